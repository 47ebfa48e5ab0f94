"""streamd.config: the daemon's YAML, validated with file:line: field errors."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from streamd.config import (
    AutoBackendConfig,
    OnnxRuntimeConfig,
    StreamdConfig,
    TensorRTConfig,
    SourceKind,
    classify_source,
    is_local_endpoint,
    load_config,
)
from streamd.errors import ConfigError

REPO = Path(__file__).parents[2]


@pytest.fixture
def folder(tmp_path: Path, tiny_bundle) -> Path:
    """A config folder with a bundle (models/tiny.bundle) and a clip (clip.mp4) beside the config."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.bundle").symlink_to(tiny_bundle.path)
    (tmp_path / "clip.mp4").write_bytes(b"")
    return tmp_path


def write(folder: Path, text: str) -> Path:
    path = folder / "streamd.yaml"
    path.write_text(textwrap.dedent(text).lstrip())
    return path


MINIMAL = """\
model: models/tiny.bundle
streams:
  - id: room-1
    source: clip.mp4
"""


def test_minimal_config_defaults_and_paths_relative_to_the_file(folder: Path, monkeypatch):
    monkeypatch.chdir("/")
    cfg = load_config(write(folder, MINIMAL))
    assert cfg.model == folder / "models" / "tiny.bundle"
    assert cfg.backend == AutoBackendConfig(type="auto")
    assert (cfg.batch.max_batch, cfg.batch.max_wait_ms) == (8, 5.0)
    assert (cfg.thresholds.conf_threshold, cfg.thresholds.iou_threshold) == (None, None)  # from the bundle
    stream = cfg.streams[0]
    assert stream.source == str(folder / "clip.mp4") and stream.kind is SourceKind.FILE and not stream.kind.live
    assert stream.queue.policy == "auto" and stream.record is None and stream.detection_log is None
    assert stream.segment_s == 600
    assert cfg.publish is None


def test_full_config(folder: Path):
    cfg = load_config(
        write(
            folder,
            """
            model: models/tiny.bundle
            backend: {type: tensorrt, precision: fp32, engine_cache_dir: engines, workspace_mb: 512}
            batch: {max_batch: 4, max_wait_ms: 2}
            thresholds: {conf_threshold: 0.25}
            streams:
              - id: cam
                source: rtsp://10.0.0.5/live
                rtsp_transport: udp
                reconnect: {initial_s: 1, max_s: 8}
                queue: {size: 2, policy: drop_oldest}
                segment_s: 60
                record: {dir: rec, crf: 28, container: mkv}
                detection_log: {dir: logs, enabled: false}
              - id: card
                source: /dev/video0
                v4l2: {video_size: 1920x1080, framerate: 60, pixel_format: yuyv422}
            publish: {bind: "tcp://127.0.0.1:5555", sndhwm: 50, linger_ms: 0}
            logging: {level: DEBUG}
            """,
        )
    )
    assert cfg.backend == TensorRTConfig(
        type="tensorrt", precision="fp32", device=0, engine_cache_dir=folder / "engines", workspace_mb=512
    )
    cam, card = cfg.streams
    assert cam.kind is SourceKind.RTSP and card.kind is SourceKind.V4L2 and cam.kind.live and card.kind.live
    assert cam.record.dir == folder / "rec" and cam.record.container == "mkv" and cam.segment_s == 60
    assert cam.detection_log.dir == folder / "logs" and not cam.detection_log.enabled  # present but disabled
    assert cfg.thresholds.conf_threshold == 0.25 and cfg.thresholds.iou_threshold is None
    assert cfg.publish.sndhwm == 50


@pytest.mark.parametrize(
    "value, expected",
    [
        ("auto", AutoBackendConfig(type="auto")),
        ("onnxruntime", OnnxRuntimeConfig(type="onnxruntime", threads=0)),
        ("{type: onnxruntime, threads: 2}", OnnxRuntimeConfig(type="onnxruntime", threads=2)),
        ("tensorrt", TensorRTConfig(type="tensorrt")),
    ],
)
def test_backend_shorthand_and_union(folder: Path, value, expected):
    cfg = load_config(write(folder, f"backend: {value}\n" + MINIMAL))
    assert cfg.backend == expected


