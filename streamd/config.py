"""The daemon's configuration (DESIGN contract 3): one YAML file per instance, loaded once, frozen.

Every field is described and bounded; unknown keys are errors (with a "did you
mean" from `streamd.yamlconfig`). Relative paths (the model bundle, file
sources, recording and log folders, the engine cache) are relative to the
config file, so a config and its data can move together. Validators are
small and read-only: they may look at the file system, never change it.

    model: models/bccd-nano.bundle
    backend: auto                       # or {type: onnxruntime, threads: 2}
    batch: {max_batch: 8, max_wait_ms: 5}
    thresholds: {conf_threshold: 0.3, iou_threshold: 0.45}
    streams:
      - id: eus-room-1
        source: rtsp://10.0.0.5/live
        segment_s: 600
        record: {dir: /var/lib/streamd/recordings}
        detection_log: {dir: /var/lib/streamd/detections}
    publish: {bind: tcp://127.0.0.1:5555}
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import Field, ValidationInfo, field_validator, model_validator

from streamd.tracking import TrackSettings
from streamd.config_outputs import (  # noqa: F401 (part of this module's names: streamd.config.PublishConfig ...)
    ArchiveConfig,
    CurveConfig,
    MetricsConfig,
    PublishConfig,
    is_local_endpoint,
    is_loopback_host,
    split_host_port,
)
from streamd.configbase import Folder, StrictModel, path_is, resolve_path, short_path
from streamd.yamlconfig import load_yaml_model

STREAM_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class SourceKind(StrEnum):
    """What a `source` names, decided once at validation; the decoder picks its demuxer options from it."""

    FILE = "file"
    RTSP = "rtsp"
    UDP = "udp"
    RTP = "rtp"
    SRT = "srt"
    V4L2 = "v4l2"

    @property
    def live(self) -> bool:
        """Live sources drop the oldest frame when inference falls behind; files block and lose nothing."""
        return self is not SourceKind.FILE


FILE_SUFFIXES = frozenset({".mp4", ".mkv", ".ts", ".avi", ".mov", ".m4v", ".m2ts", ".mts", ".webm"})
_SCHEMES = {"rtsp": SourceKind.RTSP, "rtsps": SourceKind.RTSP, "udp": SourceKind.UDP, "rtp": SourceKind.RTP,
            "srt": SourceKind.SRT}  # fmt: skip


def classify_source(source: str) -> SourceKind:
    """The kind of a `source` string: a V4L2 device, a network URL, or a file path; ValueError for other URLs."""
    if source.startswith("/dev/video"):
        return SourceKind.V4L2
    scheme, sep, _ = source.partition("://")
    if not sep or scheme.lower() == "file":
        return SourceKind.FILE
    if scheme.lower() in _SCHEMES:
        return _SCHEMES[scheme.lower()]
    raise ValueError(
        f"unsupported source {source!r}: expected {', '.join(s + '://' for s in _SCHEMES)}, /dev/videoN or a file "
        f"({', '.join(sorted(FILE_SUFFIXES))})"
    )


# --- inference -------------------------------------------------------------------------------------


class OnnxRuntimeConfig(StrictModel):
    """ONNX Runtime on the CPU: runs everywhere, the default for demos, tests and CI."""

    type: Literal["onnxruntime"]
    threads: int = Field(0, ge=0, le=256, description="Intra-op threads; 0 lets ONNX Runtime use one per core.")


class TensorRTConfig(StrictModel):
    """TensorRT on an NVIDIA GPU; the engine is built on first start and cached."""

    type: Literal["tensorrt"]
    precision: Literal["fp16", "fp32", "int8"] = Field(
        "fp16", description="Engine precision; int8 needs a model exported with Q/DQ nodes."
    )
    device: int = Field(0, ge=0, le=63, description="CUDA device index.")
    engine_cache_dir: Path | None = Field(
        None, description="Where built engines are cached (relative to this file); default: BUNDLE/engines."
    )
    workspace_mb: int = Field(2048, ge=64, le=262144, description="TensorRT builder workspace limit, MiB.")

    @field_validator("engine_cache_dir")
    @classmethod
    def _relative_to_config(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else resolve_path(value, info)


class TorchConfig(StrictModel):
    """PyTorch (pixeltable-yolox) from the bundle's weights.safetensors, on a CUDA GPU or the CPU."""

    type: Literal["torch"]
    device: str = Field("cuda:0", pattern=r"^(cpu|cuda:[0-9]{1,2})$", description="cuda:N, or cpu.")
    precision: Literal["fp16", "bf16", "fp32"] | None = Field(
        None, description="Compute precision; default fp16 on CUDA. The CPU runs fp32 only."
    )
    cuda_graphs: bool = Field(True, description="One CUDA graph per batch-size bucket, replayed per batch (CUDA only).")

    @model_validator(mode="after")
    def _cpu_is_fp32(self) -> TorchConfig:
        if self.device == "cpu" and self.precision not in (None, "fp32"):
            raise ValueError(f"device cpu runs fp32 only, not {self.precision}; leave precision out or use a cuda:N device")
        return self

    @property
    def compute_precision(self) -> str:
        """The precision the backend runs: the configured one, else fp16 on CUDA and fp32 on the CPU."""
        return self.precision or ("fp32" if self.device == "cpu" else "fp16")


