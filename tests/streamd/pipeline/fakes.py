"""Small fakes of a source, a backend and a stage, and a helper that composes a graph of them like `compose` does."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from streamd.backends.base import Ready
from streamd.errors import BackendError, OutputError, SourceError
from streamd.model.detector import Detector, yolox_anchors
from streamd.ops.metrics import Metrics
from streamd.pipeline.graph import Graph, Queue
from streamd.pipeline.queues import Batcher
from streamd.pipeline.stage import Backoff
from streamd.stages.infer import ResultsStage, SubmitStage
from streamd.types import Frame, FrameResult


class FakeSource:
    """`frames` frames (None: endless) of a 64x48 picture; live sources may fail to open a few times."""

    def __init__(
        self, stream_id: str, frames: int | None = 10, *, live: bool = False, open_failures: int = 0,
        read_delay_s: float = 0.0, fail_read_at: int | None = None, read_error: Exception | None = None,
        hang_at: int | None = None, backoff: Backoff = Backoff(0.01, 0.04), flaps: int = 0,
    ):  # fmt: skip
        self.stream_id, self.live, self.frames, self.backoff = stream_id, live, frames, backoff
        self.open_failures, self.read_delay_s = open_failures, read_delay_s
        self.fail_read_at, self.read_error, self.hang_at = fail_read_at, read_error, hang_at
        self.flaps = flaps  # this many opens are each lost at their first read (a flapping source)
        self._just_opened = False
        self.sent = 0
        self.opens = 0
        self.open_calls: list[float] = []
        self.closed = 0
        self.release = threading.Event()  # ends a hang
        self.hanging = threading.Event()  # set while it hangs

    def open(self) -> None:
        self.open_calls.append(time.monotonic())
        if self.open_failures:
            self.open_failures -= 1
            raise SourceError(f"{self.stream_id}: connection refused")
        self.opens += 1
        self._just_opened = True

    def read(self) -> Frame | None:
        if self.frames is not None and self.sent >= self.frames:
            return None
        if self.hang_at is not None and self.sent == self.hang_at:
            self.hanging.set()
            self.release.wait(30)
        if self._just_opened and self.flaps:
            self._just_opened, self.flaps = False, self.flaps - 1
            raise SourceError(f"{self.stream_id}: lost again")
        self._just_opened = False
        if self.fail_read_at is not None and self.sent == self.fail_read_at:
            self.fail_read_at = None
            raise self.read_error or SourceError(f"{self.stream_id}: lost")
        if self.read_delay_s:
            time.sleep(self.read_delay_s)
        image = np.full((48, 64, 3), 255 if self.sent % 2 else 0, np.uint8)
        frame = Frame(self.stream_id, self.sent, self.sent / 25, image, decoded_at=time.time(), decode_ms=0.5)
        self.sent += 1
        return frame

    def close(self) -> None:
        self.closed += 1


class FakeBackend:
    """The tiny model's output shape, computed by numpy; optionally slow or failing. Synchronous (Ready)."""

    name = "fake"

    def __init__(self, max_batch: int = 4, delay_s: float = 0.0, fail_on_call: int | None = None, error: Exception | None = None):
        self.max_batch, self.delay_s = max_batch, delay_s
        self.fail_on_call, self.error = fail_on_call, error
        self.calls = 0
        self.batch_sizes: list[int] = []
        self.hook: Callable[[int], None] | None = None  # called with the call number before computing

    def submit(self, batch: np.ndarray) -> Ready:
        self.calls += 1
        if self.hook is not None:
            self.hook(self.calls)
        if self.fail_on_call is not None and self.calls >= self.fail_on_call:
            raise self.error or BackendError("fake backend: CUDA error")
        if self.delay_s:
            time.sleep(self.delay_s)
        self.batch_sizes.append(len(batch))
        output = np.zeros((len(batch), yolox_anchors((64, 64)), 8), np.float32)  # the tiny bundle's 64x64, 3 classes
        output[:, 0, :6] = [16, 16, 16, 16, 0.9, 1.0]
        return Ready(output)

    def close(self) -> None:
        pass


class CollectStage:
    """Records what it gets and yields it on; can fail (once or always) at a given item, be slow, or call back."""

    def __init__(
        self, name: str = "collect", *, fail_at: int | None = None, error: Exception | None = None,
        delay_s: float = 0.0, setup_error: Exception | None = None, on_item: Callable[[int], None] | None = None,
        fail_times: int = 1,
    ):  # fmt: skip
        self.name, self.fail_at, self.error, self.delay_s, self.setup_error = name, fail_at, error, delay_s, setup_error
        self.on_item, self.fail_times = on_item, fail_times
        self.items: list = []
        self.setups = 0
        self.closes = 0

    def setup(self) -> None:
        self.setups += 1
        if self.setup_error is not None:
            raise self.setup_error

    def process(self, item):
        if self.fail_at is not None and len(self.items) >= self.fail_at and self.fail_times > 0:
            self.fail_times -= 1
            raise self.error or OutputError(f"{self.name}: disk full")
        if self.delay_s:
            time.sleep(self.delay_s)
        self.items.append(item)
        if self.on_item is not None:
            self.on_item(len(self.items))
        yield item

    def close(self) -> None:
        self.closes += 1

    def seqs(self, stream_id: str) -> list[int]:
        return [item.frame.seq for item in self.items if isinstance(item, FrameResult) and item.stream_id == stream_id]


@dataclass
class Built:
    graph: Graph
    metrics: Metrics
    backend: FakeBackend
    outputs: dict[str, list[CollectStage]]
    publisher: CollectStage | None


def build(
    bundle, sources: list[FakeSource], *, backend: FakeBackend | None = None,
    outputs: Callable[[str], list[CollectStage]] = lambda sid: [CollectStage(f"out-{sid}")],
    policy: str = "auto", queue_size: int = 4, publisher: CollectStage | None = None, max_batch: int = 4,
    max_wait_ms: float = 1.0, extra: Callable[[Graph], None] | None = None,
) -> Built:  # fmt: skip
    """The daemon's shape (streamd.pipeline.compose) with fakes: sources -> batch -> submit -> results -> outputs."""
    metrics = Metrics([s.stream_id for s in sources])
    backend = backend or FakeBackend(max_batch)
    detector = Detector.for_bundle(bundle, backend)
    graph = Graph(metrics)
    batch = Batcher(max_batch, max_wait_ms)
    submit, results = SubmitStage(detector, warmup_runs=1), ResultsStage(detector, metrics)
    graph.add_flow(batch, submit)
    graph.add_flow(submit, results, Queue("in_flight", 1, "block", per_frame=False))
    by_stream = {}
    for source in sources:
        chosen = policy if policy != "auto" else ("drop_oldest" if source.live else "block")
        graph.add_flow(source, batch, Queue("input", queue_size, chosen))
        queue = Queue("output", queue_size, chosen)
        by_stream[source.stream_id] = outputs(source.stream_id)
        for stage in by_stream[source.stream_id]:
            graph.add_flow(results, stage, queue, stream=source.stream_id)
    if publisher is not None:
        live = any(s.live for s in sources)
        graph.add_flow(results, publisher, Queue("publish", queue_size * len(sources), "drop_oldest" if live else "block"))
    if extra is not None:
        extra(graph)
    graph.check()
    return Built(graph, metrics, backend, by_stream, publisher)
