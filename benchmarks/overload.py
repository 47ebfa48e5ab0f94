"""Overload: does a paced stream stay useful when the machine cannot keep up? One table per case.

    .venv/bin/python benchmarks/overload.py [--duration-s 60] [--cases live,live-q8,demo] [--size WxH]
        [--daemon PATH] [--json PATH]

Cases (each one `streamd run` with the shipped model on ONNX Runtime, publishing to a ZeroMQ SUB in this script,
/healthz polled once a second; nothing recorded):
  live     4 live 1080p30 streams (--size another size): ffmpeg sends a 10 s testsrc2 H.264 clip (made first, GOP 1 s, no B-frames)
           with -re -stream_loop -1 as MPEG-TS over UDP to 127.0.0.1; the shipped defaults (a paced stream's
           input queue 1 frame, max_age_ms 150, max_batch 8: a batch with a paced frame holds what half the
           budget fits, streamd.pipeline.queues).
  live-q2  the same with `queue: {size: 2}` (the default for a while in this work).
  live-q8  the same with `queue: {size: 8}` on each stream (the old default).
  live-q1-b4  `queue: {size: 1}` on each stream and `batch: {max_batch: 4}`: the least waiting.
  live-b1, live-b2  the defaults with `batch: {max_batch: 1}` (or 2): batches as small as they get.
  demo     configs/streamd/demo.yaml as shipped (its paths, port and folders moved into the work folder): a file
           read as fast as it decodes beside the same file paced like a camera, until the file ends.
  demo-q2  the demo with the paced stream's queue at the default (no `queue:` line).
--daemon: another streamd executable (a build of an older commit) for an A/B in one session; interleave the runs.
Per stream: frames in, processed, fps, published, dropped by reason (the daemon's summary table),
published/processed (target >= 0.5 for a paced stream), the total latency p50/p99 of every result and its queue
and infer parts (the summary's: decode is the rest, besides the hand-offs) and of the received messages (their latency_ms.total: detections ready), the age at receipt p50/p99/max
(receive time - captured_at + decode: from the packet leaving the demuxer to this subscriber, an upper bound of
the age at the send, which freshness holds to max_age_ms), how many received messages were older than max_age_ms
at receipt, the states the heartbeat (streamd.heartbeat/2) gave the stream (one count per heartbeat) and those
/healthz's body gave it (one count per answer, polled once a second). Per case: /healthz answers by status code.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from datetime import datetime
from pathlib import Path

import yaml
import zmq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.soak import drops, summary_rows  # noqa: E402  (the daemon's end-of-run table, parsed)
from tests.streamd import media  # noqa: E402  (ffmpeg clips, free ports)

STREAMD = REPO / ".venv" / "bin" / "streamd"
LIVE = ("cam-1", "cam-2", "cam-3", "cam-4")
MAX_AGE_MS = 150.0  # streams[].max_age_ms's default


def seconds(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def loop_sender(clip: Path, port: int) -> subprocess.Popen:
    """ffmpeg sending `clip` again and again at its own rate (-re), as MPEG-TS over UDP to 127.0.0.1:port: a live
    camera that costs no encoding (the packets are copied)."""
    return subprocess.Popen(
        [media.FFMPEG, "-hide_banner", "-loglevel", "error", "-re", "-stream_loop", "-1", "-i", str(clip),
         "-c", "copy", "-f", "mpegts", f"udp://127.0.0.1:{port}?pkt_size=1316"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class Subscriber(threading.Thread):
    """A SUB socket on the daemon's endpoint: every detection message's latency and age, every heartbeat's states."""

    def __init__(self, context: zmq.Context, endpoint: str):
        super().__init__(daemon=True, name="subscriber")
        self.socket = context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.RCVHWM, 100_000)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket.connect(endpoint)
        self.total_ms: dict[str, list[float]] = {}
        self.age_ms: dict[str, list[float]] = {}
        self.states: dict[str, Counter] = {}
        self.heartbeats = 0
        self.done = threading.Event()
        self.start()

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        while not self.done.is_set():
            if not poller.poll(200):
                continue
            _topic, payload = self.socket.recv_multipart()
            now = time.time()
            message = json.loads(payload)
            schema = message.get("schema", "")
            if schema.startswith("streamd.heartbeat/"):
                self.heartbeats += 1
                for sid, stream in message["streams"].items():
                    self.states.setdefault(sid, Counter())[stream["state"]] += 1
            elif schema.startswith("streamd.detections/"):
                sid, latency = message["stream"], message["latency_ms"]
                self.total_ms.setdefault(sid, []).append(latency["total"])
                age_ms = (now - seconds(message["captured_at"])) * 1e3 + latency["decode"]
                self.age_ms.setdefault(sid, []).append(age_ms)

    def close(self) -> None:
        self.done.set()
        self.join(5)
        self.socket.close()


