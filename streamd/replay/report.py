"""The replay's report: OUT/report.json (the figures) and OUT/report.html (the same, to look at).

The HTML is one self-contained file that opens offline: no script, no external request; its plots are inline
SVG drawn here, its thumbnails inline JPEG (data: URIs) cut from the source's own frames with PyAV.
"""

from __future__ import annotations

import base64
import html
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import cv2
import numpy as np

from streamd.replay.compare import IOU_THRESHOLD, FrameAgreement, Finding, frame_agreement, only_findings
from streamd.replay.logs import ModelLog, Track, read_model_log
from streamd.replay.run import ModelRun, ReplaySource
from streamd.replay.truth import TruthFrame, judged_frames, track_verdicts, truth_figures

SCHEMA = "streamd.replay-report/1"
THUMB_PX = 160  # a thumbnail's longer side
COLOURS = ("#1f77b4", "#ff7f0e")  # model A, model B
PLOT_W, LANE_H, LABEL_W = 860, 14, 150


@dataclass(frozen=True)
class Report:
    """The report's figures (`data`, written as report.json) and what the HTML shows beside them."""

    data: dict
    logs: tuple[ModelLog, ...]
    agreement: tuple[FrameAgreement, ...]
    findings: tuple[Finding, ...]


def build_report(
    runs: Sequence[ModelRun], sources: Sequence[ReplaySource], backend: str,
    truth: tuple[TruthFrame, ...] | None = None, truth_path: Path | None = None,
) -> Report:  # fmt: skip
    """Read each run's logs and compute the figures: per model, per frame (two models), per finding, per truth."""
    logs = tuple(read_model_log(run.name, run.log_dir) for run in runs)
    models = [_model_figures(run, log) for run, log in zip(runs, logs)]
    data: dict = {
        "schema": SCHEMA,
        "backend": backend,
        "iou_threshold": IOU_THRESHOLD,
        "sources": [{"stream": s.stream_id, "path": str(s.path)} for s in sources],
        "models": models,
    }
    agreement: tuple[FrameAgreement, ...] = ()
    findings: tuple[Finding, ...] = ()
    if len(logs) == 2:
        a, b = logs
        agreement = frame_agreement(a, b)
        findings = only_findings(a, b) + only_findings(b, a)
        data["agreement"] = {
            "a": a.name, "b": b.name, "frames": len(agreement),
            "frames_agreeing": sum(r.only_a == 0 and r.only_b == 0 for r in agreement),
            "matched": sum(r.matched for r in agreement),
            "only_a": sum(r.only_a for r in agreement),
            "only_b": sum(r.only_b for r in agreement),
            "per_frame": [
                {"stream": r.stream_id, "seq": r.seq, "pts": r.pts_s, "matched": r.matched, "only_a": r.only_a,
                 "only_b": r.only_b}
                for r in agreement
            ],
        }  # fmt: skip
        data["findings_only_one_model"] = [_finding_record(f) for f in findings]
    if truth is not None:
        class_names = runs[0].class_names
        data["truth"] = {
            "file": str(truth_path),
            "frames": len(truth),
            "models": {log.name: truth_figures(truth, log, class_names) for log in logs},
        }
        verdicts = {log.name: track_verdicts(judged_frames(truth, log), log) for log in logs}
        for finding, record in zip(findings, data.get("findings_only_one_model", ())):
            record["in_truth"] = verdicts[finding.model].get((finding.track.stream_id, finding.track.track_id))
    return Report(data, logs, agreement, findings)


def _model_figures(run: ModelRun, log: ModelLog) -> dict:
    detections: Counter[str] = Counter()
    for frames in log.frames.values():
        for frame in frames:
            detections.update(run.class_names[int(c)] for c in frame.class_id)
    tracks = Counter(track.label for tracks in log.tracks.values() for track in tracks)
    return {
        "name": run.name, "sha256": run.sha256, "bundle": str(run.bundle), "log_dir": str(run.log_dir),
        "frames": log.num_frames, "wall_s": round(run.duration_s, 3), "pipeline_s": round(run.pipeline_s, 3),
        "fps": round(run.fps, 2),
        "stopped_by": run.stopped_by, "errors": list(run.errors),
        "detections_per_class": {name: detections[name] for name in run.class_names},
        "tracks_per_class": {name: tracks[name] for name in run.class_names},
    }  # fmt: skip


def _finding_record(finding: Finding) -> dict:
    track = finding.track
    return {
        "model": finding.model, "stream": track.stream_id, "track_id": track.track_id, "label": track.label,
        "first_pts": track.first_pts_s, "last_pts": track.last_pts_s,
        "duration_s": round(track.last_pts_s - track.first_pts_s, 6), "frames": track.frames,
        "best_score": track.best_score, "thumbnail": {"seq": finding.best_seq, "pts": finding.best_pts_s,
                                                       "box": list(finding.best_xyxy)},
    }  # fmt: skip


