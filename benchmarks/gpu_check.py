"""One command that checks streamd's GPU path on a machine with an NVIDIA GPU and PyTorch (`make gpu-check`).

1. Runs the `gpu`-marked tests (torch and TensorRT backends against ONNX Runtime, CUDA graphs on and off,
   batches in flight, another thread's device); a failure there makes the exit status 1.
2. Makes its own inputs, offline: a 1080p30 H.264 file (PyAV, libx264) and a YOLOX-s 640 bundle with
   untrained weights written by the trainer's export (`trainer.export.bundle.export_model`).
3. Times, each row for about --seconds: the bare model on device-resident batches (fp16, CUDA graphs) at
   batch 1/8/16/32; CUDA graphs on vs off at batch 16; the decode ceiling on the CPU (all cores) and with
   NVDEC (PyAV hwaccel, where FFmpeg has it); the GPU path from decoded frames (upload, device letterbox,
   model, batched_nms) at batch 16.
4. Prints one table. Without CUDA it says so and exits 2.

    python benchmarks/gpu_check.py [--seconds 5] [--work DIR] [--skip-tests]

Not measured here: the daemon pipeline on 16 file streams and 8 live streams (p50/p99 latency, drops),
which need the daemon's inference stage to call the torch backend's submit_frames(); see the README.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BATCHES = (1, 8, 16, 32)
HD = (1080, 1920)


def require_cuda():
    """torch with a CUDA GPU, or exit 2 with what is missing."""
    try:
        import torch
    except ImportError:
        sys.exit("gpu-check: PyTorch is not installed (pip install '.[gpu]'); it needs an NVIDIA GPU machine")
    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA GPU is available to PyTorch {torch.__version__} (torch.cuda.is_available() is "
              "False); run it on a machine with an NVIDIA GPU and driver", file=sys.stderr)  # fmt: skip
        sys.exit(2)
    return torch


def run_gpu_tests() -> tuple[bool, str]:
    """pytest -m gpu over the backend tests; (passed, the summary line)."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-rs", "tests/streamd/backends"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    print(result.stdout[-4000:])
    return result.returncode == 0, lines[-1] if lines else f"pytest exit {result.returncode}"


def make_video(path: Path, frames: int = 300, fps: int = 30) -> Path:
    """A 1080p H.264 file of moving shapes over a gradient (PyAV, libx264, no B-frames)."""
    import av
    import cv2

    height, width = HD
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "bf": "0", "g": str(fps)}
        for index in range(frames):
            image = np.broadcast_to(ramp, (height, width, 3)).astype(np.uint8).copy()
            cv2.circle(image, (200 + 5 * index, 540), 120, (40, 200, 90), -1)
            cv2.rectangle(image, (1500 - 4 * index, 200), (1700 - 4 * index, 420), (200, 60, 30), -1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="bgr24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_bundle(path: Path) -> Path:
    """A YOLOX-s 640, 80 classes, untrained: fine for timing, written by the trainer's own export."""
    import torch

    from trainer.config import Experiment
    from trainer.export.bundle import export_model
    from trainer.yolox_adapter import build_model

    exp = Experiment.model_validate({
        "name": "gpu-check-yolox-s", "classes": [f"class{i}" for i in range(80)],
        "dataset": {"name": "none", "format": "voc", "root": str(path.parent / "no-dataset")},
        "model": {"architecture": "yolox_s", "input_hw": [640, 640]},
    })  # fmt: skip
    torch.manual_seed(0)
    export_model(build_model("yolox_s", 80).eval(), exp, path, epochs=0, dataset_hash="0" * 64, checkpoint="", metrics={})
    return path


def decode_rate(path: Path, seconds: float, hwaccel: str | None) -> float | str:
    """Frames per second decoding `path` to BGR arrays, looping until `seconds` pass."""
    import av

    options = {}
    if hwaccel:
        try:
            from av.codec.hwaccel import HWAccel
        except ImportError:
            return "n/a (PyAV without hwaccel)"
        options["hwaccel"] = HWAccel(device_type=hwaccel, allow_software_fallback=False)
    count, started = 0, time.perf_counter()
    try:
        while time.perf_counter() - started < seconds:
            with av.open(str(path), **options) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                stream.thread_count = os.cpu_count() or 0
                for frame in container.decode(stream):
                    frame.to_ndarray(format="bgr24")
                    count += 1
    except (av.FFmpegError, NotImplementedError, ValueError) as exc:
        return f"n/a ({type(exc).__name__}: {str(exc)[:60]})"
    return count / (time.perf_counter() - started)


def decoded_frames(path: Path, count: int) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as container:
        frames = []
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="bgr24"))
            if len(frames) == count:
                return frames
    return frames


