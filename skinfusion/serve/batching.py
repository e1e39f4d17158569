"""Micro-batching for the HTTP service: requests that arrive within a few milliseconds share one forward pass.

One asyncio task owns the queue. It takes the first waiting job, keeps collecting jobs for at
most ``wait_ms`` (or until ``max_batch`` images are gathered), and runs the whole batch through
the scoring function in a single-thread executor, so the event loop stays free to accept and
decode the next requests while the model works. Jobs that arrive during a pass are batched
together for the next one, so under load the batches grow by themselves.

Scoring is batch-independent (``Ensemble`` runs BatchNorm in inference mode), so an image gets
the same numbers alone or in a batch of 32; tests/test_serve.py checks it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence


class QueueFull(RuntimeError):
    """More work is waiting than the batcher's ``max_queue`` allows; the caller should retry later (HTTP 503)."""

    def __init__(self, waiting: int, limit: int, retry_after_s: int):
        super().__init__(f"the server is busy: {waiting} images are already waiting to be scored (the limit is "
                         f"{limit}, skinfusion serve --max-queue); retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclasses.dataclass
class _Job:
    items: list[Any]
    future: asyncio.Future


class MicroBatcher:
    """Collects scoring jobs from concurrent requests and scores them together.

    Args:
        score: called in a worker thread with a list of items (from one or more jobs), returns
            one result per item, in order.
        max_batch: the most images one pass takes (a job larger than this is split by ``submit``).
        wait_ms: how long the first job of a batch waits for company.
        on_batch: called (in the event loop) with the size of every batch scored, for metrics.
        max_queue: the most images (and ``run`` calls) that may wait for the model; beyond it
            ``submit`` and ``run`` raise ``QueueFull`` at once instead of queueing, so that a
            burst bigger than the server can absorb costs the clients a retry, not the server
            its memory. None: no limit.
    """

    def __init__(self, score: Callable[[list[Any]], Sequence[Any]], max_batch: int = 32, wait_ms: float = 5.0,
                 on_batch: Callable[[int], None] | None = None, max_queue: int | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_queue is not None and max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.score, self.max_batch, self.wait_s, self.on_batch = score, max_batch, max(0.0, wait_ms) / 1000.0, on_batch
        self.max_queue = max_queue
        self.waiting = 0  # images submitted and not yet in a forward pass, plus run() calls not yet finished
        self.rejected = 0
        # One thread: TensorFlow already uses every core for one pass, and one model call at a
        # time keeps Grad-CAM (``run``) from competing with the batches.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="skinfusion-model")
        self.forward_passes = 0
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None
        self._carry: _Job | None = None

    async def start(self) -> None:
        """Start the batching task on the running event loop."""
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop(), name="skinfusion-batcher")

    async def stop(self) -> None:
        """Finish the batch in progress, fail any job still queued, and stop the task."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        left = [self._carry] if self._carry is not None else []
        while self._queue is not None and not self._queue.empty():
            left.append(self._queue.get_nowait())
        for job in left:
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        self.executor.shutdown(wait=True)

    def check_room(self, n: int) -> None:
        """Raise ``QueueFull`` if ``n`` more images would take the waiting work past ``max_queue``.

        Callers may check before costly work (decoding an upload); ``submit`` checks again.

        Raises:
            QueueFull: the caller may retry later.
            ValueError: ``n`` alone is more than ``max_queue``: no retry would help.
        """
        if self.max_queue is not None and n > self.max_queue:
            raise ValueError(f"one request with {n} images is more than this server queues at once ({self.max_queue}, "
                             "skinfusion serve --max-queue); send fewer images per request")
        if self.max_queue is not None and self.waiting + n > self.max_queue:
            self.rejected += 1
            # The hint: a second per full batch waiting, a pass's rough upper bound on a small CPU.
            raise QueueFull(self.waiting, self.max_queue, max(1, round(self.waiting / max(self.max_batch, 1))))

    async def submit(self, items: Sequence[Any]) -> list[Any]:
        """Score ``items`` (split into chunks of at most ``max_batch``) and return their results in order.

        Raises:
            QueueFull: when more than ``max_queue`` images would be waiting (nothing is queued then).
        """
        if self._queue is None:
            raise RuntimeError("the batcher is not started")
        self.check_room(len(items))
        self.waiting += len(items)  # one event loop: no lock needed between the check and this
        loop = asyncio.get_running_loop()
        jobs = []
        for i in range(0, len(items), self.max_batch):
            job = _Job(list(items[i : i + self.max_batch]), loop.create_future())
            await self._queue.put(job)
            jobs.append(job)
        out: list[Any] = []
        for job in jobs:
            out += await job.future
        return out

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the model thread, between batches (for Grad-CAM); it counts as one waiting image.

        Raises:
            QueueFull: when the waiting work is already at ``max_queue``.
        """
        self.check_room(1)
        self.waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        finally:
            self.waiting -= 1

    async def _collect(self) -> list[_Job]:
        assert self._queue is not None
        if self._carry is not None:
            jobs, self._carry = [self._carry], None
        else:
            jobs = [await self._queue.get()]
        n = len(jobs[0].items)
        self.waiting -= n
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while n < self.max_batch:
            # Take what is already queued without waiting, then wait out the rest of the window.
            if self._queue.empty():
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), left)
                except asyncio.TimeoutError:
                    break
            else:
                job = self._queue.get_nowait()
            if n + len(job.items) > self.max_batch:
                # Too big to join: it opens the next batch (asyncio.Queue cannot put it back in front).
                self._carry = job
                break
            jobs.append(job)
            n += len(job.items)
            self.waiting -= len(job.items)
        return jobs

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect()
            items = [item for job in jobs for item in job.items]
            try:
                results = await loop.run_in_executor(self.executor, self.score, items)
            except Exception as exc:  # noqa: BLE001 - handed to every waiting request, which reports it
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            self.forward_passes += 1
            if self.on_batch is not None:
                self.on_batch(len(items))
            start = 0
            for job in jobs:
                if not job.future.done():  # a client that went away cancelled its future
                    job.future.set_result(list(results[start : start + len(job.items)]))
                start += len(job.items)