def write_report(report: Report, out_dir: Path, sources: Sequence[ReplaySource]) -> tuple[Path, Path]:
    """OUT/report.json and OUT/report.html; their paths."""
    json_path, html_path = out_dir / "report.json", out_dir / "report.html"
    json_path.write_text(json.dumps(report.data, indent=1) + "\n")
    thumbs = thumbnails(report.findings, {s.stream_id: s.path for s in sources})
    html_path.write_text(render_html(report, thumbs))
    return json_path, html_path


def thumbnails(findings: Sequence[Finding], paths: dict[str, Path]) -> dict[Finding, str]:
    """A JPEG data: URI per finding: its best frame decoded from the source (frame number = the log's seq), cut
    around its box (the box and as much again around it), the box drawn, the longer side THUMB_PX."""
    wanted: dict[str, dict[int, list[Finding]]] = {}
    for finding in findings:
        wanted.setdefault(finding.track.stream_id, {}).setdefault(finding.best_seq, []).append(finding)
    uris: dict[Finding, str] = {}
    for stream_id, by_seq in wanted.items():
        last = max(by_seq)
        with av.open(str(paths[stream_id])) as container:
            for seq, av_frame in enumerate(container.decode(video=0)):
                for finding in by_seq.get(seq, ()):
                    uris[finding] = _thumbnail(av_frame.to_ndarray(format="bgr24"), finding.best_xyxy)
                if seq >= last:
                    break
    return uris


def _thumbnail(image: np.ndarray, xyxy: tuple[float, float, float, float]) -> str:
    height, width = image.shape[:2]
    x1, y1, x2, y2 = xyxy
    pad_x, pad_y = max((x2 - x1) / 2, 16), max((y2 - y1) / 2, 16)
    left, top = int(max(0, x1 - pad_x)), int(max(0, y1 - pad_y))
    right, bottom = int(min(width, x2 + pad_x)), int(min(height, y2 + pad_y))
    crop = image[top:bottom, left:right].copy()
    cv2.rectangle(crop, (int(x1) - left, int(y1) - top), (int(x2) - left, int(y2) - top), (0, 255, 255), 2)
    scale = THUMB_PX / max(crop.shape[:2])
    crop = cv2.resize(crop, (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale))),
                      interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)  # fmt: skip
    ok, jpeg = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise ValueError(f"thumbnail of box {xyxy}: JPEG encoding failed")
    return "data:image/jpeg;base64," + base64.b64encode(jpeg.tobytes()).decode()


def render_html(report: Report, thumbs: dict[Finding, str]) -> str:
    """The report as one HTML page: no script, every asset inline."""
    data, e = report.data, html.escape
    names = [m["name"] for m in data["models"]]
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>streamd replay: "
        + e(" vs ".join(names)) + "</title><style>" + _CSS + "</style></head><body>",
        f"<h1>streamd replay: {' vs '.join(_model_label(n, i) for i, n in enumerate(names))}</h1>",
        "<p>Sources: " + ", ".join(f"<code>{e(s['stream'])}</code> ({e(s['path'])})" for s in data["sources"])
        + f". Backend {e(data['backend'])}. Boxes agree when their class is the same and IoU &ge; "
        f"{data['iou_threshold']}.</p>",
        "<h2>Models</h2>", _models_table(data["models"]),
    ]
    if "agreement" in data:
        agreement = data["agreement"]
        parts += [
            "<h2>Agreement per frame</h2>",
            f"<p>{agreement['frames_agreeing']} of {agreement['frames']} frames agree box for box; boxes matched "
            f"{agreement['matched']}, only {e(agreement['a'])} {agreement['only_a']}, only {e(agreement['b'])} "
            f"{agreement['only_b']}.</p>",
        ]
        for stream_id in sorted({r.stream_id for r in report.agreement}):
            parts.append(_agreement_svg(stream_id, [r for r in report.agreement if r.stream_id == stream_id], names))
    parts.append("<h2>What each model saw: confirmed tracks per class</h2>")
    class_names = list(data["models"][0]["tracks_per_class"])
    only = {(f.model, f.track.stream_id, f.track.track_id) for f in report.findings}
    for stream_id in sorted({s for log in report.logs for s in log.frames}):
        parts.append(_timeline_svg(stream_id, report.logs, class_names, only))
    if "findings_only_one_model" in data:
        verdicts = [record.get("in_truth", "") for record in data["findings_only_one_model"]]
        parts += ["<h2>Findings only one model made</h2>", _findings_table(report.findings, thumbs, names, verdicts)]
    if "truth" in data:
        parts += ["<h2>Against the ground truth</h2>", _truth_table(data["truth"], class_names)]
    parts.append("</body></html>\n")
    return "\n".join(parts)


