"""Standalone mode (SPEC §7.4): a TOML file drives the relay runtime, with no server.

May import: ``relay`` (runtime, context, resolver), ``model``, ``loop``, ``log``, ``errors``,
``sysinfo``, and ``server.config`` for the shared strict TOML reader. Must never import
``store``, ``http``, ``control`` or ``cli`` (tests/unit/test_layers.py).

Thread: the main thread runs the loop (rules, the stats socket, SIGHUP reload); the
``stats`` dashboard is a separate process talking to the stats socket.

Entry points: ``config.load``, ``app.run``; ``dashboard`` (sans-IO) and ``tui`` (curses) for
``portunus-standalone stats``.
"""
