"""Host batches built ahead of the step that needs them, on a background thread.

The batch of step s is a pure function of (seed, s), so the producer can run ahead safely: it builds
and shards the batches of steps ``first, first + 1, ...`` into a bounded queue while the device runs
earlier steps. Errors in the producer are re-raised in the consumer.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator

_DONE = object()


def prefetch(make_batch: Callable[[int], Any], first_step: int, last_step: int,
             depth: int = 2) -> Iterator[tuple[int, Any]]:
    """Yields ``(step, make_batch(step))`` for ``first_step <= step < last_step``, ``depth`` ahead."""
    if depth <= 0:
        for step in range(first_step, last_step):
            yield step, make_batch(step)
        return
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce():
        try:
            for step in range(first_step, last_step):
                if stop.is_set():
                    return
                buffer.put((step, make_batch(step)))
        except BaseException as e:  # handed to the consumer
            buffer.put(e)
        buffer.put(_DONE)

    thread = threading.Thread(target=produce, name="mtt_jax-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                buffer.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)