def healthz(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, ""


# case -> (streams' queue.size, batch.max_batch): the default, the old 8-frame queue, one frame and small batches
LIVE_CASES = {"live": (None, 8), "live-q2": (2, 8), "live-q8": (8, 8), "live-q1-b4": (1, 4), "live-b1": (None, 1), "live-b2": (None, 2)}


def live_config(
    work: Path, bundle: Path, ports: dict[str, int], queue_size: int | None, max_batch: int = 8, threads: int = 0
) -> dict:
    streams = []
    for sid in LIVE:
        stream = {"id": sid, "source": f"udp://127.0.0.1:{ports[sid]}"}
        if queue_size is not None:
            stream["queue"] = {"size": queue_size}
        streams.append(stream)
    return {"model": str(bundle), "backend": {"type": "onnxruntime", "threads": threads}, "streams": streams,
            "batch": {"max_batch": max_batch, "max_wait_ms": 5}}


def demo_config(work: Path, paced_queue: bool) -> dict:
    """configs/streamd/demo.yaml with its paths absolute, outputs in `work`, and (paced_queue False) no queue line
    on the paced stream."""
    config = yaml.safe_load((REPO / "configs" / "streamd" / "demo.yaml").read_text())
    here = REPO / "configs" / "streamd"
    config["model"] = str((here / config["model"]).resolve())
    for stream in config["streams"]:
        stream["source"] = str((here / stream["source"]).resolve())
        for output in ("record", "detection_log"):
            if output in stream:
                stream[output]["dir"] = str(work / output)
        if stream.get("realtime") and not paced_queue:
            stream.pop("queue", None)
    return config


def run_case(name: str, config: dict, work: Path, duration_s: float | None, daemon_command: Path = STREAMD) -> dict:
    """One `streamd run` of `config` (publish and metrics on free ports), the subscriber and /healthz beside it.
    daemon_command: the streamd executable (another build of it, for an A/B in one session)."""
    endpoint = f"tcp://127.0.0.1:{media.free_port('tcp')}"
    metrics_port = media.free_port("tcp")
    config = {**config, "publish": {"bind": endpoint}, "metrics": {"bind": f"127.0.0.1:{metrics_port}"}}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    context = zmq.Context()
    subscriber = Subscriber(context, endpoint)
    command = [str(daemon_command), "run", str(path)] + (["--duration-s", str(duration_s)] if duration_s else [])
    err_path = work / f"{name}.err"
    answers: Counter = Counter()
    bodies: Counter = Counter()
    with open(err_path, "w") as err:
        daemon = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True)
        reader = threading.Thread(target=lambda: setattr(daemon, "out", daemon.stdout.read()), daemon=True)
        reader.start()
        try:
            url = f"http://127.0.0.1:{metrics_port}/healthz"
            while daemon.poll() is None:
                code, body = healthz(url)
                if code:  # the process's health first, then "stream: state" a line each
                    answers[code] += 1
                    for line in body.splitlines()[1:]:
                        bodies[line.strip()] += 1
                time.sleep(1.0)
            daemon.wait(timeout=120)
            reader.join(10)
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
            time.sleep(0.5)
            subscriber.close()
            context.term()
    stdout = getattr(daemon, "out", "")
    (work / f"{name}.out").write_text(stdout)
    rows = summary_rows(stdout)
    streams = {}
    for sid, row in rows.items():
        processed = int(row["processed"])
        published = int(row["published"].split()[0])
        ages = subscriber.age_ms.get(sid, [])
        budget = config_max_age(config, sid)
        streams[sid] = {
            "frames_in": int(row["in"]), "processed": processed, "published": published,
            "dropped": drops(row["dropped"]),
            "published_per_processed": round(published / processed, 3) if processed else None,
            "received": len(ages), "daemon_total_ms": row.get("total ms", ""), "fps": row.get("fps", ""),
            "daemon_queue_ms": row.get("queue ms", ""), "daemon_infer_ms": row.get("infer ms", ""),
            "total_ms_p50": percentile(subscriber.total_ms.get(sid, []), 50),
            "total_ms_p99": percentile(subscriber.total_ms.get(sid, []), 99),
            "age_ms_p50": _round(percentile(ages, 50)), "age_ms_p99": _round(percentile(ages, 99)),
            "age_ms_max": _round(max(ages) if ages else None), "max_age_ms": budget,
            "older_than_budget": sum(a > budget for a in ages) if budget else None,
            "heartbeat_states": dict(subscriber.states.get(sid, {})),
        }  # fmt: skip
    return {"case": name, "exit_code": daemon.returncode, "streams": streams, "heartbeats": subscriber.heartbeats,
            "healthz": dict(answers), "healthz_states": dict(bodies)}  # fmt: skip


