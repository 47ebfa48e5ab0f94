"""One command that checks streamd's GPU path on a machine with an NVIDIA GPU and PyTorch (`make gpu-check`), and
returns everything from one run in the folder --out names: gpu_check.json (the table, each row with its counts or
its error), pytest.log (the whole pytest output) and junit.xml (one entry per test).

1. Runs the `gpu`-marked tests (torch and TensorRT backends against ONNX Runtime, CUDA graphs on and off,
   batches in flight, another thread's device, NVDEC frames against CPU frames), each within --test-timeout-s
   (pytest-timeout) and all within --test-budget-s (then interrupted: pytest still writes its summary and JUnit
   XML, and what it printed is shown); a failure there makes the exit status 1.
2. Sets the primary CUDA context to blocking sync before anything uses the GPU, as the daemon does, so NVDEC
   shares it (streamd.hardware); probes NVDEC (streamd.stages.decoder.nvdec_problem).
3. Makes its own inputs, offline: a 1080p30 H.264 file (PyAV, libx264) and a YOLOX-s 640 bundle with
   untrained weights written by the trainer's export (`trainer.export.bundle.export_model`).
4. Times, each row for about --seconds, each in its own try/except and thread with a deadline (all rows within
   --row-budget-s), so that a row that fails or hangs is an error row and never loses the table:
   - the decode ceiling: the daemon's own decoders (AVSource) on 16 streams at once, frames handed over as the
     GPU path takes them (yuv420p planes), on the CPU with all cores and with NVDEC, each row labelled by what
     really decoded (is_hwaccel): an NVDEC row whose streams fell back to the CPU says so instead of a rate;
   - the bare model (fp16) on device-resident batches at batch 1/8/16/32, with CUDA graphs; eager at 16;
     cudnn.benchmark set first, as the torch backend sets it;
   - the GPU path from decoded planes: Backend.submit (upload, colour, letterbox, model, NMS), 2 in flight, with
     the detections per frame (an untrained model finds next to none: the NMS is timed nearly empty), and the
     same with the shipped BCCD model on BCCD images (about 40 detections a frame for the NMS);
   - the daemon (run_pipeline, torch backend, NVDEC by hwaccel auto) on 16 file streams of 1080p H.264, no
     recording: its set-up (from the call to the first result) and its frames/s from the first result to the
     last, and that rate's ratio to min(best decode ceiling, bare at max_batch);
   - the daemon on 8 live 1080p30 streams (files paced at their frame rate, decoded as live sources are: slice
     threads): latency p50 / worst p99 from each frame's own packet leaving the demuxer to its detections, and
     drops.
5. Prints each row as it is measured (and rewrites gpu_check.json), then one table with the targets of issue 8
   (met / missed). The tests' row is MISSED when a test other than TensorRT's skipped (a parity check that did
   not run). Exit 1 when a gpu-marked test failed or a row is an error; without CUDA it says so and exits 2.

    python benchmarks/gpu_check.py --out DIR [--seconds 5] [--work DIR] [--skip-tests]
    python benchmarks/gpu_check.py --smoke --out DIR   # the same steps on the CPU, tiny (the test suite runs this)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
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
    test_paths: tuple[str, ...]  # what pytest -m gpu runs
    test_budget_s: float  # the whole test step
    row_budget_s: float  # every timing row together


# The GPU run fits `make gpu-check-offline` in 8 minutes: the tests 210 s, the rows 200 s (about 150 s measured
# on the CPU's scale), the wheels and imports the rest.
GPU = Profile("cuda:0", "fp16", "yolox_s", 640, (1080, 1920), 300, (1, 8, 16, 32), 16, 16, 8, 5.0, ("tests",), 210.0, 200.0)
SMOKE = Profile("cpu", "fp32", "yolox_nano", 160, (240, 320), 24, (1, 2), 2, 2, 2, 0.5,
                ("tests/streamd/stages/test_decode_hw.py",), 300.0, 900.0)  # fmt: skip
TARGETS = {"pipeline ratio": 0.85, "pipeline fps": 1000.0, "live p99 ms": 20.0}
PER_TEST_TIMEOUT_S = 90.0
INTERRUPT_GRACE_S = 30.0  # after SIGINT, for pytest to write its summary and JUnit XML


@dataclass(frozen=True, slots=True)
class Measured:
    """What a row found: the text of its result, its target's verdict ("" when it has none) and the counts behind
    it (frames, results, streams on each decoder...), which the tests assert on instead of a formatted rate."""

    result: str
    target: str = ""
    counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the table: its check, what was measured or the error that stopped it, and how long it took."""

    check: str
    result: str
    target: str
    counts: dict[str, int]
    error: str | None
    seconds: float

    def as_json(self) -> dict:
        return {"check": self.check, "result": self.result, "target": self.target, "counts": self.counts,
                "error": self.error, "seconds": round(self.seconds, 2)}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Plan:
    """A row to measure: its check (known before it runs, so a failed row still has its line), the function that
    measures it, and how long it may take."""

    check: str
    measure: Callable[[], Measured]
    deadline_s: float


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


