"""streamd.stages.record: H.264 segments checked with ffprobe, segment rules, and a recorder killed with SIGKILL."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from streamd.config import RecordConfig, StreamConfig
from streamd.errors import OutputError
from streamd.ops.metrics import Metrics
from streamd.stages.annotate import AnnotateStage
from streamd.stages.decode import open_source
from streamd.stages.record import RecordStage, choose_codec
from streamd.types import Frame
from tests.streamd import media

FPS = 25


def recorder_for(directory: Path, segment_s: float = 600, *, stream_id: str = "eus-1", fragment_s: float = 1.0,
                 **settings) -> RecordStage:  # fmt: skip
    """A RecordStage with the stream's `record` settings as the config gives them."""
    return RecordStage(stream_id, RecordConfig(dir=directory, **settings), segment_s, fragment_s=fragment_s)


def record(frames: list[Frame], directory: Path, segment_s: float = 600, **settings) -> RecordStage:
    """Frames -> results -> annotate -> record, the way the pipeline chains them."""
    annotate = AnnotateStage(media.MODEL.class_names)
    recorder = recorder_for(directory, segment_s, **settings)
    recorder.setup()
    try:
        for frame in frames:
            for annotated in annotate.process(media.frame_result(frame)):
                assert list(recorder.process(annotated)) == [annotated]  # passes its input on
    finally:
        recorder.close()
    return recorder


def assert_segment(path: Path, frames: int, size: tuple[int, int], fps: float = FPS) -> None:
    stream = media.probe_stream(path)
    assert (stream["codec_name"], stream["pix_fmt"]) == ("h264", "yuv420p")
    assert (stream["width"], stream["height"]) == size
    assert Fraction(stream["avg_frame_rate"]) == pytest.approx(fps, rel=0.01)
    assert media.probe_frame_count(path) == frames
    pts = media.probe_pts(path)
    assert len(pts) == frames and pts[0] == pytest.approx(0, abs=1e-3)
    assert np.all(np.diff(pts) > 0)
    assert media.probe_duration(path) == pytest.approx(frames / fps, abs=1.5 / fps)


def test_file_source_n_frames_give_n_recorded_frames(tmp_path: Path) -> None:
    clip = media.make_video(tmp_path / "clip.mp4", size=(320, 240), fps=FPS, frames=40)
    source = open_source(StreamConfig(id="eus-1", source=str(clip)), Metrics(["eus-1"]))
    source.open()
    frames = []
    while (frame := source.read()) is not None:
        frames.append(frame)
    source.close()
    recorder = record(frames, tmp_path / "rec")
    assert len(recorder.segments) == 1
    assert recorder.segments[0].name.startswith("eus-1_") and recorder.segments[0].suffix == ".mp4"
    assert_segment(recorder.segments[0], 40, (320, 240))


@pytest.mark.parametrize(
    ("container", "segment_s", "count", "expected_frames"),
    [
        ("mp4", 1.0, 60, [25, 25, 10]),
        ("mkv", 0.8, 50, [20, 20, 10]),
        ("mp4", 600, 30, [30]),
    ],
)
def test_segments_split_on_source_time(
    tmp_path: Path, container: str, segment_s: float, count: int, expected_frames: list[int]
) -> None:
    recorder = record(list(media.synthetic_frames(count, fps=FPS)), tmp_path, segment_s, container=container, codec="libx264")
    assert [p.suffix for p in recorder.segments] == [f".{container}"] * len(expected_frames)
    assert [p.stem[-4:] for p in recorder.segments] == [f"{i:04d}" for i in range(len(expected_frames))]
    assert sorted(tmp_path.iterdir()) == sorted(recorder.segments)
    for path, frames in zip(recorder.segments, expected_frames):
        assert_segment(path, frames, (160, 120))


def test_odd_size_and_stalled_pts(tmp_path: Path) -> None:
    """161x121 is cropped to 160x120; pts that repeat or go back are bumped, never dropped."""
    pts = [0.0, 0.04, 0.04, 0.03, 0.16, 0.2]
    recorder = record(list(media.synthetic_frames(len(pts), size=(161, 121), pts_s=pts)), tmp_path, codec="libx264")
    path = recorder.segments[0]
    assert media.probe_frame_count(path) == len(pts)
    stream = media.probe_stream(path)
    assert (stream["width"], stream["height"]) == (160, 120)
    probed = media.probe_pts(path)
    assert np.all(np.diff(probed) > 0)
    assert probed[-1] == pytest.approx(0.2, abs=1e-3)  # the source time line is kept


def test_recorder_rejects_other_streams_and_types(tmp_path: Path) -> None:
    recorder = recorder_for(tmp_path)
    recorder.setup()
    with pytest.raises(OutputError, match="stream 'eus-2'"):
        list(recorder.process(next(media.synthetic_frames(1, stream_id="eus-2"))))
    with pytest.raises(TypeError, match="AnnotatedFrame"):
        list(recorder.process("frame"))
    recorder.close()
    assert recorder.segments == []


@pytest.mark.parametrize(("codec", "expected"), [("libx264", "libx264"), ("h264_nvenc", "h264_nvenc")])
def test_choose_codec(codec: str, expected: str) -> None:
    assert choose_codec(codec) == expected
    assert choose_codec("auto") in ("h264_nvenc", "libx264")


