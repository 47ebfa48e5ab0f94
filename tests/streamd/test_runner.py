"""streamd.pipeline.runner and graph: threads, queues, drops, reconnects and the shutdown protocol, with small fakes."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from streamd.errors import BackendError, FatalError, OutputError, RecoverableError, SourceError
from streamd.ops.metrics import Metrics, RunSummary
from streamd.ops.systemd import SystemdNotifier
from streamd.pipeline.graph import Branch, Flow, Pipeline
from streamd.pipeline.runner import Runner
from streamd.stages.batch import BatchInferStage
from streamd.types import Frame, FrameResult


class FakeSource:
    """`frames` frames (None: endless) of a 64x48 picture; live sources may fail to open a few times."""

    def __init__(
        self, stream_id: str, frames: int | None = 10, *, live: bool = False, open_failures: int = 0,
        read_delay_s: float = 0.0, fail_read_at: int | None = None, read_error: Exception | None = None,
        hang_at: int | None = None,
    ):  # fmt: skip
        self.stream_id, self.live, self.frames = stream_id, live, frames
        self.open_failures, self.read_delay_s = open_failures, read_delay_s
        self.fail_read_at, self.read_error, self.hang_at = fail_read_at, read_error, hang_at
        self.sent = 0
        self.opens = 0
        self.open_calls: list[float] = []
        self.closed = 0
        self.release = threading.Event()  # ends a hang

    def open(self) -> None:
        self.open_calls.append(time.monotonic())
        if self.open_failures:
            self.open_failures -= 1
            raise SourceError(f"{self.stream_id}: connection refused")
        self.opens += 1

    def read(self) -> Frame | None:
        if self.frames is not None and self.sent >= self.frames:
            return None
        if self.hang_at is not None and self.sent == self.hang_at:
            self.release.wait(30)
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
    """The tiny model's output shape, computed by numpy; optionally slow or failing."""

    name = "fake"

    def __init__(self, max_batch: int = 4, delay_s: float = 0.0, fail_on_call: int | None = None, error: Exception | None = None):
        self.max_batch, self.delay_s = max_batch, delay_s
        self.fail_on_call, self.error = fail_on_call, error
        self.calls = 0
        self.batch_sizes: list[int] = []
        self.closed = False

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.fail_on_call is not None and self.calls >= self.fail_on_call:
            raise self.error or BackendError("fake backend: CUDA error")
        if self.delay_s:
            time.sleep(self.delay_s)
        self.batch_sizes.append(len(batch))
        output = np.zeros((len(batch), 2, 8), np.float32)
        output[:, 0, :6] = [16, 16, 16, 16, 0.9, 1.0]
        return output

    def close(self) -> None:
        self.closed = True


class CollectStage:
    """Records what it gets and yields it on; can fail (fatal or recoverable) at a given item, or be slow."""

    def __init__(
        self, name: str = "collect", *, fail_at: int | None = None, error: Exception | None = None,
        delay_s: float = 0.0, setup_error: Exception | None = None,
    ):  # fmt: skip
        self.name, self.fail_at, self.error, self.delay_s, self.setup_error = name, fail_at, error, delay_s, setup_error
        self.items: list = []
        self.setups = 0
        self.closes = 0

    def setup(self) -> None:
        self.setups += 1
        if self.setup_error is not None:
            raise self.setup_error

    def process(self, item):
        if self.fail_at is not None and len(self.items) == self.fail_at:
            self.items.append(None)
            raise self.error or OutputError(f"{self.name}: disk full")
        if self.delay_s:
            time.sleep(self.delay_s)
        self.items.append(item)
        yield item

    def close(self) -> None:
        self.closes += 1

    def seqs(self, stream_id: str) -> list[int]:
        return [item.frame.seq for item in self.items if isinstance(item, FrameResult) and item.frame.stream_id == stream_id]


def pipeline(
    bundle, sources: list[FakeSource], *, backend: FakeBackend | None = None,
    outputs: Callable[[str], tuple[Flow, ...]] = lambda sid: (Flow(CollectStage(f"out-{sid}")),),
    policy: str = "auto", queue_size: int = 4, publisher: CollectStage | None = None, max_batch: int = 4,
    max_wait_ms: float = 1.0, reconnect: tuple[float, float] = (0.01, 0.04),
) -> Pipeline:  # fmt: skip
    branches = tuple(
        Branch(source, queue_size, policy, reconnect[0], reconnect[1], outputs(source.stream_id)) for source in sources
    )
    infer = BatchInferStage(bundle, backend or FakeBackend(max_batch), warmup_runs=1)
    metrics = Metrics([s.stream_id for s in sources])
    return Pipeline(branches, infer, max_batch, max_wait_ms, metrics, publisher)


def run(p: Pipeline, stop: threading.Event | None = None, **kwargs) -> RunSummary:
    kwargs.setdefault("drain_timeout_s", 3.0)
    return Runner(p, p.metrics, stop or threading.Event(), **kwargs).run()


def out_stage(p: Pipeline, stream_id: str) -> CollectStage:
    branch = next(b for b in p.branches if b.stream_id == stream_id)
    return branch.outputs[0].stage


def test_file_sources_lose_nothing_and_every_stage_is_closed_once(tiny_bundle):
    sources = [FakeSource("a", 30), FakeSource("b", 7)]
    p = pipeline(tiny_bundle, sources, publisher=CollectStage("publish"), queue_size=2)
    summary = run(p)
    assert summary.ok and summary.stopped_by == "end"
    for sid, count in (("a", 30), ("b", 7)):
        assert out_stage(p, sid).seqs(sid) == list(range(count))  # in order, no gap
        assert p.publisher.seqs(sid) == list(range(count))
        s = summary.stream(sid)
        assert (s.frames_in, s.processed, s.dropped, s.detections) == (count, count, 0, count)
    for stage in p.stages_in_order():
        assert stage.setups == 1 and stage.closes == 1 if isinstance(stage, CollectStage) else True
    assert p.infer.backend.closed and all(s.closed == 1 for s in sources)


def test_batches_mix_streams(tiny_bundle):
    backend = FakeBackend(max_batch=4, delay_s=0.01)
    p = pipeline(tiny_bundle, [FakeSource("a", 40), FakeSource("b", 40)], backend=backend, max_wait_ms=5)
    run(p)
    results = out_stage(p, "a").items
    assert max(r.batch_size for r in results) > 1
    assert max(backend.batch_sizes) <= 4


def test_a_live_source_never_waits_for_slow_inference_and_drops_are_counted(tiny_bundle):
    source = FakeSource("cam", 60, live=True, read_delay_s=0.002)
    p = pipeline(tiny_bundle, [source], backend=FakeBackend(max_batch=1, delay_s=0.02), queue_size=2, max_batch=1)
    started = time.monotonic()
    summary = run(p)
    s = summary.stream("cam")
    assert s.frames_in == 60 and s.dropped > 0
    assert s.processed + s.dropped == 60  # every frame is either processed or counted
    assert dict(s.dropped_by_queue)["input"] == s.dropped
    seqs = out_stage(p, "cam").seqs("cam")
    assert seqs == sorted(seqs) and len(seqs) < 60  # newest frames kept, in order
    assert time.monotonic() - started < 10


def test_a_file_source_waits_for_a_slow_consumer_instead_of_dropping(tiny_bundle):
    slow = CollectStage("slow-recorder", delay_s=0.005)
    p = pipeline(tiny_bundle, [FakeSource("f", 40)], outputs=lambda sid: (Flow(slow),), queue_size=1)
    summary = run(p)
    assert summary.stream("f").dropped == 0 and slow.seqs("f") == list(range(40))


def test_live_sources_reconnect_with_exponential_back_off(tiny_bundle):
    source = FakeSource("cam", 5, live=True, open_failures=3, fail_read_at=2)
    p = pipeline(tiny_bundle, [source], reconnect=(0.02, 0.05))
    summary = run(p)
    s = summary.stream("cam")
    assert s.reconnects == 4 and s.errors == 4 and s.processed == 5
    gaps = np.diff(source.open_calls[:4])
    assert gaps[0] >= 0.02 and gaps[1] >= 0.04 and gaps[2] >= 0.05  # 0.02, 0.04, then capped at max_s
    assert source.opens == 2  # once, and again after the read failure


