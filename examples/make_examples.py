"""Make the example inputs: portrait.jpg and speech.wav.

    python examples/make_examples.py

- portrait.jpg: scikit-image's ``astronaut`` test image (NASA, public domain), shipped inside
  the scikit-image package, saved as a 512x512 JPEG.
- speech.wav: English speech with pauses, synthesised here with espeak-ng (SSML breaks) and
  converted by sox to 16 kHz mono 16-bit PCM. Needs the Debian packages espeak-ng and sox.

The output is deterministic for a given espeak-ng version.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image
from skimage import data

HERE = Path(__file__).resolve().parent

SPEECH = """<speak>
Hello! I am a talking portrait.
<break time="900ms"/>
My mouth moves when I speak, and it stays closed in the pauses.
<break time="1200ms"/>
Upload your own photo and voice, and try it.
</speak>"""


def make_portrait(path: Path) -> None:
    """Save scikit-image's astronaut as a JPEG."""
    Image.fromarray(data.astronaut()).save(path, quality=90, optimize=True)


def make_speech(path: Path) -> None:
    """Synthesise SPEECH with espeak-ng and convert it to 16 kHz mono WAV with sox."""
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (apt-get install {tool}).")
    with tempfile.TemporaryDirectory() as folder:
        raw = Path(folder) / "raw.wav"
        subprocess.run(["espeak-ng", "-m", "-v", "en-us", "-s", "150", "-w", str(raw), SPEECH], check=True)
        subprocess.run(
            ["sox", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(path), "pad", "0.3", "0.4"],
            check=True,
        )


if __name__ == "__main__":
    make_portrait(HERE / "portrait.jpg")
    make_speech(HERE / "speech.wav")
    for name in ("portrait.jpg", "speech.wav"):
        print(f"{name}: {(HERE / name).stat().st_size} bytes")
