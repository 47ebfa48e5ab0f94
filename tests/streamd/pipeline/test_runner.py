"""streamd.pipeline.runner, worker and supervisor: threads, queues, credits, drops, reconnects, failures, shutdown.

Small fakes (tests/streamd/pipeline/fakes.py) in the daemon's graph shape. No
wall-clock upper bounds: a run that deadlocks is caught by the drain budget
(it would end with "workers did not stop") or by pytest's timeout; stops
come from readiness signals (a stage that has seen N items), not timers.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from streamd.errors import FatalError, OutputError, RecoverableError
from streamd.ops.metrics import RunSummary
from streamd.ops.systemd import SystemdNotifier
from streamd.pipeline import supervisor as supervisor_module
from streamd.pipeline import worker as worker_module
from streamd.pipeline.runner import Runner
from streamd.pipeline.stage import Backoff
from tests.streamd.pipeline.fakes import Built, CollectStage, FakeBackend, FakeSource, build


def run(built: Built, stop: threading.Event | None = None, **kwargs) -> RunSummary:
    kwargs.setdefault("drain_timeout_s", 5.0)
    return Runner(built.graph, stop or threading.Event(), **kwargs).run()


def stop_after(count: int, stop: threading.Event):
    """A stage callback that sets the stop event once the stage has seen `count` items."""
    return lambda seen: stop.set() if seen >= count else None


def test_file_sources_lose_nothing_and_every_stage_is_set_up_and_closed_once(tiny_bundle):
    sources = [FakeSource("a", 30), FakeSource("b", 7)]
    built = build(tiny_bundle, sources, publisher=CollectStage("publish"), queue_size=2)
    summary = run(built)
    assert summary.ok and summary.stopped_by == "end"
    for sid, count in (("a", 30), ("b", 7)):
        assert built.outputs[sid][0].seqs(sid) == list(range(count))  # in order, no gap
        assert built.publisher.seqs(sid) == list(range(count))
        s = summary.stream(sid)
        assert (s.frames_in, s.processed, s.dropped, s.detections) == (count, count, 0, count)
    stages = [built.outputs["a"][0], built.outputs["b"][0], built.publisher]
    assert [(stage.setups, stage.closes) for stage in stages] == [(1, 1)] * 3
    assert all(s.closed == 1 for s in sources)


def test_batches_mix_streams(tiny_bundle):
    backend = FakeBackend(max_batch=4, delay_s=0.01)
    built = build(tiny_bundle, [FakeSource("a", 40), FakeSource("b", 40)], backend=backend, max_wait_ms=5)
    run(built)
    results = built.outputs["a"][0].items
    assert max(r.batch_size for r in results) > 1
    assert max(backend.batch_sizes) <= 4
    assert {r.stream_id for r in built.outputs["b"][0].items} == {"b"}  # each stream's outputs get its own results


def test_a_live_source_never_waits_for_slow_inference_and_drops_are_counted(tiny_bundle):
    source = FakeSource("cam", 60, live=True, read_delay_s=0.002)
    built = build(tiny_bundle, [source], backend=FakeBackend(max_batch=1, delay_s=0.02), queue_size=2, max_batch=1)
    summary = run(built)
    s = summary.stream("cam")
    dropped_before_inference = dict(s.dropped_by_queue).get("input", 0)
    assert s.frames_in == 60 and dropped_before_inference > 0  # inference is the slow part: frames wait there
    assert s.processed + dropped_before_inference == 60  # every frame is either processed or counted
    seqs = built.outputs["cam"][0].seqs("cam")
    assert seqs == sorted(seqs) and len(seqs) < 60  # newest frames kept, in order


def test_a_file_source_waits_for_a_slow_consumer_instead_of_dropping(tiny_bundle):
    slow = CollectStage("slow-recorder", delay_s=0.005)
    built = build(tiny_bundle, [FakeSource("f", 40)], outputs=lambda sid: [slow], queue_size=1)
    summary = run(built)
    assert summary.stream("f").dropped == 0 and slow.seqs("f") == list(range(40))


def _live_beside(tiny_bundle, neighbour: FakeSource | None, slow_s: float) -> tuple[RunSummary, Built]:
    live = FakeSource("cam", 150, live=True, read_delay_s=0.004)
    sources = [live] if neighbour is None else [live, neighbour]
    outputs = lambda sid: [CollectStage(f"rec-{sid}", delay_s=slow_s if sid == "file" else 0.0)]  # noqa: E731
    built = build(tiny_bundle, sources, outputs=outputs, queue_size=2, max_batch=2, max_wait_ms=0)
    return run(built, drain_timeout_s=30.0), built


def test_a_slow_output_of_one_stream_slows_only_that_stream(tiny_bundle):
    """Credit-based backpressure: the file's slow recorder makes the file wait, not the live camera beside it."""
    alone, _ = _live_beside(tiny_bundle, None, 0.0)
    beside, built = _live_beside(tiny_bundle, FakeSource("file", 40), slow_s=0.05)
    cam_alone, cam_beside = alone.stream("cam"), beside.stream("cam")
    file = beside.stream("file")
    assert file.processed == 40 and file.dropped == 0  # the file lost nothing: it waited
    assert built.outputs["file"][0].seqs("file") == list(range(40))
    # Without credits the inference thread blocked for 50 ms per file frame and the camera lost most frames.
    assert cam_beside.dropped <= cam_alone.dropped + 0.1 * cam_beside.frames_in
    assert cam_beside.processed >= 0.8 * cam_beside.frames_in
    p50_alone, p50_beside = cam_alone.latency("total")[0], cam_beside.latency("total")[0]
    assert p50_beside <= 3 * p50_alone + 25.0


