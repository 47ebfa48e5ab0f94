"""streamd.ops.systemd: sd_notify datagrams to a real AF_UNIX socket (path and abstract), watchdog interval."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

from streamd.ops.systemd import SystemdNotifier, watchdog_interval_s


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