def config_max_age(config: dict, sid: str) -> float | None:
    stream = next(s for s in config["streams"] if s["id"] == sid)
    paced = stream["source"].startswith("udp://") or stream.get("realtime", False)
    return stream.get("max_age_ms", MAX_AGE_MS) if paced else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def table(result: dict) -> str:
    lines = [f"### {result['case']} (exit {result['exit_code']}; {result['heartbeats']} heartbeats; /healthz "
             + ", ".join(f"{code}: {n}" for code, n in sorted(result["healthz"].items())) + ")",
             "| stream | in | processed | fps | published | dropped by reason | pub/proc | all results: total p50/p99 ms "
             "| all results: queue, infer p50/p99 ms | published: total p50/p99 ms "
             "| age at receipt p50/p99/max ms | > max_age | heartbeat states | /healthz states |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for sid, s in result["streams"].items():
        dropped = ", ".join(f"{r} {n}" for r, n in s["dropped"].items()) or "0"
        states = ", ".join(f"{k} {v}" for k, v in sorted(s["heartbeat_states"].items()))
        health = ", ".join(f"{line.partition(': ')[2]} {n}" for line, n in sorted(result["healthz_states"].items())
                           if line.startswith(f"{sid}: "))
        over = "-" if s["older_than_budget"] is None else f"{s['older_than_budget']}/{s['received']}"
        lines.append(f"| {sid} | {s['frames_in']} | {s['processed']} | {s['fps']} | {s['published']} | {dropped} | "
                     f"{s['published_per_processed']} | {s['daemon_total_ms']} | {s['daemon_queue_ms']}, {s['daemon_infer_ms']} | "
                     f"{s['total_ms_p50']}/{s['total_ms_p99']} | "
                     f"{s['age_ms_p50']}/{s['age_ms_p99']}/{s['age_ms_max']} | {over} | {states} | {health} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=60.0, help="How long each live case runs (default 60).")
    parser.add_argument("--cases", default="live,live-q8,demo", help="Comma-separated: live, live-q2, live-q8, live-q1-b4, demo, demo-q2.")
    parser.add_argument("--size", default="1920x1080", help="WIDTHxHEIGHT of the live streams (default 1920x1080).")
    parser.add_argument("--bundle", type=Path, default=REPO / "models" / "bccd-nano.bundle")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    parser.add_argument("--work", type=Path, help="Folder for the clip, configs and logs (default: a temporary one).")
    parser.add_argument("--threads", type=int, default=0,
                        help="ONNX Runtime's threads in the live cases (backend.threads; default 0: one per core).")
    parser.add_argument("--daemon", type=Path, default=STREAMD,
                        help="The streamd executable to run (default .venv/bin/streamd; another build for an A/B).")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="streamd-overload-"))
    work.mkdir(parents=True, exist_ok=True)
    cases = args.cases.split(",")
    results = []
    if any(case.startswith("live") for case in cases):
        width, height = (int(v) for v in args.size.split("x"))
        clip = work / f"{args.size}-30fps.ts"
        if not clip.exists():
            media.make_video(clip, size=(width, height), fps=30, frames=300, gop=30)
    for case in cases:
        if case.startswith("live"):
            ports = {sid: media.free_port("udp") for sid in LIVE}
            senders = [loop_sender(clip, port) for port in ports.values()]
            try:
                queue_size, max_batch = LIVE_CASES[case]
                config = live_config(work, args.bundle.resolve(), ports, queue_size, max_batch, args.threads)
                results.append(run_case(case, config, work, args.duration_s, args.daemon))
            finally:
                for sender in senders:
                    media.stop(sender)
        elif case in ("demo", "demo-q2"):
            if not (REPO / "demo-out" / "bccd-test.mp4").exists():
                subprocess.run(["make", "-C", str(REPO), "sample"], check=True)
            results.append(run_case(case, demo_config(work / case, paced_queue=case == "demo"), work, None, args.daemon))
        else:
            parser.error(f"unknown case {case!r}")
        print(table(results[-1]), flush=True)
        print(flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"(files in {work})", file=sys.stderr)


if __name__ == "__main__":
    main()
