"""fleche's settings follow tasks into thread pools.

``with fleche.cache(c):`` and ``with fleche.rerun():`` are ``contextvars`` settings: they hold in
the thread that made them and in the asyncio tasks it starts, and a new ``threading.Thread``
starts without them (as every context variable does before Python 3.14). So that a thread pool
used inside such a block computes and stores where the block says, fleche makes
``concurrent.futures.ThreadPoolExecutor.submit`` (which ``map``, ``loop.run_in_executor`` and
``asyncio.to_thread`` go through) run each task in a copy of the submitter's context, as
``asyncio.to_thread`` does, whenever a fleche setting is active where the task is submitted:
the task sees the cache and rerun setting of the place that submitted it, whichever thread of
the pool runs it and whenever the pool was made. A task submitted where no fleche setting is
active is passed on unchanged. The wrapping is installed once per process, the first time a
fleche setting is made; plain threads, ``multiprocessing.pool.ThreadPool`` and other executors
are left as they are (start a plain thread with ``contextvars.copy_context().run`` as its target
to pass the settings on).
"""

from __future__ import annotations

import contextvars
import functools
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["follow"]

_FOLLOWED: list[contextvars.ContextVar[Any]] = []
_lock = threading.Lock()
_original_submit: Callable[..., Future] | None = None


def follow(var: contextvars.ContextVar[Any]) -> None:
    """Make thread pool tasks submitted while ``var`` is set (not ``None``) run in a copy of
    the submitter's context. Idempotent and thread-safe."""
    global _original_submit
    with _lock:
        if var not in _FOLLOWED:
            _FOLLOWED.append(var)
        if _original_submit is None:
            _original_submit = ThreadPoolExecutor.submit
            ThreadPoolExecutor.submit = _submit_in_context(_original_submit)  # type: ignore[method-assign]


def _submit_in_context(submit: Callable[..., Future]) -> Callable[..., Future]:
    @functools.wraps(submit)
    def wrapped(self: ThreadPoolExecutor, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        for var in _FOLLOWED:
            if var.get(None) is not None:
                return submit(self, contextvars.copy_context().run, fn, *args, **kwargs)
        return submit(self, fn, *args, **kwargs)

    return wrapped