def bare_rate(torch, backend, batch: int, seconds: float) -> float:
    """Frames/s of the model alone on a device-resident batch (the backend's graph or eager forward)."""
    runner = backend._cuda  # the benchmark times the CUDA runner's forward directly, without host copies
    images = torch.full((batch, 3, 640, 640), 114.0, device=runner.device)
    torch.cuda.synchronize(runner.device)  # made on the default stream, read on the compute stream
    with torch.cuda.device(runner.device), torch.cuda.stream(runner.compute_stream), torch.inference_mode():
        for _ in range(3):
            runner._forward(images)
        runner.compute_stream.synchronize()
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            for _ in range(10):
                runner._forward(images)
            runner.compute_stream.synchronize()
            runs += 10
        return runs * batch / (time.perf_counter() - started)


def gpu_path_rate(backend, frames: list[np.ndarray], batch: int, seconds: float) -> float:
    """Frames/s of detect(): upload of decoded 1080p frames, device letterbox, model, batched_nms, detections back."""
    chunks = [frames[i : i + batch] for i in range(0, len(frames) - batch + 1, batch)]
    backend.detect(chunks[0], 0.3, 0.45)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for chunk in chunks:
            backend.detect(chunk, 0.3, 0.45)
            count += len(chunk)
    return count / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="time per benchmark row")
    parser.add_argument("--work", type=Path, default=None, help="folder for the inputs (default: a temporary one)")
    parser.add_argument("--skip-tests", action="store_true", help="benchmark only")
    args = parser.parse_args()
    torch = require_cuda()
    from streamd.backends.select import make_backend
    from streamd.config import TorchConfig
    from streamd.model import load_bundle

    rows: list[tuple[str, str]] = []
    passed = True
    if not args.skip_tests:
        passed, summary = run_gpu_tests()
        rows.append(("gpu-marked tests (parity with ONNX Runtime, graphs on/off, slots, threads)", summary))
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    video = make_video(work / "1080p30.mp4")
    bundle = load_bundle(make_bundle(work / "yolox-s.bundle"))
    rows.append(("decode ceiling, CPU, all cores (frames/s)", _fmt(decode_rate(video, args.seconds, None))))
    rows.append(("decode ceiling, NVDEC (frames/s)", _fmt(decode_rate(video, args.seconds, "cuda"))))
    graphs = make_backend(bundle, TorchConfig(type="torch", device="cuda:0", precision="fp16"), max_batch=max(BATCHES))
    for batch in BATCHES:
        rows.append((f"bare YOLOX-s 640 fp16, CUDA graphs, batch {batch} (frames/s)", _fmt(bare_rate(torch, graphs, batch, args.seconds))))
    eager = make_backend(bundle, TorchConfig(type="torch", device="cuda:0", precision="fp16", cuda_graphs=False), max_batch=16)
    rows.append(("bare YOLOX-s 640 fp16, eager, batch 16 (frames/s)", _fmt(bare_rate(torch, eager, 16, args.seconds))))
    eager.close()
    frames = decoded_frames(video, 64)
    rows.append(("GPU path from decoded 1080p frames, batch 16: upload, letterbox, model, NMS (frames/s)",
                 _fmt(gpu_path_rate(graphs, frames, 16, args.seconds))))  # fmt: skip
    graphs.close()
    rows.append(("pipeline, 16 file streams / 8 live streams", "not measured here (see the module docstring)"))
    print_table(torch, rows)
    (work / "gpu_check.json").write_text(json.dumps(dict(rows), indent=2) + "\n")
    return 0 if passed else 1


def _fmt(value: float | str) -> str:
    return f"{value:,.0f}" if isinstance(value, float) else value


def print_table(torch, rows: list[tuple[str, str]]) -> None:
    import av
    import onnxruntime

    properties = torch.cuda.get_device_properties(0)
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True).stdout.strip() or "unknown"  # fmt: skip
    print(f"\nGPU {properties.name} ({properties.total_memory >> 30} GiB), driver {driver}, CUDA {torch.version.cuda}, "
          f"torch {torch.__version__}, PyAV {av.__version__}, onnxruntime {onnxruntime.__version__}, {os.cpu_count()} CPUs")  # fmt: skip
    width = max(len(name) for name, _ in rows)
    print(f"{'check':<{width}}  result")
    print(f"{'-' * width}  {'-' * 24}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    sys.exit(main())