BAD = [
    # (yaml, expected text: file:line: field: message)
    ("batch: {max_batchh: 8}\n" + MINIMAL, ":1: batch.max_batchh: unknown field; did you mean 'max_batch'?"),
    ("batch: {max_batch: 65}\n" + MINIMAL, ":1: batch.max_batch: Input should be less than or equal to 64"),
    ("batch:\n  max_wait_ms: -1\n" + MINIMAL, ":2: batch.max_wait_ms: Input should be greater than or equal to 0"),
    ("thresholds: {conf_threshold: 1.5}\n" + MINIMAL, ":1: thresholds.conf_threshold: Input should be less than or equal to 1"),
    ("backend: cuda\n" + MINIMAL, ":1: backend: Input tag 'cuda' found using 'type' does not match"),
    ("model: nowhere.bundle\nstreams: [{id: a, source: clip.mp4}]\n", ":1: model: Value error, no model bundle folder at"),
    (MINIMAL + "  - id: room-1\n    source: clip.mp4\n", ":2: streams: Value error, stream id 'room-1' is used twice"),
    (MINIMAL + "  - id: b\n    source: gone.mp4\n", ":6: streams.1.source: Value error, stream 'b': no such file:"),
    (MINIMAL + "  - id: b\n    source: http://cam/x\n", ":6: streams.1.source: Value error, unsupported source 'http://cam/x'"),
    (MINIMAL + "  - id: b\n    source: udp://127.0.0.1:5000\n    loop: true\n", ":5: streams.1: Value error, stream 'b': loop and realtime apply to file sources only"),
    (MINIMAL + "  - id: b\n    source: clip.mp4\n    v4l2: {video_size: 640x480}\n", ":5: streams.1: Value error, stream 'b': v4l2 options apply to /dev/videoN"),
    (MINIMAL + "  - id: b c\n    source: clip.mp4\n", ":5: streams.1.id: String should match pattern"),
    (MINIMAL + "    reconnect: {initial_s: 5, max_s: 1}\n", ":5: streams.0.reconnect: Value error, max_s (1.0) must be >= initial_s (5.0)"),
    (MINIMAL + "    queue: {policy: newest}\n", ":5: streams.0.queue.policy: Input should be 'auto', 'drop_oldest' or 'block'"),
    (MINIMAL + "    queue: {size: 0}\n", ":5: streams.0.queue.size: Input should be greater than or equal to 1"),
    (MINIMAL + "    record: {dir: rec, crf: 60}\n", ":5: streams.0.record.crf: Input should be less than or equal to 51"),
    (MINIMAL + "    recrod: {dir: rec}\n", ":5: streams.0.recrod: unknown field; did you mean 'record'?"),
    (MINIMAL + "    record: {dir: rec, segment_s: 60}\n", ":5: streams.0.record.segment_s: unknown field"),
    (MINIMAL + "    segment_s: 0.001\n", ":5: streams.0.segment_s: Input should be greater than or equal to 1"),
    (MINIMAL + "    log: {dir: logs}\n", ":5: streams.0.log: unknown field"),
    (MINIMAL + "    rtsp_transport: http\n", ":5: streams.0.rtsp_transport: Input should be 'tcp' or 'udp'"),
    (MINIMAL + "    track: {confirm_n: 6, confirm_m: 5}\n", ":5: streams.0.track: Value error, need 1 <= confirm_n <= confirm_m, got 6 of 5"),
    (MINIMAL + "    track: {high_conf_threshold: 0.6}\n", ":5: streams.0.track: Value error, high_conf_threshold 0.6 > new_track_threshold 0.4"),
    (MINIMAL + "    track: {method: norfair}\n", ":5: streams.0.track.method: Input should be 'bytetrack' or 'sort'"),
    (MINIMAL + "publish: {bind: 'localhost:5555'}\n", ":5: publish.bind: String should match pattern"),
    (MINIMAL + "publish: {sndhwm: 0}\n", ":5: publish.sndhwm: Input should be greater than or equal to 1"),
    (MINIMAL + "publish: {bind: 'tcp://127.0.0.1:99999'}\n", ":5: publish.bind: Value error, the port of tcp://127.0.0.1:99999 must be 1..65535"),
    (MINIMAL + "publish: {bind: 'tcp://0.0.0.0:5555'}\n", ":5: publish: Value error, bind tcp://0.0.0.0:5555 lets other machines connect, and without curve anyone"),
    (MINIMAL + "publish:\n  bind: 'tcp://*:5555'\n", ":5: publish: Value error, bind tcp://*:5555 lets other machines connect"),
    (MINIMAL + "publish: {curve: {server_secret_key_file: k}}\n", ":5: publish.curve.authorized_clients_dir: Field required"),
    (MINIMAL + "publish: {curve: {server_secret_key: k, authorized_clients_dir: c}}\n", ":5: publish.curve.server_secret_key: unknown field; did you mean 'server_secret_key_file'?"),
    (MINIMAL + "publish: {curve: {server_secret_key_file: k, authorized_clients_dir: c}, allow_plaintext_remote: true}\n", ":5: publish: Value error, allow_plaintext_remote has no effect with curve"),

    (MINIMAL + "logging: {level: LOUD}\n", ":5: logging.level: Input should be 'DEBUG', 'INFO', 'WARNING' or 'ERROR'"),
    ("model: models/tiny.bundle\nstreams: []\n", ":2: streams: List should have at least 1 item"),
    ("streams: [{id: a, source: clip.mp4}]\n", ":1: model: Field required"),
]