class AutoBackendConfig(StrictModel):
    """TensorRT when it is importable and a CUDA GPU is present, else ONNX Runtime (default settings)."""

    type: Literal["auto"]


BackendConfig = Annotated[
    Union[OnnxRuntimeConfig, TensorRTConfig, TorchConfig, AutoBackendConfig], Field(discriminator="type")
]


def gpu_index(backend: BackendConfig) -> int:
    """The index of the GPU a backend config runs on (0 when it names none: auto, onnxruntime, torch on the CPU)."""
    match backend:
        case TorchConfig(device=device) if device.startswith("cuda:"):
            return int(device.removeprefix("cuda:"))
        case TensorRTConfig(device=device):
            return device
    return 0


class BatchConfig(StrictModel):
    """How the inference worker batches frames across streams."""

    max_batch: int = Field(8, ge=1, le=64, description="Most frames in one batch.")
    max_wait_ms: float = Field(
        5.0, ge=0, le=1000, description="Longest wait for more frames after the first one of a batch, ms."
    )


class ThresholdsConfig(StrictModel):
    """Detection thresholds; an omitted one comes from the bundle's defaults.

    DESIGN's sketch writes `confidence` / `nms_iou`; the project spells them
    `conf_threshold` / `iou_threshold` everywhere (bundle, trainer, here).
    """

    conf_threshold: float | None = Field(
        None, ge=0, le=1, description="Minimum objectness x class score (DESIGN's `confidence`); default: bundle."
    )
    iou_threshold: float | None = Field(
        None, gt=0, le=1, description="Class-aware NMS IoU threshold (DESIGN's `nms_iou`); default: bundle."
    )


# --- streams ---------------------------------------------------------------------------------------


class ReconnectConfig(StrictModel):
    """How a lost live source is reopened: tried every initial_s while it is away (so it is back within about
    initial_s + its open time of returning, whatever the outage length); a source that is lost again soon
    after it came back (flapping) waits twice as long each time, up to max_s."""

    initial_s: float = Field(0.5, gt=0, le=60, description="Wait between attempts to reopen a lost source, s.")
    max_s: float = Field(30.0, gt=0, le=3600, description="Longest wait for a flapping source, s.")

    @model_validator(mode="after")
    def _ordered(self) -> ReconnectConfig:
        if self.max_s < self.initial_s:
            raise ValueError(f"max_s ({self.max_s}) must be >= initial_s ({self.initial_s})")
        return self


