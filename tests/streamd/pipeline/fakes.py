"""Small fakes of a source, a backend and a stage, and `build`: the daemon's own graph (`compose`) around them."""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamd.backends.base import HostBackend
from streamd.errors import BackendError, OutputError, SourceError
from streamd.model.bundle import Preprocess
from streamd.model.postprocess import yolox_anchors
from streamd.detector import Detector
from streamd.ops.metrics import Metrics
from streamd.config import StreamdConfig
from streamd.pipeline.compose import Endpoints, compose
from streamd.pipeline.graph import Graph
from streamd.pipeline.stage import Backoff
from streamd.stages.infer import SubmitStage
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


class FakeBackend(HostBackend):
    """The tiny model's output shape, computed by numpy; optionally slow (delay_s a call, frame_delay_s more a
    frame: a CPU backend, whose batch of n costs n frames' time) or failing. A host backend (synchronous)."""

    name = "fake"
    input_hw = (64, 64)  # the tiny bundle's
    preprocess = Preprocess()

    def __init__(self, max_batch: int = 4, delay_s: float = 0.0, fail_on_call: int | None = None, error: Exception | None = None,
                 frame_delay_s: float = 0.0):  # fmt: skip
        self.max_batch, self.delay_s, self.frame_delay_s = max_batch, delay_s, frame_delay_s
        self.fail_on_call, self.error = fail_on_call, error
        self.calls = 0
        self.batch_sizes: list[int] = []
        self.hook: Callable[[int], None] | None = None  # called with the call number before computing

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.hook is not None:
            self.hook(self.calls)
        if self.fail_on_call is not None and self.calls >= self.fail_on_call:
            raise self.error or BackendError("fake backend: CUDA error")
        if self.delay_s or self.frame_delay_s:
            time.sleep(self.delay_s + self.frame_delay_s * len(batch))
        self.batch_sizes.append(len(batch))
        output = np.zeros((len(batch), yolox_anchors((64, 64)), 8), np.float32)  # the tiny bundle's 64x64, 3 classes
        output[:, 0, :6] = [16, 16, 16, 16, 0.9, 1.0]
        return output


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
    config: StreamdConfig


def fake_config(bundle, sources: list[FakeSource], *, policy: str = "auto", queue_size: int = 4, max_batch: int = 4,
                max_wait_ms: float = 1.0, track: dict | None = None) -> StreamdConfig:  # fmt: skip
    """The config `compose` reads for these fake sources: a live one is a UDP stream, a file one an (empty) file."""
    placeholder = Path(tempfile.gettempdir()) / "streamd-fake-source.mp4"
    placeholder.touch()
    streams = [
        {"id": source.stream_id, "source": "udp://127.0.0.1:9" if source.live else str(placeholder),
         "queue": {"size": queue_size, "policy": policy}, "track": track or {"enabled": False}}
        for source in sources
    ]  # fmt: skip
    return StreamdConfig.model_validate({
        "model": str(bundle.path), "batch": {"max_batch": max_batch, "max_wait_ms": max_wait_ms}, "streams": streams,
    })  # fmt: skip


def build(
    bundle, sources: list[FakeSource], *, backend: FakeBackend | None = None,
    outputs: Callable[[str], list[CollectStage | tuple[CollectStage, ...]]] = lambda sid: [CollectStage(f"out-{sid}")],
    policy: str = "auto", queue_size: int = 4, publisher: CollectStage | None = None, max_batch: int = 4,
    max_wait_ms: float = 1.0, track: dict | None = None,
) -> Built:  # fmt: skip
    """The daemon's own graph (streamd.pipeline.compose) with fakes at its ends: each stream's outputs are chains
    (a stage, or a tuple of stages called one after the other), the publisher a stage; tracking off unless `track`."""
    config = fake_config(bundle, sources, policy=policy, queue_size=queue_size, max_batch=max_batch,
                         max_wait_ms=max_wait_ms, track=track)  # fmt: skip
    metrics = Metrics([s.stream_id for s in sources])
    backend = backend or FakeBackend(max_batch)
    detector = Detector.for_bundle(bundle, backend)
    by_stream, chains = {}, {}
    for source in sources:
        made = outputs(source.stream_id)
        chains[source.stream_id] = tuple(chain if isinstance(chain, tuple) else (chain,) for chain in made)
        by_stream[source.stream_id] = [chain[0] for chain in chains[source.stream_id]]
    endpoints = Endpoints({s.stream_id: s for s in sources}, chains, publisher)
    graph = compose(config, detector, metrics, endpoints)
    for node in graph.stages():
        if isinstance(node, SubmitStage):
            node.warmup_runs = 1
    return Built(graph, metrics, backend, by_stream, publisher, config)
