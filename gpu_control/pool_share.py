"""A pool's part in a share directory: admission host-wide, publication, and eviction requests.

`GPUPool(share_dir=...)` builds a `PoolShare`. Each admission decision of the pool is then
taken under the host-wide lock with the other processes' holdings and waiters read fresh
(`schedule`), and what it admitted or promised is published before the lock is let go, so no
two processes can take the same room. A thread (``gpu-pool-share``) checks every
`SHARE_POLL_S`: it carries out the eviction requests peers sent (offload a model whose priority
is not above the requester's as soon as it is idle; until then it takes no new job, so that the
requester, which asked first, is served first), re-plans this process's waiters (room freed by a
peer, a dead peer's share), and asks peers to offload models for the first waiter that cannot
get room otherwise (idle ones first; a request is renewed every `ASK_AGAIN_S` while it waits).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from .pool_ledger import Books, Entry, EntryView, Waiter
from .share import ShareLedger

if TYPE_CHECKING:
    from .pool import GPUPool

__all__ = ["ASK_AGAIN_S", "KEEP_ASK_S", "REWRITE_S", "SHARE_POLL_S", "PoolShare"]

logger = logging.getLogger(__name__)

SHARE_POLL_S = 0.05
"""How often eviction requests are read and waiters re-plan against the other processes."""

ASK_AGAIN_S = 1.0
"""A peer that has not offloaded a model it was asked to is asked again after this long."""

KEEP_ASK_S = 2 * ASK_AGAIN_S
"""A peer's request for a model in use is kept this long (the peer renews it while it waits)."""

REWRITE_S = 1.0
"""The state file is rewritten at least this often, unchanged or not: a damaged one is mended."""


