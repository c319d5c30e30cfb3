"""Dynamic batching: requests from concurrent clients that arrive within a short window run as one
model call, grouped by what they capture (one compiled function per group).

The model runs on one worker thread (one device); while it runs, new requests queue up and the next
gather takes them at once, so under load batches fill without waiting out the window. The window is
also skipped when `more_may_come()` says no other request can arrive (the app: every open connection
already has its request in), so a lone client never waits for company.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from latentpi.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)


class Groupable(Protocol):
    @property
    def group(self) -> Hashable: ...


ItemT = TypeVar("ItemT", bound=Groupable)
ResultT = TypeVar("ResultT")


@runtime_checkable
class BatchCompiler(Protocol):
    """Optional: lets the batcher compile a new kind of batch off the model thread."""

    def is_compiled(self, items: Sequence[Any]) -> bool: ...

    def compile(self, items: Sequence[Any]) -> None: ...


class QueueFullError(RuntimeError):
    """More requests are waiting than the server accepts."""


@dataclass
class _Pending(Generic[ItemT, ResultT]):
    item: ItemT
    future: asyncio.Future[ResultT] = field(repr=False)


class DynamicBatcher(Generic[ItemT, ResultT]):
    """`await submit(item)` returns that item's own result from a batched `run_batch(items)` call."""

    def __init__(
        self,
        run_batch: Callable[[Sequence[ItemT]], Sequence[ResultT]],
        *,
        max_batch: int,
        window_s: float,
        max_queue: int,
        metrics: ServerMetrics,
        more_may_come: Callable[[], bool] | None = None,
        compiler: BatchCompiler | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._window_s = window_s
        self._max_queue = max_queue
        self._metrics = metrics
        self._more_may_come = more_may_come or (lambda: True)
        self._compiler = compiler
        # A batch that needs a compile waits on its own thread, so batches whose function is
        # already compiled keep running meanwhile (a new latent spec never stalls the others).
        self._compile_executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="latentpi-compile"
        )
        self._compiling: dict[asyncio.Task[None], list[_Pending[ItemT, ResultT]]] = {}
        self._queue: asyncio.Queue[_Pending[ItemT, ResultT]] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="latentpi-model")
        self._task: asyncio.Task[None] | None = None
        self._in_flight: list[_Pending[ItemT, ResultT]] = []  # taken from the queue, not answered

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="latentpi-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        compiling = list(self._compiling.items())
        for task, _ in compiling:
            task.cancel()
        await asyncio.gather(*(task for task, _ in compiling), return_exceptions=True)
        # Requests gathered or running when the loop was cancelled would otherwise never resolve.
        waiting = [
            *(pending for _, chunk in compiling for pending in chunk),
            *self._in_flight,
            *(self._queue.get_nowait() for _ in range(self._queue.qsize())),
        ]
        for pending in waiting:
            if not pending.future.done():
                pending.future.set_exception(RuntimeError("server shutting down"))
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._compile_executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, item: ItemT) -> ResultT:
        if self._queue.qsize() >= self._max_queue:
            raise QueueFullError(
                f"queue: expected at most {self._max_queue} waiting requests, the server is overloaded"
            )
        future: asyncio.Future[ResultT] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(item, future))
        self._metrics.queue_depth.set(self._queue.qsize())
        return await future

    async def _loop(self) -> None:
        while True:
            self._in_flight = []
            await self._gather(self._in_flight)
            self._metrics.queue_depth.set(self._queue.qsize())
            live = [p for p in self._in_flight if not p.future.done()]  # skip clients that left
            for chunk in _chunks_by_group(live, self._max_batch):
                if self._compiler is not None and not self._compiler.is_compiled(
                    [p.item for p in chunk]
                ):
                    self._compile_then_requeue(chunk)
                else:
                    await self._run(chunk)

    async def _gather(self, gathered: list[_Pending[ItemT, ResultT]]) -> None:
        """The first waiting request, then whatever arrives within the window (up to max_batch)."""
        gathered.append(await self._queue.get())
        deadline = asyncio.get_running_loop().time() + self._window_s
        while len(gathered) < self._max_batch:
            if not self._queue.empty():
                gathered.append(self._queue.get_nowait())
                continue
            if not self._more_may_come():
                break
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                gathered.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break

    def _compile_then_requeue(self, chunk: list[_Pending[ItemT, ResultT]]) -> None:
        task = asyncio.get_running_loop().create_task(self._compile(chunk))
        self._compiling[task] = chunk
        task.add_done_callback(lambda done: self._compiling.pop(done, None))

    async def _compile(self, chunk: list[_Pending[ItemT, ResultT]]) -> None:
        assert self._compiler is not None
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(
                self._compile_executor, self._compiler.compile, [p.item for p in chunk]
            )
        except Exception as error:
            logger.exception("compiling for a batch of %d failed", len(chunk))
            for pending in chunk:
                if not pending.future.done():
                    pending.future.set_exception(error)
            return
        for pending in chunk:  # back in line, now with a compiled function
            self._queue.put_nowait(pending)

    async def _run(self, chunk: list[_Pending[ItemT, ResultT]]) -> None:
        self._metrics.batch_size.observe(len(chunk))
        loop = asyncio.get_running_loop()
        try:
            with self._metrics.infer_latency.time():
                results = await loop.run_in_executor(
                    self._executor, self._run_batch, [p.item for p in chunk]
                )
        except Exception as error:  # one failing batch must not stop the server
            logger.exception("model call failed for a batch of %d", len(chunk))
            for pending in chunk:
                if not pending.future.done():
                    pending.future.set_exception(error)
            return
        for pending, result in zip(chunk, results, strict=True):
            if not pending.future.done():
                pending.future.set_result(result)


def _chunks_by_group(
    gathered: list[_Pending[ItemT, ResultT]], max_batch: int
) -> list[list[_Pending[ItemT, ResultT]]]:
    groups: dict[Hashable, list[_Pending[ItemT, ResultT]]] = {}
    for pending in gathered:
        groups.setdefault(pending.item.group, []).append(pending)
    return [
        items[i : i + max_batch]
        for items in groups.values()
        for i in range(0, len(items), max_batch)
    ]