@pytest.mark.parametrize("text, expected", BAD, ids=[e.split(": ")[1] for _, e in BAD])
def test_errors_name_file_line_and_field(folder: Path, text: str, expected: str):
    path = write(folder, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert f"{path}{expected}" in str(caught.value)


@pytest.mark.parametrize(
    "text, where",
    [("model: " + "m" * 300 + "\nstreams: [{id: a, source: clip.mp4}]\n", ":1: model: "),
     (MINIMAL + "  - id: b\n    source: " + "s" * 5000 + ".mp4\n", ":6: streams.1.source: ")],
)  # fmt: skip
def test_a_path_too_long_for_the_file_system_is_an_error_not_a_traceback(folder: Path, text: str, where: str):
    path = write(folder, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    (line,) = str(caught.value).splitlines()
    assert line.startswith(f"{path}{where}") and "File name too long" in line and len(line) < 600


@pytest.mark.parametrize(
    ("bind", "local"),
    [("tcp://127.0.0.1:5555", True), ("tcp://127.4.5.6:5555", True), ("tcp://[::1]:5555", True),
     ("tcp://localhost:5555", True), ("tcp://LocalHost:*", True), ("tcp://[::ffff:127.0.0.1]:5555", True),
     ("ipc:///run/streamd/room.sock", True), ("inproc://room", True),
     ("tcp://*:5555", False), ("tcp://0.0.0.0:5555", False), ("tcp://[::]:5555", False), ("tcp://[*]:5555", False),
     ("tcp://10.0.0.5:5555", False), ("tcp://[fe80::1]:5555", False), ("tcp://eth0:5555", False),
     ("tcp://lo:5555", False), ("tcp://eus-gateway.local:5555", False), ("tcp://localhost.example.com:5555", False),
     ("tcp://128.0.0.1:5555", False)],
)  # fmt: skip
def test_only_loopback_and_local_transports_are_local(bind: str, local: bool):
    assert is_local_endpoint(bind) is local


@pytest.mark.parametrize(
    ("publish", "curve"),
    [("{bind: 'tcp://127.0.0.1:5555'}", False),
     ("{bind: 'ipc:///run/streamd/room.sock'}", False),
     ("{bind: 'tcp://0.0.0.0:5555', allow_plaintext_remote: true}", False),
     ("{bind: 'tcp://*:5555', curve: {server_secret_key_file: keys/server.key_secret, authorized_clients_dir: clients}}", True)],
)  # fmt: skip
def test_binds_that_are_accepted(folder: Path, publish: str, curve: bool):
    cfg = load_config(write(folder, MINIMAL + f"publish: {publish}\n"))
    assert (cfg.publish.curve is not None) is curve
    if curve:  # paths relative to the config file, like every other path
        assert cfg.publish.curve.server_secret_key_file == folder / "keys" / "server.key_secret"
        assert cfg.publish.curve.authorized_clients_dir == folder / "clients"


def test_every_error_is_listed(folder: Path):
    path = write(folder, "batch: {max_batch: 0, max_wait_ms: -1}\n" + MINIMAL + "publish: {sndhwm: 0}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    lines = str(caught.value).splitlines()
    assert len(lines) == 3 and all(line.startswith(f"{path}:") for line in lines)


def test_config_is_frozen(folder: Path):
    cfg = load_config(write(folder, MINIMAL))
    with pytest.raises(ValidationError):
        cfg.batch.max_batch = 2


@pytest.mark.parametrize(
    "source, kind",
    [("clip.mp4", SourceKind.FILE), ("/data/CASE.MKV", SourceKind.FILE), ("file:///x/clip.mkv", SourceKind.FILE),
     ("/dev/video2", SourceKind.V4L2), ("rtsp://h/p", SourceKind.RTSP), ("RTSPS://h/p", SourceKind.RTSP),
     ("udp://@:5000", SourceKind.UDP), ("rtp://h:5004", SourceKind.RTP), ("srt://h:9000", SourceKind.SRT)],
)  # fmt: skip
def test_one_source_classifier(source, kind):
    assert classify_source(source) is kind


@pytest.mark.parametrize("source", ["http://example.com/a.m3u8", "ftp://x/y.mp4"])
def test_unsupported_source_urls_are_refused(source):
    with pytest.raises(ValueError, match="unsupported source"):
        classify_source(source)


def _models(model: type[BaseModel], seen: set) -> None:
    if model in seen:
        return
    seen.add(model)
    for field in model.model_fields.values():
        for candidate in _nested(field.annotation):
            _models(candidate, seen)


def _nested(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) or () for m in _nested(arg)]


def test_every_field_is_described_and_models_forbid_extra_keys():
    models: set = set()
    _models(StreamdConfig, models)
    assert {m.__name__ for m in models} >= {"StreamConfig", "RecordConfig", "TensorRTConfig", "PublishConfig"}
    for model in models:
        assert model.model_config.get("extra") == "forbid", model.__name__
        for name, field in model.model_fields.items():
            if name != "type":  # the union's tag documents itself
                assert field.description, f"{model.__name__}.{name} has no description"


@pytest.mark.parametrize("name", ["demo.yaml", "example-live.yaml"])
def test_shipped_examples_are_valid(name: str, tmp_path: Path, tiny_bundle):
    """The example configs in configs/streamd validate (model and file sources swapped for test ones)."""
    path = REPO / "configs" / "streamd" / name
    data = yaml.safe_load(path.read_text())
    data["model"] = str(tiny_bundle.path)
    for stream in data["streams"]:
        if classify_source(stream["source"]) is SourceKind.FILE:
            stream["source"] = str(tmp_path / Path(stream["source"]).name)
            Path(stream["source"]).write_bytes(b"")
    cfg = StreamdConfig.model_validate(data, context={"base_dir": path.parent})
    assert cfg.streams



@pytest.mark.parametrize(
    ("lines", "hwaccel", "threads"),
    [("", "auto", None), ("    hwaccel: cuda\n    decoder_threads: 4\n", "cuda", 4), ("    hwaccel: none\n", "none", None)],
)
def test_decoder_settings(folder: Path, lines: str, hwaccel: str, threads: int | None):
    stream = load_config(write(folder, MINIMAL + lines)).streams[0]
    assert (stream.hwaccel, stream.decoder_threads) == (hwaccel, threads)


DECODER_BAD = [
    ("    hwaccel: nvdec\n", ":5: streams.0.hwaccel: Input should be 'auto', 'cuda' or 'none'"),
    ("    hwaccel: true\n", ":5: streams.0.hwaccel: Input should be 'auto', 'cuda' or 'none'"),
    ("    decoder_threads: 0\n", ":5: streams.0.decoder_threads: Input should be greater than or equal to 1"),
    ("    decoder_threads: 65\n", ":5: streams.0.decoder_threads: Input should be less than or equal to 64"),
    ("    decoder_threads: 2.5\n", ":5: streams.0.decoder_threads: Input should be a valid integer"),
    ("    decoder_threads: true\n", ":5: streams.0.decoder_threads: Input should be a number, not a boolean"),
    ("    decoder_thread: 2\n", ":5: streams.0.decoder_thread: unknown field; did you mean 'decoder_threads'?"),
]


@pytest.mark.parametrize("lines, expected", DECODER_BAD)
def test_decoder_setting_errors_name_file_line_and_field(folder: Path, lines: str, expected: str):
    path = write(folder, MINIMAL + lines)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert f"{path}{expected}" in str(caught.value)