class PoolShare:
    """Joins ``pool`` to ``share_dir``; `close()` leaves it."""

    def __init__(self, pool: GPUPool, share_dir: str | os.PathLike[str]) -> None:
        self.pool = pool
        self.ledger = ShareLedger(share_dir)
        self._asked: dict[tuple[str, str], float] = {}  # (peer, model) -> when we last asked
        self._asks: dict[str, tuple[int, float]] = {}  # our model -> (a peer's priority, keep until)
        self._published: Any = None
        self._written_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-pool-share", daemon=True)
        self._thread.start()
        logger.info("GPU pool shares its devices' budgets through %s (process %s)", share_dir, self.ledger.id)

    # ------------------------------------------------------------------ under the pool's lock

    def schedule(self, books: Books) -> list[Waiter]:
        """`Books.schedule` host-wide: read the peers, decide, publish, all under the shared lock."""
        with self.ledger.locked():
            books.remote = self.ledger.remote()
            served = books.schedule()
            self.drain_asked(books)
            self.publish(books)
        self._ask_peers(books)
        return served

    def publish(self, books: Books) -> None:
        """Write what this process holds (charges and promised room) and waits for; skipped when unchanged."""
        views = books.views()
        holders = []
        for entry in books.entries:
            if entry.charge > 0 and entry.device is not None:
                holders.append(self._holder(entry, entry.device.name, entry.charge, views[id(entry)]))
        promised = [  # room granted to a waiter whose victims are leaving: taken, though not charged yet
            {"model": w.entry.name, "device": w.grant.device.name, "bytes": w.need}
            for w in books.waiters
            if w.grant is not None
        ]
        waiters = [
            {
                "model": w.entry.name,
                "priority": w.entry.priority,
                "devices": [d.name for d in books.candidates(w.entry, w.need)],
                "need": w.need,
                "arrived": w.arrived,
            }
            for w in books.waiters
            if w.grant is None
        ]
        budgets = {device.name: device.budget for device in books.devices}
        content = (
            budgets,
            [{k: v for k, v in h.items() if k != "idle_since"} for h in holders],
            waiters,
            promised,
        )
        if content == self._published and time.monotonic() - self._written_at < REWRITE_S:
            return
        self.ledger.publish(budgets, holders, waiters, promised)
        self._published = content
        self._written_at = time.monotonic()

    def _holder(self, entry: Entry, device: str, nbytes: int, view: EntryView) -> dict[str, Any]:
        slot = self.pool._slots.get(id(entry))
        return {
            "model": entry.name,
            "device": device,
            "bytes": nbytes,
            "state": view.state or "loading",
            "priority": entry.priority,
            "in_use": view.in_use,
            "idle_since": None if slot is None else slot.idle_since(view),
        }

    def _ask_peers(self, books: Books) -> None:
        """For the first waiter per device that cannot get room here, ask peers to offload idle models."""
        remote = books.remote
        if remote is None or not books.waiters:
            return
        views = books.views()
        now = time.monotonic()
        seen: set[str] = set()
        for waiter in sorted((w for w in books.waiters if w.grant is None), key=Waiter.rank):
            for device in books.candidates(waiter.entry, waiter.need):
                if device.name in seen:
                    continue
                seen.add(device.name)
                local = sum(e.charge for e in books.evictable(device, waiter.entry.priority, views))
                short = waiter.need - books.free(device) - local
                candidates = sorted(
                    (
                        (peer, held)
                        for peer, held in remote.holders(device.name)
                        if held.get("state") == "gpu"
                        and int(held.get("priority", 0)) <= waiter.entry.priority
                    ),
                    # idle ones first; a busy one is asked too: no new job, it leaves when its jobs end
                    key=lambda ph: (
                        bool(ph[1].get("in_use")),
                        int(ph[1].get("priority", 0)),
                        float(ph[1].get("idle_since") or 0.0),
                    ),
                )
                for peer, held in candidates:
                    if short <= 0:
                        break
                    short -= int(held.get("bytes", 0))
                    key = (peer.id, str(held.get("model")))
                    if now - self._asked.get(key, -ASK_AGAIN_S) >= ASK_AGAIN_S:
                        self._asked[key] = now
                        logger.info(
                            "Asking process %s to offload its idle %r for %r",
                            peer.pid,
                            held.get("model"),
                            waiter.entry.name,
                        )
                        self.ledger.ask_to_evict(peer, str(held.get("model")), waiter.entry.priority)

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        while not self._stop.wait(SHARE_POLL_S):
            try:
                now = time.monotonic()
                for request in self.ledger.take_requests():
                    self._remember(request, now)
                if len(self._asked) > 4096:  # peers come and go: forget old asks
                    self._asked.clear()
                for model, (priority, until) in list(self._asks.items()):
                    if until < now or self._answer(model, priority):
                        del self._asks[model]
                with self.pool._cond:
                    self.pool._reschedule()
            except Exception:  # keep serving the peers; the next round retries
                logger.exception("The GPU pool's share check failed")

    def _remember(self, request: dict[str, Any], now: float) -> None:
        """Keep a peer's request until it is carried out or goes stale (the peer renews it while it waits)."""
        model, priority = request["model"], request["priority"]  # checked by ShareLedger.take_requests
        known = self._asks.get(model)
        self._asks[model] = (max(priority, known[0]) if known else priority, now + KEEP_ASK_S)

    def _answer(self, model: str, priority: int) -> bool:
        """A peer wants ``model``'s room: offload it once it is idle, if its priority is not above
        the peer's. True when the request is settled (done, or nothing to do), False to keep it."""
        pool = self.pool
        with pool._cond:
            entry = pool._names.get(model)
            if entry is None or entry.priority > priority:
                return True
            view = entry.view()
            if not view.idle_on_device:
                return view.state != "gpu"  # in use: keep the request (new uses wait behind it)
            if entry.claimed:
                return False
            entry.claimed = True
        try:
            pool._evict([entry], "evicted")
        finally:
            with pool._cond:
                entry.claimed = False
        return True

    def drain_asked(self, books: Books) -> None:
        """Under the pool's lock, after `Books.schedule`: models peers asked for take no new jobs."""
        for entry in books.entries:
            asked = self._asks.get(entry.name)
            if asked is not None and entry.priority <= asked[0]:
                entry.draining = True

    def close(self) -> None:
        """Stop the thread and leave the share directory (this process's share is free at once)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(5)
        self.ledger.close()
