"""The one two-signal shutdown (Loop.add_shutdown_handlers) every role installs."""

from __future__ import annotations

import signal

from portunus.loop import Loop


def _deliver(loop: Loop, signum: int) -> None:
    callback, args, _previous = loop._signals[signum]
    callback(*args)


def test_first_signal_drains_and_any_later_one_forces():
    loop = Loop()
    calls = []
    try:
        loop.add_shutdown_handlers(lambda s: calls.append(("drain", s)), lambda s: calls.append(("force", s)))
        _deliver(loop, signal.SIGTERM)
        _deliver(loop, signal.SIGINT)
        _deliver(loop, signal.SIGTERM)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        loop.remove_signal_handler(signal.SIGINT)
        loop.close()
    assert calls == [("drain", "SIGTERM"), ("force", "SIGINT"), ("force", "SIGTERM")]


def test_handlers_are_put_back_on_removal():
    before = signal.getsignal(signal.SIGINT)
    loop = Loop()
    try:
        loop.add_shutdown_handlers(lambda s: None, lambda s: None)
        assert signal.getsignal(signal.SIGINT) != before
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        loop.remove_signal_handler(signal.SIGINT)
        loop.close()
    assert signal.getsignal(signal.SIGINT) == before
