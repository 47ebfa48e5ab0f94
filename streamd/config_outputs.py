"""Outputs in the daemon's configuration: the ZeroMQ publisher (with CURVE), the metrics endpoint, a stream's archive.

Part of streamd.config (which re-exports these names); kept apart so that
each file stays readable.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field, ValidationInfo, field_validator, model_validator

from streamd.configbase import Folder, StrictModel, resolve_path


class ArchiveConfig(StrictModel):
    """The stream's own packets, remuxed untouched into crash-safe segments named like its recordings
    (streamd.stages.archive): the source kept, to run another model on it later."""

    enabled: bool = Field(True, description="Write the archive (false keeps the settings but archives nothing).")
    dir: Annotated[Folder, AfterValidator(resolve_path)] = Field(
        description="Folder of the archive segments (relative to this file); created at start."
    )


class CurveConfig(StrictModel):
    """ZeroMQ CURVE on the PUB socket: messages encrypted, and only the subscribers whose keys are listed get in.

    Key files are made by `streamd keys generate` and checked before start
    (streamd.preflight: a secret key open to other users is refused).
    """

    server_secret_key_file: Path = Field(
        description="The daemon's secret key file (NAME.key_secret), mode 0600; relative to this file."
    )
    authorized_clients_dir: Path = Field(
        description="Folder of the public key files (NAME.key) of the subscribers let in, read at start; relative to "
        "this file."
    )

    @field_validator("server_secret_key_file", "authorized_clients_dir")
    @classmethod
    def _relative_to_config(cls, value: Path, info: ValidationInfo) -> Path:
        return resolve_path(value, info)


def is_local_endpoint(endpoint: str) -> bool:
    """Whether only this machine can connect to `endpoint`: ipc://, inproc://, or tcp on 127.0.0.0/8, ::1, localhost.

    Any other tcp interface is remote: `*`, 0.0.0.0, ::, another address, a
    host name (not resolved: it may change) or an interface name (eth0).
    """
    scheme, _, rest = endpoint.partition("://")
    if scheme != "tcp":
        return True
    return is_loopback_host(rest.rpartition(":")[0].removeprefix("[").removesuffix("]"))


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 (also as ::ffff:127.x.y.z) or localhost; False for any other address or name."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


# ZMQ_MAXMSGSIZE of the PUB socket: the largest message a subscriber may send it. What a subscriber sends a PUB is
# its subscriptions (1 byte + a topic prefix; topics are stream ids of at most 64 characters) and, with CURVE, the
# handshake (INITIATE, about 300 bytes) and the encrypted subscriptions (about 40 bytes more each). A peer that sends
# more is disconnected before ZeroMQ buffers the message. ZeroMQ has no option that caps the *number* of
# subscriptions a peer keeps: each distinct prefix costs at most this many bytes (plus a trie node) until the peer
# goes away, and only local users (loopback or ipc://) or the allow-listed CURVE keys can connect at all.
MAX_SUBSCRIPTION_BYTES = 1024


class PublishConfig(StrictModel):
    """The daemon's one ZeroMQ PUB socket (DESIGN contract 2)."""

    enabled: bool = Field(True, description="Publish detections (false keeps the settings but binds nothing).")
    bind: str = Field(
        "tcp://127.0.0.1:5555",
        pattern=r"^(tcp|ipc|inproc)://.+$",
        description="Endpoint to bind, e.g. tcp://127.0.0.1:5555 (loopback) or ipc:///run/streamd/room1.sock.",
    )
    sndhwm: int = Field(
        1000, ge=1, le=1_000_000, description="ZMQ_SNDHWM: messages queued per subscriber before PUB drops them."
    )
    linger_ms: int = Field(
        100, ge=0, le=60_000, description="ZMQ_LINGER: how long unsent messages may delay shutdown, ms."
    )
    curve: CurveConfig | None = Field(
        None, description="Encryption and the subscribers' allow-list (ZeroMQ CURVE); omitted: plaintext, open to all."
    )
    allow_plaintext_remote: bool = Field(
        False, description="Let a bind other machines can reach go without curve (they read every message unencrypted)."
    )

    @field_validator("bind")
    @classmethod
    def _tcp_port(cls, value: str) -> str:
        """A tcp port must be 1..65535 (ZeroMQ would silently bind port 99999 as 34463) or *."""
        if value.startswith("tcp://"):
            port = value.rpartition(":")[2]
            if port != "*" and not (port.isdigit() and 1 <= int(port) <= 65535):
                raise ValueError(f"the port of {value} must be 1..65535 or *")
        return value

    @model_validator(mode="after")
    def _remote_needs_curve(self) -> PublishConfig:
        if self.curve is not None and self.allow_plaintext_remote:
            raise ValueError("allow_plaintext_remote has no effect with curve (nothing is plaintext): remove it")
        if self.curve is None and not self.allow_plaintext_remote and not is_local_endpoint(self.bind):
            raise ValueError(
                f"bind {self.bind} lets other machines connect, and without curve anyone who reaches the port reads "
                "every message: set publish.curve, bind to 127.0.0.1 or ipc://, or set allow_plaintext_remote: true"
            )
        return self


class MetricsConfig(StrictModel):
    """Prometheus /metrics and a /healthz for the supervisor's verdict, over HTTP on a loopback address."""

    bind: str = Field(
        "127.0.0.1:9108", max_length=64,
        description="HOST:PORT to serve on; HOST is loopback (127.x.x.x, [::1] or localhost): the endpoint has no "
        "authentication, so reach it from elsewhere through a local scraper or proxy.",
    )  # fmt: skip

    @field_validator("bind")
    @classmethod
    def _loopback_host_port(cls, value: str) -> str:
        host, port = split_host_port(value)
        if not host:
            raise ValueError(f"{value}: expected HOST:PORT, e.g. 127.0.0.1:9108")
        if ":" in host and not value.startswith("["):
            raise ValueError(f"{value}: write an IPv6 address in brackets, e.g. [::1]:9108")
        if not is_loopback_host(host):
            raise ValueError(f"{value}: not a loopback address (127.x.x.x, [::1], localhost); /metrics and /healthz "
                             "have no authentication")  # fmt: skip
        if not (port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError(f"{value}: the port must be 1..65535")
        return value


def split_host_port(bind: str) -> tuple[str, str]:
    """("127.0.0.1", "9108") from "127.0.0.1:9108", ("::1", "9108") from "[::1]:9108"."""
    host, _, port = bind.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), port
