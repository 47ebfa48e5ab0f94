"""One command that checks streamd's GPU path on a machine with an NVIDIA GPU and PyTorch (`make gpu-check`).

1. Runs the `gpu`-marked tests (torch and TensorRT backends against ONNX Runtime, CUDA graphs on and off,
   batches in flight, another thread's device, NVDEC frames against CPU frames); a failure there makes the
   exit status 1.
2. Makes its own inputs, offline: a 1080p30 H.264 file (PyAV, libx264) and a YOLOX-s 640 bundle with
   untrained weights written by the trainer's export (`trainer.export.bundle.export_model`).
3. Times, each row for about --seconds, in one run:
   - the decode ceiling: the daemon's own decoders (AVSource) on 16 streams at once, frames handed over as the
     GPU path takes them (yuv420p planes), on the CPU with all cores and with NVDEC;
   - the bare model (fp16) on device-resident batches at batch 1/8/16/32, with CUDA graphs; eager at 16;
   - the GPU path from decoded planes: submit_frames (upload, colour, letterbox, model, NMS), 2 in flight, with
     the detections per frame (an untrained model finds next to none: the NMS is timed nearly empty), and the
     same with the shipped BCCD model on BCCD images (about 40 detections a frame for the NMS);
   - the daemon (run_pipeline, torch backend, NVDEC by hwaccel auto) on 16 file streams of 1080p H.264, no
     recording: frames/s and its ratio to min(best decode ceiling, bare at max_batch);
   - the daemon on 8 live 1080p30 streams (files read at their frame rate): latency p50 / worst p99 from the
     packet leaving the demuxer to the detections, and drops.
4. Prints each row as it is measured (and keeps them in WORK/gpu_check.json), then one table with the targets of
   issue 8 (met / missed). The tests' row is MISSED when a test other than TensorRT's skipped (a parity check
   that did not run). Exit 1 when a gpu-marked test failed; without CUDA it says so and exits 2.

    python benchmarks/gpu_check.py [--seconds 5] [--work DIR] [--skip-tests]
    python benchmarks/gpu_check.py --smoke     # the same steps on the CPU, tiny (CI runs this)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@dataclass(frozen=True)
class Profile:
    """What one run measures on: the GPU check, or its CPU smoke run (the same code, small)."""

    device: str
    precision: str
    architecture: str
    input_size: int
    video_hw: tuple[int, int]
    video_frames: int
    batches: tuple[int, ...]
    max_batch: int
    file_streams: int
    live_streams: int
    seconds: float


GPU = Profile("cuda:0", "fp16", "yolox_s", 640, (1080, 1920), 300, (1, 8, 16, 32), 16, 16, 8, 5.0)
SMOKE = Profile("cpu", "fp32", "yolox_nano", 160, (240, 320), 24, (1, 2), 2, 2, 2, 0.5)
TARGETS = {"pipeline ratio": 0.85, "pipeline fps": 1000.0, "live p99 ms": 20.0}


def require_cuda():
    """torch with a CUDA GPU, or exit 2 with what is missing."""
    try:
        import torch
    except ImportError:
        sys.exit("gpu-check: PyTorch is not installed (pip install '.[gpu]'); it needs an NVIDIA GPU machine")
    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA GPU is available to PyTorch {torch.__version__} (torch.cuda.is_available() is "
              "False); run it on a machine with an NVIDIA GPU and driver, or --smoke for the CPU run", file=sys.stderr)  # fmt: skip
        sys.exit(2)
    return torch


def run_gpu_tests() -> tuple[bool, str, str]:
    """pytest -m gpu over the whole suite (at most 5 minutes); (passed, the summary line, the verdict).

    A skipped test is a parity check that did not run: only TensorRT's may skip (the GPU machines have no
    TensorRT); any other skip is reported as MISSED.
    """
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-rs", "tests"]
    try:
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as exc:
        print((exc.stdout or b"")[-4000:] if isinstance(exc.stdout, str) else "")
        return False, "pytest did not finish in 300 s", "all pass: MISSED"
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    print(result.stdout[-6000:])
    skipped = [line for line in lines if line.startswith("SKIPPED")]
    unrun = [line for line in skipped if "tensorrt" not in line.lower()]
    verdict = "all pass: met" if result.returncode == 0 and not unrun else "all pass: MISSED"
    if unrun:
        verdict += f" ({len(unrun)} skip lines other than TensorRT's, see above)"
    return result.returncode == 0, lines[-1] if lines else f"pytest exit {result.returncode}", verdict


def make_video(path: Path, hw: tuple[int, int], frames: int, fps: int = 30) -> Path:
    """An H.264 file of moving shapes over a gradient (PyAV, libx264, no B-frames): no ffmpeg binary needed."""
    import av
    import cv2

    height, width = hw
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "bf": "0", "g": str(fps)}
        for index in range(frames):
            image = np.broadcast_to(ramp, (height, width, 3)).astype(np.uint8).copy()
            cv2.circle(image, (width // 10 + 5 * index, height // 2), height // 9, (40, 200, 90), -1)
            cv2.rectangle(image, (width * 3 // 4 - 4 * index, height // 5), (width * 7 // 8 - 4 * index, height // 2), (200, 60, 30), -1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="bgr24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_bundle(path: Path, architecture: str, size: int) -> Path:
    """An untrained YOLOX of 80 classes (fine for timing), written by the trainer's own export."""
    import torch

    from trainer.config import Experiment
    from trainer.export.bundle import export_model
    from trainer.yolox_adapter import build_model

    exp = Experiment.model_validate({
        "name": f"gpu-check-{architecture}", "classes": [f"class{i}" for i in range(80)],
        "dataset": {"name": "none", "format": "voc", "root": str(path.parent / "no-dataset")},
        "model": {"architecture": architecture, "input_hw": [size, size]},
    })  # fmt: skip
    torch.manual_seed(0)
    export_model(build_model(architecture, 80).eval(), exp, path, epochs=0, dataset_hash="0" * 64, checkpoint="", metrics={})
    return path