def run_logged(command: list[str], log_path: Path, timeout_s: float, grace_s: float = INTERRUPT_GRACE_S) -> int | None:
    """Run `command` in the repository with its stdout and stderr written to `log_path` as they come; its exit
    status, or None when it ran past timeout_s: then it gets SIGINT (pytest writes its summary and JUnit XML on
    an interrupt), and is killed grace_s later. Whatever it printed is in the log either way."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            return None


def log_tail(log_path: Path, chars: int = 6000) -> str:
    """The last `chars` characters of a log (bytes decoded leniently: a test may print anything)."""
    data = log_path.read_bytes() if log_path.is_file() else b""
    return data[-chars:].decode("utf-8", errors="replace")


def run_gpu_tests(profile: Profile, out: Path, budget_s: float, per_test_s: float) -> tuple[bool, Measured]:
    """pytest -m gpu over profile.test_paths: (passed, the tests' row). The whole output goes to OUT/pytest.log and
    each test's outcome to OUT/junit.xml (one naming the interruption when pytest could not write it).

    A skipped test is a parity check that did not run: only TensorRT's may skip (the GPU machines have no
    TensorRT); any other skip is reported as MISSED.
    """
    log_path, junit = out / "pytest.log", out / "junit.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-rs", f"--junitxml={junit}"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        command.append(f"--timeout={per_test_s:g}")
    else:
        print(f"gpu-check: pytest-timeout is not installed: no per-test timeout, only the step's {budget_s:g} s", flush=True)
    junit.unlink(missing_ok=True)
    returncode = run_logged([*command, *profile.test_paths], log_path, budget_s)
    print(log_tail(log_path), flush=True)
    if not junit.is_file():
        write_junit_error(junit, f"pytest wrote no JUnit XML (exit {returncode}; stopped after {budget_s:g} s: "
                                 f"{returncode is None}); see pytest.log")  # fmt: skip
    counts = junit_counts(junit)
    lines = [line for line in log_tail(log_path, 200_000).splitlines() if line.strip()]
    unrun = [line for line in lines if line.startswith("SKIPPED") and "tensorrt" not in line.lower()]
    counts["skipped_other_than_tensorrt"] = len(unrun)
    passed = returncode == 0
    if returncode is None:
        summary = f"pytest stopped after its budget of {budget_s:g} s ({counts['tests']} tests reported)"
    else:
        summary = lines[-1] if lines else f"pytest exit {returncode}"
    verdict = "all pass: met" if passed and not unrun else "all pass: MISSED"
    if unrun:
        verdict += f" ({len(unrun)} skip lines other than TensorRT's, see pytest.log)"
    return passed, Measured(summary, verdict, counts)


def write_junit_error(path: Path, message: str) -> None:
    """A JUnit XML of one errored entry, for a test step that ended before pytest could write its own."""
    suite = ElementTree.Element("testsuite", name="gpu_check", tests="1", errors="1", failures="0", skipped="0")
    case = ElementTree.SubElement(suite, "testcase", classname="gpu_check", name="pytest step")
    ElementTree.SubElement(case, "error", message=message)
    ElementTree.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)


def junit_counts(path: Path) -> dict[str, int]:
    """tests, failures, errors and skipped, summed over the XML's test suites."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    return {key: sum(int(suite.get(key, 0)) for suite in suites) for key in ("tests", "failures", "errors", "skipped")}


