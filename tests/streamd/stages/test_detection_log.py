"""streamd.stages.detection_log: one schema-valid JSON line per frame, one file per segment, named like the recording."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from streamd.errors import OutputError
from streamd.messages import schema
from streamd.stages.annotate import AnnotateStage
from streamd.config import RecordConfig
from streamd.stages.detection_log import DetectionLogStage
from streamd.stages.record import RecordStage
from tests.streamd import media


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


@pytest.mark.parametrize(
    ("segment_s", "count", "expected_lines"),
    [
        (600, 30, [30]),
        (1.0, 60, [25, 25, 10]),
    ],
)
def test_one_valid_line_per_frame(tmp_path: Path, segment_s: float, count: int, expected_lines: list[int]) -> None:
    stage = DetectionLogStage("eus-1", tmp_path, segment_s=segment_s)
    stage.setup()
    results = [media.frame_result(f) for f in media.synthetic_frames(count)]
    try:
        for result in results:
            assert list(stage.process(result)) == [result]  # passes its input on
    finally:
        stage.close()
    assert [p.suffix for p in stage.segments] == [".jsonl"] * len(expected_lines)
    messages = [m for path in stage.segments for m in read_lines(path)]
    assert [len(read_lines(p)) for p in stage.segments] == expected_lines
    validator = jsonschema.Draft202012Validator(schema())
    for message in messages:
        validator.validate(message)
    assert [m["seq"] for m in messages] == list(range(count))
    assert messages[0]["model"]["sha256"] == media.MODEL.sha256
    assert messages[0]["detections"][0]["box"] == [40.0, 30.0, 120.0, 90.0]


def test_same_base_names_as_the_recording(tmp_path: Path) -> None:
    annotate = AnnotateStage(media.MODEL.class_names)
    recorder = RecordStage("eus-1", RecordConfig(dir=tmp_path / "rec", codec="libx264"), 0.8)
    log = DetectionLogStage("eus-1", tmp_path / "log", 0.8)  # the stream's one segment_s for both
    for stage in (recorder, log):
        stage.setup()
    for frame in media.synthetic_frames(50):
        for annotated in annotate.process(media.frame_result(frame)):
            list(recorder.process(annotated))
            list(log.process(annotated))  # accepts an AnnotatedFrame too
    recorder.close()
    log.close()
    assert len(recorder.segments) == 3
    assert [p.stem for p in log.segments] == [p.stem for p in recorder.segments]
    assert [len(read_lines(p)) for p in log.segments] == [media.probe_frame_count(p) for p in recorder.segments]


def test_the_line_is_the_published_messages_bytes(tmp_path: Path) -> None:
    stage = DetectionLogStage("eus-1", tmp_path)
    stage.setup()
    results = [media.frame_result(frame) for frame in media.synthetic_frames(3)]
    for result in results:
        list(stage.process(result))
    stage.close()
    assert stage.segments[0].read_bytes() == b"".join(result.message + b"\n" for result in results)


def test_each_line_is_on_disk_before_close(tmp_path: Path) -> None:
    """What a crash would leave: every processed line, whole."""
    stage = DetectionLogStage("eus-1", tmp_path)
    stage.setup()
    for count, frame in enumerate(media.synthetic_frames(5), start=1):
        list(stage.process(media.frame_result(frame)))
        assert len(read_lines(stage.segments[0])) == count
    stage.close()


def test_rejects_other_streams_and_types(tmp_path: Path) -> None:
    stage = DetectionLogStage("eus-1", tmp_path)
    stage.setup()
    with pytest.raises(OutputError, match="stream 'eus-2'"):
        list(stage.process(media.frame_result(next(media.synthetic_frames(1, stream_id="eus-2")))))
    with pytest.raises(TypeError, match="FrameResult"):
        list(stage.process(next(media.synthetic_frames(1))))
    stage.close()
    assert list(tmp_path.iterdir()) == []


def test_logs_and_recordings_are_0600_in_0700_folders(tmp_path: Path) -> None:
    """What a procedure leaves on disk is the service user's alone (logs carry messages, never pixels); a folder
    that was there keeps its mode (test_output_files.py tests shared ones)."""
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    log = DetectionLogStage("eus-1", loose / "log")
    recorder = RecordStage("eus-1", RecordConfig(dir=loose, codec="libx264"), 600)
    annotate = AnnotateStage(media.MODEL.class_names)
    for stage in (log, recorder):
        stage.setup()
    for annotated in annotate.process(media.frame_result(next(media.synthetic_frames(1)))):
        list(log.process(annotated))
        list(recorder.process(annotated))
    log.close()
    recorder.close()
    assert loose.stat().st_mode & 0o777 == 0o755  # not streamd's: left as it was
    assert (loose / "log").stat().st_mode & 0o777 == 0o700  # made by streamd
    for path in (*log.segments, *recorder.segments):
        assert path.stat().st_mode & 0o777 == 0o600, path
