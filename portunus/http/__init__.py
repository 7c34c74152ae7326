"""The operator HTTP API (SPEC §6) on ``http.server``.

May import: ``portunus.server`` (domain services ``ServerCore``; ``server.access`` for
bearer and session authentication, identity operations, what a tenant may see, the audit
trail and client references; ``server.identity`` for its constants), ``portunus.errors``,
``portunus.log``, ``portunus.model``. Must never import ``store``, ``relay``, ``control``,
``cli`` or ``standalone`` (tests/unit/test_layers.py enforces it).

Threads: one accept thread per listener (``serve_in_thread``) and one thread per
connection, capped (``transport.Limits``); no HTTP thread touches the loop's sockets —
``ServerCore`` posts to the loop and waits on a future.

Entry points: ``app.OperatorAPI``, ``app.make_server``, ``app.make_metrics_server``,
``app.serve_in_thread``. Routes and who may call them: ``routes.ROUTES``; the one
auth seam: ``auth.AuthSeam``.
"""
