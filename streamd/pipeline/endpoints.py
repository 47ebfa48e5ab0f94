"""The daemon's endpoints from its config: a PyAV source per stream, each stream's outputs, the ZeroMQ publisher.

`compose` wires whatever Endpoints it is given; this builds the real ones.
"""

from __future__ import annotations

import zmq

from streamd.config import StreamConfig, StreamdConfig, gpu_index
from streamd.detector import Detector
from streamd.ops.metrics import Metrics
from streamd.pipeline.compose import Chain, Endpoints, Switches, max_age_ms
from streamd.stages.annotate import AnnotateStage
from streamd.stages.archive import ArchiveTap
from streamd.stages.decode import AVSource, open_source
from streamd.stages.detection_log import DetectionLogStage
from streamd.stages.publish import PublishStage
from streamd.stages.record import RecordStage


def endpoints(
    config: StreamdConfig, detector: Detector, metrics: Metrics, zmq_context: zmq.Context | None,
    switches: Switches = Switches(),
) -> Endpoints:  # fmt: skip
    """Sources, per-stream outputs (annotate -> record, detection log) and the publisher the config and switches ask
    for, each with the config section it comes from (Endpoints.sections: what the preflight asks to check itself)."""
    sources, outputs, sections = {}, {}, []
    for index, stream in enumerate(config.streams):
        recorded = switches.record and stream.record is not None and stream.record.enabled
        archive = None
        if stream.archive is not None and stream.archive.enabled:  # a tap in the source: its packets, as they come
            archive = ArchiveTap(stream.id, stream.archive, stream.segment_s, metrics)
            sections.append((("streams", index, "archive"), archive))
        sources[stream.id] = source_for(stream, detector, metrics, recorded, gpu_index(config.backend), archive)
        sections.append((("streams", index, "source"), sources[stream.id]))
        chains: list[Chain] = []
        if recorded:
            annotate = AnnotateStage(detector.class_names, max_age_ms=max_age_ms(stream))
            chains.append((annotate, record := RecordStage(stream.id, stream.record, stream.segment_s)))
            sections.append((("streams", index, "record"), record))
        if switches.detection_log and stream.detection_log is not None and stream.detection_log.enabled:
            chains.append((log := DetectionLogStage(stream.id, stream.detection_log.dir, stream.segment_s),))
            sections.append((("streams", index, "detection_log"), log))
        outputs[stream.id] = tuple(chains)
    publisher = None
    if switches.publish and config.publish is not None and config.publish.enabled:
        if zmq_context is None:
            raise ValueError("publishing needs the process's zmq.Context")
        publisher = PublishStage(zmq_context, config.publish, metrics)
        sections.append((("publish",), publisher))
    return Endpoints(sources, outputs, publisher, tuple(sections))


def source_for(
    stream: StreamConfig, detector: Detector, metrics: Metrics, recorded: bool, gpu: int, archive: ArchiveTap | None = None
) -> AVSource:
    """A recorded stream is decoded to full-size BGR (the recorder draws on it). One that is not is never BGR at
    full size: decoded straight to the model's size, or, for a backend that converts and resizes on its device,
    handed over as the decoder's planes. NVDEC decodes where inference runs (gpu). archive: the stream's, fed with
    its packets."""
    if recorded:
        return open_source(stream, metrics, input_hw=detector.input_hw, cuda_device=gpu, archive=archive)
    if "yuv420p" in detector.pixel_formats:
        return open_source(stream, metrics, input_hw=detector.input_hw, pixel_format="yuv420p", cuda_device=gpu,
                           archive=archive)  # fmt: skip
    return open_source(stream, metrics, model_hw=detector.input_hw, cuda_device=gpu, archive=archive)
