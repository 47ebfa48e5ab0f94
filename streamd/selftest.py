"""The self-test before READY=1: golden frames through the configured backend, compared with the bundle's reference.

What a clinical user needs to know before the first frame: that the engine on
this machine (backend, device, precision) detects what the model detected when
it was validated. `self_test` runs a few frames through the daemon's own
Detector and compares the detections with a reference by streamd.model.compare,
with the bar of the backend's precision (compare.BARS); a mismatch is a
BundleError (exit 1) naming backend, device, precision, frame and what differed.

The frames and the reference:

- a format-4 bundle carries them (`golden/` and bundle.json's `golden`):
  GOLDEN_IMAGES validation images, scaled to fit the model's input and stored
  as PNG, and the detections ONNX Runtime (CPU, fp32 arithmetic) made on them
  from the bundle's model.onnx, written by `trainer export` and `trainer
  quantize` (`write_golden`);
- an older bundle has none: the self-test makes SYNTHETIC_FRAMES frames itself
  (`synthetic_frames`: seeded random ellipses of random colours on a smooth
  background, blurred, at the model's input size) and computes the reference
  at start from ONNX Runtime on the CPU running model.onnx, at the low
  SYNTHETIC_CONF_THRESHOLD so that a model trained on other pictures still
  reports boxes to compare. This checks that the backend computes what
  model.onnx computes (for torch: that weights.safetensors is the same model);
  it cannot check model.onnx itself against what was validated.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from streamd.backends.base import Backend
from streamd.config import BackendConfig, TensorRTConfig, TorchConfig
from streamd.errors import BundleError
from streamd.model.bundle import GOLDEN_DIR, Bundle, add_golden, load_bundle
from streamd.model.compare import BARS, Comparison, compare
from streamd.model.detections import Detections
from streamd.detector import Detector

log = logging.getLogger(__name__)

GOLDEN_IMAGES = 4
DETECTIONS_FILE = f"{GOLDEN_DIR}/detections.json"
REFERENCE = "onnxruntime fp32 (CPU)"
SYNTHETIC_FRAMES = 4
SYNTHETIC_SEED = 20260115
SYNTHETIC_CONF_THRESHOLD = 0.05


@dataclass(frozen=True, slots=True)
class GoldenFrames:
    """Frames and the reference detections on them.

    names: one per frame, for messages (the PNG's path in the bundle, or "synthetic-N").
    images: HxWx3 uint8 BGR, read-only. detections: the reference's, in the images' pixels.
    reference: what computed them. source: where the frames came from. Thresholds: what the reference ran with.
    """

    names: tuple[str, ...]
    images: tuple[np.ndarray, ...]
    detections: tuple[Detections, ...]
    reference: str
    source: str
    conf_threshold: float
    iou_threshold: float


@dataclass(frozen=True, slots=True)
class SelfTestResult:
    """A passed self-test: what ran, against what, and the matcher's counts (one line in summary)."""

    backend: str
    device: str
    precision: str
    golden: str  # "bundle": the bundle's golden frames; "synthetic": made at start, reference from ONNX Runtime
    frames: int
    reference_boxes: int
    summary: str


def self_test(bundle: Bundle, detector: Detector, config: BackendConfig) -> SelfTestResult:
    """Run the golden frames through `detector` (built for `bundle` from `config`) and compare with the reference.

    Raises BundleError naming backend, device, precision, frame and what differed when a detection is outside
    the precision's bar, or when the golden files cannot be read.
    """
    backend, device, precision = identity(detector.backend, config)
    golden = golden_frames(bundle)
    found = detector.detect(list(golden.images), golden.conf_threshold, golden.iou_threshold)
    comparison: Comparison = compare(golden.detections, found, BARS[precision], conf_threshold=golden.conf_threshold)
    where = f"backend {backend} on {device}, precision {precision}"
    if not comparison.ok:
        first = comparison.mismatches[0]
        raise BundleError(
            f"{bundle.path}: self-test failed: {where} does not detect what {golden.reference} detected on "
            f"{golden.source}: frame {first.index} ({golden.names[first.index]}) {first.kind}: {first.detail} "
            f"({len(comparison.mismatches)} mismatches, {comparison.matched} matched, bar {BARS[precision]}); "
            "refusing to start"
        )
    result = SelfTestResult(backend, device, precision, "bundle" if bundle.meta.golden else "synthetic",
                            comparison.frames, sum(map(len, golden.detections)), comparison.summary())  # fmt: skip
    log.info("self-test passed: %s against %s on %s: %s", where, golden.reference, golden.source, result.summary)
    return result


def identity(backend: Backend, config: BackendConfig) -> tuple[str, str, str]:
    """(backend name, device, precision) of a backend built from `config` (for `auto`: the one it chose)."""
    precision = backend.precision
    if backend.name == "onnxruntime":
        return backend.name, "cpu", precision
    if isinstance(config, TorchConfig):
        return backend.name, config.device, precision
    index = config.device if isinstance(config, TensorRTConfig) else 0  # auto picks cuda:0
    return backend.name, f"cuda:{index}", precision


def golden_frames(bundle: Bundle) -> GoldenFrames:
    """The bundle's golden frames, or for a bundle without them synthetic frames with ONNX Runtime's reference."""
    golden = bundle.meta.golden
    if golden is None:
        images = synthetic_frames(bundle.meta.input_hw)
        names = tuple(f"synthetic-{i}" for i in range(len(images)))
        detections = reference_detections(bundle, images, SYNTHETIC_CONF_THRESHOLD, bundle.meta.thresholds.iou_threshold)
        source = f"{len(images)} synthetic frames (seed {SYNTHETIC_SEED})"
        return GoldenFrames(names, images, tuple(detections), REFERENCE, source, SYNTHETIC_CONF_THRESHOLD,
                            bundle.meta.thresholds.iou_threshold)  # fmt: skip
    names = tuple(image.file for image in golden.images)
    images = tuple(_read_png(bundle.path / name) for name in names)
    detections = read_detections(bundle.path / golden.detections.file, names)
    return GoldenFrames(names, images, detections, golden.reference, golden.source, golden.conf_threshold,
                        golden.iou_threshold)  # fmt: skip


def synthetic_frames(input_hw: tuple[int, int], count: int = SYNTHETIC_FRAMES) -> tuple[np.ndarray, ...]:
    """`count` HxWx3 uint8 BGR frames at input_hw, the same on every machine for a seed: a smooth colour gradient
    with 12 to 24 filled ellipses of random colours and sizes (5 to 25% of the frame), blurred (3x3)."""
    rng = np.random.default_rng(SYNTHETIC_SEED)
    height, width = input_hw
    frames = []
    for _ in range(count):
        ramp = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None] * np.linspace(0.5, 1.0, height)[:, None, None]
        frame = np.ascontiguousarray((rng.uniform(60, 220, 3) * (0.6 + 0.4 * ramp)).astype(np.uint8))
        for _ in range(int(rng.integers(12, 25))):
            centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            axes = tuple(int(rng.uniform(0.025, 0.125) * side) + 1 for side in (width, height))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            cv2.ellipse(frame, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, thickness=-1)
        frame = cv2.GaussianBlur(frame, (3, 3), 0)
        frame.setflags(write=False)
        frames.append(frame)
    return tuple(frames)