def decode_rate(path: Path, seconds: float, hwaccel: str, streams: int) -> float | str:
    """Frames/s of the daemon's own decoders (AVSource: threads, NVDEC with its fallback, frames handed over as
    yuv420p planes as on the GPU path) on `streams` copies of `path` read at once, looping, for `seconds`."""
    import threading

    from streamd.config import StreamConfig
    from streamd.ops.metrics import Metrics
    from streamd.stages.decode import open_source

    ids = [f"d{i}" for i in range(streams)]
    metrics, counts, stop = Metrics(ids), dict.fromkeys(ids, 0), threading.Event()
    errors: list[str] = []

    def read(stream_id: str) -> None:
        config = StreamConfig(id=stream_id, source=str(path), loop=True, hwaccel=hwaccel)
        source = open_source(config, metrics, pixel_format="yuv420p")
        try:
            source.open()
            while not stop.is_set() and source.read() is not None:
                counts[stream_id] += 1
        except Exception as exc:  # noqa: BLE001  (a row of the table says it; the check goes on)
            errors.append(f"{type(exc).__name__}: {str(exc)[:80]}")
        finally:
            source.close()

    threads = [threading.Thread(target=read, args=(stream_id,), daemon=True) for stream_id in ids]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    elapsed = time.perf_counter() - started
    return f"n/a ({errors[0]})" if errors else sum(counts.values()) / elapsed


def decoded_planes(path: Path, count: int):
    """The first `count` frames as the GPU path gets them: (yuv420p planes, their PixelLayout)."""
    import av

    from streamd.stages.decoder import frame_pixels

    with av.open(str(path)) as container:
        frames = [frame_pixels(frame, "yuv420p", None)[:2] for _, frame in zip(range(count), container.decode(video=0))]
    return frames


