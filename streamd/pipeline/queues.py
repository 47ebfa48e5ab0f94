"""Bounded queues with a named overflow policy, and the batcher that reads the input queues with credits.

Every queue is bounded. When one is full, its policy decides:

- `drop_oldest` (live sources): the put never waits; the oldest queued item
  is dropped and counted, so a camera is never stalled by a slow consumer
  and what gets through is the most recent picture.
- `block` (files): the put waits, up to its timeout, so that no frame of a
  file is lost; the caller retries until the stop protocol says otherwise.

Control items (an end of stream, a heartbeat, a track event: `item.control`)
are never dropped and never wait: they are few, and a worker that waits for
room to put one could wait for itself. Every get and put takes a timeout:
nothing in the pipeline waits forever.

Credit-based backpressure: a `block` queue after inference (a stream's
outputs, or the publisher when every stream is a file) is *credited*: the
`Batcher` takes a frame only after reserving a place for its result in each
such queue of its stream. A reservation is named by the frame's key
(stream id, seq): only that frame's result takes it, and the worker that
would have put it gives it back when the result does not come (an error, a
failed stage), so nothing leaks and nothing else (a heartbeat) takes a
frame's place. The inference workers never wait on one stream's slow
outputs; a slow stream slows itself (its input queue fills, its file source
waits) and no other.

Fresh batches: a frame's result is as old as its whole batch's inference, so
a batch that holds a frame of a stream with a stale budget (max_age_ms: a
paced stream) holds no more frames than the backend infers in
`BUDGET_SHARE` of that budget, as timed on the batches before it (the
worker's time between two gets, per frame). On the CPU, where a batch of 4
costs 4 frames' time, four live streams then get a frame each per batch of
one or two, each result one or two inferences old instead of four; a GPU,
quick per frame, still fills its batches.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

from streamd.types import Batch, EndOfStream, Frame

Policy = Literal["drop_oldest", "block"]
POLICIES: tuple[Policy, ...] = ("drop_oldest", "block")

# The share of a stream's max_age_ms that its frame's batch may take in the worker (inference): the rest is the
# decode, the wait for the batcher (up to a frame's interval: the input queue holds the newest frame) and the
# hand-offs to the socket. Measured (benchmarks/overload.py, 4 live 1080p30 streams, 2-core Xeon): batches of 4
# took 100-170 ms and published 0-20% of the results; batches of 1 published 77-83% on the same loaded machine.
BUDGET_SHARE = 0.5
# Weight of the newest batch in the running time per frame: quick to follow a change of load, yet one slow batch
# (a pause, a reconnect) does not halve the next batch on its own.
_FRAME_TIME_WEIGHT = 0.5

# The stdlib's exceptions, so callers read the familiar names.
Empty = queue.Empty
Full = queue.Full


class BoundedQueue:
    """A FIFO of at most `maxsize` items with an overflow policy.

    on_drop(item) is called, after the lock is released, for every item the
    drop_oldest policy discards; `dropped` counts them. Queues that share a
    `threading.Condition` (the Batcher's inputs) wake one reader together.
    Reservations (`try_reserve(key)`) hold places for the items of those keys
    on their way: such a put takes its reserved place and never waits.
    """

    def __init__(
        self,
        name: str,
        maxsize: int,
        policy: Policy,
        on_drop: Callable[[Any], None] | None = None,
        condition: threading.Condition | None = None,
    ):
        if maxsize < 1:
            raise ValueError(f"queue {name!r}: maxsize must be >= 1, got {maxsize}")
        if policy not in POLICIES:
            raise ValueError(f"queue {name!r}: policy must be one of {POLICIES}, got {policy!r}")
        self.name = name
        self.maxsize = maxsize
        self.policy = policy
        self.dropped = 0
        self._items: deque[Any] = deque()
        self._reserved: set[tuple[str, int]] = set()
        self._on_drop = on_drop
        self._on_room: list[Callable[[], None]] = []
        self._cond = condition or threading.Condition()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def on_room(self, callback: Callable[[], None]) -> None:
        """Call `callback` (without this queue's lock) after every get: a place may have come free."""
        self._on_room.append(callback)

    @property
    def reserved(self) -> int:
        """Places held for items on their way."""
        with self._cond:
            return len(self._reserved)

    def try_reserve(self, key: tuple[str, int]) -> bool:
        """Reserve a place for the item of `key` (stream id, seq); False when every place is taken or reserved."""
        with self._cond:
            if key in self._reserved:
                return True
            if len(self._items) + len(self._reserved) >= self.maxsize:
                return False
            self._reserved.add(key)
            return True

    def release(self, keys: Iterable[tuple[str, int]]) -> None:
        """Give back the reservations of these keys whose items will not come (a key not reserved: nothing)."""
        with self._cond:
            before = len(self._reserved)
            self._reserved.difference_update(keys)
            freed = len(self._reserved) != before
            if freed:
                self._cond.notify_all()
        if freed:
            for callback in self._on_room:
                callback()

    def put(self, item: Any, timeout_s: float) -> None:
        """Add `item`; raise Full if a `block` queue stayed full for timeout_s seconds.

        The item of a reserved key takes its place; a control item always gets in (see the module's doc).
        """
        dropped = None
        with self._cond:
            key = item.key
            if key is not None and key in self._reserved:
                self._reserved.discard(key)  # its place was reserved: it fits
            elif item.control:
                pass
            elif len(self._items) + len(self._reserved) >= self.maxsize:
                if self.policy == "drop_oldest":
                    dropped = self._drop_oldest_locked()
                else:
                    deadline = time.monotonic() + timeout_s
                    while len(self._items) + len(self._reserved) >= self.maxsize:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise Full(f"queue {self.name!r} full for {timeout_s} s")
                        self._cond.wait(left)
            self._items.append(item)
            self._cond.notify_all()
        if dropped is not None and self._on_drop is not None:
            self._on_drop(dropped)

    def _drop_oldest_locked(self) -> Any:
        for index, queued in enumerate(self._items):
            if not queued.control:
                del self._items[index]
                self.dropped += 1
                return queued
        return None

    def get(self, timeout_s: float) -> Any:
        """The oldest item; raise Empty if none came within timeout_s seconds."""
        with self._cond:
            deadline = time.monotonic() + timeout_s
            while not self._items:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Empty(f"queue {self.name!r} empty for {timeout_s} s")
                self._cond.wait(left)
            item = self._items.popleft()
            self._cond.notify_all()
        for callback in self._on_room:
            callback()
        return item

    def peek_locked(self) -> Any | None:
        """The oldest item without taking it (None when empty); the caller holds the shared condition."""
        return self._items[0] if self._items else None

    def pop_locked(self) -> Any:
        """Take the oldest item without waiting; the caller holds the shared condition."""
        item = self._items.popleft()
        self._cond.notify_all()
        return item


class Batcher:
    """The inference worker's inbox: every stream's input queue read as one, in batches, fairly, with credits.

    `get` returns a Batch of up to max_batch frames (waiting at most
    max_wait_ms for it to fill after its first frame), or an EndOfStream once
    a stream's last frame has gone into a batch. It takes one frame per stream
    per turn, starting after the stream served first last time, so a busy
    stream cannot starve a quiet one; and it takes a frame only when every
    credited queue of its stream has a place reserved for the frame's result.

    max_age_ms: the stale budget of each stream that has one (paced streams): a batch with a frame of such a
    stream holds at most `fresh_limit(budget)` frames (see the module's doc); a frame of it that would not fit
    the batch begun waits for the next one. Until a batch has been timed, such a batch holds one frame.
    """

    def __init__(self, max_batch: int, max_wait_ms: float, max_age_ms: Mapping[str, float] | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.name = "batch"
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1e3
        self.max_age_ms = dict(max_age_ms or {})
        self.frame_s: float | None = None  # the worker's time per frame of a batch (running), None: not timed yet
        self._handed: tuple[float, int] | None = None  # (monotonic, frames) of the batch the worker holds
        self._limit = max_batch  # the most frames the batch being gathered may hold
        self.condition = threading.Condition()
        self._inputs: list[tuple[str, BoundedQueue]] = []
        self._credited: dict[str, list[BoundedQueue]] = {}
        self._credits_on = True
        self._ends: deque[EndOfStream] = deque()
        self._start = 0

    def add_input(self, stream_id: str, q: BoundedQueue) -> None:
        """A stream's input queue; it must share this batcher's condition, so a put wakes the reader."""
        if q._cond is not self.condition:
            raise ValueError(f"queue {q.name!r} does not share the batcher's condition")
        self._inputs.append((stream_id, q))
        self._credited.setdefault(stream_id, [])

    def add_credited(self, stream_id: str, q: BoundedQueue) -> None:
        """A `block` queue that each frame of stream_id will put one result into."""
        self._credited.setdefault(stream_id, []).append(q)
        q.on_room(self._wake)

    def release(self, frames: Iterable[Frame]) -> None:
        """Give back every credit these frames hold (their results will not come: dropped or failed on the way)."""
        for frame in frames:
            for q in self._credited.get(frame.stream_id, ()):
                q.release((frame.key,))

    def disable_credits(self) -> None:
        """After a fatal error downstream: take every frame (it is discarded and counted) so no source waits."""
        with self.condition:
            self._credits_on = False
            self.condition.notify_all()

    def _wake(self) -> None:
        with self.condition:
            self.condition.notify_all()

    def fresh_limit(self, max_age_ms: float) -> int:
        """The most frames a batch with a frame of this budget may hold: as many as the worker handles, at its
        running time per frame, in BUDGET_SHARE of the budget (at least 1, at most max_batch; 1 until timed)."""
        if self.frame_s is None:
            return 1
        fits = int(BUDGET_SHARE * max_age_ms / 1e3 / max(self.frame_s, 1e-6))
        return max(1, min(self.max_batch, fits))

    def _time_the_last_batch(self) -> None:
        """The worker is back for more: the time since it got the last batch, per frame, joins the running time."""
        if self._handed is None:
            return
        handed_at, count = self._handed
        self._handed = None
        frame_s = (time.monotonic() - handed_at) / count
        if self.frame_s is None:
            self.frame_s = frame_s
        else:
            self.frame_s += _FRAME_TIME_WEIGHT * (frame_s - self.frame_s)

    def get(self, timeout_s: float) -> Batch | EndOfStream:
        """The next Batch or EndOfStream; raise Empty if nothing could be taken within timeout_s."""
        self._time_the_last_batch()
        if self._ends:
            return self._ends.popleft()
        frames: list[Any] = []
        with self.condition:
            self._limit = self.max_batch
            deadline = time.monotonic() + timeout_s
            while not self._take_locked(frames):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Empty(f"no frame to batch for {timeout_s} s")
                self.condition.wait(left)
            fill_deadline = time.monotonic() + self.max_wait_s
            while frames and len(frames) < self._limit:
                left = fill_deadline - time.monotonic()
                if left <= 0:
                    break
                self.condition.wait(left)
                self._take_locked(frames)
        if frames:
            self._handed = (time.monotonic(), len(frames))
            return Batch(tuple(frames), time.time())
        return self._ends.popleft()

    def _take_locked(self, frames: list[Any]) -> bool:
        """Move frames into `frames` (ends into self._ends), one per stream per turn; True when anything was taken.

        A frame of a stream with a budget lowers the batch's limit to its fresh_limit; one that would not fit
        under it closes the batch and is taken first by the next one (no stream waits behind a batch it does
        not fit, and none is passed over twice)."""
        took_any = False
        progress = True
        while progress and len(frames) < self._limit and self._inputs:
            progress = False
            count = len(self._inputs)
            first_next = None  # a budgeted stream whose frame did not fit: the next batch starts with it
            for offset in range(count):
                if len(frames) >= self._limit:
                    break
                index = (self._start + offset) % count
                stream_id, q = self._inputs[index]
                head = q.peek_locked()
                if head is None:
                    continue
                if isinstance(head, EndOfStream):
                    self._ends.append(q.pop_locked())
                else:
                    limit = self._limit
                    if (budget := self.max_age_ms.get(stream_id)) is not None:
                        limit = min(limit, self.fresh_limit(budget))
                    if len(frames) >= limit:
                        self._limit, first_next = len(frames), index
                        break
                    if not self._reserve(stream_id, head.key):
                        continue
                    frames.append(q.pop_locked())
                    self._limit = limit
                progress = took_any = True
            if first_next is not None:
                self._start = first_next
            elif progress:
                self._start = (self._start + 1) % count
            ended = {end.stream_id for end in self._ends}
            if ended:
                self._inputs = [(sid, q) for sid, q in self._inputs if sid not in ended]
                self._start = self._start % len(self._inputs) if self._inputs else 0
        return took_any

    def _reserve(self, stream_id: str, key: tuple[str, int]) -> bool:
        """Reserve a place for the frame `key` in every credited queue of the stream, all or none."""
        if not self._credits_on:
            return True
        reserved = []
        for q in self._credited[stream_id]:
            if not q.try_reserve(key):
                for done in reserved:
                    done.release((key,))
                return False
            reserved.append(q)
        return True

    def empty(self) -> bool:
        with self.condition:
            return not self._ends and all(q.peek_locked() is None for _, q in self._inputs)
