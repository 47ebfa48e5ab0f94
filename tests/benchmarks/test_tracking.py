"""benchmarks/tracking.py --quick: the tables' rows and counts (not speed, not scores: the machine is shared)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "models" / "bccd-nano.bundle"
BCCD = REPO.parent / "shared" / "datasets" / "BCCD"


def rows(output: str, header: str) -> list[list[str]]:
    """The cells of the table whose header row starts with `header`, without the header and rule."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header}"))
    body = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        body.append([cell.strip() for cell in line.strip("|").split("|")])
    return body


@pytest.mark.skipif(not (BUNDLE.is_dir() and BCCD.is_dir()), reason="needs the shipped bundle and BCCD")
def test_quick_run_prints_both_tables() -> None:
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "tracking.py"), "--quick"], capture_output=True,
                          text=True, timeout=600, check=True)
    assert re.search(r"3 sequences, 320 frames, [\d.]+ boxes a frame", done.stdout)
    settings = rows(done.stdout, "setting")
    assert [row[0] for row in settings] == [
        "ByteTrack, trackers' thresholds (0.7/0.6), no confirmation",
        "ByteTrack, ours, no confirmation",
        "ByteTrack, ours, confirm 2 of 3 at 0.5 (default)",
    ]
    assert all(len(row) == 13 for row in settings)
    for row in settings:
        assert 0.0 <= float(row[1]) <= 1.0 and row[2].endswith("%") and int(row[7]) >= 0
    sequences = rows(done.stdout, "sequence")
    assert [(row[0], row[1]) for row in sequences] == [("pan 30 fps", "120"), ("shake", "120"), ("freeze + drops", "80")]
