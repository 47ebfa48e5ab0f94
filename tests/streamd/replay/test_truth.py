"""Ground truth: the file format's errors, AP50 and the clinical figures on hand-made logs, the dataset converter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from synthetic import write_experiment

from streamd.replay.errors import TruthError
from streamd.replay.logs import ModelLog, Track
from streamd.replay.truth import main, read_truth, truth_figures
from tests.streamd.replay.test_compare import BOX, FAR, frame

CLASSES = ("RBC", "WBC")


@pytest.mark.parametrize(
    "line, error",
    [
        ("{", r"truth.jsonl:2: not JSON"),
        ('{"pts": "1", "boxes": []}', r"truth.jsonl:2: pts: a number of seconds, got '1'"),
        ('{"pts": 1, "boxes": {}}', r"truth.jsonl:2: boxes: a list"),
        ('{"pts": 1, "stream": 3, "boxes": []}', r"truth.jsonl:2: stream: a stream id"),
        ('{"pts": 1, "boxes": [{"label": "rbc", "box": [0, 0, 1, 1], "object": 1}]}',
         r"truth.jsonl:2: boxes\[0\].label: 'rbc' is not one of the model's classes \(RBC, WBC\); did you mean 'RBC'\?"),
        ('{"pts": 1, "boxes": [{"label": "RBC", "box": [5, 0, 1, 1], "object": 1}]}',
         r"truth.jsonl:2: boxes\[0\].box: \[x1, y1, x2, y2\] in pixels with x1 < x2"),
        ('{"pts": 1, "boxes": [{"label": "RBC", "box": [0, 0, 1, 1], "object": "a"}]}',
         r"truth.jsonl:2: boxes\[0\].object: the object's id \(an integer\), got 'a'"),
    ],
)  # fmt: skip
def test_read_truth_names_file_line_and_field(tmp_path: Path, line: str, error: str) -> None:
    path = tmp_path / "truth.jsonl"
    path.write_text('{"pts": 0, "boxes": []}\n' + line + "\n")
    with pytest.raises(TruthError, match=error):
        read_truth(path, CLASSES)


def test_truth_without_stream_needs_a_single_stream(tmp_path: Path) -> None:
    path = tmp_path / "truth.jsonl"
    path.write_text('{"pts": 0, "boxes": []}\n')
    log = ModelLog("m", {"one": (frame(0, []),), "two": (frame(0, []),)}, {})
    with pytest.raises(TruthError, match=r"names no stream, and 2 were replayed \(one, two\)"):
        truth_figures(read_truth(path, CLASSES), log, CLASSES)


def test_truth_figures(tmp_path: Path) -> None:
    """Object 1 (RBC at BOX) from frame 0; the model's track 7 is confirmed from frame 2 (0.2 s later); its track 8
    (WBC at FAR) overlaps no truth object: one false alarm in 0.6 s of annotated video. Object 2 is never found."""
    lines = [{"pts": k / 10, "boxes": [{"label": "RBC", "box": BOX, "object": 1}]} for k in range(6)]
    lines[3]["boxes"].append({"label": "WBC", "box": [100, 100, 140, 140], "object": 2})
    path = tmp_path / "truth.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    frames = [frame(k, [(BOX, 0)], [-1]) for k in range(2)] + [frame(k, [(BOX, 0), (FAR, 1)], [7, 8]) for k in range(2, 6)]
    log = ModelLog("m", {"s": tuple(frames)}, {"s": (Track("s", 7, 0, "RBC", 0.2, 0.5, 4, 0.9),
                                                     Track("s", 8, 1, "WBC", 0.2, 0.5, 4, 0.9))})  # fmt: skip
    figures = truth_figures(read_truth(path, CLASSES), log, CLASSES)
    assert figures["frames_judged"] == 6
    assert figures["ap50"]["RBC"] == 1.0
    assert figures["ap50"]["WBC"] == 0.0  # its only box is a false positive, its object never found
    assert (figures["objects"], figures["objects_found"], figures["objects_missed"]) == (2, 1, 1)
    assert figures["time_to_detection_s"]["max"] == pytest.approx(0.2)
    assert (figures["false_alarms"], figures["tracks_judged"]) == (1, 2)
    assert figures["false_alarms_per_min"] == pytest.approx(1 / 0.01, rel=1e-3)


def test_converter_writes_a_line_per_frame_with_scaled_boxes(voc_dataset, tmp_path: Path) -> None:
    experiment = write_experiment(tmp_path / "exp.yaml", voc_dataset.root, "voc", voc_dataset.classes)
    out = tmp_path / "truth.jsonl"
    main([str(experiment), "--split", "test", "--images", "2", "--seconds-per-image", "0.5", "--fps", "4",
          "--size", "64x32", "-o", str(out)])  # fmt: skip
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["pts"] for line in lines] == [0.0, 0.25, 0.5, 0.75]
    truth = read_truth(out, voc_dataset.classes)  # the format the replay reads
    assert truth[0].object_id.tolist() == list(range(len(truth[0].object_id)))
    assert truth[2].object_id.tolist() == [1000 + i for i in range(len(truth[2].object_id))]
    assert np.array_equal(truth[0].xyxy, truth[1].xyxy)
    assert truth[0].xyxy[:, 2].max() <= 64 and truth[0].xyxy[:, 3].max() <= 32