def run_rows(plans: list[Plan], budget_s: float, report: Callable[[Row], None]) -> list[Row]:
    """Measure each plan in turn, each in a thread of its own that may take min(its deadline, what is left of
    budget_s): an exception or an overrun is that row's error, and the next row runs. A row left running past its
    deadline goes on in the background (a daemon thread) and its result is ignored."""
    rows = []
    budget_ends = time.monotonic() + budget_s
    for plan in plans:
        left_s = budget_ends - time.monotonic()
        if left_s <= 0:
            row = Row(plan.check, "error", "", {}, f"not run: the rows' budget of {budget_s:g} s was spent", 0.0)
        else:
            row = _run_row(plan, min(plan.deadline_s, left_s))
        rows.append(row)
        report(row)
    return rows


def _run_row(plan: Plan, deadline_s: float) -> Row:
    outcome: list[Measured | BaseException] = []

    def measure() -> None:
        try:
            outcome.append(plan.measure())
        except BaseException as exc:  # noqa: BLE001  (the row says it; the check goes on)
            outcome.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=measure, name=f"row: {plan.check[:40]}", daemon=True)
    thread.start()
    thread.join(deadline_s)
    elapsed = time.monotonic() - started
    if not outcome:
        return Row(plan.check, "error", "", {}, f"did not finish within its deadline of {deadline_s:.0f} s", elapsed)
    found = outcome[0]
    if isinstance(found, BaseException):
        return Row(plan.check, "error", "", {}, f"{type(found).__name__}: {str(found)[:300]}", elapsed)
    return Row(plan.check, found.result, found.target, dict(found.counts), None, elapsed)


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


def decode_rate(path: Path, seconds: float, hwaccel: str, streams: int) -> Measured:
    """Frames/s of the daemon's own decoders (AVSource: threads, NVDEC with its fallback, frames handed over as
    yuv420p planes as on the GPU path) on `streams` copies of `path` read at once, looping, for `seconds`; labelled
    by what decoded each stream (the decoder's own log line, from the codec context's is_hwaccel). With hwaccel
    cuda, a rate is given only when every stream decoded on NVDEC: the CPU's rate under NVDEC's name is not."""
    import logging

    from streamd.config import StreamConfig
    from streamd.ops.metrics import Metrics
    from streamd.stages.decode import open_source

    ids = [f"d{i}" for i in range(streams)]
    metrics, counts, stop = Metrics(ids), dict.fromkeys(ids, 0), threading.Event()
    errors: list[str] = []
    decoders = DecoderLines()
    decode_log = logging.getLogger("streamd.stages.decode")
    decode_log.addHandler(decoders)
    decode_log.setLevel(logging.INFO)

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
    try:
        for thread in threads:
            thread.start()
        time.sleep(seconds)
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    finally:
        decode_log.removeHandler(decoders)
    elapsed = time.perf_counter() - started
    on_nvdec = sum(" on NVDEC " in line for line in decoders.lines)
    found = {"frames": sum(counts.values()), "elapsed_ms": round(elapsed * 1000), "streams_on_nvdec": on_nvdec,
             "streams_on_cpu": len(decoders.lines) - on_nvdec}  # fmt: skip
    if errors:
        return Measured(f"n/a ({errors[0]})", "", found)
    label = f"{on_nvdec} of {streams} streams on NVDEC"
    if hwaccel == "cuda" and on_nvdec < streams:
        why = next((line for line in decoders.lines if " on NVDEC " not in line), "")
        return Measured(f"n/a: decoded on the CPU, not timed as NVDEC ({label}; {why})", "", found)
    return Measured(f"{_fmt(found['frames'] / elapsed)} ({label})", "", found)


