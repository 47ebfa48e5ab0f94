"""compose's own graph over time: credits that belong to their frames, the tracker as a stage of its stream,
and a stream's state that no dropped frame can lose. Real threads and queues, fakes at the ends (fakes.build)."""

from __future__ import annotations

import json
import threading
import time

import numpy as np

from streamd.errors import RecoverableError
from streamd.pipeline.runner import Runner
from streamd.types import Frame, FrameResult, TrackReport
from tests.streamd.pipeline.fakes import CollectStage, FakeBackend, FakeSource, build


def run(built, stop: threading.Event | None = None, **kwargs):
    kwargs.setdefault("drain_timeout_s", 5.0)
    return Runner(built.graph, stop or threading.Event(), **kwargs).run()


def guard(stop: threading.Event, after_s: float = 30.0) -> threading.Timer:
    """Stops a run that would otherwise wait forever (the failure these tests look for), so it fails, not hangs."""
    timer = threading.Timer(after_s, stop.set)
    timer.daemon = True
    timer.start()
    return timer


def test_a_batch_skipped_by_a_recoverable_error_gives_its_credits_back(tiny_bundle):
    """A file stream whose output queue holds 2 results: the batcher reserves a place there for each frame it takes.
    A batch the backend skips (RecoverableError) never puts its results: its credits must come back, else the stream
    has no credit left and waits forever (before: anonymous counts, leaked)."""
    backend = FakeBackend(max_batch=2)

    def fail_the_first_real_batch(call: int) -> None:
        if call == 5:  # warm-up is calls 1-4 (the model alone, then pictures, at batch 1 and max_batch): the first real batch
            raise RecoverableError("fake backend: one bad batch")

    backend.hook = fail_the_first_real_batch
    built = build(tiny_bundle, [FakeSource("f", 20)], backend=backend, queue_size=2, max_batch=2)
    stop = threading.Event()
    timer = guard(stop)
    try:
        summary = run(built, stop)
    finally:
        timer.cancel()
    s = summary.stream("f")
    assert summary.stopped_by == "end" and s.errors == 1  # ended by itself, not by the guard
    seqs = built.outputs["f"][0].seqs("f")
    assert 1 <= 20 - s.processed <= 2 and len(seqs) == s.processed and seqs == sorted(seqs)  # only that batch lost
    (output,) = [q for q in built.graph.queues() if q.name == "output:f"]
    assert output.reserved == 0  # nothing held at the end


def test_tracks_are_a_stage_of_their_stream_with_events_published_and_logged(tiny_bundle):
    """The same box in every frame: one track, its id on every message after its first frame, confirmed after
    N of M; a 'confirmed' event once and an 'ended' one at the stream's end, to the publisher and the outputs."""
    publisher = CollectStage("publish")
    track = {"enabled": True, "confirm_n": 2, "confirm_m": 3, "new_track_threshold": 0.5, "high_conf_threshold": 0.5}
    built = build(tiny_bundle, [FakeSource("a", 12), FakeSource("b", 12)], publisher=publisher, track=track)
    summary = run(built)
    assert summary.ok
    for sid in ("a", "b"):
        out = built.outputs[sid][0].items
        results = [item for item in out if isinstance(item, FrameResult)]
        events = [json.loads(item.message) for item in out if isinstance(item, TrackReport)]
        messages = [json.loads(r.message) for r in results]
        ids = {d["track_id"] for m in messages[1:] for d in m["detections"]}
        assert len(ids) == 1 and None not in ids  # one object, one id, from its second frame on
        confirmed = [d["confirmed"] for m in messages for d in m["detections"]]
        assert confirmed[:2] == [False, False] and all(confirmed[3:])
        assert [e["event"] for e in events] == ["confirmed", "ended"]
        assert events[1]["frames"] >= 11 and events[1]["track_id"] in ids
        published = [json.loads(i.message)["schema"] for i in publisher.items if i.stream_id == sid]
        assert published.count("streamd.track/1") == 2 and published.count("streamd.detections/3") == 12
    ids = {sid: {d["track_id"] for r in built.outputs[sid][0].items if isinstance(r, FrameResult)
                 for d in json.loads(r.message)["detections"]} - {None} for sid in ("a", "b")}  # fmt: skip
    assert ids == {"a": {1}, "b": {1}}  # each stream has its own tracker and its own ids


class FlaggingSource(FakeSource):
    """A live fake whose frame `at` ends a 4.25 s outage, jumps the clock and is frozen (its flags, as decode sets).
    It reads frame `at` only once `busy` is set (inference is held on an earlier frame), so that frame waits in the
    one-frame input queue and the next frame replaces it: dropped whatever the machine's speed."""

    def __init__(self, *args, at: int, busy: threading.Event, **kwargs):
        super().__init__(*args, **kwargs)
        self.at, self.busy = at, busy

    def read(self) -> Frame | None:
        if self.sent == self.at:
            self.busy.wait(30)
        frame = super().read()
        if frame is None or frame.seq != self.at:
            return frame
        return Frame(frame.stream_id, frame.seq, frame.pts_s, frame.image, frame.decoded_at, frame.decode_ms,
                     gap_s=4.25, pts_jump_s=-3.5, frozen=True)  # fmt: skip


def test_a_state_flag_survives_the_drop_of_the_frame_that_carried_it(tiny_bundle):
    """The frame that ends an outage is dropped on purpose (inference held while the live source reads on, its input
    queue dropping the oldest): the next delivered message still says what happened (Metrics.observe in the source's
    thread). Mutation check: folding the flags in from the frame at the message stage instead loses them here."""
    busy, release = threading.Event(), threading.Event()
    source = FlaggingSource("cam", 30, live=True, at=5, busy=busy)
    backend = FakeBackend(max_batch=1)

    def hold_first(call: int) -> None:
        if call == 3:  # the first real batch (after 2 warm-up runs): hold it until the source is well past frame 5
            busy.set()
            release.wait(30)

    backend.hook = hold_first
    publisher = CollectStage("publish")
    built = build(tiny_bundle, [source], backend=backend, publisher=publisher, max_batch=1)
    watcher = threading.Thread(target=lambda: (_wait_for(lambda: source.sent >= 12), release.set()), daemon=True)
    watcher.start()
    summary = run(built)
    results = [json.loads(i.message) for i in publisher.items if isinstance(i, FrameResult)]
    seqs = [m["seq"] for m in results]
    assert 5 not in seqs and dict(summary.stream("cam").dropped_by_queue).get("input", 0) > 0  # its frame was dropped
    later = [m["stream_state"] for m in results if m["seq"] > 5]
    assert later and all((s["outage_s"], s["last_gap_s"], s["clock_jumps"], s["last_jump_s"]) == (4.25, 4.25, 1, -3.5)
                         for s in later)  # fmt: skip


def _wait_for(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
