"""Retention: what streamd wrote is removed, oldest first, before it fills the disk (config `retention`).

A group is the streams one RetentionConfig governs: each stream with its own
`streams[].retention`, and the daemon's `retention` for every other stream.
It covers the folders its streams write (`output_folders`: record.dir,
detection_log.dir, archive.dir; an output that adds a folder adds it there). On every
sweep, per group, going through its closed segments oldest first (by the UTC
time and index in their names), a segment is removed when:

- its first frame is older than `max_age_days`;
- the group's segments, the open ones included, take more than `max_gb` on
  disk (allocated blocks, what removing them frees);
- the file system it is on has less than `min_free_gb` free (a disk that
  other files fill, or a max_gb above the disk's size): this is what brings
  a recorder stopped by a full disk back at its next retry.

Only what streamd wrote is ever removed: a name
`{stream id}_{UTC YYYYmmddTHHMMSSZ}_{index}[.N].{ext}` (streamd.segments,
`.N` when publish found the name taken) of one of the group's streams, with
an extension that folder's output writes, a regular file (looked at with
lstat and removed by its name: a symlink is never followed, nor removed)
owned by this user, looked at again just before it is removed. A hidden
`.partial` recording does not match the pattern. The segment being written
is never removed: per folder, stream and extension the newest by name and
the newest by modification time are kept (an output writes one segment at a
time, so the one it writes is the newest; the two together hold even when
the wall clock jumped back between two segments).

It runs in a thread of its own (`RetentionWorker`, started and stopped by
streamd.pipeline.daemon) every min(CHECK_EVERY_S, the shortest segment_s): not
in the output stages, because on a full disk those are stopped, waiting for
their retry, and that is when room must be made; and one sweep sees the
daemon's budget over every stream and folder together.
"""

from __future__ import annotations

import calendar
import logging
import math
import os
import re
import stat
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

from streamd.config import RecordConfig, RetentionConfig, StreamConfig, StreamdConfig
from streamd.ops.logging import stream_extra
from streamd.ops.metrics import Metrics

log = logging.getLogger(__name__)

COUNTERS = {  # per stream, declared to the run's Metrics
    "retention_removed": "Segments of the stream removed by retention.",
    "retention_removed_bytes": "Bytes on disk of the segments retention removed.",
}

GB = 1_000_000_000
DAY_S = 86_400
CHECK_EVERY_S = 5.0  # the longest wait between two sweeps; shorter when a segment is shorter
CLOSE_TIMEOUT_S = 10.0  # how long close() waits for a sweep stuck in the file system (a dead network mount)
RECORDING_SUFFIXES = frozenset(get_args(RecordConfig.model_fields["container"].annotation))  # mp4, mkv
LOG_SUFFIXES = frozenset({"jsonl"})
ARCHIVE_SUFFIXES = frozenset({"mp4", "mkv", "ts"})  # streamd.stages.archive's containers (a test holds them equal)
SEGMENT_NAME = re.compile(
    r"(?P<stream>.+)_(?P<utc>\d{8}T\d{6}Z)_(?P<index>\d{4,})(?:\.(?P<copy>\d{1,2}))?\.(?P<ext>[a-z0-9]+)"
)


@dataclass(frozen=True, slots=True)
class OutputFolder:
    """A folder streamd writes segments into, and the extensions of the segments it writes there."""

    directory: Path
    suffixes: frozenset[str]


@dataclass(frozen=True, slots=True)
class RetentionGroup:
    """The streams one RetentionConfig governs, and the folders they write. name: for logs ("daemon", "stream 'a'")."""

    name: str
    config: RetentionConfig
    streams: frozenset[str]
    folders: tuple[OutputFolder, ...]


@dataclass(frozen=True, slots=True)
class StoredSegment:
    """One segment file found in a group's folder: whose, when it started (UTC s from its name), its size on disk
    (bytes allocated), its modification time (s since the epoch), and its identity (device, inode)."""

    path: Path
    stream_id: str
    started_at: float
    index: int
    copy: int
    disk_bytes: int
    modified_at: float
    device: int
    inode: int

    @property
    def order(self) -> tuple[float, int, int, str]:
        """Oldest first: the UTC time and index in the name, then the copy number."""
        return (self.started_at, self.index, self.copy, self.path.name)


@dataclass(frozen=True, slots=True)
class Removal:
    """A segment to remove and why (for the log line)."""

    segment: StoredSegment
    reason: str


def output_folders(stream: StreamConfig) -> tuple[OutputFolder, ...]:
    """The folders the config lets `stream` write segments into, whether or not the output is enabled now (what
    it wrote before still ages)."""
    folders = []
    if stream.record is not None:
        folders.append(OutputFolder(stream.record.dir, RECORDING_SUFFIXES))
    if stream.detection_log is not None:
        folders.append(OutputFolder(stream.detection_log.dir, LOG_SUFFIXES))
    if stream.archive is not None:
        folders.append(OutputFolder(stream.archive.dir, ARCHIVE_SUFFIXES))
    return tuple(folders)