def bare_rate(torch, net, profile: Profile, batch: int, seconds: float, graphs: bool) -> float:
    """Frames/s of the model alone on a device-resident batch, eager or replaying one CUDA graph."""
    device = torch.device(profile.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[profile.precision]
    images = torch.full((batch, 3, profile.input_size, profile.input_size), 114.0, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        run = lambda: net(images)  # noqa: E731
        for _ in range(3):
            run()
        if graphs and device.type == "cuda":
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                net(images)
            run = graph.replay  # noqa: E731
        sync()
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            for _ in range(10):
                run()
            sync()
            runs += 10
    return runs * batch / (time.perf_counter() - started)


def gpu_path_rate(backend, frames: list, batch: int, seconds: float) -> tuple[float, float]:
    """(frames/s, detections per frame) of submit_frames on decoded planes, as the daemon hands them over (upload,
    colour conversion, letterbox, model, NMS on the device), two batches in flight."""
    chunks = [frames[i : i + batch] for i in range(0, len(frames) - batch + 1, batch)]

    def submit(chunk):
        images, layouts = [image for image, _ in chunk], [layout for _, layout in chunk]
        source_hw = [(image.shape[0] * 2 // 3, image.shape[1]) for image in images]
        return backend.submit_frames(images, layouts, [1.0] * len(chunk), source_hw, 0.3, 0.45)

    submit(chunks[0]).wait()
    count, found, started, pending = 0, 0, time.perf_counter(), None
    while time.perf_counter() - started < seconds:
        for chunk in chunks:
            handle = submit(chunk)
            if pending is not None:
                found += sum(len(d) for d in pending.wait())
            pending = handle
            count += len(chunk)
    found += sum(len(d) for d in pending.wait())
    return count / (time.perf_counter() - started), found / count


def shipped_model_row(profile: Profile, work: Path, seconds: float) -> tuple[str, str, str]:
    """The GPU path with real detections for the NMS to do: the shipped BCCD model on BCCD test images (640x480
    planes, about 40 cells each), when the images are here (STREAMD_BCCD_ROOT, .gpu-data/BCCD or ../shared)."""
    import av
    import cv2

    from streamd.backends.select import make_backend
    from streamd.config import TorchConfig
    from streamd.model import load_bundle

    check = f"GPU path, shipped bccd-nano 416 {profile.precision} on BCCD 480p planes, batch {profile.max_batch} (frames/s; detections per frame)"
    roots = [os.environ.get("STREAMD_BCCD_ROOT"), REPO / ".gpu-data" / "BCCD", REPO.parent / "shared" / "datasets" / "BCCD"]
    root = next((Path(r) for r in roots if r and (Path(r) / "ImageSets" / "Main" / "test.txt").is_file()), None)
    if root is None:
        return check, "n/a (no BCCD images here)", ""
    names = (root / "ImageSets" / "Main" / "test.txt").read_text().split()[: 2 * profile.max_batch]
    video = work / "bccd.mp4"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 640, 480, "yuv420p"
        for name in names:
            image = cv2.imread(str(root / "JPEGImages" / f"{name}.jpg"), cv2.IMREAD_COLOR)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="bgr24")))
        container.mux(stream.encode())
    bundle = load_bundle(REPO / "models" / "bccd-nano.bundle")
    backend = make_backend(bundle, TorchConfig(type="torch", device=profile.device, precision=profile.precision), max_batch=profile.max_batch)
    try:
        rate, per_frame = gpu_path_rate(backend, decoded_planes(video, len(names)), profile.max_batch, seconds)
    finally:
        backend.close()
    return check, f"{_fmt(rate)}; {per_frame:.1f}", ""


def pipeline_config(bundle: Path, profile: Profile, streams: list[dict]):
    from streamd.config import StreamdConfig

    backend = {"type": "torch", "device": profile.device, "precision": profile.precision}
    return StreamdConfig.model_validate({
        "model": str(bundle), "backend": backend, "streams": streams, "logging": {"level": "WARNING"},
        "batch": {"max_batch": profile.max_batch, "max_wait_ms": 5},
    })  # fmt: skip


def pipeline_files(bundle: Path, video: Path, profile: Profile) -> float:
    """Frames/s of the daemon on file streams read as fast as they decode, nothing recorded or published."""
    from streamd.pipeline.compose import Switches
    from streamd.pipeline.daemon import run_pipeline

    streams = [{"id": f"file{i}", "source": str(video), "queue": {"size": 2 * profile.max_batch}} for i in range(profile.file_streams)]
    summary = run_pipeline(pipeline_config(bundle, profile, streams), switches=Switches(record=False, detection_log=False, publish=False))
    if summary.error:
        raise RuntimeError(f"pipeline on files failed: {summary.error}")
    return summary.processed / summary.duration_s


def pipeline_live(bundle: Path, video: Path, profile: Profile, seconds: float) -> dict:
    """The daemon on files read at their frame rate (live policy): total latency p50 / worst p99, drops."""
    from streamd.pipeline.compose import Switches
    from streamd.pipeline.daemon import run_pipeline

    streams = [{"id": f"live{i}", "source": str(video), "realtime": True, "loop": True} for i in range(profile.live_streams)]
    config = pipeline_config(bundle, profile, streams)
    summary = run_pipeline(config, switches=Switches(record=False, detection_log=False, publish=False), duration_s=seconds)
    if summary.error:
        raise RuntimeError(f"pipeline on live streams failed: {summary.error}")
    latencies = [s.latency("total") for s in summary.streams]
    return {"fps": summary.processed / summary.duration_s, "p50_ms": statistics.median(p50 for p50, _ in latencies),
            "p99_ms": max(p99 for _, p99 in latencies), "dropped": sum(s.dropped for s in summary.streams)}  # fmt: skip


def measure(torch, profile: Profile, work: Path, seconds: float, report) -> None:
    """Every timing row, each handed to report((check, result, target)) as soon as it is measured."""
    from streamd.backends.select import make_backend
    from streamd.backends.torch import load_model
    from streamd.config import TorchConfig
    from streamd.model import load_bundle

    height, width = profile.video_hw
    video = make_video(work / f"{height}p30.mp4", profile.video_hw, profile.video_frames)
    bundle_path = make_bundle(work / f"{profile.architecture}.bundle", profile.architecture, profile.input_size)
    bundle = load_bundle(bundle_path)
    model = f"{profile.architecture} {profile.input_size} {profile.precision}"
    streams = profile.file_streams
    ceilings = {"CPU": decode_rate(video, seconds, "none", streams)}
    report((f"decode ceiling, {streams} streams {height}p to planes, CPU, {os.cpu_count()} cores (frames/s)", _fmt(ceilings["CPU"]), ""))
    if profile.device != "cpu":
        ceilings["NVDEC"] = decode_rate(video, seconds, "cuda", streams)
        report((f"decode ceiling, {streams} streams {height}p to planes, NVDEC (frames/s)", _fmt(ceilings["NVDEC"]), ""))
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[profile.precision]
    net = load_model(bundle).to(device=profile.device, dtype=dtype)
    net.decode.float()
    graphs = profile.device != "cpu"
    bare = {}
    for batch in profile.batches:
        bare[batch] = bare_rate(torch, net, profile, batch, seconds, graphs)
        report((f"bare {model}, {'CUDA graph' if graphs else 'eager'}, batch {batch} (frames/s)", _fmt(bare[batch]), ""))
    if graphs:
        batch = profile.max_batch
        report((f"bare {model}, eager, batch {batch} (frames/s; graphs on vs off)", _fmt(bare_rate(torch, net, profile, batch, seconds, False)), ""))
    del net
    backend = make_backend(bundle, TorchConfig(type="torch", device=profile.device, precision=profile.precision), max_batch=profile.max_batch)
    rate, per_frame = gpu_path_rate(backend, decoded_planes(video, 4 * profile.max_batch), profile.max_batch, seconds)
    backend.close()
    report((f"GPU path from decoded {height}p planes, batch {profile.max_batch}: upload, colour, letterbox, model, NMS "
            f"(frames/s; detections per frame, untrained model)", f"{_fmt(rate)}; {per_frame:.1f}", ""))  # fmt: skip
    report(shipped_model_row(profile, work, seconds))
    fps = pipeline_files(bundle_path, video, profile)
    ceiling = max((rate for rate in ceilings.values() if isinstance(rate, float)), default=float("inf"))
    limit = min(ceiling, bare.get(profile.max_batch, max(bare.values())))
    report((f"pipeline, {profile.file_streams} file streams {height}p, no recording (frames/s)", _fmt(fps),
            _verdict(fps >= TARGETS["pipeline fps"], f">= {TARGETS['pipeline fps']:,.0f}")))  # fmt: skip
    ratio = fps / limit
    report(("pipeline / min(decode ceiling, bare at max_batch)", f"{ratio:.2f}x",
            _verdict(ratio >= TARGETS["pipeline ratio"], f">= {TARGETS['pipeline ratio']}x")))  # fmt: skip
    live = pipeline_live(bundle_path, video, profile, max(4 * seconds, 2.0))
    report((f"pipeline, {profile.live_streams} live {height}p30 streams: latency p50 / worst p99 (ms)",
            f"{live['p50_ms']:.1f} / {live['p99_ms']:.1f}", _verdict(live["p99_ms"] <= TARGETS["live p99 ms"], "p99 <= 20")))  # fmt: skip
    report((f"pipeline, {profile.live_streams} live streams: frames dropped", str(live["dropped"]), _verdict(live["dropped"] == 0, "0")))


def _fmt(value: float | str) -> str:
    return f"{value:,.0f}" if isinstance(value, float) else value


def _verdict(met: bool, target: str) -> str:
    return f"{target}: {'met' if met else 'MISSED'}"


def environment(torch, profile: Profile) -> str:
    """The machine and the versions, for the table's header; never fails (a bare container may lack nvidia-smi)."""
    import av

    try:
        import onnxruntime

        ort = onnxruntime.__version__
    except ImportError:
        ort = "not installed"
    if profile.device == "cpu":
        device = "CPU (smoke run: the GPU targets do not apply)"
    else:
        properties = torch.cuda.get_device_properties(0)
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=30).stdout.strip() or "unknown"  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            driver = "unknown (no nvidia-smi)"
        device = f"GPU {properties.name} ({properties.total_memory >> 30} GiB), driver {driver}, CUDA {torch.version.cuda}"
    return f"{device}, torch {torch.__version__}, PyAV {av.__version__}, onnxruntime {ort}, {os.cpu_count()} CPUs"


