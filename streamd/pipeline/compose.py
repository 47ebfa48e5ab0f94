"""The daemon's pipeline as code: `compose` reads like the diagram, every stage, queue and policy in it.

`compose` wires what it is given: the sources and the outputs (`Endpoints`),
which `endpoints` builds from the config (PyAV sources, recorders, detection
logs, the ZeroMQ publisher) and the tests build from fakes, so the tests run
this very graph.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from streamd.config import StreamConfig, StreamdConfig
from streamd.detector import Detector
from streamd.ops.heartbeat import HeartbeatSource
from streamd.ops.metrics import Metrics
from streamd.pipeline.graph import Graph, Queue
from streamd.pipeline.queues import Batcher, Policy
from streamd.pipeline.stage import Source, Stage
from streamd.stages.freshness import FreshnessStage
from streamd.stages.infer import ResultsStage, SubmitStage
from streamd.stages.message import MessageStage
from streamd.stages.track import TrackStage

LIVE_INPUT_FRAMES = 1  # a paced stream's input queue by default: only its newest frame waits for inference
QUEUE_FRAMES = 8  # every other queue's default size

@dataclass(frozen=True, slots=True)
class Switches:
    """Which outputs `endpoints` builds (a benchmark measures inference alone by turning them off), and whether
    messages carry wall-clock fields (wall_clock False: captured_at counts from the epoch by the frame's pts, every
    latency is 0, so a replay of the same source writes the same bytes every time; the frames after the message
    stage then carry their pts as their capture time, so it is for replays, which neither record nor publish)."""

    record: bool = True
    detection_log: bool = True
    publish: bool = True
    wall_clock: bool = True


Chain = tuple[Stage, ...]
"""Stages of one output of a stream: the first reads the stream's output queue, each next one is called on what the
one before it yields, in the same thread (annotate -> record)."""


@dataclass(frozen=True)
class Endpoints:
    """What the graph reads and writes: a source per stream id, each stream's output chains, the shared publisher.

    sections: each part with the config section it was made from (("streams", 0, "record"), its RecordStage): the
    preflight asks every part that is streamd.checks.Checked for its findings, and names them by that section.
    """

    sources: Mapping[str, Source]
    outputs: Mapping[str, tuple[Chain, ...]] = field(default_factory=dict)
    publisher: Stage | None = None
    sections: tuple[tuple[tuple[str | int, ...], Any], ...] = ()


def compose(
    config: StreamdConfig, detector: Detector, metrics: Metrics, endpoints: Endpoints, *, wall_clock: bool = True
) -> Graph:
    """
    source:ID ─input:ID─► batch ─► submit ─in_flight─► results ─► track:ID ─► message:ID ─output:ID─► annotate ─► record
    (1 thread a stream)   (max_batch | max_wait_ms,    (decode,   (its tracks, (encode once,  │ (1 thread      └► detection_log
     drop_oldest if paced, fair; credits: a frame      NMS)       confirmed,   the stream's   │  a stream)
     block for files)      is taken only when its                 events)      state)         │
                           stream's block queues                                              └─publish─► freshness ─► publish
                           have room)                                 heartbeat (ticker, 1 s) ─┘ (N -> 1)   (drop stale) (ZeroMQ)

    Every arrow with a name is a bounded queue with its own worker thread; the
    others are calls in the same thread. Stages after `stream=` are that
    stream's: a failure stops that stage of that stream only (retried). A
    paced stream's max_age_ms is its stale budget twice: the batch that
    holds its frame fits half of it (streamd.pipeline.queues.BUDGET_SHARE),
    and freshness drops what is older at the send.
    wall_clock: see Switches.
    """
    graph = Graph(metrics)
    budgets = {s.id: budget for s in config.streams if (budget := max_age_ms(s)) is not None}
    batch = Batcher(config.batch.max_batch, config.batch.max_wait_ms, budgets)  # fresh batches for paced streams
    submit = SubmitStage(detector, config.thresholds.conf_threshold, config.thresholds.iou_threshold)
    results = ResultsStage(detector, metrics)
    graph.add_flow(batch, submit)
    graph.add_flow(submit, results, Queue("in_flight", size=1, policy="block", per_frame=False))
    messages = []
    for stream in config.streams:
        policy = queue_policy(stream)
        graph.add_flow(endpoints.sources[stream.id], batch, Queue("input", input_queue_size(stream), policy))
        last: Stage = results
        if stream.track.enabled:
            track = TrackStage(stream.id, stream.track.settings(), metrics)
            graph.add_flow(last, track, stream=stream.id)
            last = track
        message = MessageStage(stream.id, results.model, metrics, wall_clock=wall_clock)
        graph.add_flow(last, message, stream=stream.id)
        outputs = Queue("output", queue_size(stream), policy)
        for chain in endpoints.outputs.get(stream.id, ()):
            graph.add_flow(message, chain[0], outputs, stream=stream.id)
            for up, down in zip(chain, chain[1:]):
                graph.add_flow(up, down)
        messages.append(message)
    publisher = endpoints.publisher
    if publisher is not None:  # every stream's messages and the heartbeat into one queue (N -> 1)
        live = any(queue_policy(stream) == "drop_oldest" for stream in config.streams)
        # a batch's results come at once: room for a whole batch beside what the streams' queues hold
        size = sum(queue_size(stream) for stream in config.streams) + config.batch.max_batch
        published = Queue("publish", size, "drop_oldest" if live else "block")
        fresh = FreshnessStage(budgets, metrics)
        for message in messages:
            graph.add_flow(message, fresh, published)
        graph.add_flow(HeartbeatSource(metrics, results.model), fresh, published)
        graph.add_flow(fresh, publisher)
    for stream in config.streams:
        metrics.freshness(stream.id, max_age_ms(stream), published=publisher is not None)
    graph.check()
    return graph


def max_age_ms(stream: StreamConfig) -> float | None:
    """A paced stream's stale budget; a file read as fast as it decodes has none (its frames wait by design)."""
    return stream.max_age_ms if stream.paced else None


def input_queue_size(stream: StreamConfig) -> int:
    """streams[].queue.size; by default LIVE_INPUT_FRAMES for a paced stream and QUEUE_FRAMES for a file.

    A paced stream keeps only its newest frame waiting: under overload fresh frames are inferred and published, older
    ones dropped and counted (benchmarks/overload.py: 4 live 640x480 streams published 84-90% of what they processed
    with it, almost none with 2 or 8 frames). What else a result's age holds is its batch's inference, which the
    batcher keeps within half the budget (streamd.pipeline.queues: fresh batches)."""
    if stream.queue.size is not None:
        return stream.queue.size
    return LIVE_INPUT_FRAMES if stream.paced else QUEUE_FRAMES


def queue_size(stream: StreamConfig) -> int:
    """The size of a stream's other queues (its outputs): streams[].queue.size or QUEUE_FRAMES."""
    return QUEUE_FRAMES if stream.queue.size is None else stream.queue.size


def queue_policy(stream: StreamConfig) -> Policy:
    """`auto` is drop_oldest for paced streams (a live source or a realtime file: never fall behind the
    source's clock) and block for files read as fast as possible (lose no frame)."""
    if stream.queue.policy != "auto":
        return stream.queue.policy
    return "drop_oldest" if stream.paced else "block"
