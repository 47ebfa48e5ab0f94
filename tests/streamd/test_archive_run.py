"""`streamd run` with streams[].archive: the archive beside the recording and the log, found from each other by
name and seq, every frame in it; an archive on a disk that fills fails alone."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from streamd.ops.metrics import drop_reason
from streamd.stages.archive import ARCHIVE_FAILED
from tests.streamd import media
from tests.streamd.conftest import tmpfs
from tests.streamd.test_pipeline_e2e import jsonl, streamd


def _first_seq(path: Path) -> int:
    command = [media.FFPROBE, "-v", "error", "-of", "json", "-show_entries", "format_tags", str(path)]
    result = subprocess.run(command, check=True, capture_output=True, text=True, timeout=60)
    return int(json.loads(result.stdout)["format"]["tags"]["streamd_first_seq"])


def _run(folder: Path, bundle, clip: Path | str, outputs: str) -> subprocess.Popen:
    """`streamd run` on one stream (`clip`: a file or a URL) with a detection log and `outputs` (YAML flow-mapping entries)."""
    text = f"""
        model: {bundle.path}
        backend: {{type: onnxruntime, threads: 1}}
        streams:
          - {{id: eus-1, source: {clip}, detection_log: {{dir: log}}, {outputs}}}
        """
    return streamd("run", str(media.write_config(folder, text)))


def test_archive_segments_match_the_logs_and_recordings(tmp_path: Path, tiny_bundle, long_clip) -> None:
    # 150 frames at 25 fps, segment_s 2: 3 segments, each starting on a keyframe
    daemon = _run(tmp_path, tiny_bundle, long_clip, "segment_s: 2, record: {dir: rec, preset: ultrafast}, archive: {dir: archive}")
    _, err = daemon.communicate(timeout=120)
    assert daemon.returncode == 0, err
    logs = sorted((tmp_path / "log").glob("*.jsonl"))
    archives = sorted((tmp_path / "archive").glob("*.mp4"))
    recordings = sorted((tmp_path / "rec").glob("*.mp4"))
    assert [p.stem for p in archives] == [p.stem for p in logs] == [p.stem for p in recordings] and len(logs) == 3
    for log, archive in zip(logs, archives, strict=True):
        seqs = [line["seq"] for line in jsonl([log])]
        # the log's first frame is the archive's first: frame k of the archive segment is seq first + k
        assert _first_seq(archive) == seqs[0]
        assert media.probe_frame_count(archive) == len(seqs)
    assert sum(media.probe_frame_count(p) for p in archives) == 150


def test_an_archive_on_a_full_disk_fails_alone(tmp_path: Path, tiny_bundle, long_clip) -> None:
    with tmpfs(tmp_path / "small", "size=48k") as disk:
        daemon = _run(tmp_path, tiny_bundle, long_clip, f"archive: {{dir: {disk}}}")
        out, err = daemon.communicate(timeout=120)
    assert daemon.returncode == 0, err
    assert "the archive failed" in err
    assert [line["seq"] for line in jsonl(sorted((tmp_path / "log").glob("*.jsonl")))] == list(range(150))
    assert drop_reason(ARCHIVE_FAILED) in out  # the end-of-run summary's drops


def test_kill_9_loses_at_most_a_second_of_a_live_archive(tmp_path: Path, tiny_bundle) -> None:
    port = media.free_port()
    sender = media.udp_sender(port, fps=25, gop=10)
    daemon = _run(tmp_path, tiny_bundle, f"udp://127.0.0.1:{port}", "archive: {dir: archive}")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(jsonl(sorted((tmp_path / "log").glob("*.jsonl")))) < 100:
            time.sleep(0.2)
        daemon.send_signal(signal.SIGKILL)
        daemon.communicate(timeout=30)
    finally:
        media.stop(daemon)
        media.stop(sender)
    logged = [line["seq"] for line in jsonl(sorted((tmp_path / "log").glob("*.jsonl")))]
    (archive,) = (tmp_path / "archive").glob("eus-1_*.mp4")
    archived = media.probe_frame_count(archive)  # plays up to its last complete fragment
    # the log is written after inference, behind the source: the archive lost at most 1 s (25 frames) of what it has
    assert len(logged) >= 100 and _first_seq(archive) + archived - 1 >= logged[-1] - 25