class DecoderLines(logging.Handler):
    """A logging handler keeping the lines that say which decoder each stream got."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if " on NVDEC " in message or " on the CPU" in message:
            self.lines.append(message)


def decoded_planes(path: Path, count: int):
    """The first `count` frames as the GPU path gets them: (yuv420p planes, their PixelLayout)."""
    import av

    from streamd.stages.decoder import frame_pixels

    with av.open(str(path)) as container:
        frames = [frame_pixels(frame, "yuv420p", None)[:2] for _, frame in zip(range(count), container.decode(video=0))]
    return frames


def bare_rate(torch, net, profile: Profile, batch: int, seconds: float, graphs: bool) -> Measured:
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
    frames, elapsed = runs * batch, time.perf_counter() - started
    counts = {"frames": frames, "elapsed_ms": round(elapsed * 1000), "cudnn_benchmark": int(torch.backends.cudnn.benchmark)}
    return Measured(_fmt(frames / elapsed), "", counts)


def gpu_path_rate(backend, frames: list, batch: int, seconds: float) -> Measured:
    """(frames/s, detections per frame) of Backend.submit on decoded planes, as the daemon hands them over (upload,
    colour conversion, letterbox, model, NMS on the device), two batches in flight."""
    from streamd.backends.base import FrameBatch, Picture

    chunks = [frames[i : i + batch] for i in range(0, len(frames) - batch + 1, batch)]

    def submit(chunk):
        return backend.submit(FrameBatch(tuple(Picture(image, layout) for image, layout in chunk), 0.3, 0.45))

    submit(chunks[0]).wait()
    count, found, started, pending = 0, 0, time.perf_counter(), None
    while time.perf_counter() - started < seconds:
        for chunk in chunks:
            handle = submit(chunk)
            if pending is not None:
                found += sum(len(d) for d in pending.wait().detections)
            pending = handle
            count += len(chunk)
    found += sum(len(d) for d in pending.wait().detections)
    rate = count / (time.perf_counter() - started)
    return Measured(f"{_fmt(rate)}; {found / count:.1f}", "", {"frames": count, "detections": found})


def shipped_model_row(profile: Profile, work: Path, seconds: float) -> Measured:
    """The GPU path with real detections for the NMS to do: the shipped BCCD model on BCCD test images (640x480
    planes, about 40 cells each), when the images are here (STREAMD_BCCD_ROOT, .gpu-data/BCCD or ../shared)."""
    import av
    import cv2

    from streamd.model import load_bundle

    roots = [os.environ.get("STREAMD_BCCD_ROOT"), REPO / ".gpu-data" / "BCCD", REPO.parent / "shared" / "datasets" / "BCCD"]
    root = next((Path(r) for r in roots if r and (Path(r) / "ImageSets" / "Main" / "test.txt").is_file()), None)
    if root is None:
        return Measured("n/a (no BCCD images here)")
    names = (root / "ImageSets" / "Main" / "test.txt").read_text().split()[: 2 * profile.max_batch]
    video = work / "bccd.mp4"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 640, 480, "yuv420p"
        for name in names:
            image = cv2.imread(str(root / "JPEGImages" / f"{name}.jpg"), cv2.IMREAD_COLOR)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="bgr24")))
        container.mux(stream.encode())
    return gpu_path(profile, load_bundle(REPO / "models" / "bccd-nano.bundle"), video, len(names), seconds)


def gpu_path(profile: Profile, bundle, video: Path, frames: int, seconds: float) -> Measured:
    """gpu_path_rate through the torch backend of `bundle`, on the first `frames` frames of `video`."""
    from streamd.backends.select import make_backend
    from streamd.config import TorchConfig

    backend = make_backend(bundle, TorchConfig(type="torch", device=profile.device, precision=profile.precision), max_batch=profile.max_batch)
    try:
        return gpu_path_rate(backend, decoded_planes(video, frames), profile.max_batch, seconds)
    finally:
        backend.close()


def pipeline_config(bundle: Path, profile: Profile, streams: list[dict]):
    from streamd.config import StreamdConfig

    backend = {"type": "torch", "device": profile.device, "precision": profile.precision}
    return StreamdConfig.model_validate({
        "model": str(bundle), "backend": backend, "streams": streams, "logging": {"level": "WARNING"},
        "batch": {"max_batch": profile.max_batch, "max_wait_ms": 5},
    })  # fmt: skip


@dataclass
class ResultClock:
    """When the first and the last frame came out of inference in a run, and how many did (all streams)."""

    first: float | None = None
    last: float | None = None
    results: int = 0


@contextmanager
def result_clock():
    """Times every result of the pipelines run inside it, by wrapping Metrics.result (the call each frame's result
    makes, in the results thread): a pipeline's rate is then counted from its first result, without its set-up
    (backend, warm-up, sources opening), which Metrics' own duration includes."""
    from streamd.ops.metrics import Metrics

    clock, lock, original = ResultClock(), threading.Lock(), Metrics.result

    def result(self, *args, **kwargs) -> None:
        original(self, *args, **kwargs)
        now = time.monotonic()
        with lock:
            clock.first = now if clock.first is None else clock.first
            clock.last, clock.results = now, clock.results + 1

    Metrics.result = result
    try:
        yield clock
    finally:
        Metrics.result = original


