"""The host-wide ledger: processes and containers that mount one directory share each device's budget.

Every `GPUPool` built with ``share_dir`` takes part. The directory holds, per process:

- ``<id>.lock``: locked (``flock``, exclusive) by the process for its whole life. The kernel drops
  the lock when the process dies in any way (``kill -9``, the OOM killer, a container stop), so
  a peer that can lock it knows the owner is gone and deletes its files: its share comes back
  with no manual step.
- ``<id>.json``: what the process holds on each device (model, bytes, state, priority, in use,
  idle since) and what it waits for; rewritten atomically (write, then rename), so a reader
  never sees half a file. A file that cannot be read is logged, counted as holding nothing and
  rewritten by its owner at its next publication.
- ``<id>.inbox/``: eviction requests from peers, one small file each.

``ledger.lock`` serialises admission host-wide: a process decides, and publishes what it
admitted, under it. It is a kernel lock too, so a process dying while it holds it cannot
block the others.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidSetting

__all__ = ["HOLDER_STATES", "Peer", "RemoteView", "ShareLedger", "read_share_status"]

logger = logging.getLogger(__name__)

HOLDER_STATES = ("loading", "restoring", "gpu", "offloading")
"""A holder's ``state`` in the shared files and in ``python -m gpu_control status``."""

_LOCK = "ledger.lock"
_SUFFIX_STATE = ".json"
_SUFFIX_LIVE = ".lock"
_SUFFIX_INBOX = ".inbox"
_MAX_FILE = 1 << 20  # a state file past 1 MiB is not ours


@dataclass
class Peer:
    """Another live process in the share directory, as its state file says."""

    id: str
    pid: int
    host: str
    budgets: dict[str, int]
    holders: list[dict[str, Any]]
    waiters: list[dict[str, Any]]
    promised: list[dict[str, Any]] = field(default_factory=list)
    damaged: bool = False


@dataclass
class RemoteView:
    """What the other processes hold and want, per device name, for one admission decision."""

    used: dict[str, int] = field(default_factory=dict)
    budgets: dict[str, int] = field(default_factory=dict)  # the smallest budget a peer declares
    waiters: list[dict[str, Any]] = field(default_factory=list)
    peers: list[Peer] = field(default_factory=list)

    def holders(self, device: str) -> list[tuple[Peer, dict[str, Any]]]:
        """The peers' holdings on ``device``."""
        return [(peer, h) for peer in self.peers for h in peer.holders if h.get("device") == device]


