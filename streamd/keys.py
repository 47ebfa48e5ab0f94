"""ZeroMQ CURVE key files: written with the secret 0600, read with checks (the one reader for streamd and listen).

A key pair is two files in pyzmq's (and czmq's) certificate format, so that
other ZeroMQ tools read them too:

    NAME.key          the public key: give it to the other side (mode 0644)
    NAME.key_secret   the public and the secret key: keep it (mode 0600)

The daemon reads its own NAME.key_secret and a folder of its subscribers'
NAME.key files (the allow-list); a subscriber reads its own NAME.key_secret
and the daemon's NAME.key. Keys are Z85 text, 40 characters (32 bytes).
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import zmq
from zmq.auth import load_certificate
from zmq.utils import z85

from streamd.errors import FatalError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
MAX_KEY_FILE_BYTES = 64 * 1024  # a key file is ~400 bytes; refuse to read a log or a device by mistake

_BANNER = """\
#   ****  Generated on {now} by streamd keys generate  ****
#   ZeroMQ CURVE {what} Certificate
#   {advice}

"""


class KeyFileError(FatalError):
    """A key file or the allow-list folder is missing, malformed, or open to other users; the message names it."""


@dataclass(frozen=True, slots=True)
class KeyPair:
    """One side's keys, Z85-encoded (40 bytes each), as ZeroMQ's CURVE socket options take them."""

    public: bytes
    secret: bytes


def generate(name: str, folder: Path) -> tuple[Path, Path]:
    """Write a new key pair NAME.key (0644) and NAME.key_secret (0600) in `folder` (created 0700 if missing).

    The secret file is created with mode 0600 from the start (the umask can
    only remove bits), never written world-readable and fixed afterwards, as
    pyzmq's create_certificates would leave it. Existing files are never
    overwritten. Returns (public file, secret file).
    """
    if not re.fullmatch(NAME_PATTERN, name):
        raise KeyFileError(f"key name {name!r}: use letters, digits, '.', '_' and '-' (at most 64, no '/')")
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyFileError(f"cannot create the folder {folder}: {exc.strerror}") from exc
    public_file, secret_file = folder / f"{name}{PUBLIC_SUFFIX}", folder / f"{name}{SECRET_SUFFIX}"
    for path in (public_file, secret_file):
        if path.exists() or path.is_symlink():
            raise KeyFileError(f"{path} exists: remove it first, or choose another name (keys are never overwritten)")
    public, secret = zmq.curve_keypair()
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    secret_text = _BANNER.format(now=now, what="**Secret**", advice="Keep this file private (mode 0600); never copy it.")
    public_text = _BANNER.format(now=now, what="Public", advice="Give this file to the other side; it is not secret.")
    written: list[Path] = []
    try:
        _write_new(secret_file, 0o600, secret_text + _curve_section(public, secret))
        written.append(secret_file)
        _write_new(public_file, 0o644, public_text + _curve_section(public, None))
        written.append(public_file)
    except OSError as exc:
        for path in written:
            path.unlink(missing_ok=True)
        raise KeyFileError(f"cannot write {exc.filename}: {exc.strerror}") from exc
    return public_file, secret_file


def _curve_section(public: bytes, secret: bytes | None) -> str:
    lines = ["metadata", "curve", f'    public-key = "{public.decode()}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def _write_new(path: Path, mode: int, text: str) -> None:
    """Create `path` with `mode` (O_EXCL: never an existing file, never through a link) and write `text`."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_public_key(path: Path) -> bytes:
    """The public key (Z85) of a NAME.key file; a file that also holds a secret key is refused (it must not travel)."""
    public, secret = _read(path)
    if secret is not None:
        raise KeyFileError(
            f"{path} holds a secret key: give the other side the public file {path.name.removesuffix(SECRET_SUFFIX)}"
            f"{PUBLIC_SUFFIX}, and keep the secret one where it was made"
        )
    return public


def read_key_pair(path: Path) -> KeyPair:
    """The keys of a NAME.key_secret file; refused when group or others may read or write it (mode must be 0600 or 0400)."""
    public, secret = _read(path)
    if secret is None:
        raise KeyFileError(f"{path} has no secret key: this is a public key file; use the NAME{SECRET_SUFFIX} file")
    mode = stat.S_IMODE(_stat(path, "the key file").st_mode)
    if mode & 0o077:
        raise KeyFileError(f"{path} is open to other users (mode {mode:04o}): run chmod 600 {path}")
    if zmq.curve_public(secret) != public:
        raise KeyFileError(f"{path}: the public key is not the one of its secret key (the file was edited)")
    return KeyPair(public, secret)


def read_authorized_keys(folder: Path) -> frozenset[bytes]:
    """The public keys (Z85) of every NAME.key file in the allow-list `folder`; at least one.

    Refused: a missing folder, one that group or others may write (anyone who
    can write it can let themselves in), a folder without a NAME.key, a
    NAME.key_secret in it (secret keys do not belong in an allow-list), and
    any key file that does not read. Other files (a README) are ignored.
    """
    info = _stat(folder, "the folder")
    if not stat.S_ISDIR(info.st_mode):
        raise KeyFileError(f"{folder} is not a folder")
    if stat.S_IMODE(info.st_mode) & 0o022:
        raise KeyFileError(
            f"{folder} may be written by other users (mode {stat.S_IMODE(info.st_mode):04o}), who could add their own "
            f"key: run chmod go-w {folder}"
        )
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        raise KeyFileError(f"cannot list the folder {folder}: {exc.strerror}") from exc
    if secrets := [name for name in names if name.endswith(SECRET_SUFFIX)]:
        raise KeyFileError(
            f"{folder} holds a secret key ({', '.join(secrets)}): only the subscribers' public NAME{PUBLIC_SUFFIX} "
            "files belong in the allow-list; move it out"
        )
    keys = frozenset(read_public_key(folder / name) for name in names if name.endswith(PUBLIC_SUFFIX))
    if not keys:
        raise KeyFileError(
            f"{folder} holds no client key (NAME{PUBLIC_SUFFIX}): no subscriber could connect; add one made by "
            "`streamd keys generate NAME`"
        )
    return keys


def _read(path: Path) -> tuple[bytes, bytes | None]:
    """(public, secret or None) of a certificate file, each checked to be a 40-character Z85 key."""
    info = _stat(path, "the key file")
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"{path} is not a key file (not a regular file)")
    if info.st_size > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{path} is not a key file ({info.st_size} bytes; a key file has about 400)")
    try:
        public, secret = load_certificate(path)
    except OSError as exc:
        raise KeyFileError(f"cannot read the key file {path}: {exc.strerror or exc}") from exc
    except ValueError:
        raise KeyFileError(f"{path} is not a key file: no 'public-key = \"...\"' line") from None
    for what, key in (("public", public), ("secret", secret)):
        if key is not None and not _is_z85_key(key):
            raise KeyFileError(f"{path}: the {what} key is not a 40-character Z85 CURVE key")
    return public, secret


def _stat(path: Path, what: str) -> os.stat_result:
    try:
        return path.stat()
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc.strerror}") from exc


def _is_z85_key(key: bytes) -> bool:
    if len(key) != 40:
        return False
    try:
        return len(z85.decode(key)) == 32
    except (ValueError, KeyError):
        return False
