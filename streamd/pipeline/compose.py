"""The daemon's pipeline as code: `compose` reads like the diagram, every stage, queue and policy in it.

`compose` wires what it is given: the sources and the outputs (`Endpoints`),
which `endpoints` builds from the config (PyAV sources, recorders, detection
logs, the ZeroMQ publisher) and the tests build from fakes, so the tests run
this very graph.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from streamd.config import StreamConfig, StreamdConfig
from streamd.model.detector import Detector
from streamd.ops.heartbeat import HeartbeatSource
from streamd.ops.metrics import Metrics
from streamd.pipeline.graph import Graph, Queue
from streamd.pipeline.queues import Batcher, Policy
from streamd.pipeline.stage import Source, Stage
from streamd.stages.freshness import FreshnessStage
from streamd.stages.infer import ResultsStage, SubmitStage
from streamd.stages.message import MessageStage
from streamd.stages.track import TrackStage

Chain = tuple[Stage, ...]
"""Stages of one output of a stream: the first reads the stream's output queue, each next one is called on what the
one before it yields, in the same thread (annotate -> record)."""


@dataclass(frozen=True)
class Endpoints:
    """What the graph reads and writes: a source per stream id, each stream's output chains, the shared publisher."""

    sources: Mapping[str, Source]
    outputs: Mapping[str, tuple[Chain, ...]] = field(default_factory=dict)
    publisher: Stage | None = None


def compose(config: StreamdConfig, detector: Detector, metrics: Metrics, endpoints: Endpoints) -> Graph:
    """
    source:ID ─input:ID─► batch ─► submit ─in_flight─► results ─► track:ID ─► message:ID ─output:ID─► annotate ─► record
    (1 thread a stream)   (max_batch | max_wait_ms,    (decode,   (its tracks, (encode once,  │ (1 thread      └► detection_log
     drop_oldest if paced, fair; credits: a frame      NMS)       confirmed,   the stream's   │  a stream)
     block for files)      is taken only when its                 events)      state)         │
                           stream's block queues                                              └─publish─► freshness ─► publish
                           have room)                                 heartbeat (ticker, 1 s) ─┘ (N -> 1)   (drop stale) (ZeroMQ)

    Every arrow with a name is a bounded queue with its own worker thread; the
    others are calls in the same thread. Stages after `stream=` are that
    stream's: a failure stops that stage of that stream only (retried).
    """
    graph = Graph(metrics)
    batch = Batcher(config.batch.max_batch, config.batch.max_wait_ms)
    submit = SubmitStage(detector, config.thresholds.conf_threshold, config.thresholds.iou_threshold)
    results = ResultsStage(detector, metrics)
    graph.add_flow(batch, submit)
    graph.add_flow(submit, results, Queue("in_flight", size=1, policy="block", per_frame=False))
    publisher = endpoints.publisher
    if publisher is not None:
        live = any(queue_policy(stream) == "drop_oldest" for stream in config.streams)
        size = sum(stream.queue.size for stream in config.streams)
        published = Queue("publish", size, "drop_oldest" if live else "block")
        fresh = FreshnessStage({s.id: max_age_ms(s) for s in config.streams if max_age_ms(s) is not None}, metrics)
        graph.add_flow(fresh, publisher)
        graph.add_flow(HeartbeatSource(metrics, results.model), fresh, published)
    for stream in config.streams:
        policy = queue_policy(stream)
        graph.add_flow(endpoints.sources[stream.id], batch, Queue("input", input_queue_size(stream), policy))
        last: Stage = results
        if stream.track.enabled:
            track = TrackStage(stream.id, stream.track.settings(), metrics)
            graph.add_flow(last, track, stream=stream.id)
            last = track
        message = MessageStage(stream.id, results.model, metrics)
        graph.add_flow(last, message, stream=stream.id)
        outputs = Queue("output", stream.queue.size, policy)
        for chain in endpoints.outputs.get(stream.id, ()):
            graph.add_flow(message, chain[0], outputs, stream=stream.id)
            for up, down in zip(chain, chain[1:]):
                graph.add_flow(up, down)
        if publisher is not None:
            graph.add_flow(message, fresh, published)
        metrics.freshness(stream.id, max_age_ms(stream), published=publisher is not None)
    graph.check()
    return graph


def max_age_ms(stream: StreamConfig) -> float | None:
    """A paced stream's stale budget; a file read as fast as it decodes has none (its frames wait by design)."""
    return stream.max_age_ms if stream.paced else None


def input_queue_size(stream: StreamConfig) -> int:
    """The input queue of a paced stream holds at most LIVE_INPUT_FRAMES (so what waits is never older than a few
    frames, and a crash loses no more than that), or its configured size if smaller; a file's, queue.size."""
    return min(stream.queue.size, LIVE_INPUT_FRAMES) if stream.paced else stream.queue.size


LIVE_INPUT_FRAMES = 2


def queue_policy(stream: StreamConfig) -> Policy:
    """`auto` is drop_oldest for paced streams (a live source or a realtime file: never fall behind the
    source's clock) and block for files read as fast as possible (lose no frame)."""
    if stream.queue.policy != "auto":
        return stream.queue.policy
    return "drop_oldest" if stream.paced else "block"