_CSS = (
    "body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}"
    "table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
    "th:first-child,td:first-child{text-align:left}svg{display:block;margin:8px 0}"
    ".a{color:" + COLOURS[0] + "}.b{color:" + COLOURS[1] + "}img{display:block}"
)


def _model_label(name: str, index: int) -> str:
    return f'<span class="{"ab"[index]}">{html.escape(name)}</span>'


def _models_table(models: list[dict]) -> str:
    classes = list(models[0]["detections_per_class"])
    head = "<tr><th>model</th><th>frames</th><th>frames/s</th>" + "".join(
        f"<th>{html.escape(c)} boxes</th><th>{html.escape(c)} tracks</th>" for c in classes
    ) + "<th>ended by</th></tr>"
    rows = "".join(
        f"<tr><td>{_model_label(m['name'], i)}</td><td>{m['frames']}</td><td>{m['fps']}</td>"
        + "".join(f"<td>{m['detections_per_class'][c]}</td><td>{m['tracks_per_class'][c]}</td>" for c in classes)
        + f"<td>{html.escape(m['stopped_by'])}</td></tr>"
        for i, m in enumerate(models)
    )
    return f"<table>{head}{rows}</table>"


def _time_axis(t0: float, t1: float, top: float, height: float) -> tuple[list[str], Callable[[float], float]]:
    """Tick marks every 'nice' number of seconds between t0 and t1, and the pts -> x mapping."""
    span = max(t1 - t0, 1e-6)

    def x_of(t: float) -> float:
        return LABEL_W + (t - t0) / span * (PLOT_W - LABEL_W - 10)

    step = next(s for s in (0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 1e9) if span / s <= 10)
    ticks, t = [], np.ceil(t0 / step) * step
    while t <= t1 + 1e-9:
        x = x_of(t)
        ticks.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + height}" stroke="#ddd"/>'
                     f'<text x="{x:.1f}" y="{top + height + 12}" font-size="10" text-anchor="middle">{t:g} s</text>')
        t += step
    return ticks, x_of


def _agreement_svg(stream_id: str, rows: list[FrameAgreement], names: list[str]) -> str:
    """Boxes per frame over time: matched (grey), only A, only B."""
    height, top = 120, 16
    times = [r.pts_s for r in rows]
    peak = max(max(r.matched, r.only_a, r.only_b) for r in rows) or 1
    ticks, x_of = _time_axis(times[0], times[-1], top, height)
    lines = []
    for field, colour, label in (("matched", "#888", "matched"), ("only_a", COLOURS[0], f"only {names[0]}"),
                                 ("only_b", COLOURS[1], f"only {names[1]}")):  # fmt: skip
        points = " ".join(f"{x_of(r.pts_s):.1f},{top + height - getattr(r, field) / peak * height:.1f}" for r in rows)
        lines.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{points}">'
                     f"<title>{html.escape(label)}</title></polyline>")
    legend = "".join(
        f'<text x="4" y="{top + 14 + 16 * i}" font-size="11" fill="{c}">{html.escape(t)}</text>'
        for i, (c, t) in enumerate((("#888", "matched"), (COLOURS[0], f"only {names[0]}"),
                                    (COLOURS[1], f"only {names[1]}")))
    )  # fmt: skip
    return (f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{PLOT_W}" height="{height + top + 20}" '
            f'role="img" aria-label="agreement per frame, {html.escape(stream_id)}">'
            f'<text x="4" y="11" font-size="12" font-weight="bold">{html.escape(stream_id)}: boxes per frame '
            f"(0 to {peak})</text>{legend}{''.join(ticks)}{''.join(lines)}</svg>")


def _timeline_svg(stream_id: str, logs: Sequence[ModelLog], class_names: list[str], only: set) -> str:
    """One lane per class and model: a bar per confirmed track over its time range; a track only that model made
    is outlined in red."""
    times = [f.pts_s for log in logs for f in log.frames.get(stream_id, ())]
    top = 18
    height = len(class_names) * (len(logs) * LANE_H + 8)
    ticks, x_of = _time_axis(min(times), max(times), top, height)
    shapes, y = [], top
    for class_id, name in enumerate(class_names):
        for index, log in enumerate(logs):
            shapes.append(f'<text x="4" y="{y + LANE_H - 3}" font-size="11" fill="{COLOURS[index]}">'
                          f"{html.escape(name)} &middot; {html.escape(log.name)}</text>")
            for track in log.tracks.get(stream_id, ()):
                if track.class_id == class_id:
                    alone = (log.name, stream_id, track.track_id) in only
                    shapes.append(_track_bar(track, log.name, x_of, y, index, alone))
            y += LANE_H
        y += 8
    return (f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{PLOT_W}" height="{y + 20}" role="img" '
            f'aria-label="timeline, {html.escape(stream_id)}"><text x="4" y="12" font-size="12" font-weight="bold">'
            f"{html.escape(stream_id)}</text>{''.join(ticks)}{''.join(shapes)}</svg>")


