"""pipelines.media: reading and checking images and audio, and writing the MP4."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
from PIL import Image

from pipelines import MediaError, media

# ------------------------------------------------------------------------------------ images


def test_read_image_returns_rgb_for_a_jpeg(example_image: Path) -> None:
    image = media.read_image(example_image)
    assert image.mode == "RGB"
    assert image.size == (512, 512)


def test_read_image_accepts_a_pil_image_and_a_pathlike(example_image: Path) -> None:
    from_pil = media.read_image(Image.open(example_image))
    from_str = media.read_image(str(example_image))
    assert np.array_equal(np.asarray(from_pil), np.asarray(from_str))


def test_read_image_applies_exif_orientation(tmp_path: Path) -> None:
    pixels = np.zeros((80, 120, 3), np.uint8)
    pixels[:, :60] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif)
    image = np.asarray(media.read_image(path))
    assert image.shape == (120, 80, 3)
    assert image[:50].mean() > 200 and image[70:].mean() < 50  # the white half is now on top


def test_read_image_flattens_transparency_onto_white(tmp_path: Path) -> None:
    path = tmp_path / "clear.png"
    Image.new("RGBA", (70, 70), (255, 0, 0, 0)).save(path)
    assert np.asarray(media.read_image(path)).min() == 255


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "I;16"])
def test_read_image_converts_other_modes_to_rgb(tmp_path: Path, mode: str) -> None:
    image = Image.new(mode, (70, 70))
    if mode == "I;16":
        image = Image.fromarray(np.full((70, 70), 40000, np.uint16))
    path = tmp_path / f"image.{'tiff' if mode in ('CMYK', 'I;16') else 'png'}"
    image.save(path)
    result = media.read_image(path)
    assert result.mode == "RGB"
    if mode == "I;16":
        assert np.asarray(result)[0, 0, 0] == 40000 // 256


def test_read_image_rejects_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="was not found"):
        media.read_image(tmp_path / "nobody.jpg")


def test_read_image_rejects_a_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture")
    with pytest.raises(MediaError, match="is not an image file that can be read; use a JPEG, PNG or WebP"):
        media.read_image(path)


def test_read_image_rejects_a_truncated_jpeg(tmp_path: Path, example_image: Path) -> None:
    path = tmp_path / "cut.jpg"
    path.write_bytes(example_image.read_bytes()[:4000])
    with pytest.raises(MediaError, match="damaged or truncated"):
        media.read_image(path)


def test_read_image_rejects_an_image_under_64_px(tmp_path: Path) -> None:
    path = tmp_path / "tiny.png"
    Image.new("RGB", (200, 63)).save(path)
    with pytest.raises(MediaError, match="200x63 px; it must be at least 64 px"):
        media.read_image(path)
    with pytest.raises(MediaError, match="at least 64 px"):
        media.read_image(Image.new("RGB", (50, 50)))


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ((4000, 300), "4000x300 px, 13.3 times as wide as it is tall; a portrait may be at most 4 times"),
        ((300, 1300), "300x1300 px, 4.3 times as tall as it is wide; a portrait may be at most 4 times"),
    ],
)
def test_read_image_rejects_a_strip_that_would_give_a_useless_video(
    tmp_path: Path, size: tuple[int, int], message: str
) -> None:
    path = tmp_path / "strip.png"
    Image.new("RGB", size, (200, 150, 120)).save(path)
    with pytest.raises(MediaError, match=f"{message}. Crop it around the face."):
        media.read_image(path)
    with pytest.raises(MediaError, match=message):
        media.read_image(Image.new("RGB", size))


def test_read_image_accepts_exactly_four_to_one(tmp_path: Path) -> None:
    path = tmp_path / "banner.png"
    Image.new("RGB", (256, 64)).save(path)
    assert media.read_image(path).size == (256, 64)
    assert media.read_image(Image.new("RGB", (64, 256))).size == (64, 256)


def test_messages_name_the_file_but_never_its_folder(tmp_path: Path, example_image: Path) -> None:
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(example_image.read_bytes()[:4000])
    text = tmp_path / "x.mp4"
    text.write_text("hello")
    long_name = tmp_path / ("n" * 200 + ".png")
    for action, name in [
        (lambda: media.read_image(tmp_path / "nobody.jpg"), "nobody.jpg"),
        (lambda: media.read_audio(tmp_path / "gone.wav"), "gone.wav"),
        (lambda: media.read_image(truncated), "cut.jpg"),
        (lambda: media.probe_video(text), "x.mp4"),
        (lambda: media.read_image(long_name), "n" * 57 + "..."),
    ]:
        with pytest.raises(MediaError) as caught:
            action()
        assert name in str(caught.value)
        assert str(tmp_path) not in str(caught.value)


def test_read_image_rejects_an_image_over_40_megapixels_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "huge.png"
    Image.new("1", (8000, 6000)).save(path)  # 48 MP, a small file
    with pytest.raises(MediaError, match="8000x6000 px \\(48 megapixels\\); the limit is 40 megapixels"):
        media.read_image(path)


# ------------------------------------------------------------------------------------ audio


def test_read_audio_mixes_an_int16_stereo_tuple_to_mono(make_speech, to_int16) -> None:
    left = make_speech([("speech", 0.5)])
    stereo = np.stack([to_int16(left), np.zeros_like(to_int16(left))], axis=1)
    audio = media.read_audio((16000, stereo))
    assert audio.sample_rate == 16000
    assert audio.samples.dtype == np.float32 and audio.samples.shape == (8000,)
    assert np.allclose(audio.samples, left / 2, atol=1e-4)


def test_read_audio_accepts_channels_first_and_uint8(make_speech) -> None:
    wave = make_speech([("speech", 0.5)])
    first = media.read_audio((16000, np.stack([wave, wave])))
    assert first.samples.shape == (8000,)
    as_uint8 = np.round(wave * 127 + 128).astype(np.uint8)
    assert np.allclose(media.read_audio((16000, as_uint8)).samples, wave, atol=0.01)


def test_read_audio_scales_down_floats_beyond_full_scale(make_speech) -> None:
    loud = make_speech([("speech", 0.5)]) * 10
    assert np.abs(media.read_audio((16000, loud)).samples).max() == pytest.approx(1.0)


def test_read_audio_resamples_on_request(short_speech: Path) -> None:
    audio = media.read_audio(short_speech, sample_rate=48000)
    assert audio.sample_rate == 48000
    assert len(audio.samples) == pytest.approx(1.8 * 48000, abs=2)


@pytest.mark.parametrize("suffix", ["flac", "ogg"])
def test_read_audio_reads_other_soundfile_formats(tmp_path: Path, make_speech, suffix: str) -> None:
    path = tmp_path / f"speech.{suffix}"
    soundfile.write(path, make_speech([("speech", 0.5)]), 16000)
    assert media.read_audio(path).duration == pytest.approx(0.5, abs=0.01)


def test_read_audio_falls_back_to_pyav_for_m4a(tmp_path: Path, make_speech) -> None:
    path = tmp_path / "voice.m4a"
    wave = make_speech([("speech", 1.0)])
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=48000)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(
            media.resample(wave, 16000, 48000)[None, :], format="fltp", layout="mono"
        )
        frame.sample_rate = 48000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    audio = media.read_audio(path)
    assert audio.sample_rate == 48000
    assert audio.duration == pytest.approx(1.0, abs=0.05)


def test_read_audio_rejects_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="Audio file .* was not found"):
        media.read_audio(tmp_path / "gone.wav")


def test_read_audio_rejects_an_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "noise.wav"
    path.write_bytes(b"RIFF....WAVEnot really" * 10)
    with pytest.raises(MediaError, match="could not be read as audio; use WAV, FLAC, OGG, MP3 or M4A"):
        media.read_audio(path)


def test_read_audio_rejects_a_file_without_audio(tmp_path: Path, example_image: Path) -> None:
    with pytest.raises(MediaError, match="has no audio track; use WAV, FLAC, OGG, MP3 or M4A"):
        media.read_audio(example_image)


def test_read_audio_rejects_empty_audio(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="is empty"):
        media.read_audio((16000, np.zeros(0, np.int16)))
    path = tmp_path / "empty.wav"
    soundfile.write(path, np.zeros(0, np.float32), 16000)
    with pytest.raises(MediaError, match="is empty"):
        media.read_audio(path)


@pytest.mark.parametrize("seconds", [0.05, 0.1, 0.499])
def test_read_audio_rejects_audio_shorter_than_half_a_second(make_speech, seconds: float) -> None:
    with pytest.raises(
        MediaError, match=f"only {seconds:.3f} s long; it must last at least 0.5 s. Record or upload"
    ):
        media.read_audio((16000, make_speech([("speech", seconds)])))


def test_read_audio_accepts_half_a_second(make_speech) -> None:
    assert media.read_audio((16000, make_speech([("speech", 0.5)]))).duration == 0.5


def test_read_audio_rejects_silent_audio() -> None:
    with pytest.raises(MediaError, match="is silent .* below -60 dBFS"):
        media.read_audio((16000, np.zeros(16000, np.int16)))
    with pytest.raises(MediaError, match="is silent"):
        media.read_audio((16000, np.full(16000, 1e-4, np.float32)))


def test_read_audio_rejects_audio_over_the_limit_without_decoding_it(
    tmp_path: Path, make_speech, monkeypatch
) -> None:
    path = tmp_path / "long.wav"
    soundfile.write(path, make_speech([("speech", 3.0)]), 16000)
    monkeypatch.setattr(soundfile, "read", lambda *a, **k: pytest.fail("decoded a file that is too long"))
    with pytest.raises(MediaError, match="3.0 s long; the limit is 2 s. Trim it, or raise the limit"):
        media.read_audio(path, max_seconds=2)


def test_read_audio_rejects_a_tuple_over_the_limit(make_speech) -> None:
    with pytest.raises(MediaError, match="PIPELINE_MAX_AUDIO_SECONDS"):
        media.read_audio((16000, make_speech([("speech", 1.5)])), max_seconds=1)


def test_read_audio_rejects_invalid_samples() -> None:
    samples = np.full(16000, 0.5, np.float32)
    samples[10] = np.nan
    with pytest.raises(MediaError, match="NaN or infinite"):
        media.read_audio((16000, samples))


@pytest.mark.parametrize(
    ("audio", "message"),
    [
        ((16000,), "must be \\(sample_rate, samples\\)"),
        ((np.zeros(100), 16000), "in that order"),
        ((0, np.zeros(16000)), "sample rate 0 is not valid"),
        ((16000.5, np.zeros(16000)), "sample rate 16000.5 is not valid"),
        ((16000, np.zeros((2, 2, 16000))), "expected \\(samples,\\) or \\(samples, channels\\)"),
        ((16000, np.array(["a"] * 16000)), "use integer or float samples"),
    ],
)
def test_read_audio_rejects_malformed_tuples(audio: tuple, message: str) -> None:
    with pytest.raises(MediaError, match=message):
        media.read_audio(audio)


# ------------------------------------------------------------------------------------ writing


def _write(path: Path, frames: int = 10, fps: int = 25, seconds: float = 0.4, **kwargs) -> Path:
    with media.VideoWriter(path, width=96, height=64, fps=fps, **kwargs) as writer:
        for index in range(frames):
            writer.write_frame(np.full((64, 96, 3), index * 20, np.uint8))
        if kwargs.get("audio_rate", media.OUTPUT_AUDIO_RATE):
            t = np.arange(int(seconds * 48000)) / 48000
            writer.write_audio((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32))
    return path


def test_video_writer_writes_h264_yuv420p_with_aac(tmp_path: Path) -> None:
    info = media.probe_video(_write(tmp_path / "clip.mp4"))
    assert (info.video_codec, info.pix_fmt, info.audio_codec) == ("h264", "yuv420p", "aac")
    assert (info.width, info.height, info.frames, info.fps) == (96, 64, 10, 25)
    assert info.duration_s == pytest.approx(0.4)
    assert info.audio_duration_s == pytest.approx(0.4, abs=0.001)


def test_video_writer_puts_the_index_first_for_browsers(tmp_path: Path) -> None:
    data = _write(tmp_path / "clip.mp4").read_bytes()
    assert 0 < data.find(b"moov") < data.find(b"mdat")


def test_video_writer_tags_bt709_limited_range(tmp_path: Path) -> None:
    with av.open(str(_write(tmp_path / "clip.mp4"))) as container:
        context = container.streams.video[0].codec_context
        assert (context.colorspace, context.color_range) == (1, 1)


def test_video_writer_accepts_yuv420p_frames(tmp_path: Path) -> None:
    path = tmp_path / "yuv.mp4"
    with media.VideoWriter(path, width=64, height=64, fps=10, audio_rate=None) as writer:
        plane = np.full((96, 64), 128, np.uint8)
        plane[:64] = 200
        writer.write_frame(plane)
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
        assert frame.format.name == "yuv420p"
        luma = frame.to_ndarray()[:64]
    assert abs(float(luma.mean()) - 200) <= 1
    assert media.probe_video(path).audio_codec is None


def test_video_writer_leaves_nothing_behind_when_the_block_fails(tmp_path: Path) -> None:
    path = tmp_path / "out" / "broken.mp4"
    with (
        pytest.raises(RuntimeError, match="renderer crashed"),
        media.VideoWriter(path, width=64, height=64, fps=10) as writer,
    ):
        writer.write_frame(np.zeros((64, 64, 3), np.uint8))
        raise RuntimeError("renderer crashed")
    assert list(path.parent.iterdir()) == []


def test_video_writer_deletes_a_partial_file_already_on_disk_when_the_block_fails(tmp_path: Path) -> None:
    path = tmp_path / "cancelled.mp4"
    with (
        pytest.raises(RuntimeError, match="cancelled"),
        media.VideoWriter(path, width=64, height=64, fps=10) as writer,
    ):
        for index in range(500):
            writer.write_frame(np.full((64, 64, 3), index % 256, np.uint8))
            if list(tmp_path.glob(".cancelled.*.part.mp4")):
                break
        assert [p.name.endswith(".part.mp4") for p in tmp_path.iterdir()] == [True]
        raise RuntimeError("cancelled")
    assert list(tmp_path.iterdir()) == []


def test_video_writer_rejects_odd_sizes_and_wrong_frames(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="positive and even"):
        media.VideoWriter(tmp_path / "odd.mp4", width=65, height=64, fps=10)
    with (
        pytest.raises(ValueError, match="does not match the video"),
        media.VideoWriter(tmp_path / "shape.mp4", width=64, height=64, fps=10) as writer,
    ):
        writer.write_frame(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="one of \\(44100, 48000\\)"):
        media.VideoWriter(tmp_path / "rate.mp4", width=64, height=64, fps=10, audio_rate=16000)


def test_probe_video_rejects_files_without_video(tmp_path: Path, short_speech: Path) -> None:
    with pytest.raises(MediaError, match="no video stream"):
        media.probe_video(short_speech)
    text = tmp_path / "x.mp4"
    text.write_text("hello")
    with pytest.raises(MediaError, match="not a readable video"):
        media.probe_video(text)


def test_prune_videos_deletes_only_old_matching_files(tmp_path: Path) -> None:
    import os
    import time

    old = tmp_path / "talking-old.mp4"
    new = tmp_path / "talking-new.mp4"
    other = tmp_path / "keep-me.mp4"
    for path in (old, new, other):
        path.write_bytes(b"x")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    os.utime(other, (two_hours_ago, two_hours_ago))
    assert media.prune_videos(tmp_path, max_age_s=3600, pattern="talking-*.mp4") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep-me.mp4", "talking-new.mp4"]
