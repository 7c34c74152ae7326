"""A push that overtakes the reconnect replay stays (the agent's side of replay_done).

The server reads a client's stored rules for its replay on an Offload thread; a rule stored after
that read but pushed while the replay loaded reaches the client before ``replay_done``, whose list
does not name it. The agent used to remove every rule the list did not name, so a fresh client
that got its first push right after connecting dropped a rule the server had just seen acked
(the bench's fresh deploy hung on that port). Real loop, real RuleRuntime, real listeners; the
server's messages are fed to the agent on its loop.
"""

from __future__ import annotations

import socket

import pytest

from portunus.control import messages as m
from portunus.control.agent import Agent

from conftest import free_port
from harness import LoopThread

BUNDLE = {"version": 1, "client_id": "c1", "client_name": "edge-01", "server_endpoint": "127.0.0.1:9",
          "server_cert_sha256": "00" * 32, "token": "not-a-real-token"}


class Sink:
    def __init__(self):
        self.sent = []

    def send(self, msg):
        self.sent.append(msg)
        return True


def welcome() -> dict:
    return m.welcome(client_id="c1", client_name="edge-01", server_version="test", server_time=0.0,
                     stats_interval_secs=5, udp_max_flows_per_rule=1024, udp_flow_idle_secs=60)


def push(rule_id: str, port: int, target: int) -> dict:
    return m.rule_push({"rule_id": rule_id, "listen_port": port, "target": f"127.0.0.1:{target}"}, f"req-{rule_id}")


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


@pytest.fixture
def agent_on_loop():
    lt = LoopThread()
    ch = Sink()
    agent = lt.call(Agent, lt.loop, dict(BUNDLE), lt.runtime)

    def feed(*msgs):
        for msg in msgs:
            lt.call(agent._on_message, ch, msg)
    yield lt, agent, ch, feed
    lt.call(agent.stop)
    lt.call(lt.runtime.abort_all)
    lt.close()


def test_a_push_before_replay_done_survives_a_replay_that_does_not_name_it(agent_on_loop):
    lt, agent, ch, feed = agent_on_loop
    port, target = free_port(), free_port()
    feed(welcome(), push("fresh", port, target))
    assert [s["state"] for s in ch.sent if s["type"] == "rule_status"] == ["active"]
    feed(m.replay_done([]))                       # read from the store before "fresh" was stored
    assert "fresh" in lt.call(lambda: set(lt.runtime.rules))
    assert listening(port)


def test_replay_done_still_removes_what_the_server_no_longer_has(agent_on_loop):
    lt, agent, ch, feed = agent_on_loop
    old, kept, late = free_port(), free_port(), free_port()
    target = free_port()
    feed(welcome(), push("old", old, target), push("kept", kept, target), m.replay_done(["old", "kept"]))
    # the channel drops; the client keeps running both; "old" is deleted on the server meanwhile
    feed(welcome(), push("kept", kept, target), push("late", late, target), m.replay_done(["kept"]))
    assert lt.call(lambda: set(lt.runtime.rules)) == {"kept", "late"}
    assert not listening(old) and listening(kept) and listening(late)


def test_a_rule_pushed_and_removed_before_replay_done_stays_removed(agent_on_loop):
    lt, agent, ch, feed = agent_on_loop
    port = free_port()
    feed(welcome(), push("brief", port, free_port()), m.rule_remove("brief", "req-rm"), m.replay_done([]))
    assert "brief" not in lt.call(lambda: set(lt.runtime.rules))
    assert not listening(port)


def test_after_replay_done_the_list_is_not_consulted_again(agent_on_loop):
    lt, agent, ch, feed = agent_on_loop
    a, b = free_port(), free_port()
    feed(welcome(), m.replay_done([]), push("a", a, free_port()), push("b", b, free_port()))
    assert lt.call(lambda: set(lt.runtime.rules)) == {"a", "b"}
    assert agent._pushed_before_replay is None