def pipeline_files(bundle: Path, video: Path, profile: Profile) -> dict:
    """The daemon on file streams read as fast as they decode, nothing recorded or published: its set-up (from
    the call to the first result) and its frames/s from the first result to the last."""
    from streamd.pipeline.compose import Switches
    from streamd.pipeline.daemon import run_pipeline

    streams = [{"id": f"file{i}", "source": str(video), "queue": {"size": 2 * profile.max_batch}} for i in range(profile.file_streams)]
    with result_clock() as clock:
        called = time.monotonic()
        summary = run_pipeline(pipeline_config(bundle, profile, streams), switches=Switches(record=False, detection_log=False, publish=False))
    if summary.error:
        raise RuntimeError(f"pipeline on files failed: {summary.error}")
    if clock.results < 2 or clock.last <= clock.first:
        raise RuntimeError(f"pipeline on files gave {clock.results} results: no rate")
    return {"fps": (clock.results - 1) / (clock.last - clock.first), "setup_s": clock.first - called,
            "results": clock.results, "processed": summary.processed}  # fmt: skip


def pipeline_live(bundle: Path, video: Path, profile: Profile, seconds: float) -> Measured:
    """The daemon on files paced at their frame rate (live policy, slice threads as a live source decodes):
    total latency p50 / worst p99 from each frame's own packet, and the frames dropped."""
    from streamd.pipeline.compose import Switches
    from streamd.pipeline.daemon import run_pipeline

    streams = [{"id": f"live{i}", "source": str(video), "realtime": True, "loop": True} for i in range(profile.live_streams)]
    config = pipeline_config(bundle, profile, streams)
    summary = run_pipeline(config, switches=Switches(record=False, detection_log=False, publish=False), duration_s=seconds)
    if summary.error:
        raise RuntimeError(f"pipeline on live streams failed: {summary.error}")
    if summary.processed == 0:
        raise RuntimeError("pipeline on live streams gave no result")
    latencies = [s.latency("total") for s in summary.streams]
    p50, p99 = statistics.median(p50 for p50, _ in latencies), max(p99 for _, p99 in latencies)
    dropped = sum(s.dropped for s in summary.streams)
    return Measured(f"{p50:.1f} / {p99:.1f}", _verdict(p99 <= TARGETS["live p99 ms"], "p99 <= 20"),
                    {"results": summary.processed, "dropped": dropped})  # fmt: skip


