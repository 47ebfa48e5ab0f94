"""streamd.preflight: what `run` would fail on is found first, by `validate` and `run` alike, with file:line: field.

Each problem is caused for real (a folder on a read-only tmpfs, a port another
socket holds, a model whose output does not fit its bundle.json) and both
commands must refuse it with exit 2, one line per problem, no traceback.
"""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import av
import pytest
import zmq
from typer.testing import CliRunner

from streamd.cli import app
from streamd.keys import generate
from streamd.model import write_bundle
from streamd.stages.record import nvenc_opens
from tests.streamd import media
from tests.streamd.conftest import bundle_meta, tiny_onnx_bytes

runner = CliRunner()


def config_text(bundle: Path, clip: Path, *, record: str = "{dir: rec}", log: str = "{dir: log}",
                bind: str = "tcp://127.0.0.1:*", publish_more: str = "") -> str:  # fmt: skip
    return textwrap.dedent(f"""
        model: {bundle}
        backend: onnxruntime
        streams:
          - id: room-1
            source: {clip}
            record: {record}
            detection_log: {log}
        publish: {{bind: "{bind}"{publish_more}}}
    """).lstrip()


@pytest.fixture
def held_port():
    """A tcp endpoint that another PUB socket holds for the test's duration."""
    context = zmq.Context()
    socket = context.socket(zmq.PUB)
    endpoint = f"tcp://127.0.0.1:{media.free_port('tcp')}"
    socket.bind(endpoint)
    yield endpoint
    socket.close(linger=0)
    context.term()


def both(path: Path) -> list:
    """`streamd validate` and `streamd run` on the same config (run never gets past preflight here)."""
    return [runner.invoke(app, [command, str(path)]) for command in ("validate", "run")]


def assert_refused(path: Path, line: int, field: str, *words: str, code: int = 2) -> None:
    """Both commands refuse it with the same exit code: 2 for the config's fault, 1 for the machine's."""
    for result in both(path):
        assert result.exit_code == code, result.output
        assert "Traceback" not in result.output
        (problem,) = [text for text in result.stderr.splitlines() if text.startswith(f"{path}:{line}: {field}: ")]
        for word in words:
            assert word in problem, problem


def test_a_good_config_passes(tmp_path: Path, tiny_bundle, clip):
    path = tmp_path / "streamd.yaml"
    path.write_text(config_text(tiny_bundle.path, clip))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "rec").exists()  # preflight creates nothing


@pytest.mark.parametrize(
    ("field", "settings", "line", "words"),
    [
        ("streams.0.record", {"record": "{dir: rec, codec: h265_magic}"}, 6, ("no encoder 'h265_magic'",)),
        ("streams.0.record", {"record": "{dir: rec, codec: aac}"}, 6, ("encodes audio",)),
        ("streams.0.record", {"record": "{dir: rec, preset: fastest}"}, 6, ("not an x264 preset", "veryfast")),
    ],
)
def test_encoders_that_do_not_exist_here_are_refused(tmp_path: Path, tiny_bundle, clip, field, settings, line, words):
    path = tmp_path / "streamd.yaml"
    path.write_text(config_text(tiny_bundle.path, clip, **settings))
    assert_refused(path, line, field, *words)


def test_a_folder_on_a_read_only_disk_is_refused(tmp_path: Path, tiny_bundle, clip, read_only: Path):
    path = tmp_path / "streamd.yaml"
    path.write_text(config_text(tiny_bundle.path, clip, record=f"{{dir: {read_only / 'rec'}}}"))
    assert_refused(path, 6, "streams.0.record.dir", "not writable", str(read_only), code=1)  # a mount may come


def test_a_folder_under_a_file_is_refused(tmp_path: Path, tiny_bundle, clip):
    (tmp_path / "a-file").write_text("x")
    path = tmp_path / "streamd.yaml"
    path.write_text(config_text(tiny_bundle.path, clip, log=f"{{dir: {tmp_path / 'a-file' / 'logs'}}}"))
    assert_refused(path, 7, "streams.0.detection_log.dir", "is not a folder", code=1)


