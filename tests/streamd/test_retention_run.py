"""`streamd run` records and logs for longer than its disk holds: retention removes the oldest segments, the
daemon keeps recording, and nothing that is not streamd's is touched (issue 17, Retention)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.streamd import media
from tests.streamd.conftest import tmpfs

DISK_BYTES = 384 * 1024
FRAMES = 400  # 16 s at the clip's 25 fps: about twice the disk's size in recordings and logs
STRANGER_UID = 65534  # nobody


def disk_bytes(paths: list[Path]) -> int:
    return sum(os.lstat(path).st_blocks * 512 for path in paths)


@pytest.mark.slow
@pytest.mark.parametrize(
    "retention, reason",
    [
        ("{max_gb: 0.00015, min_free_gb: 0.00005}", "over max_gb 0.00015"),  # kept under a budget
        # No budget: the disk gets full, or nearly (which, depends on the sweeps' timing), and room is made
        # whenever it has less than 50 kB free; an output stopped by ENOSPC comes back at its retry.
        ("{min_free_gb: 0.00005}", "under min_free_gb 5e-05"),
    ],
)
def test_the_daemon_records_past_its_disks_size(tmp_path: Path, tiny_bundle, long_clip, retention: str, reason: str):
    with tmpfs(tmp_path / "disk", f"size={DISK_BYTES // 1024}k") as disk:
        rec, log = disk / "rec", disk / "log"
        rec.mkdir(mode=0o700)
        log.mkdir(mode=0o700)
        notes = rec / "notes.txt"
        notes.write_text("a stranger's file: not a segment name")
        theirs = rec / "a_20200101T000000Z_0000.mp4"  # a segment's name, older than any, but another user's
        theirs.write_bytes(b"\0" * 4096)
        os.chown(theirs, STRANGER_UID, STRANGER_UID)
        precious = tmp_path / "precious.jsonl"
        precious.write_text("{}\n")
        link = log / "a_20200101T000000Z_0001.jsonl"  # a segment's name, a symlink
        link.symlink_to(precious)
        config = media.write_config(
            tmp_path,
            f"""
            model: {tiny_bundle.path}
            backend: {{type: onnxruntime, threads: 1}}
            retention: {retention}
            streams:
              - id: a
                source: {long_clip}
                loop: true
                realtime: true
                segment_s: 1
                record: {{dir: {rec}, preset: ultrafast}}
                detection_log: {{dir: {log}}}
            """,
        )
        streamd = Path(sys.executable).with_name("streamd")
        result = subprocess.run([str(streamd), "run", str(config), "--max-frames", str(FRAMES)],
                                capture_output=True, text=True, timeout=300)  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert re.search(rf"│ a +│ +{FRAMES} │ +{FRAMES} │", result.stdout), result.stdout
        removed = re.findall(r"retention removed (a_\S+) \((\d+) bytes\): .*" + reason, result.stderr)
        recordings = sorted(path for path in rec.glob("a_*.mp4") if path != theirs)  # oldest first
        logs = sorted(path for path in log.glob("a_*.jsonl") if path != link)
        names = {path.name for path in recordings + logs}
        written = sum(int(size) for _, size in removed) + disk_bytes(recordings + logs)
        assert written > DISK_BYTES, (written, result.stderr)  # recorded and logged past the disk's size
        assert not names & {name for name, _ in removed}
        indices = sorted(int(path.stem.rsplit("_", 1)[1]) for path in recordings)
        assert 0 not in indices and indices[-1] >= 10  # the oldest gone, new segments kept coming
        assert any(name.endswith("_0000.mp4") for name, _ in removed)
        assert any(name.endswith("_0000.jsonl") for name, _ in removed)
        assert media.probe_frame_count(recordings[-1]) >= 1  # the newest plays
        assert media.probe_frame_count(recordings[0]) >= 1
        assert notes.exists() and theirs.exists() and link.is_symlink() and precious.read_text() == "{}\n"
        assert f"retention removed {len(removed)} segment(s)" in result.stderr  # every removal for that reason
