"""streamd.pipeline.queues: bounded queues with a named overflow policy, and the fair batch reader."""

from __future__ import annotations

import threading
import time

import pytest

from streamd.pipeline.queues import BoundedQueue, Empty, FairQueueGroup, Full
from streamd.types import EndOfStream


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
    for item in puts:
        q.put(item, timeout_s=0.01)
    assert [q.get(timeout_s=0.01) for _ in range(len(q))] == expected_items
    assert dropped == expected_dropped
    assert q.dropped == len(expected_dropped)


def test_block_policy_times_out_then_unblocks_when_read():
    q = BoundedQueue("q", 1, "block")
    q.put("a", timeout_s=0.01)
    started = time.monotonic()
    with pytest.raises(Full):
        q.put("b", timeout_s=0.05)
    assert time.monotonic() - started >= 0.05
    reader = threading.Timer(0.05, lambda: q.get(timeout_s=1))
    reader.start()
    q.put("b", timeout_s=2)  # returns once the reader made room
    reader.join()
    assert q.get(timeout_s=0.01) == "b" and q.dropped == 0


def test_get_times_out_with_empty():
    q = BoundedQueue("q", 2, "block")
    started = time.monotonic()
    with pytest.raises(Empty):
        q.get(timeout_s=0.05)
    assert time.monotonic() - started >= 0.05


@pytest.mark.parametrize("policy", ["drop_oldest", "block"])
def test_end_of_stream_is_never_dropped_nor_blocked(policy):
    q = BoundedQueue("q", 2, policy)
    q.put(1, timeout_s=0.01)
    q.put(2, timeout_s=0.01)
    end = EndOfStream("s")
    q.put(end, timeout_s=0.01)  # a full queue still takes the end (no wait, no Full)
    expected = [2, end] if policy == "drop_oldest" else [1, 2, end]
    assert [q.get(0.01) for _ in range(len(q))] == expected


def test_drop_oldest_skips_an_end_of_stream_when_dropping():
    q = BoundedQueue("q", 2, "drop_oldest")
    end = EndOfStream("s")
    q.put(end, timeout_s=0.01)
    q.put(1, timeout_s=0.01)
    q.put(2, timeout_s=0.01)  # full: drops 1, the oldest frame, not the older end
    assert [q.get(0.01) for _ in range(len(q))] == [end, 2]
    assert q.dropped == 1


@pytest.mark.parametrize(
    "maxsize, policy, error",
    [(0, "block", "maxsize"), (2, "newest", "policy")],
)
def test_bad_queue_arguments(maxsize, policy, error):
    with pytest.raises(ValueError, match=error):
        BoundedQueue("q", maxsize, policy)


def _group(*sizes: int) -> tuple[FairQueueGroup, list[BoundedQueue]]:
    condition = threading.Condition()
    group = FairQueueGroup(condition)
    queues = [group.add(BoundedQueue(f"s{i}", size, "block", condition=condition)) for i, size in enumerate(sizes)]
    return group, queues


def test_group_takes_round_robin_so_a_busy_stream_cannot_starve_a_quiet_one():
    group, (busy, quiet) = _group(16, 16)
    for i in range(10):
        busy.put(f"a{i}", 0.01)
    for i in range(2):
        quiet.put(f"b{i}", 0.01)
    first = group.get_batch(4, 0.0, 0.1)
    assert sorted(first) == ["a0", "a1", "b0", "b1"]
    assert group.get_batch(4, 0.0, 0.1) == ["a2", "a3", "a4", "a5"]


def test_group_rotates_which_queue_is_served_first():
    group, (a, b) = _group(8, 8)
    for i in range(4):
        a.put(f"a{i}", 0.01)
        b.put(f"b{i}", 0.01)
    firsts = [group.get_batch(1, 0.0, 0.1)[0][0] for _ in range(4)]
    assert firsts == ["a", "b", "a", "b"]


def test_group_waits_for_the_first_item_then_at_most_max_wait():
    group, (a,) = _group(8)
    started = time.monotonic()
    assert group.get_batch(4, 0.0, 0.05) == []
    assert time.monotonic() - started >= 0.05
    a.put("first", 0.01)
    threading.Timer(0.03, lambda: a.put("late", 0.1)).start()
    assert group.get_batch(2, 5.0, 0.1) == ["first", "late"]  # waited for the second, returned when full
    a.put("x", 0.01)
    started = time.monotonic()
    assert group.get_batch(4, 0.0, 0.1) == ["x"]  # max_wait 0: no wait once something is there
    assert time.monotonic() - started < 0.05


def test_group_batch_fills_while_waiting_and_stops_at_max_items():
    group, (a,) = _group(8)
    a.put(0, 0.01)

    def later():
        for i in range(1, 6):
            a.put(i, 0.1)
            time.sleep(0.005)

    threading.Thread(target=later).start()
    batch = group.get_batch(3, 2.0, 0.1)
    assert batch == [0, 1, 2]  # full before max_wait: returned at once


def test_group_refuses_a_queue_with_another_condition():
    group, _ = _group(1)
    with pytest.raises(ValueError, match="condition"):
        group.add(BoundedQueue("other", 1, "block"))


def test_group_remove_and_empty():
    group, (a, b) = _group(2, 2)
    assert group.empty()
    b.put(1, 0.01)
    assert not group.empty()
    group.remove(b)
    assert group.empty() and group.queues == (a,)
