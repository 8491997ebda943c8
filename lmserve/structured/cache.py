"""GrammarCache: compiled grammars keyed by their spec, compiled in a thread pool off the engine loop."""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from lmserve.structured.backend import GrammarBackend
from lmserve.structured.spec import StructuredOutput


class GrammarCache:
    """One compile per distinct spec: later requests with the same schema share the compiled grammar.

    Holds futures, so a second request for a schema still compiling waits for the same compile. The
    least recently used entries go once there are more than `max_entries`.
    """

    def __init__(self, backend: GrammarBackend, max_entries: int = 256, num_workers: int = 2) -> None:
        self.backend = backend
        self.max_entries = max_entries
        self._pool = ThreadPoolExecutor(num_workers, thread_name_prefix="grammar-compile")
        self._entries: OrderedDict[StructuredOutput, Future[Any]] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: StructuredOutput) -> Future[Any]:
        """The compiled grammar of `spec` (a done future when cached); ValueError inside for a bad spec."""
        key = replace(spec, start_after_token_id=None)  # where the grammar starts is per request
        with self._lock:
            future = self._entries.get(key)
            if future is None or (future.done() and future.exception() is not None):
                future = self._pool.submit(self.backend.compile, key)
                self._entries[key] = future
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return future

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
