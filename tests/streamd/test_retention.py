"""Retention (streamd.retention): which names are streamd's, which segments go and why, on real folders and a full
tmpfs. The daemon running past its disk's size is tests/streamd/test_retention_run.py."""

from __future__ import annotations

import calendar
import logging
import os
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from streamd.config import RetentionConfig, load_config
from streamd.errors import ConfigError
from streamd.ops.metrics import Metrics
from streamd.ops.prometheus import RunCollector
from streamd.retention import (
    ARCHIVE_SUFFIXES,
    GB,
    LOG_SUFFIXES,
    RECORDING_SUFFIXES,
    OutputFolder,
    RetentionGroup,
    RetentionWorker,
    StoredSegment,
    free_bytes,
    parse_segment_name,
    retention_groups,
    scan,
    select,
)
from streamd.stages import archive
from tests.streamd import media
from tests.streamd.conftest import tmpfs

T0 = calendar.timegm((2026, 1, 1, 0, 0, 0))  # 20260101T000000Z
DAY_S = 86_400
MB = 1_000_000
STRANGER_UID = 65534  # nobody


@pytest.mark.parametrize(
    "name, streams, expected",
    [
        ("a_20260101T000000Z_0000.mp4", {"a"}, ("a", T0, 0, 0)),
        ("a_20260101T000010Z_0003.jsonl", {"a"}, ("a", T0 + 10, 3, 0)),
        ("a_20260101T000000Z_0000.1.mp4", {"a"}, ("a", T0, 0, 1)),  # publish's name when the first was taken
        ("a_20260101T000000Z_12345.mkv", {"a"}, ("a", T0, 12345, 0)),  # past 9999 segments in one run
        ("cam_1.x_20260101T000000Z_0007.mp4", {"cam_1.x"}, ("cam_1.x", T0, 7, 0)),  # "_" and "." in a stream id
        ("cam_1.x_20260101T000000Z_0007.mp4", {"cam"}, None),  # another stream's, whose id starts like this one
        ("b_20260101T000000Z_0000.mp4", {"a"}, None),  # a stream of another group or instance
        (".a_20260101T000000Z_0000.mp4.partial", {"a"}, None),  # the recorder's hidden temporary
        ("a_20260101T000000Z_0000.txt", {"a"}, None),  # not an extension this folder's output writes
        ("a_20260101T000000Z_0000.mp4~", {"a"}, None),
        ("a_20260101T000000Z_000.mp4", {"a"}, None),
        ("a_2026011T000000Z_0000.mp4", {"a"}, None),
        ("a_20261301T000000Z_0000.mp4", {"a"}, None),  # month 13: digits, but no date
        ("a_20260101T000000Z_0000.100.mp4", {"a"}, None),  # publish stops at .99
        ("a.mp4", {"a"}, None),
    ],
)
def test_segment_names(name: str, streams: set[str], expected):
    assert parse_segment_name(name, frozenset(streams), RECORDING_SUFFIXES | LOG_SUFFIXES) == expected


def segment(name: str, *, mb: float = 1, modified_at: float | None = None, device: int = 1, folder: str = "/rec",
            streams: frozenset[str] = frozenset({"a", "b"})) -> StoredSegment:  # fmt: skip
    """A StoredSegment as scan() would find `name` in `folder`: modified (by default) 1 s after it started."""
    stream_id, started_at, index, copy = parse_segment_name(name, streams, RECORDING_SUFFIXES | LOG_SUFFIXES)
    modified = started_at + 1 if modified_at is None else modified_at
    return StoredSegment(Path(folder, name), stream_id, started_at, index, copy, int(mb * MB), modified, device, 0)


