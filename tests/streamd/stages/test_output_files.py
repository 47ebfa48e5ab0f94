"""What the recorder and the detection log write, and only that: folders made 0700 and others' left as they are,
files created new (never through a symlink, never over someone's file), and a disk that fills mid-segment
leaves a recording that ends on a complete fragment."""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from streamd.config import RecordConfig
from streamd.errors import OutputError
from streamd.segments import segment_base_name
from streamd.stages.annotate import AnnotateStage
from streamd.stages.detection_log import DetectionLogStage
from streamd.stages.record import RecordStage, remove_partials
from streamd.types import Frame
from tests.streamd import media
from tests.streamd.conftest import tmpfs

FPS = 25


def run_outputs(folder: Path, frames: int = 5, stream_id: str = "eus-1") -> tuple[DetectionLogStage, RecordStage]:
    """Record and log `frames` synthetic frames into `folder`, as the pipeline chains them."""
    log = DetectionLogStage(stream_id, folder)
    recorder = RecordStage(stream_id, RecordConfig(dir=folder, codec="libx264", preset="ultrafast"), 600)
    annotate = AnnotateStage(media.MODEL.class_names)
    for stage in (log, recorder):
        stage.setup()
    try:
        for frame in media.synthetic_frames(frames, stream_id=stream_id):
            for annotated in annotate.process(media.frame_result(frame)):
                list(log.process(annotated))
                list(recorder.process(annotated))
    finally:
        log.close()
        recorder.close()
    return log, recorder


def test_a_shared_1777_folder_keeps_its_mode_and_is_named_in_a_warning(tmp_path: Path, caplog) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    with caplog.at_level(logging.WARNING):
        log, recorder = run_outputs(shared)
    assert shared.stat().st_mode & 0o7777 == 0o1777  # the sticky bit and the others' access stay
    assert any(str(shared) in r.getMessage() and "world writable" in r.getMessage() for r in caplog.records)
    for path in (*log.segments, *recorder.segments):
        assert path.stat().st_mode & 0o777 == 0o600, path


def test_missing_folders_are_made_0700_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        run_outputs(tmp_path / "a" / "b")
    finally:
        os.umask(old)
    for folder in (tmp_path / "a", tmp_path / "a" / "b"):
        assert folder.stat().st_mode & 0o7777 == 0o700, folder


def test_a_strangers_files_survive_and_are_never_replaced(tmp_path: Path) -> None:
    """A stranger's `{id}_x.mp4` (no fragment in it) and a file at the very name the segment gets: both kept."""
    stranger = tmp_path / "eus-1_x.mp4"
    stranger.write_bytes(b"not streamd's")
    name = segment_base_name("eus-1", next(media.synthetic_frames(1)).decoded_at, 0)
    taken = tmp_path / f"{name}.mp4"
    taken.write_bytes(b"mine too")
    log, recorder = run_outputs(tmp_path)
    assert stranger.read_bytes() == b"not streamd's" and taken.read_bytes() == b"mine too"
    (segment,) = recorder.segments
    assert segment.name == f"{name}.1.mp4" and media.probe_frame_count(segment) == 5
    assert not list(tmp_path.glob(".*"))  # no temporary left


def test_symlinks_at_the_output_names_are_never_followed(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_bytes(b"keep")
    folder = tmp_path / "out"
    folder.mkdir(mode=0o700)
    (frame,) = media.synthetic_frames(1)
    name = segment_base_name("eus-1", frame.decoded_at, 0)
    (folder / f"{name}.jsonl").symlink_to(target)
    (folder / f".{name}.mp4.partial").symlink_to(target)
    log = DetectionLogStage("eus-1", folder)
    log.setup()
    with pytest.raises(OutputError, match=f"{name}.jsonl is a symbolic link"):
        list(log.process(media.frame_result(frame)))
    recorder = RecordStage("eus-1", RecordConfig(dir=folder, codec="libx264"), 600)
    recorder.setup()  # the temporary's name pattern, but a link: not removed
    with pytest.raises(OutputError, match="cannot start recording.*File exists"):
        list(recorder.process(frame))
    recorder.close()
    assert target.read_bytes() == b"keep"
    assert (folder / f"{name}.jsonl").is_symlink() and (folder / f".{name}.mp4.partial").is_symlink()


def top_level_boxes(path: Path) -> list[tuple[bytes, int]]:
    """The MP4's top-level boxes (type, size); AssertionError if the last one is cut short."""
    data = path.read_bytes()
    boxes, offset = [], 0
    while offset < len(data):
        size, kind = struct.unpack(">I4s", data[offset : offset + 8])
        assert size >= 8 and offset + size <= len(data), f"{path}: box {kind!r} at {offset} cut short"
        boxes.append((kind, size))
        offset += size
    return boxes


def test_a_disk_filling_mid_segment_cuts_it_back_to_its_last_complete_fragment(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "size=3m") as disk:
        recorder = RecordStage("eus-1", RecordConfig(dir=disk, codec="libx264", preset="ultrafast", crf=0), 600,
                               fragment_s=0.2)  # fmt: skip
        recorder.setup()
        noise = np.random.default_rng(0)
        with pytest.raises(OutputError, match="No space left|Errno 28"):
            for frame in media.synthetic_frames(2000, size=(320, 240), fps=FPS):  # noise at crf 0: ~100 KiB a frame
                image = noise.integers(0, 256, frame.image.shape, np.uint8)
                list(recorder.process(Frame(frame.stream_id, frame.seq, frame.pts_s, image, frame.decoded_at, fps=FPS)))
        with contextlib.suppress(OutputError):
            recorder.close()
        (segment,) = recorder.segments
        assert [p.name for p in disk.iterdir()] == [segment.name]
        boxes = top_level_boxes(segment)
        assert boxes[-1][0] == b"mdat" and sum(size for _, size in boxes) == segment.stat().st_size
        frames = media.probe_frame_count(segment)
        assert frames > 0
        decoded = subprocess.run(["ffmpeg", "-v", "error", "-i", str(segment), "-f", "null", "-"],
                                 capture_output=True, text=True, timeout=60)  # fmt: skip
        assert decoded.returncode == 0 and decoded.stderr == "", decoded.stderr  # no partial NAL unit


def test_a_crash_left_temporary_of_the_stream_is_removed_and_nothing_else(tmp_path: Path, caplog) -> None:
    """What the recorder (mp4) and the archive (its extensions) remove at start: their stream's hidden temporaries
    that are this user's regular files, by the exact name pattern."""
    for name in (".eus-1_20261206T101010Z_0003.mp4.partial", ".eus-1_20261206T101010Z_0004.ts.partial",
                 ".eus-10_20261206T101010Z_0003.mp4.partial", ".eus-1_20261206T101010Z_0003.mkv.partial",
                 ".eus-1_notes.mp4.partial", "eus-1_20261206T101010Z_0003.mp4"):  # fmt: skip
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".eus-1_20261206T101010Z_0005.mp4.partial").symlink_to(tmp_path / "eus-1_20261206T101010Z_0003.mp4")
    remove_partials(tmp_path, "eus-1", ("mp4", "ts"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".eus-10_20261206T101010Z_0003.mp4.partial", ".eus-1_20261206T101010Z_0003.mkv.partial",
        ".eus-1_20261206T101010Z_0005.mp4.partial", ".eus-1_notes.mp4.partial", "eus-1_20261206T101010Z_0003.mp4",
    ]  # fmt: skip
    assert caplog.text.count("a crash left it before its first fragment") == 2
