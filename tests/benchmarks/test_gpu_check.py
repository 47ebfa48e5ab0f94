"""benchmarks/gpu_check.py: its every step (the gpu-marked tests, inputs, NVDEC probe, decode ceilings, bare model,
Backend.submit on planes, the daemon on file and live streams, the table) run on the CPU with a tiny model (--smoke), so it
cannot break unseen between the rare runs on a GPU machine; and what makes one run return everything: the log and
JUnit XML of a test step cut by its per-test timeout or its budget, and rows that fail or hang without losing the
table. Asserted on counts (frames, results, tests), never on a rate: the machine may be loaded."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
import xml.etree.ElementTree as ElementTree
from dataclasses import replace
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
gpu_check = sys.modules.setdefault("gpu_check", importlib.util.module_from_spec(spec))
spec.loader.exec_module(gpu_check)  # dataclasses look their module up in sys.modules


def test_gpu_check_smoke_writes_the_table_the_pytest_log_and_the_junit_xml_with_every_row(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--smoke", "--seconds", "0.3", "--work", str(tmp_path / "work"), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    assert "Traceback" not in result.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["environment"].startswith("CPU (smoke run") and report["profile"] == "smoke"
    planned = [plan.check for plan in gpu_check.plan_rows(None, gpu_check.SMOKE, tmp_path, 0.3)]
    rows = report["rows"]
    assert [row["check"] for row in rows] == [rows[0]["check"], *planned]  # the tests' row, then every planned row
    assert [row for row in rows if row["error"] is not None] == []
    counts = {row["check"]: row["counts"] for row in rows}

    # the test step: its log and JUnit XML, the same count of tests in both and in the row
    junit = ElementTree.parse(out / "junit.xml").getroot()
    suite = junit if junit.tag == "testsuite" else junit.find("testsuite")
    tests = counts[rows[0]["check"]]
    assert tests["tests"] == int(suite.get("tests")) == tests["skipped"] >= 4  # the NVDEC tests skip: no GPU here
    assert "NVDEC cannot decode here: no NVIDIA GPU" in (out / "pytest.log").read_text()

    def row(prefix: str) -> dict:
        (found,) = [r for r in rows if r["check"].startswith(prefix)]
        return found

    assert row("NVDEC probe")["result"].startswith("n/a: ") and row("NVDEC probe")["counts"] == {"nvdec": 0}
    cpu, nvdec = row("decode ceiling, 2 streams 240p to planes, CPU"), row("decode ceiling, 2 streams 240p to planes, NVDEC")
    assert cpu["counts"]["frames"] > 0 and cpu["counts"]["streams_on_cpu"] == 2 and "(0 of 2 streams on NVDEC)" in cpu["result"]
    assert nvdec["result"].startswith("n/a: decoded on the CPU, not timed as NVDEC") and nvdec["counts"]["streams_on_nvdec"] == 0
    for batch in (1, 2):
        bare = row(f"bare yolox_nano 160 fp32, eager, batch {batch}")["counts"]
        assert bare["frames"] >= 10 * batch and bare["cudnn_benchmark"] == 1  # autotuning on, as for the backend rows
    assert row("GPU path from decoded 240p planes")["counts"]["frames"] >= 2
    shipped = row("GPU path, shipped bccd-nano")
    if not shipped["result"].startswith("n/a"):  # BCCD beside the checkout: real cells for the NMS
        assert shipped["counts"]["detections"] > 5 * shipped["counts"]["frames"]
    files = row("pipeline, 2 file streams")["counts"]
    assert files["results"] == files["processed"] == 2 * gpu_check.SMOKE.video_frames  # each frame of both files once
    assert float(row("pipeline set-up")["result"]) > 0
    assert row("pipeline, 2 live 240p30 streams")["counts"]["results"] > 0
    assert row("pipeline, 2 live streams: frames dropped")["counts"]["dropped"] >= 0
    assert (out / "table.txt").read_text() in result.stdout


SLOW_TESTS = """
import time
import pytest

@pytest.mark.gpu
def test_fast():
    pass

@pytest.mark.gpu
def test_slow():
    print("partial output of the slow test", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def slow_suite(tmp_path):
    (tmp_path / "suite").mkdir()
    (tmp_path / "suite" / "test_slow.py").write_text(SLOW_TESTS)
    return replace(gpu_check.SMOKE, test_paths=(str(tmp_path / "suite"),))


def test_a_hung_test_fails_by_its_own_timeout_and_the_step_goes_on(slow_suite, tmp_path, capsys):
    passed, found = gpu_check.run_gpu_tests(slow_suite, tmp_path, budget_s=500, per_test_s=5)
    assert not passed and found.target.startswith("all pass: MISSED")
    assert (found.counts["tests"], found.counts["failures"]) == (2, 1)
    log = (tmp_path / "pytest.log").read_text()
    assert "Timeout" in log and "partial output of the slow test" in log  # what the hung test printed is kept
    assert "partial output of the slow test" in capsys.readouterr().out


def test_a_step_past_its_budget_is_interrupted_and_still_returns_its_log_and_junit(slow_suite, tmp_path, capsys):
    """The budget ends the step with SIGINT (pytest then writes its summary and JUnit XML); what it printed until
    then is printed and kept, instead of the bytes of a TimeoutExpired being dropped."""
    passed, found = gpu_check.run_gpu_tests(slow_suite, tmp_path, budget_s=30, per_test_s=500)
    assert not passed and found.result.startswith("pytest stopped after its budget of 30 s")
    log = (tmp_path / "pytest.log").read_text()
    assert log and log[-2000:].strip() in capsys.readouterr().out
    assert ElementTree.parse(tmp_path / "junit.xml").getroot() is not None  # pytest's, or one naming the interruption


def test_run_logged_keeps_what_a_command_printed_before_its_timeout(tmp_path):
    script = "import signal, sys, time\nprint('before the timeout', flush=True)\ntime.sleep(600)\n"
    returncode = gpu_check.run_logged([sys.executable, "-c", script], tmp_path / "log", timeout_s=15, grace_s=30)
    assert returncode is None and "before the timeout" in gpu_check.log_tail(tmp_path / "log")


def test_a_row_that_fails_or_hangs_is_an_error_row_and_the_next_rows_run():
    release = threading.Event()
    reported = []

    def fails():
        raise ValueError("no such device")

    def hangs():
        release.wait(600)
        return gpu_check.Measured("late")

    plans = [
        gpu_check.Plan("raises", fails, 60),
        gpu_check.Plan("hangs", hangs, 1),
        gpu_check.Plan("measures", lambda: gpu_check.Measured("12", "met", {"frames": 12}), 60),
    ]
    try:
        rows = gpu_check.run_rows(plans, budget_s=600, report=reported.append)
    finally:
        release.set()
    assert rows == reported and [row.check for row in rows] == ["raises", "hangs", "measures"]
    assert rows[0].error == "ValueError: no such device" and rows[0].result == "error"
    assert rows[1].error == "did not finish within its deadline of 1 s"
    assert (rows[2].result, rows[2].target, rows[2].counts, rows[2].error) == ("12", "met", {"frames": 12}, None)


def test_rows_past_the_budget_are_listed_as_not_run():
    ran = []
    plans = [gpu_check.Plan(name, lambda name=name: ran.append(name) or gpu_check.Measured("ok"), 60) for name in "abc"]
    rows = gpu_check.run_rows(plans, budget_s=0, report=lambda row: None)
    assert ran == [] and [row.error for row in rows] == ["not run: the rows' budget of 0 s was spent"] * 3