def print_table(header: str, rows: list[tuple[str, str, str]]) -> None:
    print(f"\n{header}")
    widths = [max(len(row[i]) for row in rows + [("check", "result", "target")]) for i in range(3)]
    for row in [("check", "result", "target"), tuple("-" * w for w in widths), *rows]:
        print("  ".join(f"{cell:<{width}}" for cell, width in zip(row, widths)).rstrip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=None, help="time per benchmark row (default 5; smoke 0.5)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the inputs (default: a temporary one)")
    parser.add_argument("--skip-tests", action="store_true", help="benchmark only")
    parser.add_argument("--smoke", action="store_true", help="the same steps on the CPU with a tiny model and video")
    args = parser.parse_args()
    profile = SMOKE if args.smoke else GPU
    if args.smoke:
        import torch
    else:
        torch = require_cuda()
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    env = environment(torch, profile)
    print(env, flush=True)
    rows: list[tuple[str, str, str]] = []

    def report(row: tuple[str, str, str]) -> None:
        """Each row as soon as it is measured, on stdout and in gpu_check.json: a later crash keeps it."""
        rows.append(row)
        print("  ".join(cell for cell in row if cell), flush=True)
        (work / "gpu_check.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")

    passed = True
    if not (args.skip_tests or args.smoke):
        passed, summary, verdict = run_gpu_tests()
        report(("gpu-marked tests (parity with ONNX Runtime, graphs on/off, slots, threads, NVDEC)", summary, verdict))
    measure(torch, profile, work, args.seconds or profile.seconds, report)
    print_table(env, rows)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
