"""DynamicBatcher on its own (no model): grouping, max_batch, the window, back-pressure, failures
and shutdown, with a run_batch that records its calls."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from latentpi.server.batching import DynamicBatcher, QueueFullError
from latentpi.server.metrics import ServerMetrics


@dataclass(frozen=True)
class Item:
    group: str
    value: int


class Recorder:
    """run_batch that answers value * 10 per item and remembers each call's items."""

    def __init__(self, fail_on: int | None = None, gate: threading.Event | None = None) -> None:
        self.calls: list[list[Item]] = []
        self.fail_on = fail_on
        self.gate = gate

    def __call__(self, items: Sequence[Item]) -> list[int]:
        if self.gate is not None:
            assert self.gate.wait(10)
        self.calls.append(list(items))
        if any(item.value == self.fail_on for item in items):
            raise ValueError("model failed")
        return [item.value * 10 for item in items]


def batcher(run: Recorder, **overrides: float) -> DynamicBatcher[Item, int]:
    options = {"max_batch": 4, "window_s": 0.2, "max_queue": 64, **overrides}
    return DynamicBatcher(
        run,
        max_batch=int(options["max_batch"]),
        window_s=options["window_s"],
        max_queue=int(options["max_queue"]),
        metrics=ServerMetrics(),
    )


def test_groups_by_spec_and_splits_at_max_batch() -> None:
    async def main() -> tuple[list[int], Recorder]:
        run = Recorder()
        queue = batcher(run)
        queue.start()
        items = [Item("a", i) for i in range(5)] + [Item("b", i) for i in range(5, 7)]
        results = await asyncio.gather(*(queue.submit(item) for item in items))
        await queue.stop()
        return list(results), run

    results, run = asyncio.run(main())
    assert results == [i * 10 for i in range(7)]  # each caller gets its own row back
    groups = [(call[0].group, [item.value for item in call]) for call in run.calls]
    assert all(len({item.group for item in call}) == 1 for call in run.calls)
    assert ("a", [0, 1, 2, 3]) in groups
    assert sorted(value for _, values in groups for value in values) == list(range(7))
    assert max(len(call) for call in run.calls) == 4


def test_a_lone_request_waits_only_for_the_window() -> None:
    async def main() -> float:
        queue = batcher(Recorder(), window_s=0.05)
        queue.start()
        started = time.monotonic()
        assert await queue.submit(Item("a", 1)) == 10
        elapsed = time.monotonic() - started
        await queue.stop()
        return elapsed

    assert asyncio.run(main()) < 2.0


def test_no_window_when_no_other_request_may_come() -> None:
    async def main() -> float:
        queue = DynamicBatcher(
            Recorder(),
            max_batch=4,
            window_s=5.0,
            max_queue=64,
            metrics=ServerMetrics(),
            more_may_come=lambda: False,
        )
        queue.start()
        started = time.monotonic()
        assert await queue.submit(Item("a", 1)) == 10
        elapsed = time.monotonic() - started
        await queue.stop()
        return elapsed

    assert asyncio.run(main()) < 1.0


def test_requests_queue_up_while_the_model_runs_and_are_refused_when_full() -> None:
    async def main() -> tuple[list[int | BaseException], Recorder]:
        gate = threading.Event()
        run = Recorder(gate=gate)
        queue = batcher(run, max_batch=1, window_s=0.0, max_queue=2)
        queue.start()
        first = asyncio.ensure_future(queue.submit(Item("a", 1)))
        await asyncio.sleep(0.1)  # the model thread now holds item 1 behind the gate
        waiting = [asyncio.ensure_future(queue.submit(Item("a", v))) for v in (2, 3)]
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFullError, match="queue: expected at most 2 waiting requests"):
            await queue.submit(Item("a", 4))
        gate.set()
        results = await asyncio.gather(first, *waiting, return_exceptions=True)
        await queue.stop()
        return list(results), run

    results, run = asyncio.run(main())
    assert results == [10, 20, 30]
    assert [len(call) for call in run.calls] == [1, 1, 1]


def test_a_failing_batch_fails_its_requests_only() -> None:
    async def main() -> tuple[list[int | BaseException], int]:
        queue = batcher(Recorder(fail_on=2), window_s=0.0, max_batch=1)
        queue.start()
        results = await asyncio.gather(
            *(queue.submit(Item("a", v)) for v in (1, 2, 3)), return_exceptions=True
        )
        after = await queue.submit(Item("a", 4))
        await queue.stop()
        return list(results), after

    results, after = asyncio.run(main())
    assert results[0] == 10 and results[2] == 30
    assert isinstance(results[1], ValueError)
    assert after == 40


def test_stop_fails_waiting_requests() -> None:
    async def main() -> BaseException | int:
        gate = threading.Event()
        queue = batcher(Recorder(gate=gate), max_batch=1, window_s=0.0)
        queue.start()
        running = asyncio.ensure_future(queue.submit(Item("a", 1)))
        await asyncio.sleep(0.1)
        waiting = asyncio.ensure_future(queue.submit(Item("a", 2)))
        await asyncio.sleep(0.05)
        gate.set()  # let the running batch end so the executor can shut down
        await queue.stop()
        await asyncio.gather(running, return_exceptions=True)
        return (await asyncio.gather(waiting, return_exceptions=True))[0]

    outcome = asyncio.run(main())
    assert isinstance(outcome, RuntimeError) and "shutting down" in str(outcome)
