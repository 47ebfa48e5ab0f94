"""streamd.ops.systemd: sd_notify datagrams to a real AF_UNIX socket (path and abstract), watchdog interval;
the unit files through systemd-analyze (verify, security); and the start a full disk used to fail.

The systemd-analyze tests skip when it is not installed or cannot run here (Debian package `systemd`).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from streamd.ops.systemd import SystemdNotifier, watchdog_interval_s
from tests.streamd import media
from tests.streamd.test_pipeline_e2e import NotifyReader, jsonl, listen, streamd

REPO = Path(__file__).parents[3]
UNITS = ("streamd.service", "streamd@.service")
INSTALLED_STREAMD = "/opt/streamd/.venv/bin/streamd"  # where the units expect it (docs/operations.md)
MAX_EXPOSURE = 2.5


class NotifySocket:
    """What systemd listens on: a datagram socket; `messages()` returns what arrived so far."""

    def __init__(self, address: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.5)
        self.address = address

    def messages(self, count: int) -> list[str]:
        return [self.sock.recv(4096).decode() for _ in range(count)]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request, tmp_path: Path):
    address = str(tmp_path / "notify") if request.param == "path" else f"@streamd-test-{uuid.uuid4().hex}"
    server = NotifySocket(address)
    yield server
    server.close()


def test_messages_arrive_in_order(notify_socket: NotifySocket):
    notifier = SystemdNotifier(environ={"NOTIFY_SOCKET": notify_socket.address})
    assert notifier.enabled
    assert notifier.ready("running 2 stream(s)")
    assert notifier.watchdog()
    assert notifier.status("eus-1: 25.0 fps")
    assert notifier.stopping()
    assert notify_socket.messages(4) == [
        "READY=1\nSTATUS=running 2 stream(s)",
        "WATCHDOG=1",
        "STATUS=eus-1: 25.0 fps",
        "STOPPING=1",
    ]
    notifier.close()


def test_disabled_outside_systemd():
    notifier = SystemdNotifier(environ={})
    assert not notifier.enabled
    assert notifier.ready() is False and notifier.watchdog() is False


def test_a_missing_socket_is_logged_once_and_never_raises(tmp_path: Path, caplog):
    notifier = SystemdNotifier(environ={"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.ready() is False
    assert notifier.watchdog() is False
    assert len([r for r in caplog.records if "sd_notify" in r.getMessage()]) == 1


@pytest.mark.parametrize(
    "usec, pid, expected_s",
    [
        ("30000000", None, 15.0),  # half of WatchdogSec=30s
        ("1000000", "self", 0.5),
        ("1000000", "1", None),  # meant for another process
        ("0", None, None),
        ("", None, None),
        ("abc", None, None),
    ],
)
def test_watchdog_interval_table(usec, pid, expected_s):
    environ = {"WATCHDOG_USEC": usec}
    if pid is not None:
        environ["WATCHDOG_PID"] = str(os.getpid()) if pid == "self" else pid
    assert watchdog_interval_s(environ) == expected_s


def test_a_systemd_that_does_not_read_never_blocks_the_sender(tmp_path: Path):
    server = NotifySocket(str(tmp_path / "notify"))  # never read: its queue fills up
    notifier = SystemdNotifier(environ={"NOTIFY_SOCKET": server.address})
    results = [notifier.watchdog() for _ in range(2000)]  # would hang here if a send waited for the reader
    assert results[0] and not all(results)  # the first got through, the overflow was dropped, none waited
    server.close()


@pytest.mark.parametrize(
    "unit, config", [("streamd@.service", "/etc/streamd/%i.yaml"), ("streamd.service", "/etc/streamd/streamd.yaml")]
)
def test_unit_files_are_notify_services_with_a_watchdog(unit: str, config: str):
    import configparser

    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read(Path(__file__).parents[3] / "systemd" / unit)
    service = parser["Service"]
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert service["ExecStart"] == f"/opt/streamd/.venv/bin/streamd run {config}"
    assert service["WatchdogSec"] and service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "2"  # a bad config is not fixed by restarting
    assert service["User"] == "streamd" and "/var/lib/streamd" in service["ReadWritePaths"]


def _systemd_analyze() -> str | None:
    path = shutil.which("systemd-analyze")
    if path is None or subprocess.run([path, "--version"], capture_output=True).returncode != 0:
        return None
    return path


SYSTEMD_ANALYZE = _systemd_analyze()
needs_systemd_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is missing or cannot run")


def unit_settings(unit: str) -> dict[str, dict[str, list[str]]]:
    """section -> key -> every value, in order (systemd keys repeat: DeviceAllow=, SystemCallFilter=)."""
    settings: dict[str, dict[str, list[str]]] = {}
    section = ""
    for line in (REPO / "systemd" / unit).read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(section, {}).setdefault(key, []).append(value)
    return settings


def installed(unit: str, folder: Path) -> Path:
    """The unit as installed here: ExecStart's /opt/streamd/.venv/bin/streamd is this venv's (verify needs it)."""
    here = Path(sys.executable).with_name("streamd")
    assert here.exists(), "the venv has no streamd script: pip install -e ."
    text = (REPO / "systemd" / unit).read_text()
    assert INSTALLED_STREAMD in text
    path = folder / unit
    path.write_text(text.replace(INSTALLED_STREAMD, str(here)))
    return path


@needs_systemd_analyze
def test_units_verify_without_a_warning(tmp_path: Path):
    paths = [str(installed(unit, tmp_path)) for unit in UNITS]
    command = [SYSTEMD_ANALYZE, "verify", "--recursive-errors=yes", *paths]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr


@needs_systemd_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_exposure_is_at_most_2_5_with_only_gpu_and_capture_devices(unit: str):
    result = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=yes", str(REPO / "systemd" / unit)],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    exposure = float(re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout).group(1))
    assert exposure <= MAX_EXPOSURE
    (device_acl,) = [line for line in result.stdout.splitlines() if line.startswith("✗ DeviceAllow=")]
    allowed = set(re.findall(r"(char-[a-z0-9-]+):", device_acl))
    assert allowed == {"char-nvidia-frontend", "char-nvidiactl", "char-nvidia-uvm", "char-nvidia-caps",
                       "char-video4linux", "char-rtc"}  # rtc: read-only, added by ProtectClock=  # fmt: skip
    assert unit_settings(unit)["Service"]["DevicePolicy"] == ["closed"]
    operations = (REPO / "docs" / "operations.md").read_text()
    assert f"exposure level **{exposure}**" in operations  # the score the docs report is the units' score


def test_the_two_units_differ_only_in_the_config_they_run():
    single, template = (unit_settings(unit) for unit in UNITS)
    for settings in (single, template):
        settings["Unit"].pop("Description")
        settings["Service"].pop("ExecStart")
    assert single == template


@pytest.mark.parametrize("unit", UNITS)
def test_restarts_are_paced_and_never_given_up(unit: str):
    """A start that fails in a second (the full disk did) is retried every RestartSec, forever: no hot loop of
    5 starts in 5 s and then a dead unit."""
    settings = unit_settings(unit)
    assert settings["Unit"]["StartLimitIntervalSec"] == ["0"]  # no start limit: never left dead
    assert "StartLimitBurst" not in settings["Unit"]
    restart_s = settings["Service"]["RestartSec"]
    assert restart_s[-1].endswith("s") and int(restart_s[-1].removesuffix("s")) >= 10
    stop_s = int(settings["Service"]["TimeoutStopSec"][-1].removesuffix("s"))
    assert stop_s > 10  # above drain_timeout_s's default, so a stop drains before SIGKILL


@pytest.mark.slow
def test_a_full_recording_disk_at_start_is_waited_out_while_detection_runs(tmp_path: Path, tiny_bundle, long_clip,
                                                                           small_disk: Path):  # fmt: skip
    """The start that used to fail in 0.7 s and loop the unit: the recording folder on a full tmpfs. `streamd run`
    starts (READY=1), detects and publishes while the recorder retries; space freed, it records again, playably."""
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as out:
        with pytest.raises(OSError, match="No space left"):
            while True:
                out.write(b"\0" * 4096)
    endpoint = f"tcp://127.0.0.1:{media.free_port('tcp')}"
    config = media.write_config(
        tmp_path,
        f"""
        model: {tiny_bundle.path}
        backend: {{type: onnxruntime, threads: 1}}
        streams:
          - id: a
            source: {long_clip}
            loop: true
            realtime: true
            record: {{dir: {small_disk / "rec"}, preset: ultrafast}}
            detection_log: {{dir: log}}
        publish: {{bind: "{endpoint}", linger_ms: 500}}
        """,
    )
    notify = NotifyReader(tmp_path / "notify")
    listener = listen(endpoint)
    daemon = streamd("run", str(config), "--duration-s", "12", env={"NOTIFY_SOCKET": str(tmp_path / "notify")})
    try:
        deadline = time.monotonic() + 60
        while not jsonl(list((tmp_path / "log").glob("*.jsonl"))):  # frame 0 was detected: its recording failed
            assert daemon.poll() is None and time.monotonic() < deadline, daemon.stderr.read()
            time.sleep(0.1)
        filler.unlink()  # the disk frees up while the daemon runs
        out, err = daemon.communicate(timeout=90)
        received, _ = listener.communicate(timeout=30)
    finally:
        media.stop(daemon)
        media.stop(listener)
        messages = notify.close()
    assert daemon.returncode == 0, err
    assert any(m.startswith("READY=1") for m in messages)
    assert "No space left" in err and "retrying in" in err and "record:a works again" in err
    assert len(jsonl(list((tmp_path / "log").glob("*.jsonl")))) >= 100  # ~12 s at 25 fps, stale drops aside
    assert len(received.splitlines()) >= 100
    segments = sorted((small_disk / "rec").glob("a_*.mp4"))
    assert segments and media.probe_frame_count(segments[-1]) >= 25  # at least 1 s recorded after the retry
