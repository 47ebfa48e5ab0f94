"""The daemon on the GPU path, run on the CPU: backend torch (device cpu) takes yuv420p, so compose hands it
a stream that is not recorded as the decoder's yuv420p planes and a recorded one as BGR frames, and it converts,
letterboxes, runs the shipped model and NMSes on its device. Its detections, frame by frame, are ONNX Runtime's
on the host path from the same video."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from streamd.backends.select import make_backend  # noqa: E402
from streamd.config import StreamdConfig, TorchConfig  # noqa: E402
from streamd.messages import SCHEMA_ID  # noqa: E402
from streamd.model import load_bundle  # noqa: E402
from streamd.model.compare import BARS, compare  # noqa: E402
from streamd.model.detections import Detections  # noqa: E402
from streamd.detector import Detector  # noqa: E402
from streamd.ops.metrics import Metrics  # noqa: E402
from streamd.pipeline.compose import Switches, compose  # noqa: E402
from streamd.pipeline.endpoints import endpoints  # noqa: E402
from streamd.pipeline.daemon import run_pipeline  # noqa: E402
from tests.streamd import media  # noqa: E402

REPO = Path(__file__).parents[3]
SHIPPED = REPO / "models" / "bccd-nano.bundle"
CONF, IOU = 0.3, 0.45


VIDEOS = {  # (file, codec, pix_fmt, colorspace tag): frames of different colour matrix and range, which the planes carry
    "plain": ("bccd-plain.mp4", "libx264", "yuv420p", None),  # untagged: BT.601, limited range
    "bt709": ("bccd-bt709.mp4", "libx264", "yuv420p", 1),
    "full": ("bccd-full.avi", "mjpeg", "yuvj420p", None),  # full range, as an MJPEG camera sends
}


@pytest.fixture(scope="module")
def bccd_videos(bccd_root, tmp_path_factory) -> dict[str, Path]:
    """Eight BCCD test images (640x480) at 5 fps, encoded three ways (VIDEOS) with PyAV (the GPU machine has no
    ffmpeg binary)."""
    import cv2

    folder = tmp_path_factory.mktemp("bccd-video")
    names = (bccd_root / "ImageSets" / "Main" / "test.txt").read_text().split()[:8]
    images = [cv2.imread(str(bccd_root / "JPEGImages" / f"{name}.jpg"), cv2.IMREAD_COLOR) for name in names]
    videos = {}
    for kind, (name, codec, pix_fmt, colorspace) in VIDEOS.items():
        options = {"crf": "12", "bf": "0", "preset": "veryfast"} if codec == "libx264" else {"qmin": "2", "qmax": "2"}
        videos[kind] = media.encode_images(folder / name, images, fps=5, codec=codec, pix_fmt=pix_fmt, options=options,
                                           colorspace=colorspace)  # fmt: skip
    return videos


def config(folder: Path, backend: dict, streams: dict[str, Path], recorded: tuple[str, ...] = ()) -> StreamdConfig:
    """One stream per (id, video), each with a detection log; those in `recorded` recorded too (full-size BGR)."""
    entries = []
    for stream, video in streams.items():
        entry = {"id": stream, "source": str(video), "detection_log": {"dir": str(folder / "log")}}
        if stream in recorded:
            entry["record"] = {"dir": str(folder / "rec"), "preset": "ultrafast"}
        entries.append(entry)
    return StreamdConfig.model_validate({
        "model": str(SHIPPED), "backend": backend, "batch": {"max_batch": 4, "max_wait_ms": 5}, "streams": entries,
        "thresholds": {"conf_threshold": CONF, "iou_threshold": IOU}, "logging": {"level": "WARNING"},
    })  # fmt: skip


def logged(folder: Path) -> dict[tuple[str, int], Detections]:
    """The detections of each (stream, seq) in the detection logs under `folder`."""
    found = {}
    for path in sorted((folder / "log").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            message = json.loads(line)
            if message["schema"] != SCHEMA_ID:  # a track event (streamd.track/1) is logged too
                continue
            records = message["detections"]
            found[(message["stream"], message["seq"])] = Detections(
                np.array([r["box"] for r in records], np.float32).reshape(-1, 4),
                np.array([r["score"] for r in records], np.float32), np.array([r["class_id"] for r in records], np.int64),
            )  # fmt: skip
    return found


TORCH_CPU = {"type": "torch", "device": "cpu"}


def test_compose_hands_a_device_backend_planes_where_nothing_draws(tmp_path, bccd_videos):
    bundle = load_bundle(SHIPPED)
    detector = Detector.for_bundle(bundle, make_backend(bundle, TorchConfig(type="torch", device="cpu"), max_batch=2))
    assert detector.pixel_formats == {"bgr24", "yuv420p"}
    cfg = config(tmp_path, TORCH_CPU, {"planes": bccd_videos["plain"], "bgr": bccd_videos["plain"]}, recorded=("bgr",))
    metrics = Metrics(["planes", "bgr"])
    graph = compose(cfg, detector, metrics, endpoints(cfg, detector, metrics, None, Switches(publish=False)))
    sources = {node.obj.stream_id: node.obj for node, _ in graph.sources}
    assert sources["planes"].pixel_format == "yuv420p" and sources["planes"].model_hw is None
    assert sources["bgr"].pixel_format == "bgr24" and sources["bgr"].model_hw is None


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.parametrize("backend", [
    TORCH_CPU,
    pytest.param({"type": "torch", "device": "cuda:0", "precision": "fp16"}, id="cuda-fp16",
                 marks=[pytest.mark.gpu, pytest.mark.skipif(not _cuda(), reason="no CUDA GPU")]),
])  # fmt: skip
def test_the_daemon_on_the_torch_backend_gives_onnxruntimes_detections(tmp_path, bccd_videos, backend, caplog):
    """ONNX Runtime on full-size BGR frames (recorded streams: the decoder's bgr24, OpenCV's letterbox on the host)
    against torch on the planes of unrecorded streams (BT.601 limited, BT.709, full range: converted on the device
    with the frame's own matrix and range) and on the BGR frames of a recorded one; on a GPU machine also in fp16
    on CUDA, with NVDEC (hwaccel auto), by streamd.model.compare at the precision's bar, NMS flips bounded."""
    ort = config(tmp_path / "ort", {"type": "onnxruntime", "threads": 1}, bccd_videos, recorded=tuple(VIDEOS))
    streams = {**bccd_videos, "bgr": bccd_videos["plain"]}
    on_device = config(tmp_path / "torch", backend, streams, recorded=("bgr",))
    ort_run = run_pipeline(ort)
    caplog.set_level(logging.INFO, logger="streamd.stages.decode")
    torch_run = run_pipeline(on_device)
    assert ort_run.ok and torch_run.ok, (ort_run.error, torch_run.error)
    if backend["device"].startswith("cuda"):  # hwaccel auto on a GPU machine: the H.264 streams on NVDEC, for real
        decoders = [r.getMessage() for r in caplog.records if " on NVDEC (cuda)" in r.getMessage()]
        assert {line.split("'")[1] for line in decoders} >= {"plain", "bt709", "bgr"}, caplog.text[-2000:]
    expected, actual = logged(tmp_path / "ort"), logged(tmp_path / "torch")
    assert len(expected) == 8 * len(VIDEOS) and len(actual) == 8 * len(streams)
    assert sum(len(d) for d in expected.values()) > 40 * len(VIDEOS)  # BCCD: many cells per image
    frames = sorted(actual)
    bar = BARS[TorchConfig.model_validate(backend).compute_precision]
    comparison = compare([expected[("plain" if stream == "bgr" else stream, seq)] for stream, seq in frames],
                         [actual[key] for key in frames], bar, conf_threshold=CONF)  # fmt: skip
    assert comparison.ok and comparison.flip_fraction <= bar.max_flip_fraction, comparison.summary()
    assert len(list((tmp_path / "torch" / "rec").glob("bgr_*.mp4"))) == 1


@pytest.mark.parametrize("backend, index", [
    ({"type": "torch", "device": "cuda:1"}, 1), ({"type": "torch", "device": "cpu"}, 0), ({"type": "tensorrt", "device": 2}, 2),
    ({"type": "onnxruntime"}, 0), ({"type": "auto"}, 0),
])  # fmt: skip
def test_nvdec_decodes_on_the_backends_gpu(backend, index):
    from streamd.config import BackendConfig, gpu_index
    from pydantic import TypeAdapter

    assert gpu_index(TypeAdapter(BackendConfig).validate_python(backend)) == index
