"""Crash loss: kill -9 a recording daemon mid-run; how many seconds of its live stream are not in the recording?

    .venv/bin/python benchmarks/crashloss.py [--fps 10,30] [--kills 3] [--run-s 20] [--size 640x480] [--json PATH]

Per try: ffmpeg sends a testsrc2 H.264 clip (made first, GOP 1 s, no B-frames) with -re -stream_loop -1 as
MPEG-TS over UDP to 127.0.0.1; one `streamd run` with the shipped model on ONNX Runtime records the stream
(record + detection_log, the shipped defaults: paced input queue 2 frames, output queue 8, fragment 0.5 s,
x264 superfast zerolatency); --run-s after its first detection-log line it gets SIGKILL. Then:
  recorded   the last playable frame of the recording (ffprobe -count_frames and its pts; the segment's pts count
             from its first frame, which is the first line of the detection log's segment of the same name) mapped
             to that frame's captured_at in the detection log;
  logged     the last detection-log line's captured_at;
  loss       kill time - captured_at of the last recorded frame: what a crash loses of a live source, whose newest
             decoded frame is at the wall clock (target <= 1 s at any rate); and the same for the detection log;
  files      recording files left (any name, the hidden .partial ones too) and how many have no playable frame.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.overload import loop_sender, seconds  # noqa: E402
from tests.streamd import media  # noqa: E402  (ffmpeg clips, free ports, ffprobe)

STREAMD = REPO / ".venv" / "bin" / "streamd"


def log_lines(folder: Path) -> dict[str, list[dict]]:
    """Detection-log segment base name -> its frames' lines (JSON), in order; a torn last line is skipped."""
    segments = {}
    for path in sorted(folder.glob("*.jsonl")):
        lines = []
        for text in path.read_text().splitlines():
            try:
                line = json.loads(text)
            except json.JSONDecodeError:
                continue
            if line.get("schema", "").startswith("streamd.detections/"):  # not the track events
                lines.append(line)
        segments[path.stem] = lines
    return segments


def try_once(work: Path, clip: Path, fps: float, run_s: float, bundle: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    port = media.free_port("udp")
    config = {
        "model": str(bundle), "backend": {"type": "onnxruntime", "threads": 0},
        "streams": [{"id": "cam", "source": f"udp://127.0.0.1:{port}", "segment_s": 600,
                     "record": {"dir": str(work / "rec")}, "detection_log": {"dir": str(work / "log")}}],
        "publish": {"bind": f"tcp://127.0.0.1:{media.free_port('tcp')}"},
    }  # fmt: skip
    path = work / "streamd.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    sender, daemon = loop_sender(clip, port), None
    try:
        with open(work / "streamd.err", "w") as err:
            daemon = subprocess.Popen([str(STREAMD), "run", str(path)], stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 120
        while not any((work / "log").glob("*.jsonl")) or not any(p.stat().st_size for p in (work / "log").glob("*")):
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"streamd logged nothing: see {work / 'streamd.err'}")
            time.sleep(0.2)
        time.sleep(run_s)
        killed_at = time.time()
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.wait(timeout=30)
    finally:
        if daemon is not None and daemon.poll() is None:  # it failed to log: not left running
            daemon.kill()
            daemon.wait()
        media.stop(sender)
    segments = log_lines(work / "log")
    logged = [line for lines in segments.values() for line in lines]
    files = sorted((work / "rec").glob("*.mp4")) + sorted((work / "rec").glob(".*"))
    recorded_at = None
    empty = 0
    frames_total = 0
    for video in files:
        try:
            frames = media.probe_frame_count(video)
        except (subprocess.CalledProcessError, KeyError, IndexError, json.JSONDecodeError):
            frames = 0
        frames_total += frames
        if not frames:
            empty += 1
            continue
        base = video.name.lstrip(".").removesuffix(".partial").removesuffix(".mp4")
        lines = segments.get(base, [])
        if not lines:
            continue
        last_pts_s = lines[0]["pts"] + max(media.probe_pts(video))
        nearest = min(lines, key=lambda line: abs(line["pts"] - last_pts_s))
        at = seconds(nearest["captured_at"])
        recorded_at = at if recorded_at is None else max(recorded_at, at)
    last_logged = max((seconds(line["captured_at"]) for line in logged), default=None)
    return {
        "fps": fps, "logged_lines": len(logged), "recorded_frames": frames_total,
        "files": len(files), "files_without_frames": empty,
        "loss_recorded_s": None if recorded_at is None else round(killed_at - recorded_at, 2),
        "loss_logged_s": None if last_logged is None else round(killed_at - last_logged, 2),
        "recorded_behind_logged_frames": None if recorded_at is None else
        sum(seconds(line["captured_at"]) > recorded_at for line in logged),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fps", default="10,30", help="Comma-separated frame rates (default 10,30).")
    parser.add_argument("--kills", type=int, default=3, help="Tries per rate (default 3).")
    parser.add_argument("--run-s", type=float, default=20.0, help="Seconds recorded before the kill (default 20).")
    parser.add_argument("--size", default="640x480", help="WIDTHxHEIGHT of the stream (default 640x480).")
    parser.add_argument("--bundle", type=Path, default=REPO / "models" / "bccd-nano.bundle")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    parser.add_argument("--work", type=Path, help="Folder for clips, recordings and logs (default: a temporary one).")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="streamd-crashloss-"))
    width, height = (int(v) for v in args.size.split("x"))
    results = []
    print("| fps | try | log lines | recorded frames | files (no frame) | loss recorded s | loss logged s "
          "| logged after the last recorded |\n|---|---|---|---|---|---|---|---|", flush=True)  # fmt: skip
    for fps in (float(v) for v in args.fps.split(",")):
        clip = media.make_video(work / f"clip-{fps:g}.ts", size=(width, height), fps=fps, frames=int(10 * fps),
                                gop=int(fps))  # fmt: skip
        for index in range(args.kills):
            r = try_once(work / f"{fps:g}fps-{index}", clip, fps, args.run_s, args.bundle.resolve())
            results.append(r)
            print(f"| {fps:g} | {index + 1} | {r['logged_lines']} | {r['recorded_frames']} | {r['files']} "
                  f"({r['files_without_frames']}) | {r['loss_recorded_s']} | {r['loss_logged_s']} | "
                  f"{r['recorded_behind_logged_frames']} |", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"(files in {work})", file=sys.stderr)


if __name__ == "__main__":
    main()
