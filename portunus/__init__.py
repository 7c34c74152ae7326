"""Portunus: a port-forwarding appliance."""

__version__ = "0.1.0"
