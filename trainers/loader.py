"""Training micro-batches made ahead of the training step, in background threads.

A producer thread asks the stream for each micro-batch's rows in order (the one
part that reads storage, and that a Parquet stream needs in order to hold the
right windows); `threads` decoder threads decode, crop, resize and augment them;
the training step takes finished batches in micro-step order. Threads rather
than processes: rows are gathered once and shared without copying, a Parquet
stream's buffer is held once per worker, and PIL's decoders and resampling and
torch's kernels release the GIL.
"""
from __future__ import annotations

import itertools
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import torch


class Stream(Protocol):
    first_micro_step: int

    def rows(self, micro_step: int): ...

    def make(self, micro_step: int, rows) -> tuple[torch.Tensor, torch.Tensor]: ...


class Prefetcher:
    """The stream's micro-batches from its first micro-step on, at most `depth`
    (default 2 per thread) made or being made ahead of the one asked for."""

    def __init__(self, stream: Stream, threads: int, depth: int | None = None):
        self._stream = stream
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="loader-decode")
        self._ready: queue.Queue[Future] = queue.Queue(maxsize=depth or 2 * threads)
        self._stop = threading.Event()
        self._producer = threading.Thread(target=self._produce, name="loader-rows", daemon=True)
        self._producer.start()

    def _produce(self) -> None:
        try:
            for micro_step in itertools.count(self._stream.first_micro_step):
                rows = self._stream.rows(micro_step)
                if not self._put(self._pool.submit(self._stream.make, micro_step, rows)):
                    return
        except BaseException as e:  # the step waiting for this batch raises it
            failed = Future()
            failed.set_exception(e)
            self._put(failed)

    def _put(self, future: Future) -> bool:
        """Queue `future` once there is room; False when closed meanwhile."""
        while not self._stop.is_set():
            try:
                self._ready.put(future, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._ready.get().result()

    def close(self) -> None:
        """Stop making batches; the threads end once their current batch is done."""
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
