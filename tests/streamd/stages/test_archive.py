"""The archive: real videos (H.264, HEVC) and a real UDP feed through AVSource with an ArchiveTap; the segments
checked with ffprobe (frame counts, keyframes, names, tags) and decoded against the frames the source gave."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import av
import numpy as np
import pytest

from streamd.config import ArchiveConfig, SourceKind
from streamd.ops.metrics import Metrics
from streamd.stages.archive import ARCHIVE_FAILED, ArchiveTap, container_for
from streamd.stages.decode import AVSource
from tests.streamd.media import FFMPEG, FFPROBE, free_port, make_video, probe_frame_count, stop, udp_sender


def _tags(path: Path) -> dict[str, str]:
    result = subprocess.run([FFPROBE, "-v", "error", "-of", "json", "-show_entries", "format_tags", str(path)],
                            check=True, capture_output=True, text=True, timeout=60)  # fmt: skip
    return json.loads(result.stdout)["format"].get("tags", {})


def _source(url: str, kind: SourceKind, tap: ArchiveTap, metrics: Metrics) -> AVSource:
    return AVSource("cam", url, kind=kind, metrics=metrics, archive=tap, timeout_s=5.0)


def _read_all(source: AVSource, limit: int | None = None) -> list:
    frames = []
    source.open()
    while (limit is None or len(frames) < limit) and (frame := source.read()) is not None:
        frames.append(frame)
    source.close()
    return frames


@pytest.mark.parametrize(
    ("codec", "extra"),
    [
        ("libx264", ["-bf", "2"]),  # B-frames: packets in decode order, frames in presentation order
        ("libx265", ["-x265-params", "log-level=error:keyint=25:min-keyint=25:open-gop=0:bframes=2"]),
    ],
)
def test_file_archive_holds_every_decoded_frame_with_the_same_pixels(tmp_path: Path, codec: str, extra: list) -> None:
    video = tmp_path / "in.mp4"
    subprocess.run([FFMPEG, "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25", "-frames:v",
                    "100", "-c:v", codec, "-g", "25", *extra, str(video)], check=True, timeout=120)  # fmt: skip
    metrics = Metrics(["cam"])
    tap = ArchiveTap("cam", ArchiveConfig(dir=tmp_path / "archive"), segment_s=1.0, metrics=metrics)
    frames = _read_all(_source(str(video), SourceKind.FILE, tap, metrics))

    segments = sorted((tmp_path / "archive").iterdir())
    assert segments == tap.segments and len(segments) == 4  # 4 s, a keyframe every second
    assert sum(probe_frame_count(path) for path in segments) == len(frames) == 100
    for index, path in enumerate(segments):
        assert path.name.startswith("cam_") and path.name.endswith(f"_{index:04d}.mp4")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        tags = _tags(path)
        first = frames[int(tags["streamd_first_seq"])]
        assert float(tags["streamd_first_pts_s"]) == pytest.approx(first.pts_s, abs=1e-6)
        with av.open(str(path)) as archived:  # frame k of the segment is the source's frame first_seq + k
            decoded = [f.to_ndarray(format="bgr24") for f in archived.decode(video=0)]
        for k in (0, len(decoded) // 2, len(decoded) - 1):
            np.testing.assert_array_equal(decoded[k], frames[first.seq + k].image)
    assert stat.S_IMODE((tmp_path / "archive").stat().st_mode) == 0o700
    assert not list((tmp_path / "archive").glob(".*"))  # no partial left


def test_live_udp_archive_holds_every_decoded_frame(tmp_path: Path) -> None:
    port = free_port()
    sender = udp_sender(port, fps=25, gop=10)
    try:
        metrics = Metrics(["cam"])
        tap = ArchiveTap("cam", ArchiveConfig(dir=tmp_path / "archive"), segment_s=1.0, metrics=metrics)
        frames = _read_all(_source(f"udp://127.0.0.1:{port}", SourceKind.UDP, tap, metrics), limit=60)
    finally:
        stop(sender)
    assert len(tap.segments) >= 2
    assert sum(probe_frame_count(path) for path in tap.segments) == len(frames) == 60


def test_a_reopen_and_a_loop_start_new_segments(tmp_path: Path) -> None:
    video = make_video(tmp_path / "in.mp4", frames=20, gop=10)
    metrics = Metrics(["cam"])
    tap = ArchiveTap("cam", ArchiveConfig(dir=tmp_path / "archive"), segment_s=600, metrics=metrics)
    source = AVSource("cam", str(video), kind=SourceKind.FILE, metrics=metrics, archive=tap, loop=True)
    source.open()
    frames = [source.read() for _ in range(30)]  # 20, then a loop: 10 more
    source.open()  # a reopen (a reconnect): the next frames are a gap
    frames += [source.read() for _ in range(5)]
    source.close()
    assert [probe_frame_count(path) for path in tap.segments] == [20, 10, 5]
    assert [int(_tags(path)["streamd_first_seq"]) for path in tap.segments] == [0, 20, 30]
    assert [f.seq for f in frames] == list(range(35))


def test_an_unwritable_archive_fails_alone_and_is_retried(tmp_path: Path, read_only: Path) -> None:
    video = make_video(tmp_path / "in.mp4", frames=50, gop=10)
    metrics = Metrics(["cam"])
    tap = ArchiveTap("cam", ArchiveConfig(dir=read_only / "archive"), segment_s=600, metrics=metrics)
    frames = _read_all(_source(str(video), SourceKind.FILE, tap, metrics))
    assert len(frames) == 50  # the source read on
    counts = dict(metrics.counts()[0].counts)
    assert counts["errors"] == 1 and counts[ARCHIVE_FAILED] == 50
    assert tap.segments == []


@pytest.mark.parametrize(
    ("codec", "extradata", "expected"),
    [("h264", True, "mp4"), ("hevc", True, "mp4"), ("h264", False, "mpegts"), ("rawvideo", False, "matroska")],
)
def test_container_for(codec: str, extradata: bool, expected: str) -> None:
    assert container_for(codec, extradata) == expected