def test_an_outage_is_counted_once_and_probed_often(tiny_bundle):
    """Away at the start for 3 attempts, then lost once: two outages (not four), each probed every initial_s."""
    source = FakeSource("cam", 5, live=True, open_failures=3, fail_read_at=2, backoff=Backoff(0.05, 1.0))
    built = build(tiny_bundle, [source])
    summary = run(built)
    s = summary.stream("cam")
    assert (s.outages, s.reconnects, s.errors) == (2, 2, 2)
    assert s.processed + dict(s.dropped_by_queue).get("input", 0) == 5  # a live frame is processed or dropped
    assert source.opens == 2  # once after the start outage, once after the read failure
    gaps = np.diff(source.open_calls[:4])
    assert all(gap >= 0.05 for gap in gaps) and max(gaps) < 0.05 * 2 ** 3  # no exponential growth while away


def test_a_flapping_source_backs_off_exponentially(tiny_bundle):
    """Lost at once each time it comes back: the waits double (0.01, 0.02, 0.04), capped at max_s."""
    source = FakeSource("cam", 5, live=True, flaps=4, backoff=Backoff(0.01, 0.04))
    summary = run(build(tiny_bundle, [source]))
    s = summary.stream("cam")
    assert s.outages == 4 and s.frames_in == 5
    assert s.processed + dict(s.dropped_by_queue).get("input", 0) == 5  # a live frame is processed or dropped before
    gaps = np.diff(source.open_calls)
    assert gaps[0] >= 0.02 and gaps[1] >= 0.04 and gaps[2] >= 0.04  # doubled from the first loss, then capped


def test_stop_event_stops_reading_drains_and_closes(tiny_bundle):
    stop = threading.Event()
    sources = [FakeSource("cam", None, live=True, read_delay_s=0.005), FakeSource("file", None, read_delay_s=0.005)]
    publisher = CollectStage("publish", on_item=stop_after(20, stop))
    built = build(tiny_bundle, sources, publisher=publisher)
    summary = run(built, stop)
    assert summary.ok and summary.stopped_by == "stop"
    file_stream = summary.stream("file")
    assert file_stream.processed == file_stream.frames_in > 0  # the file's in-flight frames were drained, not lost
    assert built.outputs["file"][0].closes == 1 and publisher.closes == 1


@pytest.mark.parametrize(
    "kwargs, stopped_by, frames",
    [({"max_frames": 5}, "max_frames", 5), ({"duration_s": 0.3}, "duration", None)],
)
def test_limits(tiny_bundle, kwargs, stopped_by, frames):
    built = build(tiny_bundle, [FakeSource("a", None, read_delay_s=0.005), FakeSource("b", None, read_delay_s=0.005)])
    summary = run(built, **kwargs)
    assert summary.ok and summary.stopped_by == stopped_by
    if frames is not None:
        assert [s.processed for s in summary.streams] == [frames, frames]