def test_stop_event_stops_reading_drains_and_closes(tiny_bundle):
    sources = [FakeSource("cam", None, live=True, read_delay_s=0.005), FakeSource("file", None, read_delay_s=0.005)]
    publisher = CollectStage("publish")
    p = pipeline(tiny_bundle, sources, publisher=publisher)
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    summary = run(p, stop)
    assert time.monotonic() - started < 3
    assert summary.ok and summary.stopped_by == "stop"
    file_stream = summary.stream("file")
    assert file_stream.processed == file_stream.frames_in > 0  # the file's in-flight frames were drained, not lost
    assert out_stage(p, "file").closes == 1 and publisher.closes == 1


@pytest.mark.parametrize(
    "kwargs, stopped_by, frames",
    [({"max_frames": 5}, "max_frames", 5), ({"duration_s": 0.3}, "duration", None)],
)
def test_limits(tiny_bundle, kwargs, stopped_by, frames):
    p = pipeline(tiny_bundle, [FakeSource("a", None, read_delay_s=0.005), FakeSource("b", None, read_delay_s=0.005)])
    summary = run(p, **kwargs)
    assert summary.ok and summary.stopped_by == stopped_by
    if frames is not None:
        assert [s.processed for s in summary.streams] == [frames, frames]


@pytest.mark.parametrize(
    "error, fatal",
    [(OutputError("recorder: disk full"), True), (RecoverableError("one bad item"), False), (ZeroDivisionError("bug"), True)],
)
def test_output_stage_errors_are_classified_at_the_boundary(tiny_bundle, error, fatal):
    failing = CollectStage("rec", fail_at=3, error=error)
    sources = [FakeSource("a", 200), FakeSource("b", 50)]
    p = pipeline(tiny_bundle, sources, outputs=lambda sid: (Flow(failing),) if sid == "a" else (Flow(CollectStage()),), queue_size=1)
    started = time.monotonic()
    summary = run(p)
    assert time.monotonic() - started < 5  # no deadlock behind the failed stage's blocking queue
    assert failing.closes == 1
    if fatal:
        assert summary.stopped_by == "error" and not summary.ok
        assert ("ZeroDivisionError" if isinstance(error, ZeroDivisionError) else "disk full") in summary.error
        assert sources[0].sent < 200  # the sources stopped
    else:
        assert summary.ok and summary.stream("a").errors == 1 and summary.stream("a").processed == 200


@pytest.mark.parametrize("fail_on_call", [3, 4, 6, 9])  # calls 1-2 are the warm-up (batch 1 and max_batch)
def test_a_backend_failure_stops_the_pipeline_and_still_ends_every_stream(tiny_bundle, fail_on_call):
    sources = [FakeSource("a", 500), FakeSource("b", 500, live=True)]
    publisher = CollectStage("publish")
    p = pipeline(tiny_bundle, sources, backend=FakeBackend(fail_on_call=fail_on_call), publisher=publisher, queue_size=2)
    started = time.monotonic()
    summary = run(p)
    assert time.monotonic() - started < 2  # well inside the drain budget: every end-of-stream got through
    assert summary.stopped_by == "error" and "CUDA error" in summary.error
    assert out_stage(p, "a").closes == 1 and out_stage(p, "b").closes == 1 and publisher.closes == 1
    assert p.infer.backend.closed


def test_an_unexpected_source_error_ends_its_stream_and_the_run(tiny_bundle):
    source = FakeSource("a", 50, fail_read_at=3, read_error=KeyError("bug"))
    p = pipeline(tiny_bundle, [source, FakeSource("b", 5)])
    summary = run(p)
    assert summary.stopped_by == "error" and "KeyError" in summary.error
    assert out_stage(p, "a").seqs("a") == [0, 1, 2] and out_stage(p, "a").closes == 1


def test_a_file_read_error_ends_the_run_with_the_error(tiny_bundle):
    p = pipeline(tiny_bundle, [FakeSource("a", 50, fail_read_at=3)])
    summary = run(p)
    assert summary.stopped_by == "error" and "a: lost" in summary.error and summary.stream("a").errors == 1