def test_a_bind_another_process_holds_is_refused(tmp_path: Path, tiny_bundle, clip, held_port: str):
    path = tmp_path / "streamd.yaml"
    path.write_text(config_text(tiny_bundle.path, clip, bind=held_port))
    assert_refused(path, 8, "publish.bind", f"cannot bind {held_port}", code=1)  # systemd retries it later


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"class_names": ["only-one"]}, ("scores 3 classes", "names 1 (only-one)")),
        ({"input_hw": [128, 128]}, ("128",)),
    ],
)
def test_a_bundle_that_disagrees_with_its_model_is_refused(tmp_path: Path, clip, change: dict, words):
    """A 1-name bundle on a 3-class model would publish labels "1" and "2": refused before anything starts."""
    bundle = write_bundle(tmp_path / "odd.bundle", tiny_onnx_bytes(), {**bundle_meta(), **change})
    path = tmp_path / "streamd.yaml"
    path.write_text(config_text(bundle.path, clip))
    assert_refused(path, 1, "model", *words)


def test_a_bundle_whose_onnx_does_not_load_is_refused(tmp_path: Path, clip):
    bundle = write_bundle(tmp_path / "garbage.bundle", b"not an onnx model", bundle_meta())  # sha256 matches
    path = tmp_path / "streamd.yaml"
    path.write_text(config_text(bundle.path, clip))
    assert_refused(path, 1, "model", "ONNX Runtime cannot load the model")


def test_every_problem_is_listed_at_once(tmp_path: Path, tiny_bundle, clip, held_port: str):
    path = tmp_path / "streamd.yaml"
    path.write_text(config_text(tiny_bundle.path, clip, record="{dir: rec, codec: nope}", bind=held_port))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert [line.split(": ")[1] for line in result.stderr.splitlines()] == ["streams.0.record", "publish.bind"]


CURVE = ", curve: {server_secret_key_file: keys/server.key_secret, authorized_clients_dir: clients}"


@pytest.fixture
def curve_folder(tmp_path: Path) -> Path:
    """keys/server.key{,_secret} and an allow-list clients/ holding one subscriber's viewer.key, beside the config."""
    generate("server", tmp_path / "keys")
    generate("viewer", tmp_path / "clients")
    (tmp_path / "clients" / "viewer.key_secret").unlink()  # it stays with the subscriber
    return tmp_path


def test_a_good_curve_config_passes(curve_folder: Path, tiny_bundle, clip):
    path = curve_folder / "streamd.yaml"
    path.write_text(config_text(tiny_bundle.path, clip, bind="tcp://*:*", publish_more=CURVE))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("damage", "field", "words"),
    [
        ("secret readable", "server_secret_key_file", ("open to other users (mode 0644)", "chmod 600")),
        ("secret group-readable", "server_secret_key_file", ("open to other users (mode 0640)",)),
        ("secret missing", "server_secret_key_file", ("No such file or directory",)),
        ("public key given", "server_secret_key_file", ("has no secret key",)),
        ("no client key", "authorized_clients_dir", ("holds no client key",)),
        ("allow-list missing", "authorized_clients_dir", ("No such file or directory",)),
        ("secret in allow-list", "authorized_clients_dir", ("holds a secret key (viewer.key_secret)",)),
    ],
)
def test_bad_curve_keys_are_refused(curve_folder: Path, tiny_bundle, clip, damage: str, field: str, words):
    secret, clients = curve_folder / "keys" / "server.key_secret", curve_folder / "clients"
    match damage:
        case "secret readable":
            secret.chmod(0o644)
        case "secret group-readable":
            secret.chmod(0o640)
        case "secret missing":
            secret.unlink()
        case "public key given":
            secret.write_text((curve_folder / "keys" / "server.key").read_text())
        case "no client key":
            (clients / "viewer.key").unlink()
        case "allow-list missing":
            shutil.rmtree(clients)
        case "secret in allow-list":
            shutil.copy(curve_folder / "keys" / "server.key_secret", clients / "viewer.key_secret")
    path = curve_folder / "streamd.yaml"
    path.write_text(config_text(tiny_bundle.path, clip, bind="tcp://*:*", publish_more=CURVE))
    assert_refused(path, 8, f"publish.curve.{field}", *words)


