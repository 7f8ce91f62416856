"""``python -m gpu_control status [--share-dir DIR] [--json]``: the host-wide view of a share directory.

Like ``nvidia-smi`` or ``ollama ps``: per device the budget and the use, and every process's
holdings (model, state, size, in use, priority, idle time). Processes that have died are
cleaned up on the way. ``--json`` prints the machine-readable form other tools parse::

    {"devices": [{"device", "budget_gb", "used_gb",
                  "holders": [{"pid", "model", "state", "gb", "in_use", "priority", "idle_s"}]}]}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .share import read_share_status

SHARE_ENV = "GPU_SHARE_DIR"


def _size(gb: float | None) -> str:
    if gb is None:
        return "unknown"
    return f"{gb:.2f} GiB" if gb >= 0.1 else f"{gb * 1024:.1f} MiB"


def _table(status: dict) -> str:
    if not status["devices"]:
        return "No process shares this directory now."
    lines = []
    for device in status["devices"]:
        lines.append(f"{device['device']}: {_size(device['used_gb'])} used of {_size(device['budget_gb'])}")
        if not device["holders"]:
            lines.append("  (nothing held)")
            continue
        lines.append(
            f"  {'PID':>8}  {'MODEL':<24} {'STATE':<11} {'SIZE':>10} {'IN USE':>6} {'PRIO':>5} {'IDLE':>8}"
        )
        for h in device["holders"]:
            idle = "-" if h["idle_s"] is None else f"{h['idle_s']:.0f} s"
            lines.append(
                f"  {h['pid']:>8}  {str(h['model'])[:24]:<24} {str(h['state']):<11} {_size(h['gb']):>10} "
                f"{h['in_use']:>6} {h['priority']:>5} {idle:>8}"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for a bad directory)."""
    parser = argparse.ArgumentParser(prog="python -m gpu_control", description="gpu_control tools")
    commands = parser.add_subparsers(dest="command", required=True)
    status = commands.add_parser("status", help="what every process sharing the devices holds")
    status.add_argument("--share-dir", help=f"the share directory (default: {SHARE_ENV})")
    status.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    share_dir = args.share_dir or os.environ.get(SHARE_ENV, "").strip()
    if not share_dir:
        print(f"error: give --share-dir or set {SHARE_ENV}.", file=sys.stderr)
        return 2
    if not Path(share_dir).is_dir():
        print(f"error: the share directory {share_dir!r} does not exist.", file=sys.stderr)
        return 2
    result = read_share_status(share_dir)
    print(json.dumps(result, indent=2) if args.json else _table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
