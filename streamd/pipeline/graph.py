"""The pipeline as a graph of stages and queues, built with `add_flow` (as Holoscan's `compose` does).

`Graph.add_flow(upstream, downstream, queue, stream=...)` connects two
objects by reference:

- with a `Queue`, the downstream gets its own worker thread that reads that
  queue. Several flows may go into the same `Queue` object, from one stage
  or from many (every stream's message stage into the one publisher queue:
  fan-in), and out of it to several stages (one stream's annotate and
  detection log), all in that queue's worker;
- without one, the downstream runs in the upstream's worker, on each of its
  outputs (annotate -> record).

A stage's scope is explicit. `stream=ID` makes the downstream a stage *of
that stream*: on a flow out of a shared stage it takes only that stream's
items; when it fails, that stage of that stream stops and is retried, and
nothing else is touched. A stage called directly by a stage of a stream is
of that stream too. Any other downstream of a queue is shared (inference,
the publisher): one that fails stops the daemon.

A source flows into the `Batcher`, the inference worker's inbox, through its
own input queue. A `Ticker` (the heartbeat) flows into a queue from a thread
of its own, once per its period. Wiring errors (a stage wired twice, a
source or ticker without a queue, a stage no source feeds, a stage given
two scopes, an object that is not a Stage) raise here, before anything
runs. `streamd.pipeline.compose.compose` builds the daemon's graph;
`streamd.pipeline.runner.Runner` runs one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from streamd.ops.metrics import Metrics
from streamd.pipeline.queues import Batcher, BoundedQueue, Policy
from streamd.pipeline.stage import Source, Stage, Ticker


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
    """A source, a ticker, the batcher or a stage, placed in the graph.

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


@dataclass(eq=False)
class _QueueSpot:
    """A Queue of the diagram as built: its bounded queue, the stream it serves (None: shared), who reads it."""

    spec: Queue
    bounded: BoundedQueue
    scope: str | None
    feeders: list[Node] = field(default_factory=list)
    roots: list[Node] = field(default_factory=list)


@dataclass(frozen=True, eq=False)
class Worker:
    """One thread of the runner: it reads `inbox` and hands every item to `roots` (and so to their subtrees).

    streams: the streams whose end-of-stream it waits for before it ends.
    settles: the credited queues its stages put into: after each item, the credits its frames still hold
        there are given back (their results did not come: an error, a failed stage).
    holds_credits: its items' frames hold credits that no later worker will use if it drops them (the
        batcher's worker): it gives them back when it drops an item.
    """

    name: str
    inbox: Any  # BoundedQueue | Batcher (streamd.pipeline.stage.Inbox)
    roots: tuple[Node, ...]
    streams: frozenset[str]
    settles: tuple[BoundedQueue, ...] = ()
    holds_credits: bool = False

    def nodes(self) -> list[Node]:
        """Every node this worker runs, in flow order."""
        return [node for root in self.roots for node in root.subtree()]


