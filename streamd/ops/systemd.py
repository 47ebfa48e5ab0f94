"""sd_notify without libsystemd: one datagram per message to $NOTIFY_SOCKET.

systemd owns the process (`Type=notify`): streamd sends READY=1 only after
the model is loaded and warmed up, WATCHDOG=1 from the pipeline's own
heartbeat, STATUS= lines a human reads in `systemctl status`, and
STOPPING=1 when it begins to shut down. Outside systemd ($NOTIFY_SOCKET
unset) every call is a no-op, so the same code runs in a terminal and in tests.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class SystemdNotifier:
    """Sends sd_notify messages; `enabled` is False when not started by systemd.

    socket_path: $NOTIFY_SOCKET by default; a leading '@' names a Linux
    abstract socket (sent with a leading NUL byte).
    """

    def __init__(self, socket_path: str | None = None, environ: dict[str, str] | None = None):
        env = os.environ if environ is None else environ
        self.socket_path = socket_path if socket_path is not None else env.get("NOTIFY_SOCKET", "")
        self.watchdog_interval_s = watchdog_interval_s(env)
        self._socket: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return bool(self.socket_path)

    def notify(self, *lines: str) -> bool:
        """Send KEY=VALUE lines as one datagram; True if sent. Errors are logged once, never raised."""
        if not self.enabled:
            return False
        address = "\0" + self.socket_path[1:] if self.socket_path.startswith("@") else self.socket_path
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # Never wait: a systemd that does not read (a full queue, EAGAIN) must not stall the supervisor.
            self._socket.sendto("\n".join(lines).encode(), socket.MSG_DONTWAIT, address)
            return True
        except OSError as exc:
            # systemd going away must not take the pipeline down; say so once.
            if not self._warned:
                log.warning("sd_notify to %s failed: %s", self.socket_path, exc)
                self._warned = True
            return False

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_interval_s(environ: dict[str, str] | os._Environ) -> float | None:
    """How often to send WATCHDOG=1: half of $WATCHDOG_USEC, as sd_watchdog_enabled() advises.

    None when the watchdog is off, or when $WATCHDOG_PID names another process
    (the variables were inherited, not meant for us).
    """
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1e6 / 2
