"""streamd.pipeline.queues: bounded queues with a named overflow policy, and the batcher with credits."""

from __future__ import annotations

import threading
import time

import pytest

import numpy as np

from streamd.pipeline.queues import Batcher, BoundedQueue, Empty, Full
from streamd.types import EndOfStream, Frame, Heartbeat


@pytest.mark.parametrize(
    "policy, puts, expected_items, expected_dropped",
    [
        ("drop_oldest", [0, 1, 2], [0, 1, 2], []),
        ("drop_oldest", [0, 1, 2, 3, 4], [2, 3, 4], [0, 1]),
        ("block", [0, 1, 2], [0, 1, 2], []),
    ],
)
def test_policy_table(policy, puts, expected_items, expected_dropped):
    dropped = []
    q = BoundedQueue("q", 3, policy, on_drop=dropped.append)
    for seq in puts:
        q.put(frame("s", seq), timeout_s=0.01)
    assert [q.get(timeout_s=0.01).seq for _ in range(len(q))] == expected_items
    assert [item.seq for item in dropped] == expected_dropped
    assert q.dropped == len(expected_dropped)


def test_block_policy_times_out_then_unblocks_when_read():
    q = BoundedQueue("q", 1, "block")
    a, b = frame("s", 0), frame("s", 1)
    q.put(a, timeout_s=0.01)
    started = time.monotonic()
    with pytest.raises(Full):
        q.put(b, timeout_s=0.05)
    assert time.monotonic() - started >= 0.05
    reader = threading.Thread(target=lambda: q.get(timeout_s=1))
    reader.start()
    q.put(b, timeout_s=2)  # returns once the reader made room
    reader.join()
    assert q.get(timeout_s=0.01) is b and q.dropped == 0


def test_get_times_out_with_empty():
    q = BoundedQueue("q", 2, "block")
    started = time.monotonic()
    with pytest.raises(Empty):
        q.get(timeout_s=0.05)
    assert time.monotonic() - started >= 0.05


@pytest.mark.parametrize("policy", ["drop_oldest", "block"])
def test_end_of_stream_is_never_dropped_nor_blocked(policy):
    q = BoundedQueue("q", 2, policy)
    one, two = frame("s", 1), frame("s", 2)
    q.put(one, timeout_s=0.01)
    q.put(two, timeout_s=0.01)
    end = EndOfStream("s")
    q.put(end, timeout_s=0.01)  # a full queue still takes the end (no wait, no Full)
    assert [q.get(0.01) for _ in range(len(q))] == [one, two, end]  # a control item never makes room: none dropped


def test_drop_oldest_skips_an_end_of_stream_when_dropping():
    q = BoundedQueue("q", 2, "drop_oldest")
    end = EndOfStream("s")
    q.put(end, timeout_s=0.01)
    q.put(frame("s", 1), timeout_s=0.01)
    q.put(frame("s", 2), timeout_s=0.01)  # full: drops 1, the oldest frame, not the older end
    assert [item if item is end else item.seq for item in (q.get(0.01) for _ in range(len(q)))] == [end, 2]
    assert q.dropped == 1


@pytest.mark.parametrize(
    "maxsize, policy, error",
    [(0, "block", "maxsize"), (2, "newest", "policy")],
)
def test_bad_queue_arguments(maxsize, policy, error):
    with pytest.raises(ValueError, match=error):
        BoundedQueue("q", maxsize, policy)


def frame(stream_id: str, seq: int) -> Frame:
    return Frame(stream_id, seq, seq / 25, np.zeros((4, 4, 3), np.uint8), decoded_at=time.time())


def _batcher(
    *sizes: int, max_batch: int = 4, max_wait_ms: float = 0.0, max_age_ms: dict[str, float] | None = None
) -> tuple[Batcher, list[BoundedQueue]]:
    batcher = Batcher(max_batch, max_wait_ms, max_age_ms)
    queues = []
    for i, size in enumerate(sizes):
        q = BoundedQueue(f"input:s{i}", size, "block", condition=batcher.condition)
        batcher.add_input(f"s{i}", q)
        queues.append(q)
    return batcher, queues


def seqs(batch) -> list[str]:
    return [f"{f.stream_id}/{f.seq}" for f in batch.frames]