def reference_detections(
    bundle: Bundle, images: Sequence[np.ndarray], conf_threshold: float, iou_threshold: float
) -> list[Detections]:
    """What ONNX Runtime on the CPU, running the bundle's model.onnx, detects on `images` (boxes in their pixels)."""
    from streamd.backends.onnxruntime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(bundle, max_batch=len(images), intra_op_threads=1)
    try:
        return Detector.for_bundle(bundle, backend).detect(list(images), conf_threshold, iou_threshold)
    finally:
        backend.close()


def write_golden(bundle_path: Path, images: Sequence[tuple[str, np.ndarray]], source: str) -> Bundle:
    """Add golden frames to a bundle: each (name, HxWx3 uint8 BGR image), scaled down to fit the model's input,
    as golden/frame-N.png, and ONNX Runtime's detections on the PNG's pixels at the bundle's thresholds.

    name: where the image came from, for golden/detections.json. source: one line for bundle.json, e.g.
    "BCCD/val: the first 4 images". bundle.json becomes format 4.
    """
    bundle = load_bundle(bundle_path)
    thresholds = bundle.meta.thresholds
    scaled = [_fit(image, bundle.meta.input_hw) for _, image in images]
    pngs = [_png(image) for image in scaled]
    decoded = [_decode_png(data, f"golden frame {i}") for i, data in enumerate(pngs)]  # detect on what is stored
    found = reference_detections(bundle, decoded, thresholds.conf_threshold, thresholds.iou_threshold)
    names = [f"{GOLDEN_DIR}/frame-{i}.png" for i in range(len(pngs))]
    frames = [
        {"file": name, "from": origin, "xyxy": d.xyxy.tolist(), "confidence": d.confidence.tolist(),
         "class_id": d.class_id.tolist()}
        for name, (origin, _), d in zip(names, images, found)
    ]  # fmt: skip
    files = dict(zip(names, pngs)) | {DETECTIONS_FILE: (json.dumps({"frames": frames}, indent=1) + "\n").encode()}
    golden = {"images": names, "detections": DETECTIONS_FILE, "reference": REFERENCE, "source": source,
              "conf_threshold": thresholds.conf_threshold, "iou_threshold": thresholds.iou_threshold}  # fmt: skip
    written = add_golden(bundle.path, files, golden)
    log.info("%s: %d golden frames (%d detections by %s)", bundle.path, len(names), sum(map(len, found)), REFERENCE)
    return written


def read_detections(path: Path, names: Sequence[str]) -> tuple[Detections, ...]:
    """golden/detections.json: one Detections per golden image, in `names`' order; BundleError naming the field."""
    try:
        frames = json.loads(path.read_text())["frames"]
        by_name = {frame["file"]: frame for frame in frames}
        return tuple(
            Detections(np.asarray(by_name[name]["xyxy"], np.float32), by_name[name]["confidence"], by_name[name]["class_id"])
            for name in names
        )  # fmt: skip
    except KeyError as exc:
        raise BundleError(f"{path}: field {exc} missing (a golden image without its detections?)") from exc
    except (OSError, TypeError, ValueError) as exc:
        raise BundleError(f"{path}: not golden detections (frames[].file, xyxy, confidence, class_id): {exc}") from exc


def _fit(image: np.ndarray, input_hw: tuple[int, int]) -> np.ndarray:
    """The image scaled down (area interpolation) to fit input_hw, keeping its aspect; as it is when it fits."""
    scale = min(input_hw[0] / image.shape[0], input_hw[1] / image.shape[1])
    if scale >= 1:
        return image
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _png(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:
        raise ValueError(f"cannot encode a {image.shape} image as PNG")
    return data.tobytes()


def _decode_png(data: bytes, what: str) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise BundleError(f"{what}: not a PNG image")
    image.setflags(write=False)
    return image


def _read_png(path: Path) -> np.ndarray:
    return _decode_png(path.read_bytes(), str(path))
