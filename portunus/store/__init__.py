"""SQLite state of the server: ``db`` opens the store; one module per aggregate holds its SQL.

May import: the standard library, ``portunus.errors``, ``portunus.log``, ``portunus.model``.
Must never import anything else of portunus (tests/unit/test_layers.py): the services that
combine aggregates live in ``server/``.

Threads: any thread, each with its own connection (``Store.read()`` / ``Store.write()``);
HTTP request threads borrow one from a bounded pool (``Store.pooled_connections()``). Never
the loop thread: the hub reaches the store off the loop (``control.offload``).

Entry points: ``db.Store`` (open, lock, filesystem check, migrations/NNN_name.sql),
``backup`` (backup / restore / reset of a data dir), one module per aggregate (``clients``,
``rules``, ``users``, ``grants``, ``quotas``, ``traffic``, ``audit``, ``settings`` …).
"""

from .db import Store

__all__ = ["Store"]