_TRACK = TrackSettings()  # the tracker's defaults, chosen by benchmarks/tracking.py


class QueueConfig(StrictModel):
    """The bounded queue between a source and the inference worker (and before its outputs)."""

    size: int | None = Field(
        None, ge=1, le=1024, description="Frames held at most; null: 1 for the input of a paced stream (what waits "
        "for inference stays fresh), 8 otherwise.",
    )
    policy: Literal["auto", "drop_oldest", "block"] = Field(
        "auto",
        description="When full: drop_oldest (live: never stall the camera), block (files: lose no frame); "
        "auto picks drop_oldest for live sources and block for files.",
    )


class V4L2Config(StrictModel):
    """Capture-card options, passed to the V4L2 demuxer (only for /dev/videoN sources)."""

    video_size: str | None = Field(None, pattern=r"^\d{2,5}x\d{2,5}$", description="WIDTHxHEIGHT, e.g. 1920x1080.")
    framerate: float | None = Field(None, gt=0, le=480, description="Frames per second to request.")
    pixel_format: str | None = Field(None, min_length=1, max_length=32, description="e.g. yuyv422, mjpeg.")


class RecordConfig(StrictModel):
    """The annotated recording of a stream, in segments that stay playable after a crash."""

    enabled: bool = Field(True, description="Write the recording (false keeps the settings but records nothing).")
    dir: Folder = Field(description="Folder of the recordings (relative to this file); created at start.")
    codec: str = Field("auto", min_length=1, max_length=32, description="Encoder name, or auto (GPU if present).")
    preset: str = Field(
        "superfast", min_length=1, max_length=32,
        description="Encoder speed preset (x264 names). superfast: measured at 720p with zerolatency, 22% less CPU "
        "than veryfast at about the same bitrate (docs/operations.md).",
    )
    crf: int = Field(23, ge=0, le=51, description="Constant rate factor: lower is better and bigger.")
    container: Literal["mp4", "mkv"] = Field("mp4", description="File format of the segments (mp4 is fragmented).")

    @field_validator("dir")
    @classmethod
    def _relative_to_config(cls, value: Path, info: ValidationInfo) -> Path:
        return resolve_path(value, info)


class DetectionLogConfig(StrictModel):
    """The JSON-lines detection log of a stream: the published messages, one file per recording segment."""

    enabled: bool = Field(True, description="Write the log (false keeps the settings but logs nothing).")
    dir: Folder = Field(description="Folder of the logs (relative to this file); created at start.")

    @field_validator("dir")
    @classmethod
    def _relative_to_config(cls, value: Path, info: ValidationInfo) -> Path:
        return resolve_path(value, info)


class RetentionConfig(StrictModel):
    """How long streamd keeps what it wrote (streamd.retention): recordings, detection logs and archives, by age, by
    size and by the free space of their disk; the oldest closed segments go first, an open one never."""

    max_gb: float | None = Field(
        None, gt=0, le=1_000_000, description="Most gigabytes (1e9 bytes) on disk of the segments it covers, open "
        "ones included; null: no size limit.",
    )
    max_age_days: float | None = Field(
        None, gt=0, le=36_500, description="A segment whose first frame is older than this is removed; null: none "
        "is too old.",
    )
    min_free_gb: float = Field(
        1.0, gt=0, le=1_000_000, description="Free gigabytes to keep on the disk of each folder it covers (a disk "
        "that other files fill too): below it, the oldest closed segments go until there is that much again.",
    )


