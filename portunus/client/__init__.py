"""The edge client's wiring (SPEC §7.3): one loop, the rule runtime, the agent, signals, drain.

May import: ``portunus.control`` (the agent and the enrollment bundle), ``portunus.relay``
(runtime, context, resolver), ``portunus.loop``, ``portunus.log``, ``portunus.errors``,
``portunus.sysinfo``. Must never import ``store``, ``server``, ``http``, ``standalone`` or
``cli`` (the client holds no state database and serves no API; argument parsing stays in
``cli/client.py``).

Thread: the caller's (main) thread runs the loop; everything is a callback on it.

Entry point: ``app.run_agent(bundle, bundle_path, settings)`` with an ``app.AgentSettings``;
returns the process exit code.
"""
