"""The pipeline as code: `compose` reads like the diagram, wired by object references.

`compose` only builds objects and checks the wiring (a wiring error raises
here, before anything runs); `streamd.pipeline.runner.Runner` runs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import zmq

from streamd.backends import make_backend
from streamd.backends.base import Backend
from streamd.config import StreamConfig, StreamdConfig
from streamd.model.bundle import Bundle, load_bundle
from streamd.ops.metrics import Metrics
from streamd.pipeline.stage import Source, Stage
from streamd.stages.annotate import AnnotateStage
from streamd.stages.batch import BatchInferStage
from streamd.stages.decode import open_source
from streamd.stages.detlog import DetectionLogStage
from streamd.stages.publish import PublishStage
from streamd.stages.record import RecordStage


@dataclass(frozen=True)
class Flow:
    """A stage and the flows that take each of its outputs (annotate -> record)."""

    stage: Stage
    then: tuple[Flow, ...] = ()

    def stages(self) -> list[Stage]:
        """This stage, then its children's, depth first (the order they see an item, and are closed)."""
        return [self.stage, *(s for child in self.then for s in child.stages())]


@dataclass(frozen=True)
class Branch:
    """One stream: its source, its queues, its per-stream outputs."""

    source: Source
    queue_size: int
    queue_policy: str  # auto | drop_oldest | block; auto follows source.live
    reconnect_initial_s: float
    reconnect_max_s: float
    outputs: tuple[Flow, ...] = ()

    @property
    def stream_id(self) -> str:
        return self.source.stream_id

    def stages_in_flow_order(self) -> list[Stage]:
        return [stage for flow in self.outputs for stage in flow.stages()]


@dataclass(frozen=True)
class Pipeline:
    """Everything the runner needs, checked on construction."""

    branches: tuple[Branch, ...]
    infer: BatchInferStage
    max_batch: int
    max_wait_ms: float
    metrics: Metrics
    publisher: PublishStage | None = None
    zmq_context: zmq.Context | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.branches:
            raise ValueError("a pipeline needs at least one stream")
        ids = [b.stream_id for b in self.branches]
        if len(set(ids)) != len(ids):
            raise ValueError(f"stream ids must be unique, got {ids}")
        stages = self.stages_in_order()
        seen: set[int] = set()
        for stage in stages:
            missing = [name for name in ("name", "setup", "process", "close") if not hasattr(stage, name)]
            if missing:
                raise TypeError(f"{stage!r} is not a Stage: it has no {', '.join(missing)}")
            if id(stage) in seen:
                raise ValueError(f"stage {stage.name!r} is wired twice; every flow needs its own stage object")
            seen.add(id(stage))
        for branch in self.branches:
            for name in ("stream_id", "live", "open", "read", "close"):
                if not hasattr(branch.source, name):
                    raise TypeError(f"{branch.source!r} is not a Source: it has no {name}")
            if branch.queue_policy not in ("auto", "drop_oldest", "block"):
                raise ValueError(f"stream {branch.stream_id!r}: unknown queue policy {branch.queue_policy!r}")

    def stages_in_order(self) -> list[Any]:
        """Every stage in pipeline order: inference, each stream's outputs, the publisher."""
        outputs = [stage for branch in self.branches for stage in branch.stages_in_flow_order()]
        return [self.infer, *outputs, *([self.publisher] if self.publisher is not None else [])]


@dataclass(frozen=True, slots=True)
class Outputs:
    """Which outputs to build (a benchmark measures inference alone by turning them off)."""

    record: bool = True
    detection_log: bool = True
    publish: bool = True


def compose(
    config: StreamdConfig,
    bundle: Bundle,
    backend: Backend,
    metrics: Metrics,
    zmq_context: zmq.Context | None,
    outputs: Outputs = Outputs(),
) -> Pipeline:
    """
    sources (1 thread per stream) --> queue --> batch across streams --> infer --+--> per stream: annotate --> record
                                                (max_batch | max_wait_ms)        |                detection log
                                                                                 +--> publisher (ZeroMQ PUB)
    """
    infer = BatchInferStage(bundle, backend, config.thresholds.conf_threshold, config.thresholds.iou_threshold)
    publish = config.publish if outputs.publish and config.publish and config.publish.enabled else None
    if publish and zmq_context is None:
        raise ValueError("publishing needs the process's zmq.Context")
    publisher = (
        PublishStage(zmq_context, publish.bind, publish.sndhwm, publish.linger_ms, metrics) if publish else None
    )
    branches = tuple(
        Branch(
            source=_source(stream),
            queue_size=stream.queue.size,
            queue_policy=stream.queue.policy,
            reconnect_initial_s=stream.reconnect.initial_s,
            reconnect_max_s=stream.reconnect.max_s,
            outputs=_stream_outputs(stream, bundle, outputs),
        )
        for stream in config.streams
    )
    return Pipeline(branches, infer, config.batch.max_batch, config.batch.max_wait_ms, metrics, publisher, zmq_context)


def _source(stream: StreamConfig) -> Source:
    return open_source(
        stream.id, stream.source, realtime=stream.realtime, loop=stream.loop, rtsp_transport=stream.rtsp_transport,
        timeout_s=stream.timeout_s, video_size=stream.v4l2.video_size, framerate=stream.v4l2.framerate,
        pixel_format=stream.v4l2.pixel_format,
    )


def _stream_outputs(stream: StreamConfig, bundle: Bundle, outputs: Outputs) -> tuple[Flow, ...]:
    """annotate --> record, and the detection log beside it (both from the same FrameResult)."""
    flows = []
    if outputs.record and (record := stream.recording):
        recorder = RecordStage(
            stream.id, record.dir, record.segment_s, record.codec, record.preset, record.crf, record.container
        )
        flows.append(Flow(AnnotateStage(bundle.class_names), then=(Flow(recorder),)))
    if outputs.detection_log and (detlog := stream.detection_log):
        flows.append(Flow(DetectionLogStage(stream.id, detlog.dir, detlog.segment_s)))
    return tuple(flows)


def build_pipeline(
    config: StreamdConfig,
    outputs: Outputs = Outputs(),
    *,
    bundle: Bundle | None = None,
    backend: Backend | None = None,
) -> Pipeline:
    """Load the bundle, make the backend, compose. The caller runs it (Runner) and closes its zmq context."""
    bundle = bundle or load_bundle(config.model)
    backend = backend or make_backend(bundle, config.backend, max_batch=config.batch.max_batch)
    metrics = Metrics([stream.id for stream in config.streams])
    wants_zmq = outputs.publish and config.publish is not None and config.publish.enabled
    context = zmq.Context() if wants_zmq else None
    return compose(config, bundle, backend, metrics, context, outputs)
