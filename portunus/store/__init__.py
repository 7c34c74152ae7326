"""SQLite state of the server: ``db`` opens the store; one module per aggregate holds its SQL."""

from .db import Store

__all__ = ["Store"]
