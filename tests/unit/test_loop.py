"""The epoll reactor, driven with real socketpairs, pipes, threads and signals."""

from __future__ import annotations

import io
import json
import os
import select
import signal
import socket
import threading

import pytest

from portunus.log import log as process_log
from portunus.loop import Loop
from epoll_record import CountingEpoll

pytestmark = pytest.mark.timeout(10)

# Generous upper bound for run_until: only hit when the behaviour under test is broken.
WAIT = 2.0


@pytest.fixture
def loop():
    lp = Loop()
    yield lp
    lp.close()


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def loop_log(monkeypatch):
    """Capture what the loop logs (it uses the process-wide logger)."""
    buf = io.StringIO()
    monkeypatch.setattr(process_log, "stream", buf)
    monkeypatch.setattr(process_log, "fmt", "json")
    return buf


def spin(loop: Loop, turns_for: float = 0.05) -> None:
    """Run the loop for a short while with nothing to wait for (for 'did not happen' checks)."""
    assert loop.run_until(lambda: False, turns_for) is False


def log_events(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def open_fds() -> set[int]:
    """Open descriptor numbers, found without opening one (as listing /proc/self/fd would)."""
    found = set()
    for n in range(os.sysconf("SC_OPEN_MAX") if os.sysconf("SC_OPEN_MAX") < 4096 else 4096):
        try:
            os.fstat(n)
        except OSError:
            continue
        found.add(n)
    return found


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


# ---------------------------------------------------------------- readers


def test_reader_fires_when_data_arrives_and_reads_it(loop, pair):
    a, b = pair
    got = []
    loop.add_reader(a, lambda: got.append(a.recv(100)))
    b.send(b"hello")
    assert loop.run_until(lambda: got, WAIT)
    assert got == [b"hello"]


def test_reader_does_not_fire_without_data(loop, pair):
    a, _b = pair
    calls = []
    loop.add_reader(a, lambda: calls.append(1))
    spin(loop)
    assert calls == []


def test_reader_accepts_a_raw_fd_as_well_as_a_socket(loop):
    r, w = os.pipe()
    try:
        got = []
        loop.add_reader(r, lambda: got.append(os.read(r, 10)))
        os.write(w, b"xyz")
        assert loop.run_until(lambda: got, WAIT)
        assert got == [b"xyz"]
    finally:
        loop.forget(r)
        os.close(r)
        os.close(w)


def test_reader_sees_eof_when_peer_closes(loop, pair):
    a, b = pair
    got = []

    def on_read():
        data = a.recv(100)
        got.append(data)
        if not data:
            loop.remove_reader(a)

    loop.add_reader(a, on_read)
    b.send(b"x")
    b.close()
    assert loop.run_until(lambda: got and got[-1] == b"", WAIT)
    assert b"".join(got) == b"x"


def test_remove_reader_stops_callbacks_even_with_data_pending(loop, pair):
    a, b = pair
    calls = []
    loop.add_reader(a, lambda: calls.append(1))  # never reads: level-triggered, would fire forever
    b.send(b"pending")
    assert loop.run_until(lambda: calls, WAIT)
    assert loop.remove_reader(a) is True
    seen = len(calls)
    spin(loop)
    assert len(calls) == seen
    assert a.recv(100) == b"pending"  # the loop never consumed it


def test_remove_reader_without_a_reader_returns_false(loop, pair):
    a, _b = pair
    assert loop.remove_reader(a) is False
    loop.add_writer(a, lambda: None)
    assert loop.remove_reader(a) is False  # a writer is not a reader
    loop.remove_writer(a)


def test_replacing_the_reader_callback_takes_effect(loop, pair):
    a, b = pair
    first, second = [], []
    loop.add_reader(a, lambda: first.append(a.recv(100)))
    loop.add_reader(a, lambda: second.append(a.recv(100)))
    b.send(b"data")
    assert loop.run_until(lambda: second, WAIT)
    assert first == []
    assert second == [b"data"]


def test_readers_on_two_fds_are_independent(loop):
    p1 = socket.socketpair()
    p2 = socket.socketpair()
    try:
        got = {}
        loop.add_reader(p1[0], lambda: got.setdefault("one", p1[0].recv(10)))
        loop.add_reader(p2[0], lambda: got.setdefault("two", p2[0].recv(10)))
        p2[1].send(b"2")
        assert loop.run_until(lambda: "two" in got, WAIT)
        assert "one" not in got
        p1[1].send(b"1")
        assert loop.run_until(lambda: "one" in got, WAIT)
        assert got == {"one": b"1", "two": b"2"}
    finally:
        for s in (*p1, *p2):
            loop.forget(s)
            s.close()


# ---------------------------------------------------------------- writers


def test_writer_fires_on_a_writable_socket_and_delivers(loop, pair):
    a, b = pair
    sent = []

    def on_writable():
        sent.append(a.send(b"ping"))
        loop.remove_writer(a)

    loop.add_writer(a, on_writable)
    assert loop.run_until(lambda: sent, WAIT)
    assert sent == [4]
    assert b.recv(10) == b"ping"


def test_remove_writer_stops_writable_callbacks(loop, pair):
    a, _b = pair
    calls = []
    loop.add_writer(a, lambda: calls.append(1))
    assert loop.run_until(lambda: len(calls) >= 2, WAIT)  # level-triggered: keeps firing
    assert loop.remove_writer(a) is True
    seen = len(calls)
    spin(loop)
    assert len(calls) == seen
    assert loop.remove_writer(a) is False


def test_writer_waits_for_back_pressure_to_clear(loop, pair):
    a, b = pair
    # Fill a's send path until the kernel refuses more.
    chunk = b"x" * 65536
    queued = 0
    while True:
        try:
            queued += a.send(chunk)
        except BlockingIOError:
            break
    calls = []
    loop.add_writer(a, lambda: calls.append(1))
    spin(loop)
    assert calls == []  # full: not writable
    drained = 0
    while drained < queued:  # the peer reads everything
        try:
            drained += len(b.recv(1 << 20))
        except BlockingIOError:
            break
    assert loop.run_until(lambda: calls, WAIT)
    loop.remove_writer(a)


def test_reader_and_writer_on_one_fd_are_removed_separately(loop, pair):
    a, b = pair
    reads, writes = [], []
    loop.add_reader(a, lambda: reads.append(a.recv(100)))
    loop.add_writer(a, lambda: writes.append(1))
    assert loop.run_until(lambda: writes, WAIT)

    assert loop.remove_writer(a) is True
    b.send(b"still reading")
    assert loop.run_until(lambda: reads, WAIT)
    assert reads == [b"still reading"]
    seen_writes = len(writes)
    spin(loop)
    assert len(writes) == seen_writes

    loop.add_writer(a, lambda: writes.append(2))
    assert loop.remove_reader(a) is True
    assert loop.run_until(lambda: 2 in writes, WAIT)
    b.send(b"ignored")
    seen_reads = len(reads)
    spin(loop)
    assert len(reads) == seen_reads
    loop.remove_writer(a)


def test_watched_fds_counts_interests_and_drops_to_baseline(loop, pair):
    a, b = pair
    base = loop.watched_fds()
    loop.add_reader(a, lambda: None)
    loop.add_writer(a, lambda: None)
    assert loop.watched_fds() == base + 1  # one fd, two interests
    loop.add_reader(b, lambda: None)
    assert loop.watched_fds() == base + 2
    loop.remove_reader(a)
    assert loop.watched_fds() == base + 2  # still a writer on a
    loop.remove_writer(a)
    assert loop.watched_fds() == base + 1
    loop.forget(b)
    assert loop.watched_fds() == base


# ---------------------------------------------------------------- forget


def test_forget_drops_both_interests(loop, pair):
    a, b = pair
    base = loop.watched_fds()
    calls = []
    loop.add_reader(a, lambda: calls.append("r"))
    loop.add_writer(a, lambda: calls.append("w"))
    loop.forget(a)
    assert loop.watched_fds() == base
    b.send(b"data")
    spin(loop)
    assert calls == []
    assert loop.remove_reader(a) is False
    assert loop.remove_writer(a) is False


def test_forget_of_an_unknown_or_negative_fd_is_harmless(loop, pair):
    a, _b = pair
    base = loop.watched_fds()
    loop.forget(a)
    loop.forget(-1)
    assert loop.watched_fds() == base


def test_forget_inside_a_callback_suppresses_an_already_fetched_event():
    """Both fds are ready in the same turn; whichever runs first forgets the other."""
    lp = Loop()
    p1, p2 = socket.socketpair(), socket.socketpair()
    try:
        calls = []

        def make(me, other, name):
            def cb():
                calls.append(name)
                lp.forget(other)
                lp.forget(me)
            return cb

        lp.add_reader(p1[0], make(p1[0], p2[0], "one"))
        lp.add_reader(p2[0], make(p2[0], p1[0], "two"))
        p1[1].send(b"x")
        p2[1].send(b"y")
        assert lp.run_until(lambda: calls, WAIT)
        spin(lp)
        assert len(calls) == 1
    finally:
        lp.close()
        for s in (*p1, *p2):
            s.close()


def test_fd_number_reused_after_forget_and_close_works(loop):
    a, b = socket.socketpair()
    loop.add_reader(a, lambda: None)
    loop.forget(a)
    a.close()
    b.close()
    # The kernel hands out the lowest free number, so c very likely reuses a's.
    c, d = socket.socketpair()
    try:
        got = []
        loop.add_reader(c, lambda: got.append(c.recv(10)))
        d.send(b"new")
        assert loop.run_until(lambda: got, WAIT)
        assert got == [b"new"]
    finally:
        loop.forget(c)
        c.close()
        d.close()


def test_failed_add_reader_leaves_no_trace_that_blocks_a_later_add(loop):
    """A refused registration (closed fd) must not leave a stale entry behind:
    a later socket that reuses the number would otherwise never be watched."""
    a, b = socket.socketpair()
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    base = loop.watched_fds()
    with pytest.raises(OSError):
        loop.add_reader(r, lambda: None)
    with pytest.raises(OSError):
        loop.add_writer(r, lambda: None)
    assert loop.watched_fds() == base
    # Reuse the exact number for a live socket: the loop must watch it.
    try:
        os.dup2(a.fileno(), r)
        got = []
        loop.add_reader(r, lambda: got.append(os.read(r, 10)))
        b.send(b"seen")
        assert loop.run_until(lambda: got, WAIT)
        assert got == [b"seen"]
    finally:
        loop.forget(r)
        os.close(r)
        a.close()
        b.close()


def test_add_reader_on_a_regular_file_is_refused_without_a_stale_entry(loop, tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)
    try:
        base = loop.watched_fds()
        with pytest.raises(OSError):  # epoll refuses regular files (EPERM)
            loop.add_reader(fd, lambda: None)
        assert loop.watched_fds() == base
    finally:
        os.close(fd)


# ---------------------------------------------------------------- call_soon


def test_call_soon_runs_in_fifo_order_with_args(loop):
    out = []
    loop.call_soon(out.append, 1)
    loop.call_soon(out.append, 2)
    loop.call_soon(lambda a, b: out.append(a + b), 10, 20)
    assert loop.run_until(lambda: len(out) == 3, WAIT)
    assert out == [1, 2, 30]


def test_call_soon_does_not_starve_io(loop, pair):
    """A callback that reschedules itself forever must not lock out readers."""
    a, b = pair
    spins = []
    got = []

    def again():
        spins.append(1)
        loop.call_soon(again)

    loop.call_soon(again)
    loop.add_reader(a, lambda: got.append(a.recv(10)))
    b.send(b"io")
    assert loop.run_until(lambda: got, WAIT)
    assert got == [b"io"]
    assert spins


def test_callback_queued_by_a_callback_runs_on_a_later_turn(loop):
    order = []

    def first():
        order.append("first")
        loop.call_soon(lambda: order.append("queued-by-first"))

    loop.call_soon(first)
    loop.call_soon(lambda: order.append("second"))
    assert loop.run_until(lambda: len(order) == 3, WAIT)
    assert order == ["first", "second", "queued-by-first"]


# ---------------------------------------------------------------- call_soon_threadsafe


def test_call_soon_threadsafe_from_another_thread_runs_on_the_loop_thread(loop):
    ran_on = []
    t = threading.Thread(target=lambda: loop.call_soon_threadsafe(
        lambda: ran_on.append(threading.get_ident())))
    t.start()
    t.join()
    assert loop.run_until(lambda: ran_on, WAIT)
    assert ran_on == [threading.get_ident()]


def test_call_soon_threadsafe_wakes_a_blocked_run(loop):
    """run() with nothing to do blocks in epoll; a post from another thread wakes it and stops it."""
    seen = []

    def poster():
        loop.call_soon_threadsafe(seen.append, "posted")
        loop.stop_threadsafe()

    timer = threading.Timer(0.05, poster)
    timer.start()
    try:
        loop.run()  # returns only if the wakeup pipe works (else the test times out)
    finally:
        timer.cancel()
        timer.join()
    assert seen == ["posted"]


def test_many_threads_posting_every_callback_runs_exactly_once_in_per_thread_order(loop):
    threads, per_thread = 8, 200
    got: list[tuple[int, int]] = []
    start = threading.Barrier(threads)

    def worker(tid):
        start.wait()
        for i in range(per_thread):
            loop.call_soon_threadsafe(got.append, (tid, i))

    ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    # Run the loop while they post, then until everything has arrived.
    assert loop.run_until(lambda: len(got) >= threads * per_thread and not any(t.is_alive() for t in ts), 5)
    for t in ts:
        t.join()
    spin(loop)
    assert len(got) == threads * per_thread
    for tid in range(threads):
        assert [i for (t, i) in got if t == tid] == list(range(per_thread))


def test_call_soon_threadsafe_after_close_is_silent_and_writes_nowhere():
    """A resolver thread posting after close must not raise nor write a byte into
    whatever file reuses the loop's old descriptor numbers."""
    before = open_fds()
    lp = Loop()
    loop_fds = sorted(open_fds() - before)
    assert len(loop_fds) == 3  # epoll + wakeup pipe
    spare = [os.pipe() for _ in loop_fds]  # made before close so none lands on a freed number
    lp.close()
    placed = []
    try:
        for n, (r, w) in zip(loop_fds, spare):
            os.dup2(w, n)  # a pipe's write end now sits on each freed number
            placed.append(n)
        lp.call_soon_threadsafe(lambda: None)
        lp.stop_threadsafe()
        for r, _w in spare:
            assert not readable(r)
    finally:
        for n in placed:
            os.close(n)
        for r, w in spare:
            os.close(r)
            os.close(w)


# ---------------------------------------------------------------- timers


def test_call_later_fires_in_deadline_order_not_scheduling_order(loop):
    out = []
    loop.call_later(0.06, out.append, "c")
    loop.call_later(0.02, out.append, "a")
    loop.call_later(0.04, out.append, "b")
    assert loop.run_until(lambda: len(out) == 3, WAIT)
    assert out == ["a", "b", "c"]


def test_call_at_with_equal_deadlines_keeps_scheduling_order(loop):
    out = []
    when = loop.time() + 0.01
    for i in range(5):
        loop.call_at(when, out.append, i)
    assert loop.run_until(lambda: len(out) == 5, WAIT)
    assert out == [0, 1, 2, 3, 4]


def test_call_at_in_the_past_and_negative_delay_run_promptly(loop):
    out = []
    loop.call_at(loop.time() - 10, out.append, "past")
    loop.call_later(-5, out.append, "negative")
    assert loop.run_until(lambda: len(out) == 2, WAIT)
    assert sorted(out) == ["negative", "past"]


def test_timer_does_not_fire_before_its_deadline(loop):
    out = []
    loop.call_later(60, out.append, "late")
    spin(loop)
    assert out == []


def test_cancelled_timer_never_runs_and_others_still_do(loop):
    out = []
    t1 = loop.call_later(0.01, out.append, "cancelled")
    loop.call_later(0.02, out.append, "kept")
    t1.cancel()
    assert t1.cancelled
    assert loop.run_until(lambda: out, WAIT)
    spin(loop)
    assert out == ["kept"]


def test_a_timer_can_cancel_a_later_timer_due_in_the_same_turn(loop):
    out = []
    when = loop.time() + 0.01
    victim = None

    def killer():
        out.append("killer")
        victim.cancel()

    loop.call_at(when, killer)
    victim = loop.call_at(when, out.append, "victim")
    loop.call_at(when, out.append, "bystander")
    assert loop.run_until(lambda: "bystander" in out, WAIT)
    spin(loop)
    assert out == ["killer", "bystander"]


class Clock:
    """An injected clock for the loop (the loop reads ``loop.time``)."""

    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_coarse_timers_fire_late_by_at_most_a_tick_never_early_and_share_one_heap_entry(loop):
    from portunus.loop import COARSE_TICK
    clock = Clock(1000.0)
    loop.time = clock
    out = []
    for i in range(50):
        loop.call_coarse(3.0, out.append, i)
    assert len(loop._timers) == 1  # one heap entry for every deadline in the same tick
    clock.t = 1003.0 - 1e-6
    loop._run_once(max_wait=0)
    assert out == []
    clock.t = 1003.0 + COARSE_TICK + 1e-6
    loop._run_once(max_wait=0)
    assert out == list(range(50))  # in arming order
    assert loop._timers == [] and loop._coarse == {}


def test_cancelled_coarse_timer_never_runs_and_its_neighbours_still_do(loop):
    from portunus.loop import COARSE_TICK
    clock = Clock(50.0)
    loop.time = clock
    out = []
    a = loop.call_coarse(1.0, out.append, "a")
    loop.call_coarse(1.0, out.append, "b")
    later = loop.call_coarse(2.5, out.append, "later")
    a.cancel()
    assert a.cancelled and a.callback is None  # what it would have called is released at once
    clock.t = 51.0 + COARSE_TICK + 1e-6
    loop._run_once(max_wait=0)
    assert out == ["b"]
    later.cancel()
    clock.t = 60.0
    loop._run_once(max_wait=0)
    assert out == ["b"]
    assert loop._coarse == {}


def test_a_raising_coarse_timer_is_logged_and_the_rest_of_its_tick_still_fires(loop, loop_log):
    clock = Clock(10.0)
    loop.time = clock
    out = []

    def bad():
        raise RuntimeError("boom")
    loop.call_coarse(0.0, bad)
    loop.call_coarse(0.0, out.append, "after")
    clock.t = 11.0
    loop._run_once(max_wait=0)
    assert out == ["after"]
    assert [e["event"] for e in log_events(loop_log)] == ["loop.callback_error"]


def test_cancel_after_firing_is_harmless(loop):
    out = []
    t = loop.call_later(0, out.append, 1)
    assert loop.run_until(lambda: out, WAIT)
    t.cancel()
    t.cancel()
    spin(loop)
    assert out == [1]


def test_timer_rescheduling_itself_does_not_starve_call_soon(loop):
    ticks = []
    done = []

    def tick():
        ticks.append(1)
        if not done:
            loop.call_later(0, tick)

    loop.call_later(0, tick)
    loop.call_soon(done.append, True)
    assert loop.run_until(lambda: done, WAIT)


def test_timers_wake_a_blocked_run_and_stop_it(loop):
    out = []

    def fire():
        out.append("fired")
        loop.stop()

    loop.call_later(0.02, fire)
    loop.run()  # blocks in epoll until the timer is due
    assert out == ["fired"]


# ---------------------------------------------------------------- errors in callbacks


def test_a_raising_callback_does_not_kill_the_loop_and_is_logged(loop, loop_log):
    out = []

    def boom():
        raise ValueError("boom-42")

    loop.call_soon(boom)
    loop.call_soon(out.append, "after")
    assert loop.run_until(lambda: out, WAIT)
    assert out == ["after"]
    errors = [e for e in log_events(loop_log) if e["event"] == "loop.callback_error"]
    assert len(errors) == 1
    assert errors[0]["level"] == "error"
    assert "ValueError: boom-42" in errors[0]["error"]
    assert "boom" in errors[0]["callback"]
    assert errors[0]["where"].startswith("test_loop.py:")


def test_raising_reader_writer_and_timer_callbacks_leave_the_loop_working(loop, pair, loop_log):
    a, b = pair

    def bad_reader():
        a.recv(100)
        raise RuntimeError("reader")

    def bad_writer():
        loop.remove_writer(a)
        raise RuntimeError("writer")

    def bad_timer():
        raise RuntimeError("timer")

    loop.add_reader(a, bad_reader)
    loop.add_writer(a, bad_writer)
    loop.call_later(0, bad_timer)
    b.send(b"x")
    assert loop.run_until(
        lambda: sum(e["event"] == "loop.callback_error" for e in log_events(loop_log)) >= 3, WAIT)
    errors = {e["error"] for e in log_events(loop_log) if e["event"] == "loop.callback_error"}
    assert errors == {"RuntimeError: reader", "RuntimeError: writer", "RuntimeError: timer"}
    # still serving I/O afterwards
    got = []
    loop.add_reader(a, lambda: got.append(a.recv(100)))
    b.send(b"alive")
    assert loop.run_until(lambda: got, WAIT)
    assert got == [b"alive"]


# ---------------------------------------------------------------- stop / run / run_until


def test_stop_from_a_callback_returns_from_run(loop):
    out = []

    def stopper():
        out.append("stopping")
        loop.stop()

    loop.call_soon(stopper)
    loop.run()
    assert out == ["stopping"]


def test_run_can_be_started_again_after_stop(loop):
    out = []
    for i in range(3):
        loop.call_soon(out.append, i)
        loop.call_soon(loop.stop)
        loop.run()
    assert out == [0, 1, 2]


def test_stop_lets_the_current_turn_finish(loop):
    out = []
    loop.call_soon(loop.stop)
    loop.call_soon(out.append, "same turn")
    loop.run()
    assert out == ["same turn"]


def test_run_until_returns_true_once_the_predicate_holds(loop):
    state = {"n": 0}

    def bump():
        state["n"] += 1
        if state["n"] < 5:
            loop.call_soon(bump)

    loop.call_soon(bump)
    assert loop.run_until(lambda: state["n"] == 5, WAIT) is True
    assert state["n"] == 5


def test_run_until_returns_false_when_the_predicate_never_holds(loop):
    assert loop.run_until(lambda: False, 0.05) is False


def test_run_until_checks_the_predicate_before_running_anything(loop):
    out = []
    loop.call_soon(out.append, "queued")
    assert loop.run_until(lambda: True, WAIT) is True
    assert out == []  # predicate already held: no turn was taken
    assert loop.run_until(lambda: out, WAIT)


# ---------------------------------------------------------------- signals


@pytest.fixture
def usr1_guard():
    """Whatever the loop does, leave SIGUSR1/SIGUSR2 as we found them."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def test_signal_is_delivered_onto_the_loop_as_a_callback(loop, usr1_guard):
    got = []
    loop.add_signal_handler(signal.SIGUSR1, lambda tag: got.append((tag, threading.get_ident())), "usr1")
    os.kill(os.getpid(), signal.SIGUSR1)
    assert loop.run_until(lambda: got, WAIT)
    assert got == [("usr1", threading.get_ident())]


def test_signal_wakes_a_blocked_run(loop, usr1_guard):
    got = []

    def on_usr1():
        got.append("usr1")
        loop.stop()

    loop.add_signal_handler(signal.SIGUSR1, on_usr1)
    killer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGUSR1))
    killer.start()
    try:
        loop.run()  # nothing else would ever wake it
    finally:
        killer.cancel()
        killer.join()
    assert got == ["usr1"]


def test_two_signals_reach_their_own_handlers(loop, usr1_guard):
    got = []
    loop.add_signal_handler(signal.SIGUSR1, got.append, "one")
    loop.add_signal_handler(signal.SIGUSR2, got.append, "two")
    os.kill(os.getpid(), signal.SIGUSR2)
    assert loop.run_until(lambda: "two" in got, WAIT)
    os.kill(os.getpid(), signal.SIGUSR1)
    assert loop.run_until(lambda: "one" in got, WAIT)
    assert got == ["two", "one"]


def test_signal_handler_is_not_run_inside_the_os_handler(loop, usr1_guard):
    """The callback runs on a loop turn, not at the moment the signal lands."""
    got = []
    loop.add_signal_handler(signal.SIGUSR1, got.append, "usr1")
    os.kill(os.getpid(), signal.SIGUSR1)
    assert got == []
    assert loop.run_until(lambda: got, WAIT)


def test_remove_signal_handler_restores_the_previous_handler(loop, usr1_guard):
    outside = []
    previous = lambda signum, frame: outside.append(signum)  # noqa: E731
    signal.signal(signal.SIGUSR1, previous)
    got = []
    loop.add_signal_handler(signal.SIGUSR1, got.append, "loop")
    loop.remove_signal_handler(signal.SIGUSR1)
    assert signal.getsignal(signal.SIGUSR1) is previous
    os.kill(os.getpid(), signal.SIGUSR1)
    spin(loop)
    assert got == []
    assert outside == [signal.SIGUSR1]


def test_replacing_a_signal_handler_then_removing_it_restores_the_original(loop, usr1_guard):
    original = lambda signum, frame: None  # noqa: E731
    signal.signal(signal.SIGUSR1, original)
    got = []
    loop.add_signal_handler(signal.SIGUSR1, got.append, "first")
    loop.add_signal_handler(signal.SIGUSR1, got.append, "second")
    os.kill(os.getpid(), signal.SIGUSR1)
    assert loop.run_until(lambda: got, WAIT)
    assert got == ["second"]
    loop.remove_signal_handler(signal.SIGUSR1)
    assert signal.getsignal(signal.SIGUSR1) is original


def test_close_releases_signal_handlers(usr1_guard):
    original = lambda signum, frame: None  # noqa: E731
    signal.signal(signal.SIGUSR1, original)
    lp = Loop()
    lp.add_signal_handler(signal.SIGUSR1, lambda: None)
    assert signal.getsignal(signal.SIGUSR1) is not original
    lp.close()
    assert signal.getsignal(signal.SIGUSR1) is original


# ---------------------------------------------------------------- close


def test_close_releases_the_loops_descriptors():
    before = open_fds()
    lp = Loop()
    a, b = socket.socketpair()
    lp.add_reader(a, lambda: None)
    assert len(open_fds() - before) == 5
    lp.close()
    a.close()
    b.close()
    assert open_fds() - before == set()


def test_a_raising_reader_is_unwatched_instead_of_spinning(loop, pair, loop_log):
    a, b = pair
    calls = []

    def bad_reader():
        calls.append(1)
        raise RuntimeError("boom")  # never reads: the fd stays readable
    loop.add_reader(a, bad_reader)
    b.send(b"x")
    loop.run_until(lambda: False, 0.3)
    assert calls == [1]
    assert loop.watched_fds() == 1  # only the loop's own wakeup pipe


def test_an_event_fetched_for_an_fd_dropped_in_the_same_batch_does_not_reach_its_new_interest(loop):
    """The fd number may already name a new socket: its stale event must not run the new handler."""
    p1, p2 = socket.socketpair(), socket.socketpair()
    try:
        ran = []
        fds = [p1[0].fileno(), p2[0].fileno()]

        def first(fd, other):
            if ran:
                return
            ran.append(("first", fd))
            loop.forget(other)
            loop.add_reader(other, lambda: ran.append(("new", other)))
        for fd, other in ((fds[0], fds[1]), (fds[1], fds[0])):
            loop.add_reader(fd, lambda fd=fd, other=other: first(fd, other))
        p1[1].send(b"x")
        p2[1].send(b"x")
        # both are readable before the first turn: one epoll_wait fetches both events
        assert readable(fds[0]) and readable(fds[1])
        loop._run_once(max_wait=0.5)
        assert len(ran) == 1 and ran[0][0] == "first"
        loop._run_once(max_wait=0.5)  # next turn: the new interest sees the fd, still readable
        assert ran[1][0] == "new" and ran[1][1] != ran[0][1]
    finally:
        for s in (*p1, *p2):
            s.close()


# ---------------------------------------------------------------- lazy removal of interest


def test_an_interest_dropped_and_taken_again_before_the_next_poll_keeps_working(loop, pair):
    a, b = pair
    got = []
    loop.add_writer(a, lambda: got.append("w"))
    assert loop.run_until(lambda: got, WAIT)  # a socketpair is writable at once
    loop.remove_writer(a)  # the dialer hands the socket over ...
    loop.add_reader(a, lambda: got.append(a.recv(16)))  # ... and its new owner reads from it
    b.send(b"hello")
    assert loop.run_until(lambda: b"hello" in got, WAIT)
    assert got.count("w") >= 1 and got[-1] == b"hello"
    assert loop._pending_del == {}


def test_a_dropped_interest_is_gone_before_the_loop_waits_again(loop, pair):
    a, b = pair
    got = []
    loop.add_reader(a, lambda: got.append(a.recv(16)))
    b.send(b"one")
    assert loop.run_until(lambda: got, WAIT)
    loop.remove_reader(a)
    b.send(b"two")  # level-triggered and readable: only a removed interest keeps it quiet
    spin(loop)
    assert got == [b"one"] and readable(a.fileno())
    assert loop._pending_del == {} and loop.watched_fds() == 1


def test_forget_closing_then_a_new_socket_on_the_same_number_is_watched(loop):
    a, b = socket.socketpair()
    fd = a.fileno()
    loop.add_reader(a, lambda: None)
    loop.forget(fd, closing=True)
    a.close()
    c, d = socket.socketpair()  # the lowest free numbers: c takes fd again
    try:
        assert c.fileno() == fd
        got = []
        loop.add_reader(c, lambda: got.append(c.recv(16)))
        d.send(b"x")
        assert loop.run_until(lambda: got, WAIT)
        assert got == [b"x"]
    finally:
        for s in (b, c, d):
            s.close()


def test_an_fd_closed_without_forget_after_its_interest_went_then_reused_is_watched(loop):
    """remove_reader, then close without forget (the DEL is still pending), then the number is
    reused within the same turn: the new socket must be registered, not taken for the old one."""
    a, b = socket.socketpair()
    fd = a.fileno()
    loop.add_reader(a, lambda: None)
    loop.remove_reader(a)
    a.close()
    c, d = socket.socketpair()
    try:
        assert c.fileno() == fd
        got = []
        loop.add_reader(c, lambda: got.append(c.recv(16)))
        d.send(b"y")
        assert loop.run_until(lambda: got, WAIT)
        assert got == [b"y"]
    finally:
        for s in (b, c, d):
            s.close()


class _RecordingEpoll:
    """Stands in for the loop's epoll in a clock test: records each poll's timeout, no events."""

    def __init__(self, real):
        self.real, self.timeouts = real, []

    def poll(self, timeout):
        self.timeouts.append(timeout)
        return []

    def __getattr__(self, name):
        return getattr(self.real, name)


@pytest.mark.parametrize("callback_kind", ["ready", "timer"])
def test_the_poll_timeout_counts_from_after_the_turns_callbacks(loop, callback_kind):
    """One clock read per turn (after the events), and one more only when timers or callbacks ran:
    a slow callback must not make the next poll sleep past a deadline."""
    now = [100.0]
    loop.time = lambda: now[0]
    rec = loop._epoll = _RecordingEpoll(loop._epoll)
    fired = []
    loop.call_at(110.0, fired.append, "deadline")

    def slow():
        now[0] += 4.0  # the callback took 4 s of the fake clock
    if callback_kind == "ready":
        loop.call_soon(slow)
    else:
        loop.call_at(100.0, slow)
    try:
        loop._run_once()
        loop._run_once()  # the deadline is 6 s away from the clock after slow(), not 10
        now[0] = 110.0
        loop._run_once()
    finally:
        loop._epoll = rec.real
    assert rec.timeouts[1] == pytest.approx(6.0)
    assert rec.timeouts[0] == (0 if callback_kind == "ready" else 0.0)
    assert fired == ["deadline"]


def test_a_loop_idle_for_long_times_its_first_poll_from_now(loop):
    """Every entry (run, run_until, one turn) reads the clock afresh: a loop whose last turn was
    long ago does not time its next poll from that turn's clock."""
    now = [5.0]
    loop.time = lambda: now[0]
    rec = loop._epoll = _RecordingEpoll(loop._epoll)
    try:
        loop._run_once()
        now[0] = 500.0  # a long time without a turn
        loop.call_later(1.0, lambda: None)
        loop._run_once()
    finally:
        loop._epoll = rec.real
    assert rec.timeouts == [-1, pytest.approx(1.0)]  # from a stale clock it would be 496 s


def test_set_reader_hands_a_writer_over_to_a_reader_in_one_modify(loop, pair):
    a, b = pair
    ep = loop._epoll = CountingEpoll(loop._epoll)
    try:
        writes, reads = [], []

        def dialer():  # what a dialer's writer does on "connected": hand the fd to its reader
            writes.append(1)
            loop.set_reader(a, lambda: reads.append(a.recv(100)))
        loop.add_writer(a, dialer)
        assert loop.run_until(lambda: writes, WAIT)
        b.send(b"reply")
        assert loop.run_until(lambda: reads, WAIT)
        spin(loop)
        assert writes == [1] and reads == [b"reply"]  # the writer is gone, the reader works
        assert ep.ops == [("add", a.fileno(), select.EPOLLOUT), ("mod", a.fileno(), select.EPOLLIN)]
    finally:
        loop._epoll = ep.real


def test_set_reader_on_an_unwatched_fd_is_add_reader_and_a_new_callback_costs_nothing(loop, pair):
    a, b = pair
    ep = loop._epoll = CountingEpoll(loop._epoll)
    try:
        got = []
        loop.set_reader(a, lambda: got.append(("first", a.recv(100))))
        loop.set_reader(a, lambda: got.append(("second", a.recv(100))))  # replaces the callback
        b.send(b"x")
        assert loop.run_until(lambda: got, WAIT)
        assert got == [("second", b"x")]
        assert ep.ops == [("add", a.fileno(), select.EPOLLIN)]
        assert loop.remove_reader(a) is True
    finally:
        loop._epoll = ep.real


def test_set_reader_on_a_number_dropped_and_reused_in_the_same_turn_watches_the_new_file(loop):
    """A dialer's fd whose interest was dropped (deferred DEL) and whose number was closed and
    reused before the next poll: set_reader registers the new file instead of trusting the old mask."""
    a1, b1 = socket.socketpair()
    loop.add_writer(a1, lambda: None)
    loop.remove_writer(a1)  # the DEL waits for the next poll
    fd = a1.fileno()
    a1.close()
    b1.close()
    a2, b2 = socket.socketpair()
    try:
        if a2.fileno() != fd:
            a2, b2 = b2, a2
        if a2.fileno() != fd:
            pytest.skip("the kernel did not reuse the number")
        got = []
        loop.set_reader(a2, lambda: got.append(a2.recv(10)))
        b2.send(b"new")
        assert loop.run_until(lambda: got, WAIT)
        assert got == [b"new"]
        loop.forget(a2)
    finally:
        a2.close()
        b2.close()
