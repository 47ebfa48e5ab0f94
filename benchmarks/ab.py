"""A/B: the benchmark's two pipeline rows for an earlier commit and the working tree, alternating, in one session.

    .venv/bin/python benchmarks/ab.py adda376 [--rounds 3]

On a shared, noisy machine two runs of bench.py an hour apart differ by more
than most changes do; alternating the two versions round by round on the
same input puts them under the same noise. Each measurement is its own
process (the version's own `streamd` first on sys.path); the table shows the
mean of each row and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench  # noqa: E402

_ONE = r"""
import json, sys, tempfile
from pathlib import Path
repo = Path(sys.argv[1])
sys.path[:0] = [str(repo), str(repo / "benchmarks")]
import bench
with tempfile.TemporaryDirectory() as tmp:
    result = bench.bench_pipeline(Path(tmp), repo / "models" / "bccd-nano.bundle", Path(sys.argv[2]), 4, 5.0, 0,
                                  record=sys.argv[3] == "1")
print(json.dumps(result))
"""


def measure(repo: Path, video: Path, record: bool) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _ONE, str(repo), str(video), "1" if record else "0"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""}, timeout=600,
    )  # fmt: skip
    if out.returncode:
        raise RuntimeError(f"{repo}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["fps"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev", help="the earlier commit to compare with the working tree")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="streamd-ab-") as tmp:
        folder = Path(tmp)
        old = folder / "old"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(old), args.rev], check=True)
        (folder / "shared").symlink_to(REPO.parent / "shared")  # the worktree's ../shared, for its BCCD paths
        try:
            video = bench.make_video(folder / "bccd-720p.mp4", "1280x720", 20)
            fps: dict[tuple[str, bool], list[float]] = {}
            for round_ in range(args.rounds):
                for name, repo in ((args.rev, old), ("working tree", REPO)):
                    for record in (False, True):
                        value = measure(repo, video, record)
                        fps.setdefault((name, record), []).append(value)
                        print(f"round {round_}: {name}, {'recording' if record else 'no recording'}: {value:.1f} fps",
                              flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old)], check=False)
    print(f"\n| pipeline row, 720p file | {args.rev} | working tree | ratio |\n|---|---|---|---|")
    for record in (False, True):
        before, after = statistics.mean(fps[(args.rev, record)]), statistics.mean(fps[("working tree", record)])
        label = "with recording and log" if record else "no recording"
        print(f"| {label} | {before:.1f} fps | {after:.1f} fps | {after / before:.2f}x |")


if __name__ == "__main__":
    main()
