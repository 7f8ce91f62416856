"""Command line: make talking videos from IMAGE AUDIO pairs.

    python -m pipelines portrait.jpg speech.wav -o talk.mp4
    python -m pipelines a.jpg a.wav b.png b.flac -o videos/ --size 384 --seed 7

Several pairs share one model: the manager keeps it on the device for the whole batch
(``offload_after_use=False``) and offloads it once at the end. Every input is checked before
the model is loaded. Exit status: 0 done, 2 bad input or options, 1 generation failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from gpu_control import GPUResourceManager

from . import media
from .errors import MediaError, PipelineError
from .protocol import OPTION_RANGES, GeneratedVideo, GenerateOptions, Pipeline, load_pipeline, run_pipeline
from .talking_portrait import TalkingPortrait

logger = logging.getLogger("pipelines")

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


class _BadInput(Exception):
    """An input, option or output path the user must fix (exit status 2)."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to render the help in docs/PIPELINES.md)."""

    def span(name: str) -> str:
        low, high = OPTION_RANGES[name]
        return f"{low:g}-{high:g}"

    parser = argparse.ArgumentParser(
        prog="python -m pipelines",
        description="Make talking videos from portrait + speech pairs.",
        epilog="Exit status: 0 done, 2 bad input or options, 1 generation failed.",
    )
    parser.add_argument("inputs", nargs="+", metavar="IMAGE AUDIO", help="one or more portrait/speech pairs")
    parser.add_argument(
        "-o", "--output", help="output .mp4 (one pair) or folder (several pairs); default: current folder"
    )
    parser.add_argument("--fps", type=int, metavar="N", help=f"frames per second ({span('fps')}, default 25)")
    parser.add_argument(
        "--size", type=int, metavar="PX", help=f"output long side in px ({span('size')}, default 512)"
    )
    parser.add_argument(
        "--expressiveness",
        type=float,
        metavar="X",
        help=f"mouth opening ({span('expressiveness')}, default 1)",
    )
    parser.add_argument(
        "--head-motion",
        type=float,
        metavar="X",
        help=f"head sway and nods ({span('head_motion')}, default 1)",
    )
    parser.add_argument(
        "--blinks", type=float, metavar="X", help=f"blink rate, 0 = none ({span('blinks')}, default 1)"
    )
    parser.add_argument("--seed", type=int, metavar="N", help="seed for head motion and blinks (default 0)")
    parser.add_argument(
        "--mouth",
        metavar="X,Y",
        help="mouth position as fractions of width,height (overrides face detection)",
    )
    parser.add_argument(
        "--max-audio-seconds",
        type=float,
        metavar="S",
        help="longest audio accepted (default $PIPELINE_MAX_AUDIO_SECONDS or 300)",
    )
    parser.add_argument(
        "--device", metavar="DEVICE", help="cpu, cuda or cuda:N (default: cuda when available)"
    )
    parser.add_argument(
        "--pipeline", metavar="MODULE:ATTR", help="your own pipeline instead of the built-in one"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log details (and tracebacks on failure)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        pairs = _pairs(args.inputs)
        options = GenerateOptions.from_mapping(
            {
                "fps": args.fps,
                "size": args.size,
                "expressiveness": args.expressiveness,
                "head_motion": args.head_motion,
                "blinks": args.blinks,
                "seed": args.seed,
                "mouth": args.mouth,
                "max_audio_seconds": args.max_audio_seconds,
            }
        )
        outputs = _outputs(pairs, args.output)
        pipeline: Pipeline = load_pipeline(args.pipeline) if args.pipeline else TalkingPortrait()
        for image, audio in pairs:
            media.read_image(image)
            media.read_audio(audio, max_seconds=options.max_audio_seconds)
        manager = GPUResourceManager(offload_after_use=len(pairs) == 1, device=args.device)
    except (MediaError, PipelineError, ValueError, _BadInput) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        for (image, audio), output in zip(pairs, outputs):
            pair_options = dataclasses.replace(options, output_path=str(output))
            video = _generate_one(manager, pipeline, image, audio, pair_options, args.quiet)
            _report(video)
    except MediaError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as error:
        if args.verbose:
            logger.exception("Generation failed")
        print(f"error: generation failed: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if len(pairs) > 1:
            manager.force_offload()
    return 0


def _pairs(inputs: list[str]) -> list[tuple[str, str]]:
    """Group the positional arguments into (image, audio) pairs."""
    if len(inputs) % 2:
        raise _BadInput(
            f"expected IMAGE AUDIO pairs, got an odd number of paths ({len(inputs)}); give an audio file for every image."
        )
    return [(inputs[i], inputs[i + 1]) for i in range(0, len(inputs), 2)]


def _outputs(pairs: list[tuple[str, str]], output: str | None) -> list[Path]:
    """Where each pair's video goes: the -o file, or named after the inputs in the -o folder."""
    target = Path(output) if output else Path.cwd()
    if len(pairs) == 1 and (output and target.suffix.lower() == ".mp4"):
        return [target]
    if target.suffix.lower() == ".mp4":
        raise _BadInput(f"-o {output} names one file, but {len(pairs)} pairs were given; pass a folder.")
    if target.exists() and not target.is_dir():
        raise _BadInput(f"-o {output} is a file; pass a folder (or a .mp4 name for a single pair).")
    names: list[Path] = []
    for image, audio in pairs:
        stem = f"{Path(image).stem}_{Path(audio).stem}"
        candidate, number = target / f"{stem}.mp4", 2
        while candidate in names:
            candidate, number = target / f"{stem}-{number}.mp4", number + 1
        names.append(candidate)
    return names


def _generate_one(
    manager: object, pipeline: Pipeline, image: str, audio: str, options: GenerateOptions, quiet: bool
) -> GeneratedVideo:
    """Generate one video with a progress bar."""
    label = f"{Path(image).name} + {Path(audio).name}"
    bar_format = "{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}"
    with tqdm(total=100, desc=label, disable=quiet, bar_format=bar_format) as bar:

        def progress(fraction: float, message: str) -> None:
            bar.update(max(0, round(fraction * 100) - bar.n))
            bar.set_postfix_str(message, refresh=False)

        return run_pipeline(manager, pipeline, image, audio, options, progress)


def _report(video: GeneratedVideo) -> None:
    """Print where the video went, and any notes."""
    print(f"{video.path}  ({video.duration_s:.2f} s, {video.width}x{video.height}, {video.fps} fps)")
    for note in video.notes:
        print(f"  note: {note}")


if __name__ == "__main__":
    sys.exit(main())