def _track_bar(track: Track, model: str, x_of, y: float, index: int, only: bool) -> str:
    x1, x2 = x_of(track.first_pts_s), x_of(track.last_pts_s)
    outline = ' stroke="#d62728" stroke-width="2"' if only else ""
    title = (f"{model}: track {track.track_id} {track.label} {track.first_pts_s:.2f}-{track.last_pts_s:.2f} s, "
             f"best {track.best_score:.2f}" + (", only this model" if only else ""))
    return (f'<rect x="{x1:.1f}" y="{y + 2}" width="{max(x2 - x1, 2):.1f}" height="{LANE_H - 4}" '
            f'fill="{COLOURS[index]}" fill-opacity="0.4"{outline}><title>{html.escape(title)}</title></rect>')


def _thumb_cell(finding: Finding, thumbs: dict[Finding, str]) -> str:
    """The finding's thumbnail, or why there is none (its frame is past what the source decodes now: changed since?)."""
    if finding not in thumbs:
        return "no frame: the source no longer decodes that far"
    return f'<img alt="{html.escape(finding.track.label)} at {finding.best_pts_s:.2f} s" src="{thumbs[finding]}">'


def _findings_table(findings: Sequence[Finding], thumbs: dict[Finding, str], names: list[str], verdicts: list) -> str:
    """A row per finding; verdicts: per finding True (an object of the truth), False (a false alarm), None (on no
    annotated frame), "" (no truth given: no column)."""
    if not findings:
        return "<p>None: every confirmed track of each model was seen by the other.</p>"
    with_truth = any(v != "" for v in verdicts)
    shown = {True: "object", False: "false alarm", None: "not annotated"}
    rows = "".join(
        f"<tr><td>{_model_label(f.model, names.index(f.model))}</td><td>{html.escape(f.track.stream_id)}</td>"
        f"<td>{f.track.track_id}</td><td>{html.escape(f.track.label)}</td>"
        f"<td>{f.track.first_pts_s:.2f} &ndash; {f.track.last_pts_s:.2f} s</td><td>{f.track.frames}</td>"
        f"<td>{f.track.best_score:.2f}</td><td>{_thumb_cell(f, thumbs)}</td>"
        + (f"<td>{shown[v]}</td>" if with_truth else "") + "</tr>"
        for f, v in zip(findings, verdicts)
    )
    return ("<table><tr><th>only</th><th>stream</th><th>track</th><th>class</th><th>time</th><th>frames</th>"
            "<th>best score</th><th>best frame</th>" + ("<th>in the truth</th>" if with_truth else "")
            + f"</tr>{rows}</table>")


def _truth_table(truth: dict, class_names: list[str]) -> str:
    head = ("<tr><th>model</th><th>frames judged</th><th>mAP50</th>"
            + "".join(f"<th>AP50 {html.escape(c)}</th>" for c in class_names)
            + "<th>objects found / all</th><th>time to detection mean / median / max, s</th>"
            "<th>false alarms (tracks judged)</th><th>false alarms / min</th></tr>")  # fmt: skip
    rows = []
    for index, (name, m) in enumerate(truth["models"].items()):
        ttd = m["time_to_detection_s"]
        rows.append(
            f"<tr><td>{_model_label(name, index)}</td><td>{m['frames_judged']}</td><td>{_num(m['map50'])}</td>"
            + "".join(f"<td>{_num(m['ap50'][c])}</td>" for c in class_names)
            + f"<td>{m['objects_found']} / {m['objects']}</td>"
            f"<td>{_num(ttd['mean'])} / {_num(ttd['median'])} / {_num(ttd['max'])}</td>"
            f"<td>{m['false_alarms']} ({m['tracks_judged']})</td><td>{_num(m['false_alarms_per_min'])}</td></tr>"
        )
    return (f"<p>Truth: <code>{html.escape(truth['file'])}</code>, {truth['frames']} annotated frames.</p>"
            f"<table>{head}{''.join(rows)}</table>")


def _num(value: float | None) -> str:
    return "&ndash;" if value is None else f"{value:.3f}"