class TrackConfig(StrictModel):
    """The stream's tracker (streamd.tracking): a track id per detection, confirmed once N of its last M frames had
    its box at or above confirm_threshold."""

    enabled: bool = Field(True, description="Track objects (false: no track ids; every box is sent as confirmed).")
    method: Literal["bytetrack", "sort"] = Field(
        _TRACK.method, description="bytetrack (two passes: low-score boxes keep tracks alive) or sort."
    )
    new_track_threshold: float = Field(
        _TRACK.new_track_threshold, ge=0, le=1, description="A box starts a track only with at least this confidence."
    )
    high_conf_threshold: float = Field(
        _TRACK.high_conf_threshold, ge=0, le=1,
        description="ByteTrack's first pass takes boxes at or above this confidence, the second the others.",
    )
    match_iou_threshold: float = Field(
        _TRACK.match_iou_threshold, ge=0, le=1, description="Least IoU between a track's predicted box and a box."
    )
    confirm_n: int = Field(_TRACK.confirm_n, ge=1, le=1000, description="A track is confirmed once N of ...")
    confirm_m: int = Field(_TRACK.confirm_m, ge=1, le=1000, description="... its last M frames had its box ...")
    confirm_threshold: float = Field(
        _TRACK.confirm_threshold, ge=0, le=1, description="... with at least this confidence (0: any box)."
    )
    max_lost_s: float = Field(_TRACK.max_lost_s, gt=0, le=3600, description="A track ends after this long unseen, s.")

    @model_validator(mode="after")
    def _the_trackers_own_rules(self) -> TrackConfig:
        self.settings()  # TrackSettings checks N of M and ByteTrack's thresholds: one place for its rules
        return self

    def settings(self) -> TrackSettings:
        return TrackSettings(**self.model_dump(exclude={"enabled"}))


class StreamConfig(StrictModel):
    """One video stream: where it comes from and where its results go."""

    id: str = Field(pattern=STREAM_ID_PATTERN, description="Unique name: ZeroMQ topic, file-name prefix, log tag.")
    source: str = Field(
        min_length=1, description="rtsp://, udp://, rtp://, ... URL, /dev/videoN, or a file path (relative to this file)."
    )
    realtime: bool = Field(False, description="Files only: pace reading at the file's frame rate, like a camera.")
    loop: bool = Field(False, description="Files only: start again at the end instead of ending the stream.")
    rtsp_transport: Literal["tcp", "udp"] = Field("tcp", description="RTSP transport.")
    timeout_s: float = Field(5.0, gt=0, le=120, description="Open/read timeout of a network or device source, s.")
    reconnect: ReconnectConfig = Field(default_factory=ReconnectConfig, description="Back-off of live reconnects.")
    queue: QueueConfig = Field(default_factory=QueueConfig, description="The stream's bounded queues.")
    v4l2: V4L2Config = Field(default_factory=V4L2Config, description="Capture-card options.")
    segment_s: float = Field(
        600, ge=1, le=86400, description="Length of one recording and detection-log file, seconds (one rule for both)."
    )
    max_age_ms: float | None = Field(
        150, gt=0, le=60_000, description="Live and realtime streams: a result older than this (from capture) is "
        "never published (dropped, counted as stale) and the recording shows 'AI stale' without its boxes; null: off.",
    )
    frozen_after_s: float | None = Field(
        2.0, gt=0, le=3600, description="Live streams: a picture unchanged for this long is flagged frozen; null: off."
    )
    hwaccel: Literal["auto", "cuda", "none"] = Field(
        "auto", description="Decoder: cuda (NVDEC; the CPU with a warning when it does not open), none (the CPU), "
        "auto (cuda when an NVIDIA GPU is present, else the CPU).",
    )
    decoder_threads: int | None = Field(
        None, ge=1, le=64, description="CPU decoder threads of the stream; null: FFmpeg's choice (about one per core)."
    )
    track: TrackConfig = Field(default_factory=TrackConfig, description="Object tracking and confirmed findings.")
    record: RecordConfig | None = Field(None, description="Annotated recording; omitted: none.")
    detection_log: DetectionLogConfig | None = Field(None, description="Detection log (JSON lines); omitted: none.")
    archive: ArchiveConfig | None = Field(
        None, description="The source's own packets in segments beside the recording, no decode or encode; omitted: none."
    )
    retention: RetentionConfig | None = Field(
        None, description="This stream's own retention, in place of the daemon's; omitted: the daemon's."
    )

    @field_validator("source")
    @classmethod
    def _supported_and_present(cls, value: str, info: ValidationInfo) -> str:
        if classify_source(value) is not SourceKind.FILE:
            return value
        path = resolve_path(Path(value.removeprefix("file://")), info)
        if not path_is(path, "file"):
            stream = info.data.get("id", "?")
            raise ValueError(f"stream {stream!r}: no such file: {short_path(path)}")
        return str(path)

    @model_validator(mode="after")
    def _file_only_options(self) -> StreamConfig:
        if self.kind is not SourceKind.FILE and (self.loop or self.realtime):
            raise ValueError(f"stream {self.id!r}: loop and realtime apply to file sources only")
        has_v4l2 = any(v is not None for v in (self.v4l2.video_size, self.v4l2.framerate, self.v4l2.pixel_format))
        if has_v4l2 and self.kind is not SourceKind.V4L2:
            raise ValueError(f"stream {self.id!r}: v4l2 options apply to /dev/videoN sources only")
        return self

    @property
    def kind(self) -> SourceKind:
        """The source's kind (the source was validated, so this never raises)."""
        return classify_source(self.source)

    @property
    def paced(self) -> bool:
        """Frames come at the source's own rate (a live source, or a realtime file): live policies apply."""
        return self.kind.live or self.realtime


