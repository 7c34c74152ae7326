"""Portunus: a port-forwarding appliance (server, edge clients and standalone mode in one zipapp).

Layers, top down (docs/ARCHITECTURE.md; tests/unit/test_layers.py keeps the arrows):
``__main__`` -> ``cli`` / ``doctor`` (commands) -> ``client`` / ``server`` / ``standalone``
(wiring and services) -> ``http`` (only below ``server.app``), ``control``, ``store`` ->
``relay`` -> ``netio`` / ``loop`` -> ``model`` / ``log`` / ``errors``. Each package's
``__init__`` states what it may import, what it must never import, and its thread.
"""

__version__ = "0.1.0"