def test_a_metrics_port_another_process_holds_is_refused(tmp_path: Path, tiny_bundle, clip):
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        path = tmp_path / "streamd.yaml"
        path.write_text(config_text(tiny_bundle.path, clip) + f'metrics: {{bind: "127.0.0.1:{port}"}}\n')
        assert_refused(path, 9, "metrics.bind", f"cannot listen on 127.0.0.1:{port}", code=1)


def zero_size_video(path: Path) -> Path:
    """A Matroska file whose video track says 0x0 (a 64x64 rawvideo one with its PixelWidth/PixelHeight zeroed)."""
    with av.open(str(path), "w") as output:
        stream = output.add_stream("rawvideo", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for packet in (*stream.encode(av.VideoFrame(64, 64, "yuv420p")), *stream.encode()):
            output.mux(packet)
    data = bytearray(path.read_bytes())
    for element in (b"\xb0\x81\x40", b"\xba\x81\x40"):  # EBML: PixelWidth / PixelHeight, 1 byte, 64
        data[data.index(element) + 2] = 0
    path.write_bytes(bytes(data))
    return path


NVENC_OPENS = nvenc_opens()


@pytest.mark.parametrize(
    ("case", "line", "field", "words"),
    [
        ("mjpeg", 6, "streams.0.record", ("mjpeg cannot record mp4 segments here",)),
        ("rawvideo", 6, "streams.0.record", ("rawvideo cannot record mp4 segments here", "does not support")),
        pytest.param("h264_nvenc", 6, "streams.0.record", ("h264_nvenc",),
                     marks=pytest.mark.skipif(NVENC_OPENS, reason="h264_nvenc opens here (a GPU)")),
        ("symlink loop", 6, "streams.0.record.dir", ("cannot be reached: Too many levels of symbolic links",)),
        ("300-character name", 7, "streams.0.detection_log.dir", ("a folder name of 300 bytes (at most 255)",)),
        ("metrics port is the publish port", 9, "metrics.bind", ("is publish.bind's too",)),
        ("0x0 video", 5, "streams.0.source", ("zero.mkv: its first frame does not decode (0x0 video)",)),
    ],
)
def test_settings_that_can_never_work_are_refused(tmp_path: Path, tiny_bundle, clip, case, line, field, words):
    """Each ran before, logging errors forever (or 0 frames) and exiting 0: now validate and run refuse it, exit 2."""
    settings, more, source = {}, "", clip
    port = media.free_port("tcp")
    match case:
        case "mjpeg" | "rawvideo" | "h264_nvenc":
            settings["record"] = f"{{dir: rec, codec: {case}}}"
        case "symlink loop":
            (tmp_path / "loop").symlink_to(tmp_path / "loop")
            settings["record"] = "{dir: loop/rec}"
        case "300-character name":
            settings["log"] = f"{{dir: {'d' * 300}}}"
        case "metrics port is the publish port":
            settings["bind"] = f"tcp://127.0.0.1:{port}"
            more = f'metrics: {{bind: "127.0.0.1:{port}"}}\n'
        case "0x0 video":
            source = zero_size_video(tmp_path / "zero.mkv")
    path = tmp_path / "streamd.yaml"
    path.write_text(config_text(tiny_bundle.path, source, **settings) + more)
    assert_refused(path, line, field, *words)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name not in ("loop", "zero.mkv")) == ["streamd.yaml"]
