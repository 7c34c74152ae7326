"""The control channel (SPEC §3): its codec, messages, TLS pinning, enrollment, and its two ends.

May import: the standard library, ``cryptography`` (``tls``), ``portunus.loop``,
``portunus.netio``, ``portunus.model``, ``portunus.log``, ``portunus.errors``, and ``relay``
(only the client end, ``agent``, which drives a ``RuleRuntime``). Must never import ``store``,
``server``, ``http``, ``cli`` or ``standalone``: what the hub needs from the server's state
comes through the ``registry.ClientRegistry`` interface (tests/unit/test_layers.py).

Thread: the loop thread. Blocking work (the registry's database calls) goes through
``offload.Offload`` and comes back on the loop; HTTP threads reach the hub only through
``Hub.call`` / ``Hub.post_update`` (posted to the loop).

Entry points: ``hub.Hub`` (server end), ``agent.Agent`` and ``redeem.enroll`` (client end);
sans-IO: ``frames`` (length-prefixed JSON), ``messages`` (schemas and constructors),
``stats_report`` (what a report may say), ``enrollment`` (URI and bundle).
"""