# --- outputs and process ---------------------------------------------------------------------------


class LoggingConfig(StrictModel):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Lowest level logged.")


class StreamdConfig(StrictModel):
    """One daemon instance: a model, its backend, the streams and the outputs."""

    model: Path = Field(description="Model bundle folder (NAME.bundle), relative to this file.")
    backend: BackendConfig = Field(
        default_factory=lambda: AutoBackendConfig(type="auto"),
        description="auto | onnxruntime | tensorrt, or a mapping with `type` and that backend's options.",
    )
    batch: BatchConfig = Field(default_factory=BatchConfig, description="Batching across streams.")
    thresholds: ThresholdsConfig = Field(default_factory=ThresholdsConfig, description="Detection thresholds.")
    streams: list[StreamConfig] = Field(min_length=1, max_length=64, description="The video streams.")
    publish: PublishConfig | None = Field(None, description="ZeroMQ publishing; omitted: none.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Log settings.")
    metrics: MetricsConfig | None = Field(None, description="Prometheus /metrics and /healthz; omitted: none.")
    retention: RetentionConfig | None = Field(
        None, description="Retention of every stream without its own; omitted: streamd removes nothing of theirs."
    )
    drain_timeout_s: float = Field(
        10.0, gt=0, le=300, description="On stop, how long in-flight frames may take to drain before giving up, s."
    )

    @field_validator("model")
    @classmethod
    def _bundle_folder(cls, value: Path, info: ValidationInfo) -> Path:
        path = resolve_path(value, info)
        if not path_is(path, "dir"):
            raise ValueError(f"no model bundle folder at {short_path(path)}")
        return path

    @field_validator("backend", mode="before")
    @classmethod
    def _backend_shorthand(cls, value: object) -> object:
        """`backend: auto` is short for `backend: {type: auto}`."""
        return {"type": value} if isinstance(value, str) else value

    @field_validator("streams")
    @classmethod
    def _unique_ids(cls, value: list[StreamConfig]) -> list[StreamConfig]:
        seen: set[str] = set()
        for stream in value:
            if stream.id in seen:
                raise ValueError(f"stream id {stream.id!r} is used twice; ids must be unique")
            seen.add(stream.id)
        return value


def load_config(path: str | Path) -> StreamdConfig:
    """Read and validate a daemon config; raise ConfigError listing every problem with file:line: field."""
    return load_yaml_model(path, StreamdConfig)
