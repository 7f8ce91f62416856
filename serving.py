"""Serving the app: a uvicorn server that stops within a grace period, and partial-video clean-up.

At SIGTERM or SIGINT, `GracefulServer` takes no new jobs, lets the running one finish within
the grace period, cancels it after that, cuts open event streams (a browser tab's) and stops;
`delete_partial_videos` removes what an interrupted run left behind.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

if TYPE_CHECKING:
    from pipelines.jobs import JobGate

__all__ = ["CANCEL_WAIT_S", "PARTIAL_VIDEOS", "STREAMS_CLOSE_S", "GracefulServer", "delete_partial_videos"]

logger = logging.getLogger(__name__)

CANCEL_WAIT_S = 1.0  # how long a cancelled job gets to unwind (delete its partial file, end its lease)
STREAMS_CLOSE_S = 0.5  # how long open event streams get to finish once the jobs are over
PARTIAL_VIDEOS = ".*.part.mp4"  # what `pipelines.video.VideoWriter` writes before a video is complete


def delete_partial_videos(folder: Path) -> int:
    """Delete the partial videos (``.*.part.mp4``) that an interrupted run left in ``folder``.

    Args:
        folder: the output folder.

    Returns:
        How many files were deleted.
    """
    deleted = 0
    for path in folder.glob(PARTIAL_VIDEOS):
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as error:
            logger.warning("Could not delete the partial video %s: %s", path.name, error.strerror)
            continue
        deleted += 1
    if deleted:
        logger.info("Deleted %d partial video(s) left in %s by an interrupted run", deleted, folder)
    return deleted


class GracefulServer(uvicorn.Server):
    """uvicorn's server, stopping within a grace period whatever is still open.

    At SIGTERM or SIGINT the gate takes no new jobs; the running job gets ``grace_s``
    seconds to finish, then it is cancelled and gets `CANCEL_WAIT_S` to unwind (deleting its
    partial video, ending its lease); open event streams (a browser tab's heartbeat, an MCP
    client's SSE stream) are cut `STREAMS_CLOSE_S` after that. A second signal stops waiting.
    Unlike `uvicorn.Server`, the signal is not raised again once the server has stopped, so
    the caller's clean-up runs and the process exits with status 0.

    Args:
        config: uvicorn's configuration (its ``timeout_graceful_shutdown`` is set here).
        gate: the gate the app's jobs go through.
        grace_s: how long the running job may take to finish after the signal.
    """

    def __init__(self, config: uvicorn.Config, *, gate: JobGate, grace_s: float) -> None:
        config.timeout_graceful_shutdown = STREAMS_CLOSE_S
        super().__init__(config)
        self.gate = gate
        self.grace_s = grace_s

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Start the shutdown at the first signal; stop waiting at the next one."""
        if self.should_exit:
            self.force_exit = True
        self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Close the gate, let the running job finish or cancel it, then stop serving."""
        self.gate.close()
        running = self.gate.running
        if running and not self.force_exit:
            logger.info(
                "Shutting down: no new jobs; waiting up to %g s for %d running job(s) to finish",
                self.grace_s,
                running,
            )
        else:
            logger.info("Shutting down")
        if running and not await self._wait_idle(self.grace_s):
            logger.warning("Cancelling %d job(s) still running after %g s", self.gate.running, self.grace_s)
            self.gate.cancel()
            if await self._wait_idle(CANCEL_WAIT_S):
                logger.info("The cancelled job stopped")
            else:
                left = self.gate.running
                logger.warning("%d job(s) did not stop within %g s of being cancelled", left, CANCEL_WAIT_S)
        await self._close_streams()
        await super().shutdown(sockets=sockets)

    async def _close_streams(self) -> None:
        """Stop listening, give open responses `STREAMS_CLOSE_S` to end, then disconnect them.

        A browser tab's event stream never ends by itself; disconnecting it lets the app
        unwind as for a closed tab, where uvicorn would cancel it with a traceback.
        """
        for listener in self.servers:
            listener.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()  # idle connections close now, busy ones after their response
        deadline = time.monotonic() + STREAMS_CLOSE_S
        while self.server_state.connections and not self.force_exit and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for connection in list(self.server_state.connections):
            connection.transport.close()

    async def _wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds (less after a second signal) for the jobs to end."""
        deadline = time.monotonic() + timeout
        while self.gate.running and not self.force_exit and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self.gate.running