def plan_rows(torch, profile: Profile, work: Path, seconds: float) -> list[Plan]:
    """Every timing row of a run, in order; `state` carries what a row made (inputs, model, rates) to the rows
    after it, and a row whose input failed fails naming it."""
    from streamd.hardware import nvidia_gpu_present

    state: dict = {}
    height, width = profile.video_hw
    model = f"{profile.architecture} {profile.input_size} {profile.precision}"
    streams, gpu = profile.file_streams, profile.device != "cpu"
    graphs = gpu

    def need(key: str):
        if key not in state:
            raise RuntimeError(f"needs the {key} an earlier row makes, and that row failed")
        return state[key]

    def inputs_video() -> Measured:
        state["video"] = make_video(work / f"{height}p30.mp4", profile.video_hw, profile.video_frames)
        return Measured(state["video"].name, "", {"frames": profile.video_frames})

    def inputs_bundle() -> Measured:
        from streamd.model import load_bundle

        state["bundle path"] = make_bundle(work / f"{profile.architecture}.bundle", profile.architecture, profile.input_size)
        state["bundle"] = load_bundle(state["bundle path"])
        return Measured(state["bundle path"].name)

    def nvdec_probe() -> Measured:
        from streamd.stages.decoder import nvdec_problem

        problem = nvdec_problem(0) if nvidia_gpu_present() else "no NVIDIA GPU (no /dev/nvidia0)"
        return Measured("NVDEC decodes" if problem is None else f"n/a: {problem}", "", {"nvdec": int(problem is None)})

    def decode(hwaccel: str) -> Callable[[], Measured]:
        def row() -> Measured:
            found = decode_rate(need("video"), seconds, hwaccel, streams)
            if "frames" in found.counts and not found.result.startswith("n/a"):
                state.setdefault("ceilings", []).append(_rate(found))
            return found

        return row

    def net():
        if "net" not in state:
            from streamd.backends.torch import load_model

            # Set before the first convolution, as the torch backend sets it for itself (process-wide): otherwise
            # the bare rows would time cuDNN's default kernels and the backend rows its autotuned ones. (On the
            # CPU it changes nothing; the smoke run sets it too, so that its test sees the order.)
            torch.backends.cudnn.benchmark = True
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[profile.precision]
            state["net"] = load_model(need("bundle")).to(device=profile.device, dtype=dtype)
            state["net"].decode.float()
        return state["net"]

    def bare(batch: int, with_graphs: bool) -> Callable[[], Measured]:
        def row() -> Measured:
            found = bare_rate(torch, net(), profile, batch, seconds, with_graphs)
            if with_graphs == graphs:
                state.setdefault("bare", {})[batch] = _rate(found)
            return found

        return row

    def untrained_gpu_path() -> Measured:
        state.pop("net", None)  # the backend loads its own
        return gpu_path(profile, need("bundle"), need("video"), 4 * profile.max_batch, seconds)

    def files() -> Measured:
        state["files"] = found = pipeline_files(need("bundle path"), need("video"), profile)
        target = _verdict(found["fps"] >= TARGETS["pipeline fps"], f">= {TARGETS['pipeline fps']:,.0f}")
        return Measured(_fmt(found["fps"]), target, {"results": found["results"], "processed": found["processed"]})

    def setup() -> Measured:
        return Measured(f"{need('files')['setup_s']:.1f}")

    def ratio() -> Measured:
        ceiling = max(state.get("ceilings") or [float("inf")])
        bare_rates = need("bare")
        limit = min(ceiling, bare_rates.get(profile.max_batch, max(bare_rates.values())))
        value = need("files")["fps"] / limit
        return Measured(f"{value:.2f}x", _verdict(value >= TARGETS["pipeline ratio"], f">= {TARGETS['pipeline ratio']}x"))

    def live() -> Measured:
        state["live"] = found = pipeline_live(need("bundle path"), need("video"), profile, max(4 * seconds, 2.0))
        return found

    def drops() -> Measured:
        dropped = need("live").counts["dropped"]
        return Measured(str(dropped), _verdict(dropped == 0, "0"), {"dropped": dropped})

    decode_s, model_s, pipeline_s = seconds + 90, seconds + 150, 10 * seconds + 180
    plans = [
        Plan(f"inputs: {height}p30 H.264, {profile.video_frames} frames (PyAV libx264)", inputs_video, 300),
        Plan(f"inputs: untrained {profile.architecture} {profile.input_size} bundle (trainer export)", inputs_bundle, 300),
        Plan("NVDEC probe: FFmpeg with cuda, libnvcuvid.so.1, one NVDEC decode", nvdec_probe, 60),
        Plan(f"decode ceiling, {streams} streams {height}p to planes, CPU, {os.cpu_count()} cores (frames/s)", decode("none"), decode_s),
        Plan(f"decode ceiling, {streams} streams {height}p to planes, NVDEC (frames/s)", decode("cuda"), decode_s),
    ]  # fmt: skip
    for batch in profile.batches:
        plans.append(Plan(f"bare {model}, {'CUDA graph' if graphs else 'eager'}, batch {batch} (frames/s)", bare(batch, graphs), model_s))
    if graphs:
        batch = profile.max_batch
        plans.append(Plan(f"bare {model}, eager, batch {batch} (frames/s; graphs on vs off)", bare(batch, False), model_s))
    plans += [
        Plan(f"GPU path from decoded {height}p planes, batch {profile.max_batch}: upload, colour, letterbox, model, NMS "
             "(frames/s; detections per frame, untrained model)", untrained_gpu_path, model_s),
        Plan(f"GPU path, shipped bccd-nano 416 {profile.precision} on BCCD 480p planes, batch {profile.max_batch} "
             "(frames/s; detections per frame)", lambda: shipped_model_row(profile, work, seconds), model_s),
        Plan(f"pipeline, {profile.file_streams} file streams {height}p, no recording (frames/s from the first result)", files, pipeline_s),
        Plan("pipeline set-up: from run_pipeline to its first result (backend, warm-up, sources) (s)", setup, 5),
        Plan("pipeline / min(decode ceiling, bare at max_batch)", ratio, 5),
        Plan(f"pipeline, {profile.live_streams} live {height}p30 streams (paced files, slice threads): latency from "
             "each frame's packet p50 / worst p99 (ms)", live, pipeline_s),
        Plan(f"pipeline, {profile.live_streams} live streams: frames dropped", drops, 5),
    ]  # fmt: skip
    return plans


