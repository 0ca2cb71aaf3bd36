"""``hotreload watch``'s signal handler (``publisher.cli.watch.Stopper``): the first SIGTERM
or SIGINT asks the daemon to stop; one more while it is still stopping writes every thread's
stack to stderr, so a daemon that does not stop shows where it waits before its SIGKILL."""

from __future__ import annotations

import logging
import signal
import threading

import pytest

from publisher.cli.watch import Stopper


def test_the_first_signal_stops_and_the_next_shows_every_thread_s_stack(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    stop = threading.Event()
    parked = threading.Event()
    waiter = threading.Thread(target=parked.wait, name="parked-waiter", daemon=True)
    waiter.start()
    stopper = Stopper(stop.set)
    caplog.set_level(logging.INFO, logger="publisher.cli.watch")
    try:
        stopper(signal.SIGTERM, None)
        assert stop.is_set()
        assert "SIGTERM received, stopping" in caplog.text
        assert "most recent call first" not in capfd.readouterr().err  # no stacks yet

        stopper(signal.SIGINT, None)
        err = capfd.readouterr().err
        assert "SIGINT received again, still stopping" in caplog.text
        # faulthandler's dump: this thread (in this very test) and the parked one
        assert err.count("most recent call first") >= 2
        assert "test_the_first_signal_stops_and_the_next_shows_every_thread_s_stack" in err
        assert "in wait" in err  # the parked thread, where it waits
        stopper(signal.SIGTERM, None)  # and again: never exits by itself
        assert "most recent call first" in capfd.readouterr().err
    finally:
        parked.set()
        waiter.join(5)
