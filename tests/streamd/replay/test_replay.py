"""`streamd replay` end to end on BCCD clips with the shipped bundles: determinism, the report (checked in a real
headless Chromium), Ctrl-C, and the command's errors."""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import jsonschema
import numpy as np
import pytest
from synthetic import write_experiment
from typer.testing import CliRunner

from streamd.cli import app
from streamd.messages import schema
from streamd.replay.command import EXIT_INTERRUPTED, replay
from streamd.replay.report import build_report, write_report
from streamd.replay.run import find_sources
from streamd.replay.truth import read_truth
from streamd.replay.truth import truth_from_split
from tests.streamd import media
from tests.streamd.replay.browser import CHROMIUM, Browser
from trainer.config import load_experiment
from trainer.datasets import load_split

REPO = Path(__file__).resolve().parents[3]
FP32 = REPO / "models" / "bccd-nano.bundle"
INT8 = REPO / "models" / "bccd-nano-int8.bundle"
CLASSES = ("RBC", "WBC", "Platelets")
IMAGES, FRAMES_PER_IMAGE, FPS, SIZE_WH = 12, 5, 10, (320, 240)
runner = CliRunner()


@pytest.fixture(scope="module")
def bccd_clip(bccd_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 60-frame 320x240 10 fps clip of the first 12 BCCD test images (0.5 s each) and its truth file."""
    folder = tmp_path_factory.mktemp("replay")
    split = load_split(load_experiment(write_experiment(folder / "exp.yaml", bccd_root, "voc", CLASSES)), "test")
    records = split.records[:IMAGES]
    images = [cv2.resize(cv2.imread(str(r.path)), SIZE_WH) for r in records for _ in range(FRAMES_PER_IMAGE)]
    clip = media.encode_images(folder / "bccd-clip.mp4", images, fps=FPS)
    truth = folder / "truth.jsonl"
    lines = truth_from_split(split, images=IMAGES, seconds_per_image=FRAMES_PER_IMAGE / FPS, fps=FPS, size_wh=SIZE_WH)
    truth.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return clip, truth


def log_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.jsonl"))}


def test_replay_twice_writes_identical_logs_in_the_daemons_schema(bccd_clip, tmp_path: Path) -> None:
    clip, _ = bccd_clip
    first = replay([clip], [FP32], tmp_path / "one", backend="onnxruntime")
    second = replay([clip], [FP32], tmp_path / "two", backend="onnxruntime")
    logs = log_files(tmp_path / "one")
    assert list(logs) == ["bccd-nano/bccd-clip_19700101T000000Z_0000.jsonl"]  # named by pts, not the wall clock
    assert logs == log_files(tmp_path / "two")
    assert first.runs[0].frames == second.runs[0].frames == IMAGES * FRAMES_PER_IMAGE
    messages = [json.loads(line) for line in next(iter(logs.values())).splitlines()]
    frames = [m for m in messages if m["schema"] == "streamd.detections/3"]
    assert [m["seq"] for m in frames] == list(range(IMAGES * FRAMES_PER_IMAGE))
    for message in messages:
        jsonschema.validate(message, schema(message["schema"]))
    assert {m["latency_ms"]["total"] for m in frames} == {0.0}
    assert frames[10]["captured_at"] == "1970-01-01T00:00:01.000000Z"  # the frame's pts, 1.0 s
    assert any(d["track_id"] is not None and d["confirmed"] for m in frames for d in m["detections"])
    report = json.loads(first.report_json.read_text())
    assert report["models"][0]["frames"] == IMAGES * FRAMES_PER_IMAGE and "agreement" not in report


def test_replay_compares_two_models_against_the_truth_and_the_report_opens_in_a_browser(
    bccd_clip, tmp_path: Path
) -> None:
    clip, truth = bccd_clip
    result = replay([clip], [FP32, INT8], tmp_path / "out", backend="onnxruntime", truth_path=truth)
    report = json.loads(result.report_json.read_text())
    frames = IMAGES * FRAMES_PER_IMAGE
    assert [m["name"] for m in report["models"]] == ["bccd-nano", "bccd-nano-int8"]
    assert [m["frames"] for m in report["models"]] == [frames, frames]
    agreement = report["agreement"]
    assert len(agreement["per_frame"]) == agreement["frames"] == frames
    assert agreement["matched"] > agreement["only_a"] + agreement["only_b"]  # the int8 model mostly agrees
    # With confirmation on confident boxes (2 of 3 at >= 0.5) fp32 and int8 confirm the same tracks here (with 3 of 5
    # on any box, int8 confirmed 2 RBC tracks alone): the findings the report lists are only_findings' own
    assert report["findings_only_one_model"] == []
    for model in report["truth"]["models"].values():
        assert model["frames_judged"] == frames
        assert 0.5 < model["map50"] <= 1.0  # the shipped model: 0.82 on the whole demo video
        assert model["objects_found"] > 0 and model["time_to_detection_s"]["max"] is not None
    # A finding, rendered: the int8 log again without one of its confirmed tracks (as if a model never saw that
    # object), so that the page has one, its thumbnail cut from the clip's frame and judged against the truth.
    int8_run = result.runs[1]
    messages = [json.loads(line) for log in sorted(int8_run.log_dir.glob("*.jsonl")) for line in log.read_text().splitlines()]
    missing = next(d["track_id"] for m in messages if m["schema"] == "streamd.detections/3" for d in m["detections"]
                   if d["confirmed"])  # fmt: skip
    blind = tmp_path / "blind"
    blind.mkdir()
    for log in int8_run.log_dir.glob("*.jsonl"):
        messages = [json.loads(line) for line in log.read_text().splitlines()]
        for m in messages:
            if m["schema"] == "streamd.detections/3":
                m["detections"] = [d for d in m["detections"] if d["track_id"] != missing]
        (blind / log.name).write_text("".join(json.dumps(m) + "\n" for m in messages))
    runs = (int8_run, dataclasses.replace(int8_run, name="blind", log_dir=blind))
    sources = find_sources([clip])
    built = build_report(runs, sources, "onnxruntime", read_truth(truth, CLASSES), truth)
    (tmp_path / "blind-report").mkdir()
    _, html_path = write_report(built, tmp_path / "blind-report", sources)
    report = built.data
    findings = report["findings_only_one_model"]
    assert [(f["model"], f["track_id"]) for f in findings] == [("bccd-nano-int8", missing)]
    page = html_path.read_text()
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium): the browser check did not run")
    with Browser(tmp_path / "profile") as browser:
        loaded = browser.load(html_path.as_uri(), (
            "({plots: Array.from(document.querySelectorAll('svg.plot'), s => s.getBoundingClientRect().height),"
            " bars: document.querySelectorAll('svg.plot rect').length,"
            " images: Array.from(document.images, i => [i.complete, i.naturalWidth, i.naturalHeight])})"
        ))  # fmt: skip
    assert loaded.problems == []
    assert len(loaded.answer["plots"]) == 2 and min(loaded.answer["plots"]) > 50  # agreement, timeline
    assert loaded.answer["bars"] >= sum(sum(m["tracks_per_class"].values()) for m in report["models"])
    assert len(loaded.answer["images"]) == len(findings)
    assert all(complete and width > 0 and height > 0 for complete, width, height in loaded.answer["images"])
    shot = cv2.imdecode(np.frombuffer(loaded.screenshot_png, np.uint8), cv2.IMREAD_COLOR)
    assert (shot.min(axis=2) < 200).mean() > 0.05  # drawn: text, plots and thumbnails, not a blank page


def test_ctrl_c_leaves_whole_log_lines_and_no_report(bccd_root: Path, bccd_clip, tmp_path: Path) -> None:
    clip, _ = bccd_clip
    import av

    with av.open(str(clip)) as container:
        images = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]
    long_clip = media.encode_images(tmp_path / "long.mp4", images * 6, fps=FPS)  # 360 frames
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "streamd.cli", "replay", str(long_clip), "--model", str(FP32), "--model", str(INT8),
         "--backend", "onnxruntime", "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not any(f.stat().st_size for f in out.glob("*/*.jsonl")):
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read().decode()
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == EXIT_INTERRUPTED, stderr.decode()
    assert "interrupted" in stderr.decode()
    assert [p.parent.name for p in out.glob("*/*.jsonl")] == ["bccd-nano"]  # int8 never started
    data = next(out.glob("*/*.jsonl")).read_bytes()
    assert data.endswith(b"\n")
    lines = [json.loads(line) for line in data.splitlines()]
    frames = [m for m in lines if m["schema"] == "streamd.detections/3"]
    assert 0 < len(frames) < len(images) * 6
    assert [m["seq"] for m in frames] == list(range(len(frames)))
    assert not (out / "report.json").exists()


@pytest.mark.parametrize(
    "args, error",
    [
        (["missing.mp4", "--model", str(FP32)], r"missing.mp4: no such file or folder"),
        (["{empty}", "--model", str(FP32)], r"no video file in this folder"),
        (["{clip}", "--model", str(FP32), "--model", "{tiny}"], r"tiny.bundle: classes lesion, landmark, tool differ from .*bccd-nano.bundle"),
        (["{clip}", "--model", str(FP32), "--backend", "tpu"], r"--backend 'tpu': one of auto, onnxruntime"),
        (["{clip}", "--model", str(FP32), "--truth", "{bad_truth}"], r"truth.jsonl:1: not JSON"),
    ],
)
def test_replay_argument_errors_exit_2_naming_what(args, error, clip, tiny_bundle, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "truth.jsonl").write_text("{\n")
    names = {"empty": tmp_path / "empty", "clip": clip, "tiny": tiny_bundle.path, "bad_truth": tmp_path / "truth.jsonl"}
    args = [a.format(**names) for a in args]
    result = runner.invoke(app, ["replay", *args, "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert re.search(error, result.output), result.output


def test_an_output_folder_with_logs_is_refused(clip, tmp_path: Path) -> None:
    (tmp_path / "out" / "bccd-nano").mkdir(parents=True)
    (tmp_path / "out" / "bccd-nano" / "old.jsonl").write_text("")
    result = runner.invoke(app, ["replay", str(clip), "--model", str(FP32), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "already holds detection logs" in result.output