def test_batcher_takes_round_robin_so_a_busy_stream_cannot_starve_a_quiet_one():
    batcher, (busy, quiet) = _batcher(16, 16)
    for i in range(10):
        busy.put(frame("s0", i), 0.01)
    for i in range(2):
        quiet.put(frame("s1", i), 0.01)
    assert sorted(seqs(batcher.get(0.1))) == ["s0/0", "s0/1", "s1/0", "s1/1"]
    assert seqs(batcher.get(0.1)) == ["s0/2", "s0/3", "s0/4", "s0/5"]


def test_batcher_rotates_which_stream_is_served_first():
    batcher, (a, b) = _batcher(8, 8, max_batch=1)
    for i in range(4):
        a.put(frame("s0", i), 0.01)
        b.put(frame("s1", i), 0.01)
    firsts = [batcher.get(0.1).frames[0].stream_id for _ in range(4)]
    assert firsts == ["s0", "s1", "s0", "s1"]


def test_batcher_waits_for_the_first_frame_then_at_most_max_wait():
    batcher, (a,) = _batcher(8, max_batch=2, max_wait_ms=5000)
    with pytest.raises(Empty):
        batcher.get(0.05)
    a.put(frame("s0", 0), 0.01)
    ready = threading.Event()
    late = threading.Thread(target=lambda: (ready.wait(5), a.put(frame("s0", 1), 0.1)))
    late.start()
    ready.set()
    assert seqs(batcher.get(0.1)) == ["s0/0", "s0/1"]  # waited for the second, returned when full
    late.join()
    quick, (b,) = _batcher(8, max_wait_ms=0)
    b.put(frame("s0", 0), 0.01)
    assert seqs(quick.get(0.1)) == ["s0/0"]  # max_wait 0: no wait once something is there


def test_a_stream_end_comes_after_its_last_frame_and_removes_the_stream():
    batcher, (a, b) = _batcher(8, 8)
    a.put(frame("s0", 0), 0.01)
    a.put(EndOfStream("s0"), 0.01)
    b.put(frame("s1", 0), 0.01)
    assert sorted(seqs(batcher.get(0.1))) == ["s0/0", "s1/0"]
    assert batcher.get(0.1) == EndOfStream("s0")
    assert batcher.empty()
    a.put(frame("s0", 1), 0.01)  # nothing follows an end: the stream is no longer read
    assert batcher.empty()


def test_credits_take_a_frame_only_when_its_streams_block_queue_has_room():
    batcher, (a, b) = _batcher(8, 8)
    out_a = BoundedQueue("output:s0", 2, "block")
    batcher.add_credited("s0", out_a)
    for i in range(4):
        a.put(frame("s0", i), 0.01)
        b.put(frame("s1", i), 0.01)
    first = seqs(batcher.get(0.1))
    assert sorted(first) == ["s0/0", "s0/1", "s1/0", "s1/1"]  # two places reserved for stream s0's results
    assert seqs(batcher.get(0.1)) == ["s1/2", "s1/3"]  # s0 has no credit left: only s1 goes on
    with pytest.raises(Empty):
        batcher.get(0.05)
    out_a.put(frame("s0", 0), 0.01)  # its result takes its reservation: never waits
    out_a.put(frame("s0", 1), 0.01)
    assert len(out_a) == 2
    got = []
    taker = threading.Thread(target=lambda: got.append(batcher.get(2.0)))
    taker.start()
    out_a.get(0.01)  # the output drains one: a place comes free and wakes the batcher
    taker.join()
    assert seqs(got[0]) == ["s0/2"]


def test_a_reservation_is_its_frames_and_release_gives_it_back():
    q = BoundedQueue("q", 1, "block")
    assert q.try_reserve(("s", 0)) and not q.try_reserve(("s", 1))
    q.release([("s", 1)])  # not reserved: nothing happens
    assert q.reserved == 1
    q.release([("s", 0)])
    assert q.try_reserve(("s", 1))
    with pytest.raises(Full):  # another item cannot take frame 1's place
        q.put(frame("s", 5), 0.01)
    q.put(mine := frame("s", 1), 0.01)
    assert q.get(0.01) is mine and q.reserved == 0


def test_a_control_item_neither_takes_a_reservation_nor_waits():
    """The heartbeat once took a frame's reservation, and that frame's result then raised Full in a shared thread."""
    q = BoundedQueue("publish", 1, "block")
    assert q.try_reserve(("s", 0))
    q.put(beat := Heartbeat(b"{}"), 0.01)  # the queue is fully reserved: the heartbeat gets in anyway
    q.put(result := frame("s", 0), 0.01)  # and the reserved frame still fits, without waiting
    assert [q.get(0.01), q.get(0.01)] == [beat, result]