class ShareLedger:
    """This process's membership of a share directory.

    Args:
        share_dir: the directory every taking part process mounts (created if missing).

    Raises:
        InvalidSetting: the directory cannot be created or written.
    """

    def __init__(self, share_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(share_dir)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".probe-{os.getpid()}-{secrets.token_hex(4)}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise InvalidSetting(
                f"The share directory {str(share_dir)!r} cannot be used: {error.strerror or error}."
            ) from None
        self.pid = os.getpid()
        self.host = socket.gethostname()
        # Containers have their own PID namespaces: the pid alone does not name a process here.
        self.id = f"{self.pid}-{secrets.token_hex(6)}"
        self._thread_lock = threading.Lock()  # flock does not exclude threads sharing one descriptor
        self._ledger = open(self.dir / _LOCK, "a+b")  # noqa: SIM115 - held for the process's life
        # Lock first, then give the lock file its name: a peer never sees it unlocked and takes it for dead.
        pending = self.dir / f".new-{self.id}"
        self._live = open(pending, "a+b")  # noqa: SIM115 - held for the process's life
        fcntl.flock(self._live, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(pending, self.dir / f"{self.id}{_SUFFIX_LIVE}")
        self.inbox = self.dir / f"{self.id}{_SUFFIX_INBOX}"
        self.inbox.mkdir(exist_ok=True)
        self._closed = False

    # ------------------------------------------------------------------ the lock

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the host-wide admission lock."""
        with self._thread_lock:
            fcntl.flock(self._ledger, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._ledger, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ reading

    def remote(self) -> RemoteView:
        """The other live processes' holdings and waiters; dead ones are cleaned up on the way."""
        view = RemoteView()
        for peer in read_peers(self.dir, exclude=self.id):
            view.peers.append(peer)
            for device, budget in peer.budgets.items():
                view.budgets[device] = min(budget, view.budgets.get(device, budget))
            for holder in [*peer.holders, *peer.promised]:
                device = str(holder.get("device"))
                view.used[device] = view.used.get(device, 0) + int(holder.get("bytes", 0))
            for waiter in peer.waiters:
                view.waiters.append({**waiter, "peer": peer.id, "pid": peer.pid})
        return view

    # ------------------------------------------------------------------ writing

    def publish(
        self,
        budgets: dict[str, int],
        holders: list[dict[str, Any]],
        waiters: list[dict[str, Any]],
        promised: list[dict[str, Any]] = (),  # type: ignore[assignment]
    ) -> None:
        """Write this process's state file atomically.

        ``holders`` are charged on their device; ``promised`` is room granted to a request whose
        evictions are under way (others count both; ``status`` shows the holders).
        """
        if self._closed:
            return
        body = {
            "pid": self.pid,
            "host": self.host,
            "id": self.id,
            "updated": time.time(),
            "budgets": budgets,
            "holders": holders,
            "waiters": waiters,
            "promised": list(promised),
        }
        _write_atomic(self.dir / f"{self.id}{_SUFFIX_STATE}", json.dumps(body).encode())

    def ask_to_evict(self, peer: Peer, model: str, priority: int) -> None:
        """Ask ``peer`` to offload its idle ``model`` (it checks the priority itself)."""
        inbox = self.dir / f"{peer.id}{_SUFFIX_INBOX}"
        if not inbox.is_dir():
            return
        body = json.dumps({"model": model, "priority": priority, "from": self.id, "at": time.time()}).encode()
        with contextlib.suppress(OSError):
            _write_atomic(inbox / f"{secrets.token_hex(8)}.json", body, tmp_dir=self.dir)

    def take_requests(self) -> list[dict[str, Any]]:
        """Read and delete the eviction requests addressed to this process."""
        requests = []
        try:
            names = sorted(os.listdir(self.inbox))
        except OSError:
            return []
        for name in names:
            path = self.inbox / name
            try:
                data = json.loads(path.read_bytes()[:_MAX_FILE])
            except (OSError, ValueError):
                data = None
            with contextlib.suppress(OSError):
                path.unlink()
            if isinstance(data, dict) and isinstance(data.get("model"), str):
                requests.append(data)
        return requests

    def close(self) -> None:
        """Leave the directory: delete this process's files and drop its lock."""
        if self._closed:
            return
        self._closed = True
        _remove_member(self.dir, self.id)
        with contextlib.suppress(OSError):
            fcntl.flock(self._live, fcntl.LOCK_UN)
        self._live.close()
        self._ledger.close()


# ---------------------------------------------------------------------------- shared helpers


def read_peers(share_dir: Path, *, exclude: str | None = None) -> list[Peer]:
    """Every live member of ``share_dir`` (but ``exclude``); members found dead are removed."""
    peers = []
    try:
        names = os.listdir(share_dir)
    except OSError:
        return []
    for name in names:
        if not name.endswith(_SUFFIX_LIVE) or name == _LOCK:
            continue
        member = name[: -len(_SUFFIX_LIVE)]
        if member == exclude:
            continue
        if not _alive(share_dir / name):
            logger.info("A process of the share directory has ended (%s): its share is free again", member)
            _remove_member(share_dir, member)
            continue
        peers.append(_read_state(share_dir, member))
    return peers


def _alive(lock_path: Path) -> bool:
    """Whether the owner of ``lock_path`` still holds it (a free lock means a dead owner)."""
    try:
        with open(lock_path, "a+b") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False
    except OSError:
        return True  # cannot tell: keep its share rather than over-commit the device


def _read_state(share_dir: Path, member: str) -> Peer:
    path = share_dir / f"{member}{_SUFFIX_STATE}"
    pid = int(member.split("-", 1)[0]) if member.split("-", 1)[0].isdigit() else -1
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return Peer(member, pid, "", {}, [], [])  # started, has published nothing yet
    except OSError:
        raw = b""
    try:
        data = json.loads(raw[:_MAX_FILE])
        if not isinstance(data, dict):
            raise ValueError("not an object")
        return Peer(
            member,
            int(data.get("pid", pid)),
            str(data.get("host", "")),
            {str(k): int(v) for k, v in dict(data.get("budgets") or {}).items()},
            _sized(data.get("holders")),
            [w for w in list(data.get("waiters") or []) if isinstance(w, dict) and _number(w.get("arrived"))],
            _sized(data.get("promised")),
        )
    except (ValueError, TypeError, AttributeError):
        logger.warning(
            "The shared state of process %s is damaged; counted as empty until it is rewritten", member
        )
        return Peer(member, pid, "", {}, [], [], [], damaged=True)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _sized(items: Any) -> list[dict[str, Any]]:
    """Holdings with a device name and a byte count; anything else in a damaged file is dropped."""
    return [
        item
        for item in list(items or [])
        if isinstance(item, dict)
        and isinstance(item.get("device"), str)
        and isinstance(item.get("bytes"), int)
        and item["bytes"] >= 0
        and _number(item.get("priority", 0))
        and _number(item.get("in_use", 0))
    ]


def _remove_member(share_dir: Path, member: str) -> None:
    inbox = share_dir / f"{member}{_SUFFIX_INBOX}"
    with contextlib.suppress(OSError):
        for name in os.listdir(inbox):
            with contextlib.suppress(OSError):
                (inbox / name).unlink()
    with contextlib.suppress(OSError):
        inbox.rmdir()
    for suffix in (_SUFFIX_STATE, _SUFFIX_LIVE):
        with contextlib.suppress(OSError):
            (share_dir / f"{member}{suffix}").unlink()


def _write_atomic(path: Path, data: bytes, *, tmp_dir: Path | None = None) -> None:
    tmp = (tmp_dir or path.parent) / f".tmp-{os.getpid()}-{secrets.token_hex(6)}"
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def read_share_status(share_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The host-wide view for ``python -m gpu_control status``: each device's budget, use and holders.

    Returns:
        ``{"devices": [{"device", "budget_gb", "used_gb", "holders": [{"pid", "model", "state",
        "gb", "in_use", "priority", "idle_s"}]}]}`` (GiB), devices sorted by name.
    """
    now = time.time()
    devices: dict[str, dict[str, Any]] = {}
    for peer in read_peers(Path(share_dir)):
        for device, budget in peer.budgets.items():
            entry = devices.setdefault(
                device, {"device": device, "budget_gb": None, "used_gb": 0.0, "holders": []}
            )
            gb = budget / 2**30
            entry["budget_gb"] = gb if entry["budget_gb"] is None else min(entry["budget_gb"], gb)
        for holder in peer.holders:
            device = str(holder.get("device"))
            entry = devices.setdefault(
                device, {"device": device, "budget_gb": None, "used_gb": 0.0, "holders": []}
            )
            gb = int(holder.get("bytes", 0)) / 2**30
            entry["used_gb"] += gb
            idle_since = holder.get("idle_since")
            entry["holders"].append(
                {
                    "pid": peer.pid,
                    "model": holder.get("model"),
                    "state": holder.get("state"),
                    "gb": gb,
                    "in_use": int(holder.get("in_use", 0)),
                    "priority": int(holder.get("priority", 0)),
                    "idle_s": None if idle_since is None else max(0.0, now - float(idle_since)),
                }
            )
    return {"devices": [devices[name] for name in sorted(devices)]}