def retention_groups(config: StreamdConfig) -> tuple[RetentionGroup, ...]:
    """One group per stream with its own retention, one for the daemon's over every other stream; none without
    a retention. Folders that several outputs share are listed once, with every extension written there."""
    groups = []
    shared = [stream for stream in config.streams if stream.retention is None]
    if config.retention is not None and shared:
        groups.append(_group("daemon", config.retention, shared))
    for stream in config.streams:
        if stream.retention is not None:
            groups.append(_group(f"stream {stream.id!r}", stream.retention, [stream]))
    return tuple(groups)


def _group(name: str, config: RetentionConfig, streams: list[StreamConfig]) -> RetentionGroup:
    suffixes: dict[Path, frozenset[str]] = {}
    for stream in streams:
        for folder in output_folders(stream):
            suffixes[folder.directory] = suffixes.get(folder.directory, frozenset()) | folder.suffixes
    folders = tuple(OutputFolder(directory, exts) for directory, exts in suffixes.items())
    return RetentionGroup(name, config, frozenset(stream.id for stream in streams), folders)


def parse_segment_name(
    name: str, streams: frozenset[str], suffixes: frozenset[str]
) -> tuple[str, float, int, int] | None:
    """(stream id, UTC start in s since the epoch, index, copy) of a segment file name of one of `streams` with one
    of `suffixes`; None for any other name."""
    match = SEGMENT_NAME.fullmatch(name)
    if match is None or match["stream"] not in streams or match["ext"] not in suffixes:
        return None
    try:
        started_at = calendar.timegm(time.strptime(match["utc"], "%Y%m%dT%H%M%SZ"))
    except ValueError:  # digits in the pattern's places, but no date (month 13)
        return None
    return match["stream"], float(started_at), int(match["index"]), int(match["copy"] or 0)


def scan(group: RetentionGroup) -> list[StoredSegment]:
    """The group's segment files now: names of its streams, regular files of this user (lstat: a symlink is
    never followed). A folder that is not there (yet) has none; OSError when one cannot be read."""
    found = []
    uid = os.getuid()
    for folder in group.folders:
        try:
            entries = list(os.scandir(folder.directory))
        except FileNotFoundError:
            continue
        for entry in entries:
            parsed = parse_segment_name(entry.name, group.streams, folder.suffixes)
            if parsed is None:
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # removed since the listing
                continue
            if not stat.S_ISREG(info.st_mode) or info.st_uid != uid:
                continue
            stream_id, started_at, index, copy = parsed
            found.append(StoredSegment(
                Path(entry.path), stream_id, started_at, index, copy, info.st_blocks * 512, info.st_mtime,
                info.st_dev, info.st_ino,
            ))  # fmt: skip
    return found


def open_segments(segments: Iterable[StoredSegment]) -> set[Path]:
    """The segments that may be being written: per folder, stream and extension, the newest by name and the
    newest by modification time."""
    newest: dict[tuple[Path, str, str], tuple[StoredSegment, StoredSegment]] = {}
    for segment in segments:
        key = (segment.path.parent, segment.stream_id, segment.path.suffix)
        by_name, by_time = newest.get(key, (segment, segment))
        newest[key] = (max(by_name, segment, key=lambda s: s.order),
                       max(by_time, segment, key=lambda s: (s.modified_at, s.order)))  # fmt: skip
    return {segment.path for pair in newest.values() for segment in pair}


def select(
    segments: list[StoredSegment], config: RetentionConfig, now_s: float, free_bytes: Mapping[int, int]
) -> list[Removal]:
    """What to remove from a group's `segments`, oldest first, and why.

    now_s: the wall clock (s since the epoch). free_bytes: free bytes per device (st_dev) now; a removal is
    counted as freeing its disk_bytes. The open segments (open_segments) are never selected, but count in max_gb.
    """
    kept = open_segments(segments)
    total_bytes = sum(segment.disk_bytes for segment in segments)
    free = dict(free_bytes)
    max_bytes = math.inf if config.max_gb is None else config.max_gb * GB
    max_age_s = math.inf if config.max_age_days is None else config.max_age_days * DAY_S
    min_free_bytes = config.min_free_gb * GB
    removals = []
    for segment in sorted(segments, key=lambda s: s.order):
        if segment.path in kept:
            continue
        device_free = free.get(segment.device, math.inf)
        if now_s - segment.started_at > max_age_s:
            reason = f"older than max_age_days {config.max_age_days:g}"
        elif total_bytes > max_bytes:
            reason = f"its streams take {total_bytes / 1e6:.1f} MB, over max_gb {config.max_gb:g}"
        elif device_free < min_free_bytes:
            reason = f"{device_free / 1e6:.1f} MB free on its disk, under min_free_gb {config.min_free_gb:g}"
        else:
            continue
        removals.append(Removal(segment, reason))
        total_bytes -= segment.disk_bytes
        free[segment.device] = device_free + segment.disk_bytes
    return removals