def test_disabled_credits_take_everything():
    batcher, (a,) = _batcher(8)
    out = BoundedQueue("output:s0", 1, "block")
    batcher.add_credited("s0", out)
    for i in range(3):
        a.put(frame("s0", i), 0.01)
    assert seqs(batcher.get(0.1)) == ["s0/0"]
    batcher.disable_credits()
    assert seqs(batcher.get(0.1)) == ["s0/1", "s0/2"]


def test_batcher_refuses_a_queue_with_another_condition():
    batcher, _ = _batcher(1)
    with pytest.raises(ValueError, match="condition"):
        batcher.add_input("x", BoundedQueue("other", 1, "block"))


# --- fresh batches: a batch with a frame of a stream with a stale budget fits half of it ---------------------


def infer_batches(batcher: Batcher, count: int, frame_s: float) -> list[list[str]]:
    """`count` batches taken as the inference worker takes them, each holding the worker frame_s per frame (real
    sleeps: a CPU backend, whose batch of n costs n frames' time)."""
    batches = []
    for _ in range(count):
        batch = batcher.get(1.0)
        batches.append(seqs(batch))
        time.sleep(frame_s * len(batch.frames))
    return batches


def filled(*counts: int, **kwargs) -> Batcher:
    """A batcher over `len(counts)` streams s0, s1 ... whose input queues already hold that many frames each."""
    batcher, queues = _batcher(*(max(1, n) for n in counts), **kwargs)
    for i, (q, n) in enumerate(zip(queues, counts)):
        for seq in range(n):
            q.put(frame(f"s{i}", seq), 0.01)
    return batcher


def test_slow_inference_gives_a_budgeted_stream_batches_of_one_in_turn():
    """30 ms a frame against half of a 100 ms budget: one frame fits (a loaded machine only makes it slower)."""
    batcher = filled(6, 6, 6, 6, max_batch=8, max_age_ms={f"s{i}": 100.0 for i in range(4)})
    batches = infer_batches(batcher, 12, frame_s=0.03)
    assert [len(b) for b in batches] == [1] * 12
    assert [b[0].split("/")[0] for b in batches] == ["s0", "s1", "s2", "s3"] * 3  # still round-robin
    assert batcher.frame_s >= 0.03


def test_quick_inference_still_fills_the_batches_and_nothing_is_timed_before_the_first():
    """2 ms a frame against half of 1000 ms: max_batch fits; the first batch, not yet timed, holds one frame."""
    batcher = filled(10, 10, 10, 10, max_batch=8, max_age_ms={f"s{i}": 1000.0 for i in range(4)})
    assert batcher.fresh_limit(1000.0) == 1
    sizes = [len(b) for b in infer_batches(batcher, 5, frame_s=0.002)]
    assert sizes == [1, 8, 8, 8, 8]


def test_the_limit_follows_inference_that_slows_down_within_a_few_batches():
    """From 2 to 60 ms a frame, 200 ms budget: the running time per frame (the newest batch weighs half) passes
    50 ms after 3 batches, and from then on one frame fits; a batch never grows while the worker slows."""
    batcher = filled(40, 40, 40, 40, max_batch=8, max_age_ms={f"s{i}": 200.0 for i in range(4)})
    assert [len(b) for b in infer_batches(batcher, 3, frame_s=0.002)][1:] == [8, 8]
    sizes = [len(b) for b in infer_batches(batcher, 7, frame_s=0.06)]
    assert sizes[0] == 8 and sizes == sorted(sizes, reverse=True)
    assert sizes[4:] == [1, 1, 1]


def test_a_budgeted_frame_closes_a_batch_it_would_not_fit_and_goes_first_in_the_next():
    """A file read as fast as it decodes beside a camera, 30 ms a frame against half of the camera's 100 ms: the
    camera's frame goes alone, and the file's batch closes where the camera's next frame would wait behind it, which
    the next batch takes first (one frame per stream per turn, as the round robin wants); once the camera has
    nothing waiting, the file's frames fill their batches."""
    batcher = filled(3, 30, max_batch=8, max_age_ms={"s0": 100.0})
    batches = infer_batches(batcher, 6, frame_s=0.03)
    assert batches == [["s0/0"], ["s1/0"], ["s0/1"], ["s1/1"], ["s0/2"], [f"s1/{i}" for i in range(2, 10)]]
