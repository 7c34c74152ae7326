"""The server: domain services below HTTP and the control hub, and the ``serve`` wiring (SPEC §4–§6).

May import: ``store``, ``control`` (hub, enrollment, TLS, stats reports), ``model``, ``loop``,
``log``, ``errors``, ``sysinfo``. Must never import ``cli`` or ``relay``; only ``server.app``
(the composition root, like ``client.app``) imports ``http``, to start the API and metrics
listeners (tests/unit/test_layers.py).

Threads: the loop thread runs the hub; services (``core.ServerCore``, ``access``,
``identity``, ``quotas``, ``owner_caps``) are called from HTTP threads, each with a store
connection borrowed from the pool, and reach the loop only through ``Hub.call`` /
``Hub.post_update``. ``traffic`` runs its ``ReportWriter`` and ``TrafficHousekeeper``
threads; ``passwords`` hashes in Argon2 worker processes (``hashworkers``).

Entry points: ``app.serve``, ``core.ServerCore``, ``access.OperatorAccess``,
``client_registry.StoreClientRegistry`` (the hub's ``ClientRegistry``), ``config.load``,
``metrics`` (Prometheus text, sans-IO).
"""
