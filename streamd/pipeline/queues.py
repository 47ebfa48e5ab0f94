"""Bounded queues with a named overflow policy, and the fair multi-queue the batcher reads.

Every queue is bounded. When one is full, its policy decides:

- `drop_oldest` (live sources): the put never waits; the oldest queued item
  is dropped and counted, so a camera is never stalled by a slow consumer
  and what gets through is the most recent picture.
- `block` (files): the put waits, up to its timeout, so that no frame of a
  file is lost; the caller retries until the stop protocol says otherwise.

The end-of-stream marker is never dropped. Every get and put takes a
timeout: nothing in the pipeline waits forever.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Literal

from streamd.types import EndOfStream

Policy = Literal["drop_oldest", "block"]
POLICIES: tuple[Policy, ...] = ("drop_oldest", "block")

# The stdlib's exceptions, so callers read the familiar names.
Empty = queue.Empty
Full = queue.Full


class BoundedQueue:
    """A FIFO of at most `maxsize` items with an overflow policy.

    on_drop(item) is called, after the lock is released, for every item the
    drop_oldest policy discards; `dropped` counts them. Queues that share
    a `threading.Condition` (see FairQueueGroup) wake one reader together.
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
        self._on_drop = on_drop
        self._cond = condition or threading.Condition()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def put(self, item: Any, timeout_s: float) -> None:
        """Add `item`; raise Full if a `block` queue stayed full for timeout_s seconds."""
        dropped = None
        with self._cond:
            if len(self._items) >= self.maxsize:
                if self.policy == "drop_oldest" or isinstance(item, EndOfStream):
                    # An end-of-stream must get through even into a full blocking queue:
                    # it is the last item of its producer, so this overshoots by one at most.
                    if self.policy == "drop_oldest":
                        dropped = self._drop_oldest_locked()
                else:
                    deadline = time.monotonic() + timeout_s
                    while len(self._items) >= self.maxsize:
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
            if not isinstance(queued, EndOfStream):
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
            return item

    def get_nowait_locked(self) -> Any:
        """Pop without waiting; the caller holds the shared condition (FairQueueGroup)."""
        item = self._items.popleft()
        self._cond.notify_all()
        return item

    def has_items_locked(self) -> bool:
        return bool(self._items)


class FairQueueGroup:
    """Several BoundedQueues read as one, round-robin, for batching across streams.

    All member queues must share this group's `condition`, so that a put into
    any of them wakes the reader. `get_batch` takes one item per queue per
    turn, starting after the queue served first last time, so a busy stream
    cannot starve a quiet one.
    """

    def __init__(self, condition: threading.Condition):
        self.condition = condition
        self._queues: list[BoundedQueue] = []
        self._start = 0

    def add(self, q: BoundedQueue) -> BoundedQueue:
        if q._cond is not self.condition:
            raise ValueError(f"queue {q.name!r} does not share the group's condition")
        self._queues.append(q)
        return q

    def remove(self, q: BoundedQueue) -> None:
        with self.condition:
            self._queues.remove(q)
            self._start = self._start % len(self._queues) if self._queues else 0

    @property
    def queues(self) -> Sequence[BoundedQueue]:
        return tuple(self._queues)

    def get_batch(self, max_items: int, max_wait_s: float, timeout_s: float) -> list[Any]:
        """Up to max_items items, fairly across queues.

        Waits up to timeout_s for a first item (returns [] if none came), then
        up to max_wait_s more for the batch to fill. An EndOfStream ends its
        queue's share of the batch (nothing follows it in that queue).
        """
        items: list[Any] = []
        with self.condition:
            deadline = time.monotonic() + timeout_s
            while not self._take_round_robin_locked(items, max_items):
                left = deadline - time.monotonic()
                if left <= 0:
                    return items
                self.condition.wait(left)
            fill_deadline = time.monotonic() + max_wait_s
            while len(items) < max_items:
                left = fill_deadline - time.monotonic()
                if left <= 0:
                    break
                self.condition.wait(left)
                self._take_round_robin_locked(items, max_items)
        return items

    def _take_round_robin_locked(self, items: list[Any], max_items: int) -> bool:
        """Move items into `items`, one per queue per turn; True when `items` is non-empty."""
        count = len(self._queues)
        progress = True
        while len(items) < max_items and progress:
            progress = False
            for offset in range(count):
                q = self._queues[(self._start + offset) % count]
                if len(items) < max_items and q.has_items_locked():
                    items.append(q.get_nowait_locked())
                    progress = True
            if progress:
                self._start = (self._start + 1) % count
        return bool(items)

    def empty(self) -> bool:
        with self.condition:
            return not any(q.has_items_locked() for q in self._queues)

