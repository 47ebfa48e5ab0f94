"""benchmarks/gpu_check.py --smoke: the GPU check's every step (inputs, decode ceiling, bare model, submit_frames,
the daemon on file and live streams, the table) run on the CPU with a tiny model, so it cannot break unseen
between the rare runs on a GPU machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parents[2]


def test_gpu_check_smoke_runs_every_step_on_the_cpu(tmp_path):
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--smoke", "--seconds", "0.3", "--work", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = {check: (value, target) for check, value, target in report["rows"]}
    assert report["environment"].startswith("CPU (smoke run")
    numbers = [check for check, (value, _) in rows.items() if value.replace(",", "").replace(".", "").isdigit()]
    assert len(numbers) >= 4, rows  # decode ceiling, bare at batch 1 and 2, the pipeline
    gpu_path = next(value for check, (value, _) in rows.items() if check.startswith("GPU path from decoded 240p planes"))
    rate, per_frame = gpu_path.split("; ")
    assert float(rate.replace(",", "")) > 0 and float(per_frame) >= 0
    shipped = next(value for check, (value, _) in rows.items() if check.startswith("GPU path, shipped bccd-nano"))
    if not shipped.startswith("n/a"):  # BCCD beside the checkout: real cells for the NMS
        assert float(shipped.split("; ")[1]) > 5
    files = next(value for check, (value, _) in rows.items() if check.startswith("pipeline, 2 file streams"))
    assert float(files.replace(",", "")) > 0
    live_drops = next(check for check in rows if check.endswith("frames dropped"))
    assert rows[live_drops][0].isdigit()
    assert "check" in result.stdout and "pipeline / min(decode ceiling, bare at max_batch)" in result.stdout
