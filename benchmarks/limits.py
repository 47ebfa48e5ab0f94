"""What each stage costs alone, in CPU time per frame, and the limit that puts on a pipeline.

Each stage runs alone over the same frames, timed with time.process_time()
(CPU time of every thread of the process), so the cost of a stage is what it
takes from the machine's cores. A pipeline cannot go faster than
cores / (sum of its stages' costs): the "limit". bench.py reports the
pipeline's fps as a ratio to it.

    .venv/bin/python benchmarks/limits.py VIDEO [--bundle B] [--int8 B]     # the stage table alone
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from streamd.backends.onnxruntime import OnnxRuntimeBackend
from streamd.config import TrackConfig
from streamd.draw import draw_detections
from streamd.messages import encode_message
from streamd.model import letterbox_batch, load_bundle, postprocess
from streamd.tracking import make_tracker
from streamd.types import Frame, Latency, ModelRef

X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "medium")


@dataclass(frozen=True)
class StageCosts:
    """CPU ms per frame of each stage, and the limits (frames/s on `cores`) of the two pipeline shapes."""

    cores: int
    ms: dict[str, float]

    def limit(self, recorded: bool, model: str = "infer fp32") -> float:
        """frames/s: cores / the stages a frame goes through (a recorded stream keeps the full-size frame)."""
        if recorded:
            path = ["decode full BGR", "letterbox from full", model, "decode + NMS", "track", "message", "annotate",
                    "encode x264"]
        else:
            path = ["decode to model size", "letterbox (pad only)", model, "decode + NMS", "track", "message"]
        return self.cores / sum(self.ms[name] for name in path) * 1e3


def _cpu_ms_per(count: int, work: Callable[[], None], repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        work()
        best = min(best, (time.process_time() - started) / count * 1e3)
    return best


def stage_costs(video: Path, bundle_path: Path, int8_path: Path | None, max_batch: int = 4, frames: int = 120) -> StageCosts:
    bundle = load_bundle(bundle_path)
    meta = bundle.meta
    input_hw = tuple(meta.input_hw)
    with av.open(str(video)) as container:
        decoded = [f for _, f in zip(range(frames), container.decode(video=0))]
    full = [f.to_ndarray(format="bgr24") for f in decoded]
    height, width = full[0].shape[:2]
    scale = min(input_hw[0] / height, input_hw[1] / width)
    size = (int(width * scale), int(height * scale))
    scaled = [f.to_ndarray(width=size[0], height=size[1], format="bgr24", interpolation="AREA") for f in decoded]
    n = len(full)
    ms: dict[str, float] = {}

    def decode(to_model: bool) -> None:
        with av.open(str(video)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for _, frame in zip(range(n), container.decode(stream)):
                if to_model:
                    frame.to_ndarray(width=size[0], height=size[1], format="bgr24", interpolation="AREA")
                else:
                    frame.to_ndarray(format="bgr24")

    ms["decode full BGR"] = _cpu_ms_per(n, lambda: decode(False))
    ms["decode to model size"] = _cpu_ms_per(n, lambda: decode(True))
    ms["letterbox from full"] = _cpu_ms_per(n, lambda: [letterbox_batch(full[i : i + max_batch], input_hw, meta.preprocess) for i in range(0, n, max_batch)])
    ms["letterbox (pad only)"] = _cpu_ms_per(n, lambda: [letterbox_batch(scaled[i : i + max_batch], input_hw, meta.preprocess) for i in range(0, n, max_batch)])
    batches = [letterbox_batch(full[i : i + max_batch], input_hw, meta.preprocess) for i in range(0, n - max_batch + 1, max_batch)]
    for name, path in (("infer fp32", bundle_path), ("infer int8", int8_path)):
        if path is None:
            continue
        model = load_bundle(path)
        backend = OnnxRuntimeBackend(model, max_batch=max_batch, intra_op_threads=0)
        backend.submit_tensor(batches[0][0]).wait()  # warm-up
        ms[name] = _cpu_ms_per(len(batches) * max_batch, lambda b=backend: [b.submit_tensor(t).wait() for t, _ in batches], repeat=2)
    backend = OnnxRuntimeBackend(bundle, max_batch=max_batch, intra_op_threads=0)
    outputs = [(backend.submit_tensor(t).wait(), s) for t, s in batches]
    sizes = [(height, width)] * max_batch
    ms["decode + NMS"] = _cpu_ms_per(len(outputs) * max_batch, lambda: [postprocess(o, s, sizes, 0.3, 0.45) for o, s in outputs])
    found = [d for o, s in outputs for d in postprocess(o, s, sizes, 0.3, 0.45)]
    ref = ModelRef(meta.name, bundle.sha256, meta.class_names)
    latency = Latency(1.0, 1.0, 1.0, 3.0)
    frame = Frame("bench", 0, 0.0, full[0], time.time())
    settings = TrackConfig().settings()  # the daemon's default tracker, over the frames in their order

    def track() -> None:
        tracker = make_tracker(settings)
        for i, detections in enumerate(found):
            tracker.update(detections, i / 30)

    ms["track"] = _cpu_ms_per(len(found), track)
    ms["message"] = _cpu_ms_per(len(found), lambda: [encode_message(frame, d, ref, latency) for d in found])
    ms["annotate"] = _cpu_ms_per(len(found), lambda: [draw_detections(full[i], d, meta.class_names) for i, d in enumerate(found)])
    ms["encode x264"] = encode_costs(full, ("veryfast",))["veryfast", "zerolatency"][0]
    return StageCosts(os.cpu_count() or 1, ms)


def encode_costs(images: list[np.ndarray], presets=X264_PRESETS, crf: int = 23, fps: int = 30) -> dict:
    """(preset, tune) -> (CPU ms per frame, kbit/s) of libx264 on these frames, as the recorder encodes them."""
    results = {}
    for preset in presets:
        for tune in ("zerolatency", None):
            sizes: list[int] = []

            def run() -> None:
                codec = av.CodecContext.create("libx264", "w")
                codec.width, codec.height = images[0].shape[1] & ~1, images[0].shape[0] & ~1
                codec.pix_fmt, codec.time_base = "yuv420p", Fraction(1, fps)
                codec.options = {"preset": preset, "crf": str(crf), **({"tune": tune} if tune else {})}
                codec.max_b_frames, codec.gop_size = 0, 2 * fps
                codec.open()
                sizes.clear()
                for pts, image in enumerate(images):
                    video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image[: codec.height, : codec.width]), format="bgr24")
                    video_frame.pts = pts
                    sizes.extend(p.size for p in codec.encode(video_frame))
                sizes.extend(p.size for p in codec.encode(None))

            cost = _cpu_ms_per(len(images), run, repeat=1)
            results[preset, tune or "none"] = (cost, sum(sizes) * 8 / (len(images) / fps) / 1e3)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("video", type=Path)
    parser.add_argument("--bundle", type=Path, default=Path(__file__).resolve().parents[1] / "models" / "bccd-nano.bundle")
    parser.add_argument("--int8", type=Path, default=None)
    args = parser.parse_args()
    costs = stage_costs(args.video, args.bundle, args.int8)
    for name, value in costs.ms.items():
        print(f"| {name} | {value:.2f} ms |")
    print(f"limit: {costs.limit(False):.1f} fps without recording, {costs.limit(True):.1f} fps with it")


if __name__ == "__main__":
    main()
