"""The data plane: listeners, forwarded connections and flows, target health, rule runtime.

May import: the standard library, ``portunus.loop``, ``portunus.netio``,
``portunus.model``, ``portunus.log``, ``portunus.errors``.
Must never import: ``store``, ``http``, ``server``, ``control`` (they drive the
relay through ``RuleRuntime``, never the other way round).
Thread: everything runs on the one loop thread; nothing here blocks it.
Entry points: ``runtime.RuleRuntime`` (activate / apply / remove / shutdown /
snapshot), the seam the client agent and standalone mode share; each rule is
served by a ``rule_relay.RuleRelay`` (``tcp.TcpRuleRelay``, ``udp.UdpRuleRelay``).
"""
