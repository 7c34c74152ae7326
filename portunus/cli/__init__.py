"""The command lines of the three roles: argparse trees and how results are printed (SPEC §7).

May import: anything below it — ``client``, ``server``, ``standalone``, ``control``, ``store``
(offline commands: backup, restore, reset, onboarding), ``doctor``, ``model``, ``errors``,
``log``. Nothing imports ``cli`` except ``portunus.__main__`` (tests/unit/test_layers.py).
Wiring does not live here: ``cli/client.py`` hands parsed settings to ``client.app``,
``cli/standalone.py`` to ``standalone.app``, ``serve`` to ``server.app``.

Thread: the main thread; the operator commands are blocking HTTP calls (``api_client``).

Entry points: ``server.main``, ``client.main``, ``standalone.main`` (picked by ``__main__``);
``output`` (JSON, tables, byte counts), ``api_client.ApiClient``, ``demo`` (``serve demo``).
"""
