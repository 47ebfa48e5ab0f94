"""The daemon's pipeline as code: `compose` reads like the diagram, every stage, queue and policy in it."""

from __future__ import annotations

from dataclasses import dataclass

import zmq

from streamd.config import BackendConfig, StreamConfig, StreamdConfig, TensorRTConfig, TorchConfig
from streamd.model.detector import Detector
from streamd.ops.heartbeat import HeartbeatSource
from streamd.ops.metrics import Metrics
from streamd.pipeline.graph import Graph, Queue
from streamd.pipeline.queues import Batcher, Policy
from streamd.stages.annotate import AnnotateStage
from streamd.stages.decode import open_source
from streamd.stages.detection_log import DetectionLogStage
from streamd.stages.freshness import FreshnessStage
from streamd.stages.infer import ResultsStage, SubmitStage
from streamd.stages.publish import PublishStage
from streamd.stages.record import RecordStage


@dataclass(frozen=True, slots=True)
class Switches:
    """Which outputs to build (a benchmark measures inference alone by turning them off)."""

    record: bool = True
    detection_log: bool = True
    publish: bool = True


def compose(
    config: StreamdConfig,
    detector: Detector,
    metrics: Metrics,
    zmq_context: zmq.Context | None,
    switches: Switches = Switches(),
) -> Graph:
    """
    source:ID ──input:ID──► batch ──► submit ──in_flight──► results ──output:ID──► annotate ──► record
    (1 thread per stream)   (max_batch | max_wait_ms,        (decode, NMS,    │   (1 thread     └──► detection_log
     queue per stream:       fair, credits: a frame is        message)       │    per stream)
     drop_oldest if paced,   taken only when its stream's                    └──publish──► freshness ──► publish
     block for files)        block queues have room)                         ▲     (drop stale)   (ZeroMQ PUB)
                                                                   heartbeat ┘ (the supervisor, once a second)

    Every arrow with a name is a bounded queue and has its own worker thread; the
    others are calls in the same thread. A stage after `stream=` is that
    stream's: its failure stops that output of that stream only.
    """
    graph = Graph(metrics)
    batch = Batcher(config.batch.max_batch, config.batch.max_wait_ms)
    submit = SubmitStage(detector, config.thresholds.conf_threshold, config.thresholds.iou_threshold)
    results = ResultsStage(detector, metrics)
    on_device = detector.on_device  # a FrameBackend: colour conversion and resize on its device
    gpu = cuda_device(config.backend)  # NVDEC decodes where inference runs
    graph.add_flow(batch, submit)
    graph.add_flow(submit, results, Queue("in_flight", size=1, policy="block", per_frame=False))
    for stream in config.streams:
        policy = queue_policy(stream)
        recorded = switches.record and stream.record is not None and stream.record.enabled
        # A stream that is not recorded is never BGR at full size: decoded straight to the model's size,
        # or, for a backend that converts and resizes on its device, handed over as the decoder's planes.
        if recorded:
            source = open_source(stream, metrics, input_hw=detector.input_hw, cuda_device=gpu)
        elif on_device:
            source = open_source(stream, metrics, input_hw=detector.input_hw, pixel_format="yuv420p", cuda_device=gpu)
        else:
            source = open_source(stream, metrics, model_hw=detector.input_hw, cuda_device=gpu)
        graph.add_flow(source, batch, Queue("input", stream.queue.size, policy))
        outputs = Queue("output", stream.queue.size, policy)
        if recorded:
            annotate = AnnotateStage(detector.class_names, max_age_ms=max_age_ms(stream))
            graph.add_flow(results, annotate, outputs, stream=stream.id)
            graph.add_flow(annotate, RecordStage(stream.id, stream.record, stream.segment_s))
        if switches.detection_log and stream.detection_log is not None and stream.detection_log.enabled:
            log = DetectionLogStage(stream.id, stream.detection_log.dir, stream.segment_s)
            graph.add_flow(results, log, outputs, stream=stream.id)
    publish = config.publish
    if switches.publish and publish is not None and publish.enabled:
        if zmq_context is None:
            raise ValueError("publishing needs the process's zmq.Context")
        live = any(queue_policy(stream) == "drop_oldest" for stream in config.streams)
        size = sum(stream.queue.size for stream in config.streams)
        budgets = {stream.id: max_age_ms(stream) for stream in config.streams if max_age_ms(stream) is not None}
        fresh = FreshnessStage(budgets, metrics)
        published = Queue("publish", size, "drop_oldest" if live else "block")
        graph.add_flow(results, fresh, published)
        graph.add_flow(fresh, PublishStage(zmq_context, publish, metrics))
        graph.add_heartbeat(HeartbeatSource(metrics, results.model, budgets), published)  # once a second
    graph.check()
    return graph


def cuda_device(backend: BackendConfig) -> int:
    """The index of the GPU a backend config runs on (0 when it names none: auto, onnxruntime, torch on the CPU)."""
    match backend:
        case TorchConfig(device=device) if device.startswith("cuda:"):
            return int(device.removeprefix("cuda:"))
        case TensorRTConfig(device=device):
            return device
    return 0


def max_age_ms(stream: StreamConfig) -> float | None:
    """A paced stream's stale budget; a file read as fast as it decodes has none (its frames wait by design)."""
    return stream.max_age_ms if stream.paced else None


def queue_policy(stream: StreamConfig) -> Policy:
    """`auto` is drop_oldest for paced streams (a live source or a realtime file: never fall behind the
    source's clock) and block for files read as fast as possible (lose no frame)."""
    if stream.queue.policy != "auto":
        return stream.queue.policy
    return "drop_oldest" if stream.paced else "block"

