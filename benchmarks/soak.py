"""Soak: `streamd run` with 4 streams for --minutes, faults on a schedule, and one table of what held.

    sudo .venv/bin/python benchmarks/soak.py [--minutes 15] [--fps 10] [--bundle models/bccd-nano.bundle] [--json PATH]

Streams (320x240 at --fps):
  file-1, file-2  the same 10 s clip, loop: true, realtime: true, queue policy block (they must lose nothing),
                  recorded onto a tmpfs;
  live-1, live-2  MPEG-TS over UDP from ffmpeg on 127.0.0.1, each through a relay in this process (so packets
                  can be corrupted), recorded onto the normal disk.
Faults, at fractions of the run so that a short run has them all:
  15 %  live-1's sender stopped for 10 s, then started again (a new ffmpeg)
  30 %  live-2's relay corrupts 5 % of its packets (8 flipped bytes each) for 10 s
  45 %  the recordings' tmpfs is filled up for 20 s, then freed
  65 %  a second subscriber stops reading for 30 s (a stalled subscriber; the first must not notice)
Measured:
  the daemon's RSS (/proc) after warm-up and at the end; frames lost by the file streams (read but never through
  detection: must be 0) and their detection-log lines; each stream's drops by reason; live-1's reconnect time
  (sender back -> the first frame captured after it, in the detection log, and the first message at the
  subscriber: a stale result is logged but not published); the largest message age (receive time - captured_at) per
  stream at the first subscriber, and whether it got every published message; what the stalled subscriber
  missed (what the first got and it did not); /healthz answers that were not 200; and
  every recording segment through ffprobe (playable: ffprobe decodes it without error and finds frames).
The disk fault needs root (a tmpfs mount); without it the file streams record to the normal disk and the
table says the fault was skipped.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

import zmq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from streamd.config import StreamConfig  # noqa: E402
from tests.streamd import media  # noqa: E402  (ffmpeg clips, UDP senders, free ports, ffprobe)

STREAMD = REPO / ".venv" / "bin" / "streamd"
LIVE = ("live-1", "live-2")
FILES = ("file-1", "file-2")


class Relay(threading.Thread):
    """UDP 127.0.0.1:in_port -> 127.0.0.1:out_port; while `corrupt` is set, 5 % of the packets get 8 flipped bytes."""

    def __init__(self, out_port: int):
        super().__init__(daemon=True, name=f"relay:{out_port}")
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.in_port = self.sock.getsockname()[1]
        self.out = ("127.0.0.1", out_port)
        self.corrupt = threading.Event()
        self.corrupted = 0
        self.done = threading.Event()
        self.rng = random.Random(0)
        self.start()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                packet = self.sock.recv(65536)
            except TimeoutError:
                continue
            if self.corrupt.is_set() and self.rng.random() < 0.05:
                data = bytearray(packet)
                for _ in range(8):
                    data[self.rng.randrange(len(data))] ^= 0xFF
                packet = bytes(data)
                self.corrupted += 1
            self.sock.sendto(packet, self.out)


class Subscriber(threading.Thread):
    """A SUB socket on the daemon's endpoint: per stream, the messages received and the largest age.

    stall_at/stall_s: stop reading at that monotonic time for that long (its RCVHWM fills; PUB drops for it).
    """

    def __init__(self, context: zmq.Context, endpoint: str, rcvhwm: int, name: str, rcvbuf: int = -1):
        super().__init__(daemon=True, name=name)
        self.socket = context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.RCVHWM, rcvhwm)
        self.socket.setsockopt(zmq.RCVBUF, rcvbuf)  # -1: the kernel's default (autotuned, megabytes on loopback)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket.connect(endpoint)
        self.count: dict[str, int] = {}
        self.other = 0  # messages that are not detections (heartbeats)
        self.max_age_s: dict[str, float] = {}
        self.first_after: dict[str, float] = {}  # stream -> wall time of its first message after `watch_from`
        self.watch_from: dict[str, float] = {}
        self.stall_at: float | None = None
        self.stall_s = 0.0
        self.done = threading.Event()
        self.start()

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        while not self.done.is_set():
            if self.stall_at is not None and time.monotonic() >= self.stall_at:
                time.sleep(self.stall_s)
                self.stall_at = None
            if not poller.poll(200):
                continue
            _topic, payload = self.socket.recv_multipart()
            now = time.time()
            message = json.loads(payload)
            if not message.get("schema", "").startswith("streamd.detections/"):
                self.other += 1  # a heartbeat
                continue
            sid = message["stream"]
            captured_at = datetime.fromisoformat(message["captured_at"].replace("Z", "+00:00")).timestamp()
            self.count[sid] = self.count.get(sid, 0) + 1
            self.max_age_s[sid] = max(self.max_age_s.get(sid, 0.0), now - captured_at)
            if sid in self.watch_from and sid not in self.first_after and captured_at > self.watch_from[sid]:
                self.first_after[sid] = now

    def close(self) -> None:
        self.done.set()
        self.join(5)
        self.socket.close()


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0


def rss_slope(samples: list[tuple[float, float]]) -> float | None:
    """Least-squares growth of RSS in MiB per hour over (minutes, MiB) samples; None with fewer than 3."""
    if len(samples) < 3:
        return None
    minutes = [m for m, _ in samples]
    mib = [r for _, r in samples]
    mean_m, mean_r = sum(minutes) / len(minutes), sum(mib) / len(mib)
    slope = sum((m - mean_m) * (r - mean_r) for m, r in samples) / sum((m - mean_m) ** 2 for m in minutes)
    return round(slope * 60, 1)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0  # fmt: skip


def fill(folder: Path) -> int:
    """Write a file until the file system is full; its size in bytes."""
    written = 0
    chunk = b"\0" * (1 << 20)
    with open(folder / "filler", "wb") as filler:
        try:
            while True:
                filler.write(chunk)
                filler.flush()
                written += len(chunk)
        except OSError:
            pass
    return written


def summary_rows(stdout: str) -> dict[str, dict[str, str]]:
    """The end-of-run table that `streamd run` prints: stream id -> column -> cell."""
    header = next(line for line in stdout.splitlines() if "┃" in line and "stream" in line)
    columns = [cell.strip() for cell in header.split("┃")[1:-1]]
    rows = {}
    for line in stdout.splitlines():
        if line.count("│") > 5:
            cells = [cell.strip() for cell in line.split("│")[1:-1]]
            rows[cells[0]] = dict(zip(columns, cells))
    return rows


def drops(cell: str) -> dict[str, int]:
    """'record failed 37, input 2' -> {'record failed': 37, 'input': 2}; '0' -> {}."""
    return {m.group(1).strip(): int(m.group(2)) for m in re.finditer(r"([a-z_ ]+?) (\d+)(?:,|$)", cell)}


def playable(path: Path) -> tuple[bool, int]:
    try:
        frames = media.probe_frame_count(path)
    except (subprocess.CalledProcessError, KeyError, IndexError, json.JSONDecodeError):
        return False, 0
    return frames > 0, frames


def write_config(work: Path, bundle: Path, clip: Path, disk: Path, live_ports: dict[str, int],
                 endpoint: str, metrics_port: int) -> Path:  # fmt: skip
    no_stale = "max_age_ms: null, " if "max_age_ms" in StreamConfig.model_fields else ""
    lines = [
        f"model: {bundle}",
        "backend: {type: onnxruntime, threads: 2}",
        "batch: {max_batch: 4, max_wait_ms: 5}",
        "streams:",
    ]
    for sid in FILES:  # paced like a camera, but blocking: a file stream must lose nothing
        lines.append(f"  - {{id: {sid}, source: {clip}, loop: true, realtime: true, queue: {{policy: block}}, "
                     f"{no_stale}segment_s: 60, record: {{dir: {disk / sid}, preset: ultrafast}}, "
                     f"detection_log: {{dir: {work / 'log'}}}}}")  # fmt: skip
    for sid in LIVE:
        lines.append(f"  - {{id: {sid}, source: \"udp://127.0.0.1:{live_ports[sid]}\", segment_s: 60, "
                     f"record: {{dir: {work / 'rec'}, preset: ultrafast}}, detection_log: {{dir: {work / 'log'}}}}}")
    # A small SNDHWM, so that a 30 s stall overflows what ZeroMQ holds for the stalled subscriber.
    lines += [f'publish: {{bind: "{endpoint}", sndhwm: 100}}', f'metrics: {{bind: "127.0.0.1:{metrics_port}"}}']
    path = work / "soak.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def soak(minutes: float, fps: float, bundle: Path, work: Path) -> dict:
    duration_s = minutes * 60
    clip = media.make_video(work / "clip.mp4", size=(320, 240), fps=fps, frames=int(10 * fps), gop=int(fps))
    disk = work / "disk"
    # Room for the whole run's file recordings (about 10 MiB a minute for the two at 320x240): the 60-minute run
    # filled 512 MiB after 49 minutes, and the recordings failed from then on, a fault not on the schedule.
    disk_fault = mount_tmpfs(disk, f"{max(512, int(minutes * 16))}m")
    live_ports = {sid: media.free_port("udp") for sid in LIVE}
    relays = {sid: Relay(live_ports[sid]) for sid in LIVE}
    endpoint = f"tcp://127.0.0.1:{media.free_port('tcp')}"
    metrics_port = media.free_port("tcp")
    config = write_config(work, bundle, clip, disk, live_ports, endpoint, metrics_port)
    senders = {sid: media.udp_sender(relays[sid].in_port, fps=fps, gop=int(fps)) for sid in LIVE}
    context = zmq.Context()
    first = Subscriber(context, endpoint, 100_000, "subscriber")
    stalled = Subscriber(context, endpoint, 10, "stalled-subscriber", rcvbuf=4096)  # little room: the stall bites
    err_path = work / "streamd.err"
    with open(err_path, "w") as err:
        daemon = subprocess.Popen([str(STREAMD), "run", str(config)], stdout=subprocess.PIPE, stderr=err, text=True)
    result: dict = {"minutes": minutes, "fps": fps, "disk_fault": disk_fault}
    try:
        healthz = f"http://127.0.0.1:{metrics_port}/healthz"
        deadline = time.monotonic() + 120
        while get(healthz) != 200:
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"streamd did not start: see {err_path}")
            time.sleep(0.5)
        started = time.monotonic()
        time.sleep(min(10.0, duration_s / 10))  # warm-up done, every stream flowing
        result["rss_start_mib"] = round(rss_mib(daemon.pid), 1)
        stalled.stall_at, stalled.stall_s = started + 0.65 * duration_s, 30.0
        schedule = [
            (0.15, "stop live-1 sender"), (0.15 + 10 / duration_s, "start live-1 sender"),
            (0.30, "corrupt live-2"), (0.30 + 10 / duration_s, "clean live-2"),
            (0.45, "fill disk"), (0.45 + 20 / duration_s, "free disk"),
        ]  # fmt: skip
        unhealthy = 0
        events: dict[str, float] = {}
        rss_samples = [(0.0, result["rss_start_mib"])]  # (minutes since start, MiB), one a minute
        while (now := time.monotonic()) - started < duration_s:
            if now - started >= 60 * len(rss_samples):
                rss_samples.append((round((now - started) / 60, 2), round(rss_mib(daemon.pid), 1)))
            while schedule and now - started >= schedule[0][0] * duration_s:
                _, event = schedule.pop(0)
                events[event] = time.time()
                if event == "stop live-1 sender":
                    media.stop(senders["live-1"])
                elif event == "start live-1 sender":
                    first.watch_from["live-1"] = time.time()
                    senders["live-1"] = media.udp_sender(relays["live-1"].in_port, fps=fps, gop=int(fps))
                elif event == "corrupt live-2":
                    relays["live-2"].corrupt.set()
                elif event == "clean live-2":
                    relays["live-2"].corrupt.clear()
                elif event == "fill disk" and disk_fault:
                    result["disk_filled_mib"] = round(fill(disk) / 2**20)
                elif event == "free disk" and disk_fault:
                    (disk / "filler").unlink()
            if daemon.poll() is not None:
                raise RuntimeError(f"streamd exited with {daemon.returncode} during the soak: see {err_path}")
            unhealthy += get(healthz) != 200
            time.sleep(2.0)
        result["rss_end_mib"] = round(rss_mib(daemon.pid), 1)
        result["rss_samples"] = rss_samples
        result["rss_second_half_mib_per_h"] = rss_slope(rss_samples[len(rss_samples) // 2 :])
        result["healthz_not_200"] = unhealthy
        daemon.send_signal(signal.SIGINT)
        stdout, _ = daemon.communicate(timeout=120)
        result["exit_code"] = daemon.returncode
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        for sender in senders.values():
            media.stop(sender)
        for relay in relays.values():
            relay.done.set()
        first.close()
        stalled.close()
        context.term()
    rows = summary_rows(stdout)
    log_lines: dict[str, int] = {}
    restarted_at = events.get("start live-1 sender", float("inf"))
    first_detection_after: float | None = None  # captured_at of live-1's first logged frame after its sender restarted
    for path in (work / "log").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            message = json.loads(line)
            sid = message["stream"]
            log_lines[sid] = log_lines.get(sid, 0) + 1
            captured_at = datetime.fromisoformat(message["captured_at"].replace("Z", "+00:00")).timestamp()
            if sid == "live-1" and captured_at > restarted_at:
                first_detection_after = min(first_detection_after or captured_at, captured_at)
    streams = {}
    for sid, row in rows.items():
        by_reason = drops(row["dropped"])
        entry = {
            "frames_in": int(row["in"]), "processed": int(row["processed"]), "dropped": by_reason,
            "log_lines": log_lines.get(sid, 0), "outages": int(row.get("outages", row.get("reconnects", "0"))),
            "corrupt_packets": int(row["corrupt"]), "errors": int(row["errors"]),
            "published": int(row["published"].split()[0]), "messages": first.count.get(sid, 0),
            "max_age_ms": round(first.max_age_s.get(sid, 0.0) * 1e3, 1),
            "stalled_subscriber_missed": first.count.get(sid, 0) - stalled.count.get(sid, 0),
        }  # fmt: skip
        if sid in FILES:
            before_detection = {"input", "output", "shutdown", "failed", "stale"}
            entry["frames_lost"] = entry["frames_in"] - entry["processed"] + sum(
                n for reason, n in by_reason.items() if reason in before_detection
            )
        streams[sid] = entry
    result["streams"] = streams
    if "live-1" in first.first_after:
        result["live1_first_message_s"] = round(first.first_after["live-1"] - restarted_at, 2)
    if first_detection_after is not None:
        result["live1_first_detection_s"] = round(first_detection_after - restarted_at, 2)
    result["live2_packets_corrupted"] = relays["live-2"].corrupted
    segments = sorted((work / "rec").glob("*.mp4")) + sorted(disk.glob("*/*.mp4"))
    checked = [(path, *playable(path)) for path in segments]
    result["segments"] = len(checked)
    result["segments_playable"] = sum(ok for _, ok, _ in checked)
    result["unplayable"] = [f"{path.name} ({path.stat().st_size} bytes)" for path, ok, _ in checked if not ok]
    result["recorded_frames"] = sum(frames for _, _, frames in checked)
    if disk_fault:
        subprocess.run(["umount", "-l", str(disk)], check=False)
    return result


def table(result: dict) -> str:
    s = result["streams"]
    rows = [
        ("duration", f"{result['minutes']:g} min, 4 streams 320x240 at {result['fps']:g} fps"),
        ("RSS start -> end", f"{result['rss_start_mib']} MiB -> {result['rss_end_mib']} MiB"),
        ("RSS growth over the second half (least squares, one sample a minute)",
         f"{result['rss_second_half_mib_per_h']} MiB/h" if result.get("rss_second_half_mib_per_h") is not None else "n/a (under 6 min)"),
        ("frames lost, file streams (must be 0)", ", ".join(f"{sid} {s[sid]['frames_lost']}" for sid in FILES)),
        ("file streams: frames in / processed / log lines", "; ".join(
            f"{sid} {s[sid]['frames_in']} / {s[sid]['processed']} / {s[sid]['log_lines']}" for sid in FILES)),
        ("drops by reason", "; ".join(
            f"{sid}: " + (", ".join(f"{r} {n}" for r, n in v["dropped"].items()) or "0") for sid, v in s.items())),
        ("live-1: sender stopped 10 s; back -> first frame decoded / first message",
         f"{result.get('live1_first_detection_s', 'never')} s / {result.get('live1_first_message_s', 'never')} s "
         f"(outages counted: {s['live-1']['outages']})"),
        ("live-2: corrupt packets sent / counted", f"{result['live2_packets_corrupted']} / "
         f"{s['live-2']['corrupt_packets']} (errors {s['live-2']['errors']})"),
        ("disk filled 20 s", f"{result.get('disk_filled_mib', 0)} MiB filler" if result["disk_fault"] else
         "skipped (no tmpfs: not root)"),
        ("max message age at the subscriber", ", ".join(f"{sid} {v['max_age_ms']:.0f} ms" for sid, v in s.items())),
        ("stalled subscriber (30 s): messages it missed", ", ".join(
            f"{sid} {v['stalled_subscriber_missed']}" for sid, v in s.items())),
        ("first subscriber: messages received / published", ", ".join(
            f"{sid} {v['messages']} / {v['published']}" for sid, v in s.items())),
        ("recordings: segments playable (ffprobe)", f"{result['segments_playable']} / {result['segments']}, "
         f"{result['recorded_frames']} frames" + (f"; unplayable: {', '.join(result['unplayable'])}"
                                                   if result["unplayable"] else "")),
        ("/healthz answers not 200 (every 2 s)", str(result["healthz_not_200"])),
        ("exit code after SIGINT", str(result["exit_code"])),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    return "\n".join([f"| {'measure':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"] +
                     [f"| {name:<{width}} | {value} |" for name, value in rows])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=15.0, help="How long the daemon runs (default 15).")
    parser.add_argument("--fps", type=float, default=10.0, help="Frame rate of every stream (default 10).")
    parser.add_argument("--bundle", type=Path, default=REPO / "models" / "bccd-nano.bundle")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    parser.add_argument("--work", type=Path, help="Folder for clips, recordings and logs (default: a temporary one).")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="streamd-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    result = soak(args.minutes, args.fps, args.bundle.resolve(), work)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"(files in {work})", file=sys.stderr)


if __name__ == "__main__":
    main()