# Records FRAMES synthetic frames at FPS as fast as it can, says so, then waits to be killed (so the parent
# knows exactly how many frames the recorder had been handed when the SIGKILL came).
_RECORDER = """
import sys, time
from pathlib import Path
import numpy as np
from streamd.config import RecordConfig
from streamd.stages.record import RecordStage
from streamd.types import Frame

folder, container, fps, frames = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
recorder = RecordStage("eus-1", RecordConfig(dir=folder, container=container, codec="libx264"), 600)
recorder.setup()
for seq in range(frames):
    image = np.full((120, 160, 3), seq % 256, np.uint8)
    list(recorder.process(Frame("eus-1", seq, seq / fps, image, decoded_at=1.8e9 + seq / fps, fps=fps)))
print(frames, flush=True)
time.sleep(3600)
"""


def record_then_kill(folder: Path, container: str, fps: float, frames: int) -> tuple[int, subprocess.CompletedProcess]:
    """Have a recorder process write `frames` frames, then SIGKILL it; (frames it was handed, process)."""
    process = subprocess.Popen(
        [sys.executable, "-c", _RECORDER, str(folder), container, str(fps), str(frames)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    written = -1
    try:
        written = int(process.stdout.readline() or -1)  # every frame handed over; the process now only waits
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        process.stdout.close()
        stderr = process.stderr.read()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL, stderr
    return written, process


@pytest.mark.parametrize(("container", "fps"), [("mp4", 10), ("mp4", 30), ("mkv", 10), ("mkv", 30)])
def test_sigkill_loses_at_most_one_second_and_leaves_a_playable_file(tmp_path: Path, container: str, fps: int) -> None:
    written, _ = record_then_kill(tmp_path, container, fps, frames=5 * fps)  # 5 s of video
    (path,) = tmp_path.iterdir()
    assert path.suffix == f".{container}"
    assert media.probe_codec(path) == "h264"
    on_disk = media.probe_frame_count(path)
    assert written - fps <= on_disk <= written  # at most 1 s of video lost, whatever the frame rate


def test_a_segment_killed_before_its_first_fragment_is_removed_at_the_next_start(tmp_path: Path) -> None:
    """Until its first fragment a segment is a hidden temporary: no file under a recording's name without a frame."""
    written, _ = record_then_kill(tmp_path, "mp4", 10, frames=1)
    (empty,) = tmp_path.iterdir()
    assert empty.name.startswith(".eus-1_") and empty.name.endswith(".mp4.partial")
    assert written == 1 and media.probe_frame_count(empty) == 0  # a header and nothing to play
    recorder = recorder_for(tmp_path)
    recorder.setup()
    assert list(tmp_path.iterdir()) == []
    recorder.close()


def test_a_full_disk_is_an_output_error_and_setup_again_starts_a_new_segment(small_disk: Path, tmp_path: Path) -> None:
    """What the runner does with a failed output: close it, set it up again later, go on in a new segment."""
    recorder = recorder_for(small_disk, codec="libx264", preset="ultrafast", crf=0)
    recorder.setup()
    frames = media.synthetic_frames(2000, size=(320, 240), fps=FPS)
    noise = np.random.default_rng(0)
    with pytest.raises(OutputError, match=f"stream 'eus-1'.*{small_disk}") as failed:
        for frame in frames:  # noisy frames at crf 0: the 256 KiB disk is full after a few
            image = noise.integers(0, 256, frame.image.shape, np.uint8)
            list(recorder.process(Frame(frame.stream_id, frame.seq, frame.pts_s, image, frame.decoded_at, fps=FPS)))
    assert "No space left" in str(failed.value) or "Errno 28" in str(failed.value)
    with contextlib.suppress(OutputError):  # the final flush into a full disk may fail too
        recorder.close()  # either way the stage is closed
    for path in small_disk.iterdir():
        path.unlink()  # space comes back
    recorder.setup()
    for frame in media.synthetic_frames(5, size=(320, 240), fps=FPS, pts_s=[10.0 + n / FPS for n in range(5)]):
        list(recorder.process(frame))
    recorder.close()
    (path,) = small_disk.iterdir()
    assert path.stem.endswith("_0001")  # a new segment, never a splice across the frames it could not write
    assert media.probe_frame_count(path) == 5


def test_a_disk_still_full_leaves_no_empty_segment_behind(small_disk: Path) -> None:
    """A recorder retried on a disk that is still full: the segment it could not start (0 bytes), and at close
    one without a complete fragment, are removed at once, not left unplayable until a next start that may not come."""
    (small_disk / "filler").write_bytes(b"\0" * (small_disk_free(small_disk) - 512))
    recorder = recorder_for(small_disk, codec="libx264", preset="ultrafast")
    recorder.setup()
    (frame,) = media.synthetic_frames(1, size=(320, 240), fps=FPS)
    with pytest.raises(OutputError, match="cannot (start recording|write)"):
        for _ in range(50):
            list(recorder.process(frame))
    with contextlib.suppress(OutputError):
        recorder.close()
    assert [path.name for path in small_disk.iterdir()] == ["filler"]


def small_disk_free(folder: Path) -> int:
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize
