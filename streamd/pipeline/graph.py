"""The pipeline as a graph of stages and queues, built with `add_flow` (as Holoscan's `compose` does).

`Graph.add_flow(upstream, downstream, queue, stream=...)` connects two
objects by reference:

- with a `Queue`, the downstream gets its own worker thread that reads that
  queue; several flows through the same `Queue` object share the queue and
  its worker (one stream's annotate -> record and detection log);
- without one, the downstream runs in the upstream's worker, on each of its
  outputs (annotate -> record);
- `stream=ID` on a flow out of a shared stage takes only that stream's
  items, and makes the downstream a stage *of that stream*: when it fails,
  that output of that stream stops and is retried, and nothing else is
  touched. A shared stage (inference, the publisher) that fails stops the
  daemon.

A source flows into the `Batcher`, the inference worker's inbox, through
its own input queue. Wiring errors (a stage wired twice, a source without a
queue, a stage no source feeds, an object that is not a Stage) raise here,
before anything runs. `streamd.pipeline.compose.compose` builds the daemon's
graph; `streamd.pipeline.runner.Runner` runs one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from streamd.ops.heartbeat import HeartbeatSource
from streamd.ops.metrics import Metrics
from streamd.pipeline.queues import Batcher, BoundedQueue, Policy
from streamd.pipeline.stage import Source, Stage


@dataclass(frozen=True, eq=False)
class Queue:
    """A queue in the diagram: its role (drops are counted under it), size and overflow policy.

    Identity matters: every flow through the same Queue object shares one
    bounded queue and one worker. per_frame: each item is one frame's, so a
    `block` queue after the batcher is credited (see streamd.pipeline.queues);
    False for the queue of batches between the inference stages.
    """

    role: str
    size: int
    policy: Policy
    per_frame: bool = True


@dataclass(eq=False)
class Node:
    """A source, the batcher or a stage, placed in the graph.

    stream: the one stream this node serves (None: shared by all streams).
    streams: the streams whose items reach it (set by Graph.check).
    queued: (stream filter, queue) of its flows through a queue, one entry per queue.
    direct: (stream filter, node) of its flows called in its own worker.
    """

    obj: Any
    stream: str | None
    name: str
    streams: set[str] = field(default_factory=set)
    queued: list[tuple[str | None, BoundedQueue]] = field(default_factory=list)
    direct: list[tuple[str | None, Node]] = field(default_factory=list)
    has_input: bool = False

    def subtree(self) -> Iterator[Node]:
        """This node, then the nodes its direct flows call, depth first (the order they see an item, and close)."""
        yield self
        for _, child in self.direct:
            yield from child.subtree()


@dataclass(frozen=True, eq=False)
class Worker:
    """One thread of the runner: it reads `inbox` and hands every item to `roots` (and so to their subtrees).

    streams: the streams whose end-of-stream it waits for before it ends.
    """

    name: str
    inbox: Any  # BoundedQueue | Batcher (streamd.pipeline.stage.Inbox)
    roots: tuple[Node, ...]
    streams: frozenset[str]

    def nodes(self) -> list[Node]:
        """Every node this worker runs, in flow order."""
        return [node for root in self.roots for node in root.subtree()]


class Graph:
    """Stages, queues and flows; `check()` validates and freezes it for the runner."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self._nodes: dict[int, Node] = {}
        self._queues: dict[int, tuple[Queue, BoundedQueue, Node, str | None]] = {}
        self._queue_roots: dict[int, list[Node]] = {}
        self.sources: list[tuple[Node, BoundedQueue]] = []
        self.batcher: Node | None = None
        self.heartbeat: tuple[HeartbeatSource, BoundedQueue] | None = None
        self._checked = False

    # --- building -----------------------------------------------------------------------------------

    def add_flow(self, upstream: Any, downstream: Any, queue: Queue | None = None, *, stream: str | None = None) -> None:
        """Send every output of `upstream` (of stream `stream` only, if given) to `downstream`, through `queue` if given."""
        if self._checked:
            raise ValueError("the graph was already checked: add every flow before running it")
        up = self._node(upstream)
        if up.stream is not None and stream is not None and stream != up.stream:
            raise ValueError(f"{up.name} serves stream {up.stream!r}: it cannot feed stream {stream!r}")
        scope = stream if stream is not None else up.stream
        if isinstance(upstream, Source) and queue is None:
            raise ValueError(f"{up.name} needs a Queue to {downstream!r}: a source runs in a thread of its own")
        if isinstance(upstream, Batcher) and queue is not None:
            raise ValueError("the batcher is its worker's inbox: its flow to the inference stage takes no Queue")
        if isinstance(downstream, Batcher):
            if queue is None or not isinstance(upstream, Source) or id(queue) in self._queues:
                raise ValueError("only sources flow into the batcher, each through a Queue of its own")
            down = self._node(downstream)
            bounded = BoundedQueue(
                f"{queue.role}:{up.stream}", queue.size, queue.policy, self._counter(queue.role), downstream.condition
            )
            downstream.add_input(up.stream, bounded)
            self.sources.append((up, bounded))
            up.queued.append((None, bounded))
            self._queues[id(queue)] = (queue, bounded, up, scope)
            down.has_input = True
            return
        if not isinstance(downstream, Stage):
            raise TypeError(f"{downstream!r} is not a Stage: it needs name, setup(), process(item) and close()")
        down = self._node(downstream, scope)
        if down.has_input:
            raise ValueError(f"stage {down.name!r} is wired twice; every flow needs its own stage object")
        down.has_input = True
        if queue is None:
            up.direct.append((stream, down))
            return
        if id(queue) in self._queues:
            _, bounded, owner, owner_scope = self._queues[id(queue)]
            if owner is not up or owner_scope != scope:
                raise ValueError(f"queue {bounded.name!r} is shared by flows from different stages or streams")
        else:
            name = queue.role if scope is None else f"{queue.role}:{scope}"
            bounded = BoundedQueue(name, queue.size, queue.policy, self._counter(queue.role))
            self._queues[id(queue)] = (queue, bounded, up, scope)
            up.queued.append((stream, bounded))
        self._queue_roots.setdefault(id(queue), []).append(down)

    def add_heartbeat(self, source: HeartbeatSource, queue: Queue) -> None:
        """The supervisor puts source.beat() into `queue` once a second (a Queue already in a flow: the publisher's)."""
        if id(queue) not in self._queues:
            raise ValueError(f"the heartbeat goes into a queue of the graph; {queue.role!r} is in no flow")
        self.heartbeat = (source, self._queues[id(queue)][1])

    def _node(self, obj: Any, stream: str | None = None) -> Node:
        node = self._nodes.get(id(obj))
        if node is None:
            if isinstance(obj, Source):
                node = Node(obj, obj.stream_id, f"source:{obj.stream_id}")
                if any(n.stream == obj.stream_id for n in self._nodes.values() if isinstance(n.obj, Source)):
                    raise ValueError(f"stream ids must be unique: {obj.stream_id!r} is used twice")
            elif isinstance(obj, Batcher):
                if self.batcher is not None:
                    raise ValueError("a graph has one batcher")
                node = self.batcher = Node(obj, None, obj.name)
            elif isinstance(obj, Stage):
                node = Node(obj, stream, obj.name if stream is None else f"{obj.name}:{stream}")
            else:
                raise TypeError(f"{obj!r} is not a Stage: it needs name, setup(), process(item) and close()")
            self._nodes[id(obj)] = node
        return node

    def _counter(self, role: str):
        return lambda item: self.metrics.count_dropped(item, role)

    # --- checking -----------------------------------------------------------------------------------

    def check(self) -> None:
        """Validate the wiring and work out which streams reach each node; raises ValueError."""
        if not self.sources:
            raise ValueError("a pipeline needs at least one stream")
        nodes = list(self._nodes.values())
        for node, _ in self.sources:
            node.streams = {node.stream}
        changed = True
        while changed:  # propagate streams along the flows (the graph is small: a fixpoint is cheap)
            changed = False
            for node in nodes:
                targets = [(flt, child) for flt, child in node.direct]
                targets += [(flt, root) for flt, q in node.queued for root in self._roots_of(q)]
                for flt, child in targets:
                    reach = node.streams if flt is None else node.streams & {flt}
                    if not reach <= child.streams:
                        child.streams |= reach
                        changed = True
        unfed = [n.name for n in nodes if not n.streams]
        if unfed:
            raise ValueError(f"no source feeds {', '.join(unfed)}")
        if self.batcher is not None:
            self._credit_queues()
        self._checked = True

    def _roots_of(self, bounded: BoundedQueue) -> list[Node]:
        if self.batcher is not None and any(bounded is q for _, q in self.sources):
            return [self.batcher]
        for key, (_, q, _, _) in self._queues.items():
            if q is bounded:
                return self._queue_roots.get(key, [])
        return []

    def _credit_queues(self) -> None:
        """Every per-frame `block` queue after the batcher is credited for each stream that reaches it."""
        batcher = self.batcher.obj
        after = set()
        pending = [self.batcher]
        while pending:
            node = pending.pop()
            for _, child in node.direct:
                after.add(id(child))
                pending.append(child)
            for _, q in node.queued:
                for root in self._roots_of(q):
                    if id(root) not in after:
                        after.add(id(root))
                        pending.append(root)
        for spec, bounded, owner, scope in self._queues.values():
            if id(owner) in after and spec.per_frame and spec.policy == "block":
                for stream_id in sorted(owner.streams if scope is None else owner.streams & {scope}):
                    batcher.add_credited(stream_id, bounded)

    # --- what the runner reads ------------------------------------------------------------------------

    def workers(self) -> list[Worker]:
        """The consumer threads, in pipeline order: the batcher's, then each queue's."""
        if not self._checked:
            self.check()
        workers = []
        if self.batcher is not None:
            roots = tuple(child for _, child in self.batcher.direct)
            workers.append(Worker("batch", self.batcher.obj, roots, frozenset(self.batcher.streams)))
        for key, (_, bounded, owner, _) in self._queues.items():
            if isinstance(owner.obj, Source):
                continue
            roots = tuple(self._queue_roots[key])
            streams = frozenset().union(*(root.streams for root in roots))
            workers.append(Worker(bounded.name, bounded, roots, streams))
        return workers

    def stages(self) -> list[Any]:
        """Every stage in pipeline order (setup order; closing goes by worker)."""
        return [worker_node.obj for worker in self.workers() for worker_node in worker.nodes()]