@pytest.mark.parametrize("error", [OutputError("recorder: disk full"), ZeroDivisionError("bug")])
def test_a_failing_output_stops_for_its_stream_only_and_is_retried(tiny_bundle, monkeypatch, error):
    """A stream's output that fails is closed, its items dropped and counted, and set up again later;
    detection, the stream's other outputs, the publisher and the other streams go on."""
    monkeypatch.setattr(worker_module, "RETRY_S", 0.05)
    failing = CollectStage("rec", fail_at=3, error=error, fail_times=1, delay_s=0.002)
    log_a = CollectStage("log-a")
    sources = [FakeSource("a", 200, read_delay_s=0.001), FakeSource("b", 50)]
    outputs = lambda sid: [failing, log_a] if sid == "a" else [CollectStage("rec-b")]  # noqa: E731
    built = build(tiny_bundle, sources, outputs=outputs, publisher=CollectStage("publish"), queue_size=1)
    summary = run(built)
    assert summary.ok and summary.stopped_by == "end"
    a = summary.stream("a")
    assert a.processed == 200 and a.errors == 1 and ("disk full" in a.last_error or "ZeroDivisionError" in a.last_error)
    assert log_a.seqs("a") == list(range(200))  # the stream's detection log went on
    assert built.publisher.seqs("a") == list(range(200)) and built.publisher.seqs("b") == list(range(50))
    assert built.outputs["b"][0].seqs("b") == list(range(50))
    lost = dict(a.dropped_by_queue)["rec failed"]
    assert 1 <= lost < 200 and len(failing.items) == 200 - lost  # retried: it took frames again
    assert failing.setups == 2 and failing.closes == 2  # closed when it failed, set up again, closed at the end


def test_an_output_that_sets_up_and_fails_at_once_waits_longer_each_time(tiny_bundle, monkeypatch, caplog):
    """A recorder on a disk that stays full opens its file and fails on the first frame: that is not "working
    again", so each retry waits twice as long (5, 10, 20 ... 60 s in the daemon) and nothing says it is back,
    until a frame gets through."""
    monkeypatch.setattr(worker_module, "RETRY_S", 0.02)
    caplog.set_level(logging.INFO, logger="streamd.pipeline.worker")
    failing = CollectStage("rec", fail_at=3, fail_times=4, delay_s=0.001)
    built = build(tiny_bundle, [FakeSource("a", 600, read_delay_s=0.002)], outputs=lambda sid: [failing], queue_size=1)
    summary = run(built)
    assert summary.ok and summary.stream("a").errors == 4
    waits = [float(m.split("retrying in ")[1].split(" s")[0]) for m in caplog.messages if "retrying in" in m]
    assert waits == [0.02, 0.04, 0.08, 0.16]
    assert sum("works again" in m for m in caplog.messages) == 1  # once, when a frame got through
    assert failing.setups == 5 and len(failing.items) > 3


def test_a_recoverable_output_error_skips_the_item(tiny_bundle):
    failing = CollectStage("rec", fail_at=3, error=RecoverableError("one bad item"))
    built = build(tiny_bundle, [FakeSource("a", 20)], outputs=lambda sid: [failing])
    summary = run(built)
    assert summary.ok and summary.stream("a").errors == 1 and len(failing.items) == 19


@pytest.mark.parametrize("fail_on_call", [5, 6, 8, 11])  # calls 1-4 are the warm-up (the model alone, then pictures, at batch 1 and max_batch)
def test_a_backend_failure_stops_the_pipeline_and_still_ends_every_stream(tiny_bundle, fail_on_call):
    sources = [FakeSource("a", 500), FakeSource("b", 500, live=True)]
    publisher = CollectStage("publish")
    built = build(tiny_bundle, sources, backend=FakeBackend(fail_on_call=fail_on_call), publisher=publisher, queue_size=2)
    summary = run(built)
    assert summary.stopped_by == "error" and "CUDA error" in summary.error
    assert "did not stop" not in summary.error  # every end-of-stream got through: nothing waited for the drain budget
    assert built.outputs["a"][0].closes == 1 and built.outputs["b"][0].closes == 1 and publisher.closes == 1


