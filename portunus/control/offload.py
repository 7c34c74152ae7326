"""Blocking work (sqlite writes) off the loop, with the result delivered back on it."""

from __future__ import annotations

import concurrent.futures
from typing import Callable

from ..log import log


class Offload:
    """Run blocking work (sqlite writes) off the loop; deliver the result back on it."""

    def __init__(self, loop, workers: int = 2):
        self.loop = loop
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="portunus-store")

    def run(self, fn: Callable, *args, then: Callable | None = None) -> None:
        fut = self.pool.submit(fn, *args)

        def done(f: concurrent.futures.Future) -> None:
            if then is None:
                exc = f.exception()
                if exc is not None:
                    log.error("store.write_failed", error=f"{type(exc).__name__}: {exc}")
                return
            self.loop.call_soon_threadsafe(then, f)
        fut.add_done_callback(done)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
