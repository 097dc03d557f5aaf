"""The reader threads behind :class:`~ktnas.cache.stream.FeatureLoader`: a minimal pool of daemon threads
whose shutdown waits for the reads in flight, so that no store read outlives the iteration that asked for it."""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future

JOIN_TIMEOUT = 60.0  # seconds a closing loader waits for its threads' reads in flight


class ReaderPool:
    """A minimal pool of daemon threads running submitted callables into :class:`Future` objects."""

    def __init__(self, workers: int):
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._run, name=f"ktnas-reader-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, fn, *args) -> Future:
        fut: Future = Future()
        self._tasks.put((fut, fn, args))
        return fut

    def _run(self):
        while (task := self._tasks.get()) is not None:
            fut, fn, args = task
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # handed to whoever waits on the future
                fut.set_exception(e)

    def shutdown(self, wait: bool = True):
        """Let each thread exit once the tasks queued before this call are done (cancelled ones are skipped);
        with ``wait``, return once they have (a read in flight finishes), so that no store read outlives the
        iteration that asked for it: an error raised to the caller is the last thing the store sees."""
        for _ in self._threads:
            self._tasks.put(None)
        if wait:
            for t in self._threads:
                t.join(JOIN_TIMEOUT)