def test_a_source_stuck_in_read_is_ended_by_the_supervisor(tiny_bundle):
    stuck = FakeSource("stuck", None, live=True, hang_at=3)
    p = pipeline(tiny_bundle, [stuck, FakeSource("ok", None, read_delay_s=0.005)])
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    try:
        summary = run(p, stop, drain_timeout_s=1.0)
    finally:
        stuck.release.set()
    assert time.monotonic() - started < 3
    assert "source:stuck" in summary.error
    assert out_stage(p, "stuck").closes == 1 and out_stage(p, "ok").closes == 1  # everything downstream still ended


def test_a_failed_setup_raises_before_ready_and_closes_what_was_set_up(tiny_bundle):
    broken = CollectStage("rec", setup_error=OutputError("cannot create /recordings"))
    first = CollectStage("first")
    p = pipeline(tiny_bundle, [FakeSource("a", 5), FakeSource("b", 5)], outputs=lambda sid: (Flow(first if sid == "a" else broken),))
    with pytest.raises(FatalError, match="cannot create"):
        run(p)
    assert first.closes == 1 and broken.closes == 0 and p.infer.backend.closed


def test_ready_then_watchdog_from_the_heartbeat_then_stopping(tiny_bundle, tmp_path: Path):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(tmp_path / "notify"))
    server.settimeout(0.01)
    notifier = SystemdNotifier(environ={"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "100000"})
    p = pipeline(tiny_bundle, [FakeSource("cam", None, live=True, read_delay_s=0.01)])
    stop = threading.Event()
    threading.Timer(0.6, stop.set).start()
    run(p, stop, notifier=notifier)
    messages = []
    while True:
        try:
            messages.append(server.recv(4096).decode())
        except TimeoutError:
            break
    server.close()
    kinds = [m.split("\n")[0].split("=")[0] for m in messages]
    assert kinds[0] == "READY"
    assert kinds.count("WATCHDOG") >= 2
    assert "STOPPING" in kinds and kinds.index("STOPPING") > kinds.index("WATCHDOG")


def test_a_stalled_worker_starves_the_watchdog(tiny_bundle, monkeypatch):
    """A backend hung for longer than the stall limit: the supervisor stops feeding the watchdog."""
    from streamd.pipeline import runner as runner_module

    monkeypatch.setattr(runner_module, "STALL_S", 0.2)
    pings: list[float] = []
    notifier = SystemdNotifier(environ={})
    notifier.watchdog_interval_s = 0.05
    monkeypatch.setattr(notifier, "watchdog", lambda: pings.append(time.monotonic()) or True)
    hang_started = []
    backend = FakeBackend(max_batch=1)
    original = backend.infer

    def hang_once(batch):
        if backend.calls == 3 and not hang_started:  # after the warm-up
            hang_started.append(time.monotonic())
            time.sleep(0.8)
        return original(batch)

    monkeypatch.setattr(backend, "infer", hang_once)
    p = pipeline(tiny_bundle, [FakeSource("a", 3)], backend=backend, max_batch=1)
    run(p, notifier=notifier)
    start = hang_started[0]
    silent = [t for t in pings if start + 0.35 < t < start + 0.75]
    assert pings and not silent


def test_wiring_errors_raise_at_build_time(tiny_bundle):
    shared = CollectStage("shared")
    with pytest.raises(ValueError, match="wired twice"):
        pipeline(tiny_bundle, [FakeSource("a"), FakeSource("b")], outputs=lambda sid: (Flow(shared),))
    with pytest.raises(ValueError, match="unique"):
        pipeline(tiny_bundle, [FakeSource("a"), FakeSource("a")])
    with pytest.raises(TypeError, match="not a Stage"):
        pipeline(tiny_bundle, [FakeSource("a")], outputs=lambda sid: (Flow(object()),))
    with pytest.raises(ValueError, match="queue policy"):
        pipeline(tiny_bundle, [FakeSource("a")], policy="newest")


def test_flows_fan_out_each_output_to_every_child(tiny_bundle):
    annotate, record, detlog = CollectStage("annotate"), CollectStage("record"), CollectStage("detlog")
    p = pipeline(tiny_bundle, [FakeSource("a", 6)], outputs=lambda sid: (Flow(annotate, then=(Flow(record),)), Flow(detlog)))
    assert [s.name for s in p.branches[0].stages_in_flow_order()] == ["annotate", "record", "detlog"]
    run(p)
    assert annotate.seqs("a") == record.seqs("a") == detlog.seqs("a") == list(range(6))