def day(n: int) -> str:
    """The UTC part of a segment name n days after T0."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(T0 + n * DAY_S))


NOW = T0 + 10 * DAY_S
A = [segment(f"a_{day(k)}_000{k}.mp4") for k in range(4)]  # days 0..3, 1 MB each; a_..._0003 is the open one


@pytest.mark.parametrize(
    "segments, config, free, expected",
    [
        # Nothing over a limit: nothing goes.
        (A, {"max_gb": 1, "max_age_days": 30}, {1: GB}, []),
        # Age: days 0 and 1 are over 8.5 days old at day 10; day 2 is not.
        (A, {"max_age_days": 8.5}, {}, ["a_" + day(0) + "_0000.mp4", "a_" + day(1) + "_0001.mp4"]),
        # The open segment is never removed, however old.
        (A, {"max_age_days": 1}, {}, [s.path.name for s in A[:3]]),
        # Size: 4 MB with the open one; 2.5 MB allowed: the two oldest go (3 MB is still over).
        (A, {"max_gb": 0.0025}, {}, [s.path.name for s in A[:2]]),
        # A budget under the open segment's own size: every closed one goes, the open one stays.
        (A, {"max_gb": 0.0001}, {}, [s.path.name for s in A[:3]]),
        # A full disk: 0.5 MB free, 2 MB wanted: two removals of 1 MB bring it to 2.5 MB.
        (A, {"min_free_gb": 0.002}, {1: MB // 2}, [s.path.name for s in A[:2]]),
        # Another disk being full is no reason to remove this one's segments.
        (A, {"min_free_gb": 0.002}, {1: GB, 2: 0}, []),
        # Oldest first across streams sharing a budget, each stream's newest kept.
        ([segment(f"a_{day(0)}_0000.mp4"), segment(f"b_{day(1)}_0000.mp4"), segment(f"a_{day(2)}_0001.mp4"),
          segment(f"b_{day(3)}_0001.mp4")], {"max_gb": 0.003}, {}, [f"a_{day(0)}_0000.mp4"]),
        (A[:1] + [segment(f"b_{day(1)}_0000.mp4")], {"max_gb": 0.0001}, {}, []),  # each is its stream's newest
        # A recording and a log in one folder: each extension's newest is open.
        ([segment(f"a_{day(0)}_0000.mp4"), segment(f"a_{day(0)}_0000.jsonl", mb=0.1), segment(f"a_{day(1)}_0001.mp4"),
          segment(f"a_{day(1)}_0001.jsonl", mb=0.1)], {"max_age_days": 1}, {},
         [f"a_{day(0)}_0000.jsonl", f"a_{day(0)}_0000.mp4"]),  # a tie in time: by name
        # The same stream in two folders: each folder's newest is open.
        ([segment(f"a_{day(0)}_0000.mp4"), segment(f"a_{day(1)}_0001.mp4", folder="/other")], {"max_age_days": 1},
         {}, []),
        # The wall clock jumped back: the segment written now has an older name, but the newest modification time.
        ([segment(f"a_{day(0)}_0000.mp4", modified_at=NOW), segment(f"a_{day(1)}_0000.mp4"),
          segment(f"a_{day(2)}_0001.mp4")], {"max_gb": 0.0001}, {}, [f"a_{day(1)}_0000.mp4"]),
        # A copy (.1) of a name is newer than the name itself.
        ([segment(f"a_{day(0)}_0000.mp4", modified_at=T0), segment(f"a_{day(0)}_0000.1.mp4")],
         {"max_gb": 0.0001}, {}, [f"a_{day(0)}_0000.mp4"]),
    ],
)
def test_selection(segments: list[StoredSegment], config: dict, free: dict[int, int], expected: list[str]):
    removals = select(segments, RetentionConfig(**config), NOW, free)
    assert [r.segment.path.name for r in removals] == expected


def test_each_removal_says_why():
    config = RetentionConfig(max_gb=0.0025, max_age_days=9.5, min_free_gb=0.0025)
    reasons = [r.reason for r in select(A, config, NOW, {1: 0})]
    assert reasons == ["older than max_age_days 9.5", "its streams take 3.0 MB, over max_gb 0.0025",
                       "2.0 MB free on its disk, under min_free_gb 0.0025"]  # fmt: skip


def write(path: Path, size_bytes: int = 4096, *, modified_at: float | None = None) -> Path:
    path.write_bytes(b"\1" * size_bytes)
    if modified_at is not None:
        os.utime(path, (modified_at, modified_at))
    return path


def group(folder: Path, **config) -> RetentionGroup:
    return RetentionGroup("daemon", RetentionConfig(**config), frozenset({"a"}),
                          (OutputFolder(folder, RECORDING_SUFFIXES | LOG_SUFFIXES),))  # fmt: skip


def test_scan_finds_only_this_users_regular_files_with_segment_names(tmp_path: Path):
    rec = tmp_path / "rec"
    rec.mkdir()
    ours = [write(rec / f"a_{day(k)}_000{k}.mp4") for k in range(2)]
    write(rec / "notes.txt")
    write(rec / f".a_{day(2)}_0002.mp4.partial")
    write(rec / f"b_{day(0)}_0000.mp4")  # another stream's
    outside = write(tmp_path / "precious.mp4")
    (rec / f"a_{day(3)}_0003.mp4").symlink_to(outside)  # a link with a segment's name
    (rec / f"a_{day(4)}_0004.mp4").mkdir()  # a folder with a segment's name
    os.mkfifo(rec / f"a_{day(5)}_0005.jsonl")
    if os.getuid() == 0:  # a stranger's file with a segment's name (root can give it away)
        os.chown(write(rec / f"a_{day(6)}_0006.mp4"), STRANGER_UID, STRANGER_UID)
    found = scan(group(rec))
    assert sorted(s.path for s in found) == ours
    assert {s.disk_bytes for s in found} == {os.lstat(ours[0]).st_blocks * 512}
    assert scan(group(tmp_path / "not-yet")) == []  # a folder the outputs have not made yet


def test_a_sweep_removes_logs_and_counts_and_leaves_everything_else(tmp_path: Path, caplog):
    rec = tmp_path / "rec"
    rec.mkdir()
    now = time.time()
    old = [write(rec / f"a_{day(k)}_000{k}.mp4", modified_at=T0 + k * DAY_S) for k in range(3)]
    open_one = write(rec / f"a_{day(3)}_0003.mp4")  # the newest: being written
    outside = write(tmp_path / "precious.mp4")
    link = rec / f"a_{day(-1)}_0009.mp4"
    link.symlink_to(outside)
    stranger = write(rec / "notes.txt")
    metrics = Metrics(["a"])
    worker = RetentionWorker((group(rec, max_age_days=(now - T0) / DAY_S - 2.5),), metrics)  # days 0..2 too old
    sizes = sum(os.lstat(p).st_blocks * 512 for p in old)
    with caplog.at_level(logging.INFO, logger="streamd.retention"):
        removed = worker.sweep()
    assert [r.segment.path for r in removed] == old
    assert not any(p.exists() for p in old)
    assert open_one.exists() and outside.exists() and link.is_symlink() and stranger.exists()
    counts = dict(metrics.counts()[0].counts)
    assert counts["retention_removed"] == 3 and counts["retention_removed_bytes"] == sizes
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RunCollector(metrics, [], []))  # /metrics's own collector
    exported = generate_latest(registry).decode()
    assert 'streamd_retention_removed_total{stream="a"} 3.0' in exported
    assert f'streamd_retention_removed_bytes_total{{stream="a"}} {float(sizes)}' in exported
    assert [r.getMessage() for r in caplog.records][0].startswith(f"retention removed {old[0].name} (")
    assert worker.sweep() == []  # nothing left to remove


def test_a_full_disk_gets_its_room_back(tmp_path: Path):
    """A 1 MiB tmpfs filled to ENOSPC with closed segments: one sweep frees min_free_gb, the newest stays."""
    with tmpfs(tmp_path / "disk", "size=1m") as disk:
        rec = disk / "rec"
        rec.mkdir()
        written: list[Path] = []
        with pytest.raises(OSError, match="No space left"):
            for k in range(1000):
                path = rec / f"a_{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(T0 + k))}_{k:04d}.mp4"
                written.append(path)
                write(path, 64 * 1024)
        this = group(rec, min_free_gb=0.0003)
        assert min(free_bytes(this).values()) < 300_000
        removed = RetentionWorker((this,), Metrics(["a"])).sweep()
        assert min(free_bytes(this).values()) >= 300_000
        assert [r.segment.path for r in removed] == written[: len(removed)]  # the oldest
        assert written[-1].exists()  # the one ENOSPC cut short is the newest: it may still be written


def test_an_unreadable_folder_is_logged_once_and_skipped(tmp_path: Path, caplog):
    rec = tmp_path / "rec"
    rec.write_text("a file where the folder should be")
    worker = RetentionWorker((group(rec, max_gb=1),), Metrics(["a"]))
    with caplog.at_level(logging.WARNING, logger="streamd.retention"):
        assert worker.sweep() == [] and worker.sweep() == []
    assert [r.getMessage() for r in caplog.records] == [
        f"retention of daemon: cannot read its folders: [Errno 20] Not a directory: '{rec}'"
    ]


def test_groups_follow_the_config(tmp_path: Path, tiny_bundle, clip):
    """The daemon's retention covers every stream without its own; a stream's own replaces it; a folder two
    outputs share is one folder with both outputs' extensions."""
    config = load_config(media.write_config(tmp_path, f"""
        model: {tiny_bundle.path}
        retention: {{max_gb: 2}}
        streams:
          - {{id: a, source: {clip}, record: {{dir: out}}, detection_log: {{dir: out}}}}
          - {{id: b, source: {clip}, record: {{dir: rec-b}}, archive: {{dir: src-b}}, retention: {{max_age_days: 7}}}}
          - {{id: c, source: {clip}, detection_log: {{dir: logs}}}}
        """))  # fmt: skip
    groups = retention_groups(config)
    assert [(g.name, sorted(g.streams), g.config.max_gb, g.config.max_age_days) for g in groups] == [
        ("daemon", ["a", "c"], 2, None), ("stream 'b'", ["b"], None, 7)
    ]
    assert groups[0].folders == (OutputFolder(tmp_path / "out", RECORDING_SUFFIXES | LOG_SUFFIXES),
                                 OutputFolder(tmp_path / "logs", LOG_SUFFIXES))  # fmt: skip
    assert groups[1].folders == (OutputFolder(tmp_path / "rec-b", RECORDING_SUFFIXES),
                                 OutputFolder(tmp_path / "src-b", ARCHIVE_SUFFIXES))  # fmt: skip
    assert RetentionWorker.for_config(config, Metrics(["a", "b", "c"])).every_s == 5.0


def test_archive_suffixes_are_the_archives_containers():
    assert ARCHIVE_SUFFIXES == set(archive._EXTENSIONS.values())


@pytest.mark.parametrize(
    "retention, error",
    [
        ("{max_gb: 0}", "retention.max_gb: Input should be greater than 0"),
        ("{max_age_days: -1}", "retention.max_age_days: Input should be greater than 0"),
        ("{min_free_gb: 0}", "retention.min_free_gb: Input should be greater than 0"),
        ("{max_gigabytes: 1}", "retention.max_gigabytes"),
    ],
)
def test_config_errors_name_the_line_and_field(tmp_path: Path, tiny_bundle, clip, retention: str, error: str):
    path = media.write_config(tmp_path, f"""
        model: {tiny_bundle.path}
        streams:
          - id: a
            source: {clip}
            retention: {retention}
        """)  # fmt: skip
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"streamd.yaml:5: streams.0.{error}" in str(info.value)
