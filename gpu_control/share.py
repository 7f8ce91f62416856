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
import math
import os
import secrets
import socket
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidSetting
from .security import excerpt

__all__ = ["HOLDER_STATES", "Peer", "RemoteView", "ShareLedger", "read_share_status"]

logger = logging.getLogger(__name__)

HOLDER_STATES = ("loading", "restoring", "gpu", "offloading")
"""A holder's ``state`` in the shared files and in ``python -m gpu_control status``."""

_LOCK = "ledger.lock"
_SUFFIX_STATE = ".json"
_SUFFIX_LIVE = ".lock"
_SUFFIX_INBOX = ".inbox"
_MAX_FILE = 1 << 20  # a state file past 1 MiB is not ours
_MAX_REQUEST = 4096
_MAX_REQUESTS = 256  # read per look; more wait for the next
_MAX_ITEMS = 1024
_MAX_BYTES = 1 << 60
_MAX_PRIORITY = 1_000_000

STALE_S = 5.0
"""A peer whose state file is older than this (it rewrites it every second) counts as hung:
its holdings still count, its queued requests no longer block anyone."""


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
        if not str(share_dir).strip():
            raise InvalidSetting("The share directory is empty: name a directory every process mounts.")
        self.dir = Path(share_dir)
        self.pid = os.getpid()
        self.host = socket.gethostname()
        # Containers have their own PID namespaces: the pid alone does not name a process here.
        self.id = f"{self.pid}-{secrets.token_hex(6)}"
        self._thread_lock = threading.Lock()  # flock does not exclude threads sharing one descriptor
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if not self.dir.is_dir():
                raise NotADirectoryError(20, "not a directory")
            self._ledger = _open_regular(self.dir / _LOCK)  # held for the process's life
            # Lock first, then give the lock file its name: a peer never sees it unlocked, taking it for dead.
            pending = self.dir / f".new-{self.id}"
            self._live = _open_regular(pending)
            fcntl.flock(self._live, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(pending, self.dir / f"{self.id}{_SUFFIX_LIVE}")
            self.inbox = self.dir / f"{self.id}{_SUFFIX_INBOX}"
            self.inbox.mkdir()
        except OSError as error:
            raise InvalidSetting(
                f"The share directory {excerpt(str(share_dir))} cannot be used "
                f"({error.strerror or 'refused'}): give a directory this process can write, "
                "shared by the processes that use these devices."
            ) from None
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
        if not _real_dir(inbox):
            return  # missing, or a link to somewhere else: never written through
        body = json.dumps({"model": model, "priority": priority, "from": self.id, "at": time.time()}).encode()
        with contextlib.suppress(OSError):
            _write_atomic(inbox / f"{secrets.token_hex(8)}.json", body, tmp_dir=self.dir)

    def take_requests(self) -> list[dict[str, Any]]:
        """Read and delete the eviction requests addressed to this process."""
        requests = []
        if not _real_dir(self.inbox):
            return []
        try:
            names = sorted(os.listdir(self.inbox))[:_MAX_REQUESTS]
        except OSError:
            return []
        for name in names:
            path = self.inbox / name
            data = _load_json(path, _MAX_REQUEST)
            with contextlib.suppress(OSError):
                path.unlink()
            request = _request(data)
            if request is not None:
                requests.append(request)
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
        fd = os.open(lock_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return True  # cannot tell (or a link): keep its share rather than over-commit the device
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _read_state(share_dir: Path, member: str) -> Peer:
    """A live member's state file, every field checked; anything unreadable counts as empty."""
    path = share_dir / f"{member}{_SUFFIX_STATE}"
    pid = int(member.split("-", 1)[0]) if member.split("-", 1)[0].isdigit() else -1
    if not os.path.lexists(path):
        return Peer(member, pid, "", {}, [], [])  # started, has published nothing yet
    data = _load_json(path, _MAX_FILE)
    try:
        if not isinstance(data, dict):
            raise ValueError("not an object")
        updated = data.get("updated")
        fresh = _finite(updated) and time.time() - float(updated) < STALE_S
        return Peer(
            member,
            _int(data.get("pid"), pid),
            str(data.get("host", ""))[:255],
            _budgets(data.get("budgets")),
            _sized(data.get("holders")),
            _waiters(data.get("waiters")) if fresh else [],  # a hung peer's queue blocks no one
            _sized(data.get("promised")),
        )
    except Exception:  # noqa: BLE001 - whatever is in the file, the others keep working
        logger.warning(
            "The shared state of process %s is damaged; counted as empty until it is rewritten", member
        )
        return Peer(member, pid, "", {}, [], [], [], damaged=True)


def _open_regular(path: Path) -> Any:
    """Open (creating) a regular file for the process's life, never through a link."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise IsADirectoryError(21, "not a regular file")
    return os.fdopen(fd, "r+b")


def _real_dir(path: Path) -> bool:
    """A directory itself, not a link to one."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _load_json(path: Path, limit: int) -> Any:
    """A small regular file's JSON, read without blocking or following links; None when it is not one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            return None
        raw = os.read(fd, limit + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(raw) > limit:
        return None
    try:
        return json.loads(raw)
    except Exception:  # noqa: BLE001 - malformed, too deep, too large a number: not a state
        return None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(value: Any, default: int, low: int = -(2**62), high: int = 2**62) -> int:
    """A whole number within bounds, else ``default``."""
    if not _finite(value) or not low <= value <= high:
        return default
    return int(value)


def _budgets(items: Any) -> dict[str, int]:
    if not isinstance(items, dict):
        return {}
    return {str(k)[:64]: int(v) for k, v in list(items.items())[:64] if _finite(v) and 0 < v <= _MAX_BYTES}


def _sized(items: Any) -> list[dict[str, Any]]:
    """Holdings with a device, a byte count and sane numbers; anything else in the file is dropped."""
    found = []
    for item in list(items)[:_MAX_ITEMS] if isinstance(items, list) else []:
        if not isinstance(item, dict) or not isinstance(item.get("device"), str):
            continue
        nbytes = item.get("bytes")
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or not 0 <= nbytes <= _MAX_BYTES:
            continue
        idle = item.get("idle_since")
        found.append(
            {
                "model": str(item.get("model"))[:64],
                "device": item["device"][:64],
                "bytes": nbytes,
                "state": str(item.get("state"))[:16] if item.get("state") in HOLDER_STATES else "gpu",
                "priority": _int(item.get("priority", 0), 0, -_MAX_PRIORITY, _MAX_PRIORITY),
                "in_use": _int(item.get("in_use", 0), 0, 0, 2**31),
                "idle_since": float(idle) if _finite(idle) else None,
            }
        )
    return found


def _waiters(items: Any) -> list[dict[str, Any]]:
    """Queued requests with a priority, an arrival time and a list of device names."""
    found = []
    for item in list(items)[:_MAX_ITEMS] if isinstance(items, list) else []:
        if (
            not isinstance(item, dict)
            or not _finite(item.get("arrived"))
            or not _finite(item.get("priority", 0))
        ):
            continue
        devices = item.get("devices")
        if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
            continue
        found.append(
            {
                "model": str(item.get("model"))[:64],
                "priority": _int(item.get("priority", 0), 0, -_MAX_PRIORITY, _MAX_PRIORITY),
                "devices": [d[:64] for d in devices[:64]],
                "need": _int(item.get("need", 0), 0, 0, _MAX_BYTES),
                "arrived": float(item["arrived"]),
            }
        )
    return found


def _request(data: Any) -> dict[str, Any] | None:
    """An eviction request, checked: a model name and a priority within bounds."""
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("model"), str)
        or not _finite(data.get("priority", 0))
    ):
        return None
    priority = data.get("priority", 0)
    if not -_MAX_PRIORITY <= priority <= _MAX_PRIORITY:
        return None
    at = data.get("at")
    return {
        "model": data["model"][:64],
        "priority": int(priority),
        "from": str(data.get("from"))[:64],
        "at": float(at) if _finite(at) else time.time(),
    }


def _remove_member(share_dir: Path, member: str) -> None:
    """Delete a member's files; a link is removed itself, never followed."""
    inbox = share_dir / f"{member}{_SUFFIX_INBOX}"
    if _real_dir(inbox):
        with contextlib.suppress(OSError):
            for name in os.listdir(inbox):
                with contextlib.suppress(OSError):
                    (inbox / name).unlink()
        with contextlib.suppress(OSError):
            inbox.rmdir()
    else:
        with contextlib.suppress(OSError):
            inbox.unlink()
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