def free_bytes(group: RetentionGroup) -> dict[int, int]:
    """Free bytes (for this user) of the file system of each of the group's folders that exists, by device."""
    free = {}
    for folder in group.folders:
        try:
            device = os.stat(folder.directory).st_dev
            fs = os.statvfs(folder.directory)
        except FileNotFoundError:
            continue
        free[device] = fs.f_bavail * fs.f_frsize
    return free


class RetentionWorker:
    """Sweeps the config's retention groups every `every_s` from a thread of its own, from start() to close().

    Every removal is logged (stream, file, bytes, reason) and counted per stream in `retention_removed` and
    `retention_removed_bytes`. A folder it cannot read or a file it cannot remove is logged (once until the
    error changes) and skipped: retention never stops the daemon.
    """

    def __init__(self, groups: tuple[RetentionGroup, ...], metrics: Metrics, every_s: float = CHECK_EVERY_S) -> None:
        self.groups = groups
        self.metrics = metrics
        metrics.declare(COUNTERS)
        self.every_s = every_s
        self.removed = 0
        self.removed_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error: dict[str, str] = {}

    @classmethod
    def for_config(cls, config: StreamdConfig, metrics: Metrics) -> RetentionWorker:
        """The daemon's worker: its groups, swept every min(CHECK_EVERY_S, the shortest segment_s): a segment
        closes at most that often."""
        every_s = min([CHECK_EVERY_S, *(stream.segment_s for stream in config.streams)])
        return cls(retention_groups(config), metrics, every_s)

    def start(self) -> None:
        """Sweep now, then every every_s, in a thread (none when no stream has a retention)."""
        if self.groups:
            self._thread = threading.Thread(target=self._run, name="retention", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the thread (after the sweep it is in, if any: at most CLOSE_TIMEOUT_S, then it is left behind, a
        daemon thread) and log what this run removed."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(CLOSE_TIMEOUT_S)
            if self._thread.is_alive():
                log.warning("retention: a sweep did not end within %.0f s; left behind", CLOSE_TIMEOUT_S)
            log.info("retention removed %d segment(s), %.1f MB, in this run", self.removed, self.removed_bytes / 1e6)

    def _run(self) -> None:
        while True:
            try:
                self.sweep()
            except Exception:  # a report of a bug, not a reason to stop recording
                log.exception("retention sweep failed; trying again in %.3g s", self.every_s)
            if self._stop.wait(self.every_s):
                return

    def sweep(self) -> list[Removal]:
        """One pass over every group: what was removed."""
        removed = []
        for group in self.groups:
            try:
                segments, free = scan(group), free_bytes(group)
            except OSError as exc:
                self._error(group.name, f"retention of {group.name}: cannot read its folders: {exc}")
                continue
            self._last_error.pop(group.name, None)
            removed.extend(r for r in select(segments, group.config, time.time(), free) if self._remove(r))
        return removed

    def _remove(self, removal: Removal) -> bool:
        """Remove the segment if it is still the file that was selected (same inode, a regular file of this user)."""
        segment = removal.segment
        try:
            info = os.lstat(segment.path)
            if (
                (info.st_dev, info.st_ino) != (segment.device, segment.inode)
                or not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid()
            ):  # fmt: skip
                log.info("retention: %s changed since it was selected: kept", segment.path)
                return False
            os.unlink(segment.path)
        except FileNotFoundError:  # removed by someone else meanwhile
            return False
        except OSError as exc:
            self._error(str(segment.path), f"retention cannot remove {segment.path}: {exc}")
            return False
        self._last_error.pop(str(segment.path), None)
        self.removed += 1
        self.removed_bytes += segment.disk_bytes
        self.metrics.count(segment.stream_id, "retention_removed")
        self.metrics.count(segment.stream_id, "retention_removed_bytes", segment.disk_bytes)
        log.info("retention removed %s (%d bytes): %s", segment.path.name, segment.disk_bytes, removal.reason,
                 extra=stream_extra(segment.stream_id))
        return True

    def _error(self, key: str, text: str) -> None:
        """Log an error once until it changes (a folder unreadable for hours is one line, not one per sweep)."""
        if self._last_error.get(key) != text:
            self._last_error[key] = text
            log.warning("%s", text)