def _fmt(value: float | str) -> str:
    return f"{value:,.0f}" if isinstance(value, float) else value


def _rate(found: Measured) -> float:
    """Frames per second from a row's counts (frames, elapsed_ms)."""
    return found.counts["frames"] * 1000 / max(1, found.counts["elapsed_ms"])


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


def table(header: str, rows: list[Row]) -> str:
    """The rows as a text table under `header`: check, result (or error), target."""
    cells = [("check", "result", "target")] + [(r.check, r.result if r.error is None else f"error: {r.error}", r.target) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(3)]
    lines = [header, *("  ".join(f"{cell:<{width}}" for cell, width in zip(row, widths)).rstrip()
                       for row in [cells[0], tuple("-" * w for w in widths), *cells[1:]])]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json, pytest.log, junit.xml, table.txt")
    parser.add_argument("--seconds", type=float, default=None, help="time per benchmark row (default 5; smoke 0.5)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the inputs (default: a temporary one)")
    parser.add_argument("--skip-tests", action="store_true", help="benchmark only")
    parser.add_argument("--smoke", action="store_true", help="the same steps on the CPU with a tiny model and video")
    parser.add_argument("--test-budget-s", type=float, default=None, help="the whole test step (default 210; smoke 300)")
    parser.add_argument("--test-timeout-s", type=float, default=PER_TEST_TIMEOUT_S, help="each test (pytest-timeout)")
    parser.add_argument("--row-budget-s", type=float, default=None, help="all timing rows together (default 200)")
    args = parser.parse_args()
    profile = SMOKE if args.smoke else GPU
    context = None
    if not args.smoke:  # before anything touches the GPU, as the daemon does: NVDEC then shares the context
        from streamd.hardware import set_primary_context_blocking_sync

        context = set_primary_context_blocking_sync(0)[1]
    if args.smoke:
        import torch
    else:
        torch = require_cuda()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    env = environment(torch, profile)
    print(env, flush=True)
    rows: list[Row] = []

    def report(row: Row) -> None:
        """Each row as soon as it is measured, on stdout and in OUT/gpu_check.json: a later crash keeps it."""
        rows.append(row)
        print("  ".join(cell for cell in (row.check, row.result, row.target, row.error and f"error: {row.error}") if cell), flush=True)
        document = {"environment": env, "profile": "smoke" if args.smoke else "gpu", "cuda_context": context,
                    "rows": [r.as_json() for r in rows], "files": {"pytest_log": "pytest.log", "junit": "junit.xml"}}  # fmt: skip
        (out / "gpu_check.json").write_text(json.dumps(document, indent=2) + "\n")

    passed = True
    if not args.skip_tests:
        started = time.monotonic()
        try:
            passed, found = run_gpu_tests(profile, out, args.test_budget_s or profile.test_budget_s, args.test_timeout_s)
            report(Row("gpu-marked tests (parity with ONNX Runtime, graphs on/off, slots, threads, NVDEC)", found.result,
                       found.target, found.counts, None, time.monotonic() - started))  # fmt: skip
        except Exception as exc:  # noqa: BLE001  (the test step's own failure is a row; the timings still run)
            passed = False
            report(Row("gpu-marked tests", "error", "", {}, f"{type(exc).__name__}: {exc}", time.monotonic() - started))
    plans = plan_rows(torch, profile, work, args.seconds or profile.seconds)
    measured = run_rows(plans, args.row_budget_s or profile.row_budget_s, report)
    text = table(env, rows)
    (out / "table.txt").write_text(text)
    print(f"\n{text}\nwritten to {out}: gpu_check.json, table.txt, pytest.log, junit.xml", flush=True)
    return 0 if passed and not [row for row in measured if row.error] else 1


if __name__ == "__main__":
    sys.exit(main())
