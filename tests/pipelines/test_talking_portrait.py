"""pipelines.talking_portrait: layout, motion and the rendered video."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import GeneratedVideo, GenerateOptions, MediaError, TalkingPortrait, media, run_pipeline
from pipelines.talking_portrait import (
    NOTE_MANUAL,
    NOTE_NO_EYES,
    NOTE_NO_FACE,
    PortraitAnimator,
    frame_features,
    locate_face,
    motion_tracks,
)

FPS = 25


def _tracks(samples: np.ndarray, **options: object):
    """Motion tracks for 16 kHz samples at 25 fps."""
    model = PortraitAnimator()
    energies = model.band_energies(torch.from_numpy(samples)).double().numpy()
    frames = round(len(samples) / 16000 * FPS)
    return motion_tracks(frame_features(energies, frames, FPS), FPS, GenerateOptions(**options))


def _generate(image: object, audio: object, path: Path, **options: object) -> GeneratedVideo:
    pipeline = TalkingPortrait()
    return pipeline.generate(
        pipeline.load(), image, audio, GenerateOptions(output_path=str(path), **options), None
    )


# ------------------------------------------------------------------------------------ layout


def test_locate_face_finds_the_example_face(example_image: Path) -> None:
    layout, notes = locate_face(media.read_image(example_image))
    x, y, w, _ = layout.face
    assert notes == [] and layout.source == "detected"
    assert 170 <= x <= 190 and 60 <= y <= 80 and 80 <= w <= 105  # the astronaut's face
    mouth_x, mouth_y = layout.mouth
    assert x + 0.3 * w < mouth_x < x + 0.7 * w and 135 <= mouth_y <= 150  # her lips are at y ~ 142
    assert layout.eyes is not None
    for eye_x, eye_y in layout.eyes:
        assert 95 <= eye_y <= 106  # pupils at y ~ 101
    assert layout.eyes[0][0] < mouth_x < layout.eyes[1][0]


def test_locate_face_scales_with_the_image(example_image: Path) -> None:
    image = media.read_image(example_image)
    big, _ = locate_face(image)
    small, _ = locate_face(image.resize((256, 256)))
    assert small.mouth[0] == pytest.approx(big.mouth[0] / 2, abs=4)
    assert small.mouth[1] == pytest.approx(big.mouth[1] / 2, abs=4)


def test_locate_face_falls_back_to_the_lower_centre_and_says_so() -> None:
    gradient = np.tile(np.linspace(40, 220, 300, dtype=np.uint8)[:, None, None], (1, 200, 3))
    layout, notes = locate_face(Image.fromarray(gradient))
    assert layout.source == "fallback"
    assert layout.mouth == pytest.approx((100, 186))
    assert layout.eyes is None
    assert notes == [NOTE_NO_FACE, NOTE_NO_EYES]


def test_a_manual_mouth_inside_the_face_keeps_the_eyes(example_image: Path) -> None:
    layout, notes = locate_face(media.read_image(example_image), mouth=(0.45, 0.3))
    assert layout.source == "manual" and notes == [NOTE_MANUAL]
    assert layout.mouth == pytest.approx((0.45 * 512, 0.3 * 512))
    assert layout.eyes is not None


def test_a_manual_mouth_away_from_any_face_turns_blinking_off(example_image: Path) -> None:
    layout, notes = locate_face(media.read_image(example_image), mouth=(0.8, 0.9))
    assert layout.mouth == pytest.approx((0.8 * 512, 0.9 * 512))
    assert layout.eyes is None and notes == [NOTE_MANUAL, NOTE_NO_EYES]


# ------------------------------------------------------------------------------------ motion


def test_the_mouth_is_shut_in_pauses_and_open_in_speech(make_speech) -> None:
    tracks = _tracks(make_speech([("pause", 0.6), ("speech", 1.0), ("pause", 1.0)]))
    assert np.all(tracks.openness[:15] == 0.0)  # the first 0.6 s
    assert np.all(tracks.openness[45:] == 0.0)  # 0.2 s after the speech ends, to the end
    assert tracks.openness[15:40].max() > 0.6


def test_the_mouth_follows_the_syllables(make_speech) -> None:
    tracks = _tracks(make_speech([("speech", 2.0)]))
    spectrum = np.abs(np.fft.rfft(tracks.openness - tracks.openness.mean()))
    frequencies = np.fft.rfftfreq(len(tracks.openness), 1 / FPS)
    assert frequencies[np.argmax(spectrum)] == pytest.approx(4.0, abs=0.5)  # the test signal's 4 Hz syllables


def test_expressiveness_scales_the_opening(make_speech) -> None:
    speech = make_speech([("pause", 0.3), ("speech", 1.0)])
    normal, double, none = (_tracks(speech, expressiveness=e).openness for e in (1.0, 2.0, 0.0))
    assert np.allclose(double, 2 * normal) and not none.any()


def test_tracks_are_repeatable_for_a_seed_and_differ_between_seeds(make_speech) -> None:
    speech = make_speech([("speech", 3.0), ("pause", 3.0)])
    first, again, other = _tracks(speech, seed=3), _tracks(speech, seed=3), _tracks(speech, seed=4)
    for field in ("angle", "shift_x", "shift_y", "scale", "blink"):
        assert np.array_equal(getattr(first, field), getattr(again, field))
    assert not np.allclose(first.angle, other.angle)
    assert np.array_equal(first.openness, other.openness)  # the mouth follows the audio only


def test_head_motion_and_blinks_can_be_turned_off(make_speech) -> None:
    speech = make_speech([("speech", 4.0), ("pause", 4.0)])
    still = _tracks(speech, head_motion=0.0, blinks=0.0)
    assert not still.angle.any() and not still.shift_x.any() and not still.shift_y.any()
    assert np.all(still.scale == 1.0) and not still.blink.any()
    lively = _tracks(speech, head_motion=2.0, blinks=3.0)
    assert np.abs(lively.angle).max() > np.radians(0.5)
    assert lively.blink.max() == pytest.approx(1.0, abs=0.2)


def test_blink_rate_follows_the_option() -> None:
    thirty_seconds = np.zeros(16000 * 30, np.float32)
    counts = {}
    for rate in (0.5, 2.0):
        closed = _tracks(thirty_seconds, blinks=rate).blink > 0.5
        counts[rate] = int(np.sum(closed[1:] & ~closed[:-1]))
    assert 2 <= counts[0.5] <= 8 and 10 <= counts[2.0] <= 22  # ~4 s / rate between blinks over 30 s


# ------------------------------------------------------------------------------------ video


def test_generate_writes_a_browser_ready_video_as_long_as_the_audio(
    example_image: Path, short_speech: Path, tmp_path: Path
) -> None:
    video = _generate(example_image, short_speech, tmp_path / "v.mp4", size=128)
    info = media.probe_video(video.path)
    assert (info.video_codec, info.pix_fmt, info.audio_codec) == ("h264", "yuv420p", "aac")
    assert (video.width, video.height, info.width, info.height) == (128, 128, 128, 128)
    assert video.frames == info.frames == 45 and video.fps == FPS
    assert abs(info.duration_s - 1.8) <= 1 / FPS
    assert abs(info.audio_duration_s - 1.8) <= 1 / FPS
    assert video.notes == ()
    assert set(video.timings) == {"read", "analyse", "render", "encode"}


@pytest.mark.parametrize(("seconds", "fps"), [(1.03, 25), (0.77, 30), (2.5, 12)])
def test_video_duration_matches_odd_audio_lengths_within_a_frame(
    example_image: Path, make_speech, tmp_path: Path, seconds: float, fps: int
) -> None:
    audio = (16000, make_speech([("speech", seconds)]))
    info = media.probe_video(_generate(example_image, audio, tmp_path / "v.mp4", size=64, fps=fps).path)
    assert abs(info.duration_s - seconds) <= 1 / fps
    assert abs(info.audio_duration_s - seconds) <= 1 / fps


def test_output_keeps_the_aspect_ratio_with_even_sides(
    example_image: Path, short_speech: Path, tmp_path: Path
) -> None:
    wide = Image.open(example_image).crop((0, 100, 512, 441))  # 512 x 341
    video = _generate(wide, short_speech, tmp_path / "v.mp4", size=201)
    assert (video.width, video.height) == (200, 134)


def test_silence_keeps_the_mouth_closed_and_speech_moves_it(
    example_image: Path, make_speech, tmp_path: Path, decode
) -> None:
    audio = (16000, make_speech([("pause", 0.6), ("speech", 1.0), ("pause", 1.0)]))
    video = _generate(example_image, audio, tmp_path / "v.mp4", size=256, head_motion=0.0, blinks=0.0)
    frames = decode(video.path)
    layout, _ = locate_face(media.read_image(example_image))
    layout = layout.scaled(0.5)
    mx, my, mw, fh = *layout.mouth, layout.mouth_half_width, layout.face_height
    mouth = frames[:, int(my - 0.1 * fh) : int(my + 0.25 * fh), int(mx - 1.3 * mw) : int(mx + 1.3 * mw)]
    from_rest = np.abs(mouth - mouth[0]).mean(axis=(1, 2))
    step = np.abs(np.diff(mouth, axis=0)).mean(axis=(1, 2))
    assert from_rest[:15].max() < 0.5  # still and closed before the speech
    assert from_rest[15:40].max() > 15.0  # open while speaking
    assert step[45:].max() < 0.5  # still from 0.2 s after the speech ...
    assert from_rest[45:].max() < 0.15 * from_rest[15:40].max()  # ... and closed again (up to H.264 noise)


def test_generate_is_deterministic_for_a_seed(
    example_image: Path, short_speech: Path, tmp_path: Path, decode
) -> None:
    first = decode(_generate(example_image, short_speech, tmp_path / "a.mp4", size=128, seed=5).path)
    again = decode(_generate(example_image, short_speech, tmp_path / "b.mp4", size=128, seed=5).path)
    other = decode(_generate(example_image, short_speech, tmp_path / "c.mp4", size=128, seed=6).path)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_generate_reports_a_missing_face_in_its_notes(short_speech: Path, tmp_path: Path) -> None:
    wall = Image.fromarray(np.tile(np.linspace(60, 200, 160, dtype=np.uint8)[:, None, None], (1, 120, 3)))
    video = _generate(wall, short_speech, tmp_path / "v.mp4", size=128)
    assert video.notes == (NOTE_NO_FACE, NOTE_NO_EYES)


def test_generate_takes_gradio_numpy_audio(
    example_image: Path, make_speech, to_int16, tmp_path: Path
) -> None:
    stereo = np.stack([to_int16(make_speech([("speech", 1.5)]))] * 2, axis=1)
    video = _generate(example_image, (44100, stereo), tmp_path / "v.mp4", size=64)
    assert video.duration_s == pytest.approx(24000 / 44100, abs=1 / FPS)


def test_generate_rejects_bad_inputs(example_image: Path, tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="is silent"):
        _generate(example_image, (16000, np.zeros(16000, np.int16)), tmp_path / "v.mp4", size=64)
    assert not (tmp_path / "v.mp4").exists()


def test_generate_needs_its_own_model(example_image: Path, short_speech: Path) -> None:
    with pytest.raises(TypeError, match="needs the PortraitAnimator its load\\(\\) returns, got Linear"):
        TalkingPortrait().generate(
            torch.nn.Linear(2, 2), example_image, short_speech, GenerateOptions(), None
        )


def test_lip_sync_on_the_example_clip(
    example_image: Path, example_audio: Path, tmp_path: Path, decode
) -> None:
    """The mouth moves with the loudness; the forehead barely moves.

    The mouth's frame-to-frame change is the speed of its opening, which peaks at syllable
    onsets and offsets rather than at each 40 ms frame's loudness, so both are compared as
    activity over syllable-length windows (0.2 s).
    """
    video = _generate(example_image, example_audio, tmp_path / "v.mp4", size=256)
    audio = media.read_audio(example_audio)
    assert abs(video.duration_s - audio.duration) <= 1 / FPS
    frames = decode(video.path)
    layout, _ = locate_face(media.read_image(example_image))
    layout = layout.scaled(0.5)
    (mx, my), mw = layout.mouth, layout.mouth_half_width
    fx, fy, fw, fh = layout.face
    mouth = frames[:, int(my - 0.1 * fh) : int(my + 0.25 * fh), int(mx - 1.3 * mw) : int(mx + 1.3 * mw)]
    forehead = frames[:, int(fy - 0.05 * fh) : int(fy + 0.15 * fh), int(fx + 0.25 * fw) : int(fx + 0.75 * fw)]
    mouth_change = np.abs(np.diff(mouth, axis=0)).mean(axis=(1, 2))
    forehead_change = np.abs(np.diff(forehead, axis=0)).mean(axis=(1, 2))
    hop = audio.sample_rate / FPS
    loudness = np.array(
        [
            np.sqrt(np.mean(audio.samples[int(i * hop) : int((i + 1) * hop)] ** 2))
            for i in range(1, len(frames))
        ]
    )
    window = np.ones(5) / 5
    pearson = np.corrcoef(np.convolve(mouth_change, window, "valid"), np.convolve(loudness, window, "valid"))[
        0, 1
    ]
    assert pearson >= 0.6
    assert forehead_change.mean() < 0.25 * mouth_change.mean()


@pytest.mark.gpu
def test_generate_runs_on_the_device_the_manager_chose(
    example_image: Path, short_speech: Path, tmp_path: Path, decode
) -> None:
    from gpu_control import GPUResourceManager

    manager = GPUResourceManager(device="cuda")
    pipeline = TalkingPortrait()
    seen = []
    original = pipeline.generate

    def spy(model, *args):
        seen.append(model.device.type)
        return original(model, *args)

    pipeline.generate = spy  # type: ignore[method-assign]
    try:
        gpu = run_pipeline(
            manager,
            pipeline,
            example_image,
            short_speech,
            GenerateOptions(size=128, output_path=str(tmp_path / "g.mp4")),
        )
    finally:
        manager.force_release()
        manager.stop_monitor()
    cpu = _generate(example_image, short_speech, tmp_path / "c.mp4", size=128)
    assert seen == ["cuda"]
    assert gpu.frames == cpu.frames
    assert np.abs(decode(gpu.path) - decode(cpu.path)).mean() < 1.0


def test_a_clip_longer_than_the_limit_is_refused(
    example_image: Path, example_audio: Path, tmp_path: Path
) -> None:
    with pytest.raises(MediaError, match="the limit is 5 s"):
        _generate(example_image, example_audio, tmp_path / "v.mp4", size=64, max_audio_seconds=5)
