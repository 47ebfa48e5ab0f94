"""What a part of the daemon checks before the start: each source and output declares its own (`Checked`).

`streamd.preflight` asks every part the config builds (streamd.pipeline.endpoints) for its findings, so a new
output brings its own check with it instead of a copy of its setup in the preflight. A finding names the field
relative to the part's own config section; the preflight puts the section's path and YAML line in front.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from streamd.configbase import short_path

NAME_MAX = 255  # bytes in one file or folder name (Linux, every common file system)


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing `run` would fail on. field: under the part's own config section (() is the section itself);
    environment: the machine, not the config, is at fault (a taken port, a folder not writable now: systemd may
    retry those; a bad config it may not)."""

    field: tuple[str | int, ...]
    text: str
    environment: bool = False


@runtime_checkable
class Checked(Protocol):
    """A source or an output that can say, before the start and without side effects that last, what would fail."""

    def check(self) -> Iterator[Finding]: ...


def folder_findings(field: tuple[str | int, ...], folder: Path) -> Iterator[Finding]:
    """A finding for `folder` (field names it) when streamd could not write files in it."""
    if found := unwritable(folder):
        yield Finding(field, *found)


def unwritable(folder: Path) -> tuple[str, bool] | None:
    """Why streamd could not write files in `folder` (creating it if need be), and whether the machine is at
    fault (True: a folder not writable now) or the path itself (False: a name too long, a symlink loop); or None."""
    too_long = [part for part in folder.parts if len(os.fsencode(part)) > NAME_MAX]
    if too_long:
        return f"{short_path(folder)}: a folder name of {len(os.fsencode(too_long[0]))} bytes (at most {NAME_MAX})", False
    existing = folder
    while True:
        try:
            existing.stat()
            break
        except (FileNotFoundError, NotADirectoryError):  # to be created (or under a file: said below)
            if existing.parent == existing:
                break
            existing = existing.parent
        except OSError as exc:  # ELOOP (a symlink loop), ENAMETOOLONG, EACCES on the way
            fixed = exc.errno in (errno.ELOOP, errno.ENAMETOOLONG)
            return f"{short_path(folder)} cannot be reached: {exc.strerror}", not fixed
    if not existing.is_dir():
        return f"{existing} is not a folder", True
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "folder" if existing == folder else f"folder {existing}, where {folder} would be created,"
        return f"the {what} is not writable by this user (uid {os.getuid()})", True
    return None