class Graph:
    """Stages, queues and flows; `check()` validates and freezes it for the runner."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self._nodes: dict[int, Node] = {}
        self._spots: dict[int, _QueueSpot] = {}  # id(Queue) -> its spot
        self.sources: list[tuple[Node, BoundedQueue]] = []
        self.tickers: list[tuple[Node, BoundedQueue]] = []
        self.batcher: Node | None = None
        self._credited: set[int] = set()  # id(BoundedQueue) of the credited queues
        self._checked = False

    # --- building -----------------------------------------------------------------------------------

    def add_flow(self, upstream: Any, downstream: Any, queue: Queue | None = None, *, stream: str | None = None) -> None:
        """Send every output of `upstream` (of stream `stream` only, if given) to `downstream`, through `queue` if given.

        `stream=` also makes `downstream` a stage of that stream (see the module's doc).
        """
        if self._checked:
            raise ValueError("the graph was already checked: add every flow before running it")
        up = self._node(upstream)
        if up.stream is not None and stream is not None and stream != up.stream:
            raise ValueError(f"{up.name} serves stream {up.stream!r}: it cannot feed stream {stream!r}")
        if isinstance(upstream, Source | Ticker) and queue is None:
            raise ValueError(f"{up.name} needs a Queue to {downstream!r}: it runs in a thread of its own")
        if isinstance(upstream, Batcher) and queue is not None:
            raise ValueError("the batcher is its worker's inbox: its flow to the inference stage takes no Queue")
        if isinstance(downstream, Batcher):
            self._into_batcher(up, downstream, queue)
            return
        if not isinstance(downstream, Stage):
            raise TypeError(f"{downstream!r} is not a Stage: it needs name, setup(), process(item) and close()")
        # A stage called in its upstream's worker serves what its upstream serves; behind a queue, it is shared
        # unless the flow names its stream.
        scope = stream if stream is not None else (up.stream if queue is None else None)
        down = self._node(downstream, scope)
        if down.stream != scope:
            raise ValueError(
                f"stage {down.name!r} is {_scope_text(down.stream)} but a flow from {up.name} makes it {_scope_text(scope)}"
            )
        if queue is None:
            if down.has_input:
                raise ValueError(f"stage {down.name!r} is wired twice; every flow needs its own stage object")
            down.has_input = True
            up.direct.append((stream, down))
            return
        spot = self._spot(queue, scope)
        if up not in spot.feeders:
            spot.feeders.append(up)
            up.queued.append((stream, spot.bounded))
        if down not in spot.roots:
            if down.has_input:
                raise ValueError(f"stage {down.name!r} is wired twice; every flow needs its own stage object")
            down.has_input = True
            spot.roots.append(down)

    def _into_batcher(self, up: Node, batcher: Batcher, queue: Queue | None) -> None:
        if queue is None or not isinstance(up.obj, Source) or id(queue) in self._spots:
            raise ValueError("only sources flow into the batcher, each through a Queue of its own")
        down = self._node(batcher)
        bounded = BoundedQueue(
            f"{queue.role}:{up.stream}", queue.size, queue.policy, self._counter(queue.role), batcher.condition
        )
        batcher.add_input(up.stream, bounded)
        self.sources.append((up, bounded))
        up.queued.append((None, bounded))
        self._spots[id(queue)] = _QueueSpot(queue, bounded, up.stream, [up], [down])
        down.has_input = True

    def _spot(self, queue: Queue, scope: str | None) -> _QueueSpot:
        spot = self._spots.get(id(queue))
        if spot is None:
            name = queue.role if scope is None else f"{queue.role}:{scope}"
            bounded = BoundedQueue(name, queue.size, queue.policy, self._counter(queue.role))
            spot = self._spots[id(queue)] = _QueueSpot(queue, bounded, scope)
        elif spot.scope != scope:
            raise ValueError(f"queue {spot.bounded.name!r} serves {_scope_text(spot.scope)}: a flow cannot make it "
                             f"{_scope_text(scope)}")
        return spot

    def _node(self, obj: Any, stream: str | None = None) -> Node:
        node = self._nodes.get(id(obj))
        if node is None:
            if isinstance(obj, Source):
                node = Node(obj, obj.stream_id, f"source:{obj.stream_id}")
                if any(n.stream == obj.stream_id for n in self._nodes.values() if isinstance(n.obj, Source)):
                    raise ValueError(f"stream ids must be unique: {obj.stream_id!r} is used twice")
            elif isinstance(obj, Ticker):
                node = Node(obj, None, f"ticker:{obj.name}")
                self.tickers.append((node, None))  # its queue is set by check()
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
        roots = {id(spot.bounded): spot.roots for spot in self._spots.values()}
        for node, _ in self.sources:
            node.streams = {node.stream}
        changed = True
        while changed:  # propagate streams along the flows (the graph is small: a fixpoint is cheap)
            changed = False
            for node in nodes:
                targets = [(flt, child) for flt, child in node.direct]
                targets += [(flt, root) for flt, q in node.queued for root in roots[id(q)]]
                for flt, child in targets:
                    reach = node.streams if flt is None else node.streams & {flt}
                    if not reach <= child.streams:
                        child.streams |= reach
                        changed = True
        unfed = [n.name for n in nodes if not n.streams and not isinstance(n.obj, Ticker)]
        if unfed:
            raise ValueError(f"no source feeds {', '.join(unfed)}")
        if any(len(node.queued) != 1 for node, _ in self.tickers):
            raise ValueError("a ticker flows into exactly one queue")
        self.tickers = [(node, node.queued[0][1]) for node, _ in self.tickers]
        if self.batcher is not None:
            self._credit_queues()
        self._checked = True

    def _credit_queues(self) -> None:
        """Every per-frame `block` queue after the batcher is credited for each stream that reaches it."""
        batcher = self.batcher.obj
        after = {id(self.batcher)}
        pending = [self.batcher]
        spots = {id(spot.bounded): spot for spot in self._spots.values()}
        while pending:
            node = pending.pop()
            children = [child for _, child in node.direct]
            children += [root for _, q in node.queued for root in spots[id(q)].roots]
            for child in children:
                if id(child) not in after:
                    after.add(id(child))
                    pending.append(child)
        for spot in self._spots.values():
            fed = [node for node in spot.feeders if id(node) in after]
            if not fed or not spot.spec.per_frame or spot.spec.policy != "block":
                continue
            streams = set().union(*(node.streams for node in fed))
            if spot.scope is not None:
                streams &= {spot.scope}
            for stream_id in sorted(streams):
                batcher.add_credited(stream_id, spot.bounded)
            self._credited.add(id(spot.bounded))

    # --- what the runner reads ------------------------------------------------------------------------

    def workers(self) -> list[Worker]:
        """The consumer threads, in pipeline order: the batcher's, then each queue's."""
        if not self._checked:
            self.check()
        workers = []
        if self.batcher is not None:
            roots = tuple(child for _, child in self.batcher.direct)
            workers.append(self._worker("batch", self.batcher.obj, roots))
        for spot in self._spots.values():
            if any(isinstance(node.obj, Source) for node in spot.feeders):
                continue
            workers.append(self._worker(spot.bounded.name, spot.bounded, tuple(spot.roots)))
        return workers

    def _worker(self, name: str, inbox: Any, roots: tuple[Node, ...]) -> Worker:
        streams = frozenset().union(*(root.streams for root in roots))
        nodes = [node for root in roots for node in root.subtree()]
        settles = {id(q): q for node in nodes for _, q in node.queued if id(q) in self._credited}
        return Worker(name, inbox, roots, streams, tuple(settles.values()), holds_credits=isinstance(inbox, Batcher))

    def queues(self) -> list[BoundedQueue]:
        """Every bounded queue of the graph (the sources' input queues first)."""
        return [spot.bounded for spot in self._spots.values()]

    def stages(self) -> list[Any]:
        """Every stage in pipeline order (setup order; closing goes by worker)."""
        return [worker_node.obj for worker in self.workers() for worker_node in worker.nodes()]


def _scope_text(scope: str | None) -> str:
    return "shared" if scope is None else f"stream {scope!r}'s"