def test_a_source_that_raises_ends_its_own_stream_and_the_others_run_to_their_end(tiny_bundle):
    source = FakeSource("a", 50, fail_read_at=3, read_error=IndexError("list index out of range"))
    built = build(tiny_bundle, [source, FakeSource("b", 30)])
    summary = run(built)
    assert summary.ok and summary.stopped_by == "end"
    assert built.outputs["a"][0].seqs("a") == [0, 1, 2] and built.outputs["a"][0].closes == 1
    assert built.outputs["b"][0].seqs("b") == list(range(30))
    (failed,) = summary.failed_streams
    assert failed.stream_id == "a" and "IndexError" in failed.end_error and failed.errors == 1


def test_a_live_source_that_raises_reconnects(tiny_bundle):
    source = FakeSource("cam", 10, live=True, fail_read_at=3, read_error=IndexError("demuxer bug"))
    summary = run(build(tiny_bundle, [source]))
    s = summary.stream("cam")
    assert summary.ok and s.end_error is None and (s.outages, s.reconnects) == (1, 1) and s.frames_in == 10
    assert s.processed + dict(s.dropped_by_queue).get("input", 0) == 10  # live: processed, or dropped before it


def test_a_source_stuck_in_read_is_ended_by_the_supervisor(tiny_bundle):
    stuck = FakeSource("stuck", None, live=True, hang_at=3)
    stop = threading.Event()
    ok = FakeSource("ok", None, read_delay_s=0.005)
    outputs = lambda sid: [CollectStage(f"out-{sid}", on_item=stop_after(10, stop) if sid == "ok" else None)]  # noqa: E731
    built = build(tiny_bundle, [stuck, ok], outputs=outputs)
    try:
        summary = run(built, stop, drain_timeout_s=1.0)
    finally:
        stuck.release.set()
    assert stuck.hanging.is_set() and "source:stuck" in summary.error
    assert built.outputs["stuck"][0].closes == 1 and built.outputs["ok"][0].closes == 1  # downstream still ended


def test_a_shared_stage_that_fails_its_setup_stops_the_start_and_closes_what_was_set_up(tiny_bundle):
    first = CollectStage("first")
    publisher = CollectStage("publish", setup_error=OutputError("cannot bind tcp://127.0.0.1:5555"))
    built = build(tiny_bundle, [FakeSource("a", 5)], outputs=lambda sid: [first], publisher=publisher)
    with pytest.raises(FatalError, match="cannot bind"):
        run(built)
    assert first.closes == 1 and publisher.closes == 0


class FailsSetupOnce(CollectStage):
    """A recorder whose folder cannot be created at the start (a full disk), and can be later."""

    def setup(self) -> None:
        self.setups += 1
        if self.setups == 1:
            raise OutputError("stream 'b': cannot create the recording folder /recordings: No space left on device")


def test_a_stream_output_that_fails_its_setup_starts_stopped_and_is_retried(tiny_bundle, monkeypatch):
    """A full disk at the start stops that recording only: the daemon starts, detects and publishes, and the
    recording is set up again later (before, the daemon exited and systemd restarted it in a hot loop)."""
    monkeypatch.setattr(worker_module, "RETRY_S", 0.05)
    broken = FailsSetupOnce("rec-b")
    publisher = CollectStage("publish")
    sources = [FakeSource("a", 5), FakeSource("b", 200, read_delay_s=0.002)]
    outputs = lambda sid: [CollectStage("rec-a") if sid == "a" else broken]  # noqa: E731
    built = build(tiny_bundle, sources, outputs=outputs, publisher=publisher)
    summary = run(built)
    assert summary.ok and summary.stream("b").errors == 1
    assert publisher.seqs("b") == list(range(200)) and built.outputs["a"][0].seqs("a") == list(range(5))
    lost = dict(summary.stream("b").dropped_by_queue)["rec-b failed"]
    assert broken.setups == 2 and 1 <= lost < 200 and len(broken.items) == 200 - lost  # it took frames again
    assert broken.closes == 1  # closed once, after its setup worked


