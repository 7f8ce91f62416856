"""A process taking part in a share directory, driven line by line by the cross-process tests.

    python -m tests.gpu_control.share_worker SHARE_DIR NAME MIB [--budget-mib N] [--priority P]
        [--wait S] [--slow-restore S] [--keep]

Commands on stdin, one per line; one JSON answer per command on stdout:
``use`` (take a lease and let it go), ``hold`` / ``unhold`` (keep a lease), ``offload``,
``status`` (the pool's status), ``quit``. The first line written is ``{"ready": pid}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

import torch
from torch import nn

from gpu_control import GPUPool
from gpu_control.weights import attach


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("share_dir")
    parser.add_argument("name")
    parser.add_argument("mib", type=int)
    parser.add_argument("--budget-mib", type=float, default=3)
    parser.add_argument("--priority", type=int, default=0)
    parser.add_argument("--wait", type=float, default=20)
    parser.add_argument("--slow-restore", type=float, default=0)
    parser.add_argument("--keep", action="store_true", help="stay on the device after use (until asked)")
    args = parser.parse_args()

    def load() -> nn.Module:
        return nn.Linear(1024, 256 * args.mib, bias=False)

    def engine(model: Any, device: torch.device, **kwargs: Any) -> Any:
        weights = attach(model, device, **kwargs)
        real = weights.to_device

        def to_device() -> Any:
            if args.slow_restore:
                print(json.dumps({"restoring": True}), flush=True)
                time.sleep(args.slow_restore)
            return real()

        weights.to_device = to_device
        return weights

    pool = GPUPool(
        devices=["emulated:0"],
        budget_gb=args.budget_mib / 1024,
        wait_timeout=args.wait,
        share_dir=args.share_dir,
    )
    manager = pool.add(
        args.name,
        load,
        priority=args.priority,
        idle_timeout=float("inf"),
        offload_after_use=not args.keep,
        engine=engine,
    )
    release = threading.Event()
    holding = threading.Event()

    def hold() -> None:
        with manager.use():
            holding.set()
            release.wait()

    print(json.dumps({"ready": pool._share.ledger.pid}), flush=True)
    for line in sys.stdin:
        command = line.strip()
        start = time.monotonic()
        try:
            if command == "use":
                with manager.use() as model:
                    model(torch.ones(1, 1024))
                answer: dict[str, Any] = {"ok": True}
            elif command == "hold":
                release.clear()
                holding.clear()
                threading.Thread(target=hold, daemon=True).start()
                holding.wait()
                answer = {"ok": True}
            elif command == "unhold":
                release.set()
                answer = {"ok": True}
            elif command == "offload":
                answer = {"ok": True, "message": manager.force_offload().message}
            elif command == "status":
                answer = {"ok": True, "status": pool.get_status()}
            elif command == "quit":
                break
            else:
                answer = {"ok": False, "error": f"unknown command {command!r}"}
        except Exception as error:  # the test reads the sentence
            answer = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        answer["seconds"] = time.monotonic() - start
        print(json.dumps(answer, default=str), flush=True)
    pool.close()


if __name__ == "__main__":
    main()
