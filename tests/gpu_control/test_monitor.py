"""The deadline watcher: sleeps until the deadline it is given, re-plans when woken."""

from __future__ import annotations

import threading
import time

from gpu_control.monitor import MAX_RETRY, MAX_SLEEP, DeadlineWatcher

from .helpers import FakeClock
from .sync import SleepSpy


def test_the_watcher_calls_back_at_the_deadline_not_on_a_fixed_interval():
    calls: list[float] = []
    first = threading.Event()
    done = threading.Event()

    def due(now: float) -> float | None:
        calls.append(now)
        if len(calls) == 1:
            first.set()
            return now + 0.2
        done.set()
        return None

    watcher = DeadlineWatcher(due)
    watcher.start()
    try:
        assert first.wait(2)
        assert done.wait(2)
        assert calls[1] - calls[0] >= 0.19
        assert calls[1] - calls[0] < 0.19 + 0.5
    finally:
        watcher.stop()
    assert not watcher.running


def test_wake_makes_the_watcher_replan_before_its_deadline():
    calls: list[float] = []
    woken = threading.Event()

    def due(now: float) -> float | None:
        calls.append(now)
        if len(calls) >= 2:
            woken.set()
        return now + 3600

    watcher = DeadlineWatcher(due)
    watcher.start()
    try:
        deadline = time.monotonic() + 2
        while not calls and time.monotonic() < deadline:
            time.sleep(0.005)
        watcher.wake()
        assert woken.wait(2)
    finally:
        watcher.stop()


def test_a_failing_callback_is_logged_and_retried(caplog):
    attempts: list[int] = []
    retried = threading.Event()

    def due(now: float) -> float | None:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("probe failed")
        retried.set()
        return None

    watcher = DeadlineWatcher(due)
    watcher.start()
    try:
        assert retried.wait(3)
    finally:
        watcher.stop()
    assert "watcher's check failed" in caplog.text


def test_a_callback_that_keeps_failing_is_retried_less_and_less_often(caplog):
    clock = FakeClock()
    failures = 8

    def due(now: float) -> float | None:
        nonlocal failures
        if failures > 0:
            failures -= 1
            raise RuntimeError("probe failed")
        return None

    watcher = DeadlineWatcher(due, clock=clock)
    spy = SleepSpy()
    watcher._wake = spy
    planned: list[float | None] = []
    watcher.start()
    try:
        for _ in range(9):
            assert spy.asleep.wait(5), "the watcher never went to sleep"
            planned.append(spy.timeouts[-1])
            spy.asleep.clear()
            watcher.wake()  # stands in for the seconds it would sleep
    finally:
        watcher.stop()
    assert planned == [1, 2, 4, 8, 16, 32, MAX_RETRY, MAX_RETRY, MAX_SLEEP]
    assert "retrying in 32 s" in caplog.text


def test_start_and_stop_are_idempotent():
    watcher = DeadlineWatcher(lambda now: None)
    assert watcher.start() is True
    assert watcher.start() is False
    assert watcher.stop() is True
    assert watcher.stop() is False