def test_ready_then_watchdog_from_the_heartbeat_then_stopping(tiny_bundle, tmp_path: Path):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(tmp_path / "notify"))
    server.settimeout(0.05)
    notifier = SystemdNotifier(environ={"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "100000"})
    stop = threading.Event()
    messages: list[str] = []

    def read() -> None:  # systemd's side; stops the run after the second watchdog ping
        while not (stop.is_set() and "STOPPING" in "".join(messages)):
            try:
                messages.append(server.recv(4096).decode())
            except TimeoutError:
                continue
            if sum(m.startswith("WATCHDOG") for m in messages) >= 2:
                stop.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    run(build(tiny_bundle, [FakeSource("cam", None, live=True, read_delay_s=0.01)]), stop, notifier=notifier)
    reader.join(10)
    server.close()
    kinds = [m.split("\n")[0].split("=")[0] for m in messages]
    assert kinds[0] == "READY"
    assert kinds.count("WATCHDOG") >= 2
    assert "STOPPING" in kinds and kinds.index("STOPPING") > kinds.index("WATCHDOG")


def test_a_stalled_worker_starves_the_watchdog(tiny_bundle, monkeypatch):
    """A backend hung for longer than the stall limit: the supervisor stops feeding the watchdog."""
    monkeypatch.setattr(supervisor_module, "STALL_S", 0.2)
    pings: list[float] = []
    notifier = SystemdNotifier(environ={})
    notifier.watchdog_interval_s = 0.05
    monkeypatch.setattr(notifier, "watchdog", lambda: pings.append(time.monotonic()) or True)
    hang_started: list[float] = []
    backend = FakeBackend(max_batch=1)

    def hang_once(call: int) -> None:
        if call == 3:  # after the warm-up
            hang_started.append(time.monotonic())
            time.sleep(1.5)

    backend.hook = hang_once
    run(build(tiny_bundle, [FakeSource("a", 3)], backend=backend, max_batch=1), notifier=notifier)
    start = hang_started[0]
    # STALL_S is 0.2 s: well past it and well before the hang ends, nothing feeds the watchdog (wide margins:
    # a ping's time is taken when the supervisor, maybe descheduled on a loaded machine, finally sends it)
    silent = [t for t in pings if start + 0.7 < t < start + 1.3]
    assert pings and not silent


def test_flows_fan_out_each_output_to_every_child(tiny_bundle):
    annotate, record, detection_log = CollectStage("annotate"), CollectStage("record"), CollectStage("detection_log")
    # annotate -> record in the same worker, on each of annotate's outputs; the detection log beside them
    built = build(tiny_bundle, [FakeSource("a", 6)], outputs=lambda sid: [(annotate, record), detection_log])
    (worker,) = [w for w in built.graph.workers() if w.name == "output:a"]  # one queue, one worker for both flows
    assert [n.obj.name for n in worker.nodes()] == ["annotate", "record", "detection_log"]
    run(built)
    assert annotate.seqs("a") == record.seqs("a") == detection_log.seqs("a") == list(range(6))


def test_live_streams_on_slow_inference_get_batches_fresh_enough_to_publish(tiny_bundle):
    """Four cameras at 100 fps on a CPU-like backend (45 ms a frame, so a batch of 4 is 180 ms: older than the
    150 ms budget before it is out): each batch holds what half the budget fits, one frame, and at least half of
    the results are fresh enough to publish (each about one inference old: a third of the budget)."""
    from streamd.types import FrameResult

    sources = [FakeSource(f"cam-{i}", 60, live=True, read_delay_s=0.01) for i in range(4)]
    backend = FakeBackend(max_batch=8, frame_delay_s=0.045)
    built = build(tiny_bundle, sources, backend=backend, publisher=(publisher := CollectStage("publish")),
                  queue_size=1, max_batch=8, outputs=lambda sid: [])  # fmt: skip
    summary = run(built)
    assert backend.batch_sizes[:4] == [1, 8, 1, 8]  # the warm-up: the model alone, then pictures
    assert backend.batch_sizes[4:] and set(backend.batch_sizes[4:]) == {1}
    for source in sources:
        s = summary.stream(source.stream_id)
        published = sum(isinstance(item, FrameResult) and item.stream_id == source.stream_id for item in publisher.items)
        stale = dict(s.dropped_by_queue).get("stale", 0)
        assert s.processed == published + stale and s.processed > 0
        assert published >= s.processed / 2, (source.stream_id, published, stale)
