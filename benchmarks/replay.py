"""`streamd replay`'s speed beside the daemon's own file speed, both models, in one run.

    .venv/bin/python benchmarks/replay.py [VIDEO] [--model A.bundle --model B.bundle] [--backend onnxruntime]

Rows per model, alternating in the same process:
  daemon file   run_pipeline on the file as `streamd run` reads it (as fast as it decodes, the config's default
                batch: max_batch 8, max_wait_ms 5), the detection log on, the wall clock in the messages
  replay        replay_model: the same pipeline, batch 1 (determinism), no wall clock
frames/s is the pipeline's (frames / RunSummary.duration_s: after the bundle's loading and self-test, the stages'
set-up and warm-up included); wall s includes the loading. VIDEO: demo-out/bccd-test.mp4 (`make sample`).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from streamd.config import StreamdConfig  # noqa: E402
from streamd.pipeline.compose import Switches  # noqa: E402
from streamd.pipeline.daemon import run_pipeline  # noqa: E402
from streamd.replay.run import find_sources, model_folder_names, replay_model  # noqa: E402


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def daemon_row(bundle: Path, video: Path, backend: str, out: Path) -> tuple[int, float, float]:
    """(frames, pipeline s, wall s) of the daemon's own file run."""
    config = StreamdConfig.model_validate({
        "model": str(bundle), "backend": {"type": backend},
        "streams": [{"id": "bench", "source": str(video), "detection_log": {"dir": str(out)}}],
    })  # fmt: skip
    started = time.monotonic()
    summary = run_pipeline(config, switches=Switches(record=False, detection_log=True, publish=False))
    return summary.processed, summary.duration_s, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("video", type=Path, nargs="?", default=REPO / "demo-out" / "bccd-test.mp4")
    parser.add_argument("--model", type=Path, action="append", help="A bundle (repeat; default fp32 and int8).")
    parser.add_argument("--backend", default="onnxruntime")
    args = parser.parse_args()
    bundles = args.model or [REPO / "models" / "bccd-nano.bundle", REPO / "models" / "bccd-nano-int8.bundle"]
    if not args.video.is_file():
        sys.exit(f"{args.video}: no such video (make sample)")
    sources = find_sources([args.video])
    print(f"{args.video.name}, backend {args.backend}, {cpu_name()}, {platform.node()}")
    print(f"{'model':<18} {'run':<12} {'frames':>7} {'frames/s':>9} {'pipeline s':>11} {'wall s':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for bundle, name in zip(bundles, model_folder_names(bundles)):
            frames, pipeline_s, wall_s = daemon_row(bundle, args.video, args.backend, Path(tmp) / f"daemon-{name}")
            print(f"{name:<18} {'daemon file':<12} {frames:>7} {frames / pipeline_s:>9.1f} {pipeline_s:>11.1f} "
                  f"{wall_s:>7.1f}")  # fmt: skip
            run = replay_model(bundle, name, sources, Path(tmp) / "replay", backend=args.backend)
            print(f"{name:<18} {'replay':<12} {run.frames:>7} {run.fps:>9.1f} {run.pipeline_s:>11.1f} "
                  f"{run.duration_s:>7.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
