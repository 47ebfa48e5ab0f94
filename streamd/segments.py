"""Segments: where a stream's recording and detection log start a new file, and what the files are called.

One rule for both outputs, and one `segment_s` per stream (`streams[].segment_s`),
so a recording and its log have the same base name:
`eus-1_20261122T180000Z_0000.mp4` and `eus-1_20261122T180000Z_0000.jsonl`.

Segments follow the source's time line, not the wall clock: a new segment
starts on the first frame whose pts reaches the next multiple of segment_s
after the first frame.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from streamd.errors import OutputError
from streamd.types import Frame

log = logging.getLogger(__name__)

_BOUNDARY_EPS_S = 1e-6  # float pts on a boundary (25 x 0.04 s) count as reaching it


@dataclass(frozen=True, slots=True)
class Segment:
    """One segment of a stream's outputs: its number, its first frame's pts and wall-clock time, its file name stem."""

    index: int
    start_pts_s: float
    started_at: float
    base_name: str


def segment_base_name(stream_id: str, started_at: float, index: int) -> str:
    """"{stream_id}_{UTC YYYYmmddTHHMMSSZ}_{index:04d}", the stem of a segment's recording and log."""
    return f"{stream_id}_{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(started_at))}_{index:04d}"


class Segmenter:
    """Where a stream's segments start, from the frames' pts.

    Segment 0 starts on the first frame. Segment k+1 starts on the first frame
    whose pts reaches first_pts + n * segment_s for the next n (so segments do
    not drift, and a gap in the stream just makes one segment shorter); a
    change of frame size, a frame after an outage (gap_s > 0: never splice
    across it), or `cut()`, also starts a segment. Its name carries
    the UTC wall-clock time of its first frame.
    """

    def __init__(self, stream_id: str, segment_s: float) -> None:
        if segment_s <= 0:
            raise ValueError(f"segment_s must be > 0, got {segment_s}")
        self.stream_id = stream_id
        self.segment_s = float(segment_s)
        self.current: Segment | None = None
        self._first_pts_s = 0.0
        self._next_boundary_s = 0.0
        self._size: tuple[int, int] | None = None
        self._cut = False

    def cut(self) -> None:
        """Start a new segment at the next frame (after an output failed and is retried: never splice across it)."""
        self._cut = True

    def advance(self, frame: Frame) -> Segment | None:
        """The new segment when `frame` starts one, else None (the frame belongs to `current`)."""
        size = (frame.width, frame.height)
        if self.current is None:
            index = 0
            self._first_pts_s = frame.pts_s
        elif self._cut or frame.gap_s > 0 or frame.pts_s >= self._next_boundary_s - _BOUNDARY_EPS_S or size != self._size:
            index = self.current.index + 1
        else:
            return None
        self._cut = False
        elapsed_s = frame.pts_s - self._first_pts_s
        self._next_boundary_s = self._first_pts_s + (elapsed_s // self.segment_s + 1) * self.segment_s
        if self._next_boundary_s - frame.pts_s <= _BOUNDARY_EPS_S:  # the frame sits on a boundary: it opens it
            self._next_boundary_s += self.segment_s
        self._size = size
        name = segment_base_name(self.stream_id, frame.decoded_at, index)
        self.current = Segment(index, frame.pts_s, frame.decoded_at, name)
        return self.current


FOLDER_MODE = 0o700  # recordings and logs are the procedure's: only the service user reads them
FILE_MODE = 0o600
_OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def start_output(segmenter: Segmenter, directory: Path, what: str) -> None:
    """An output's setup(): make its folder (make_folder); the next frame opens a new segment (at start, and on a
    retry)."""
    try:
        make_folder(directory, what)
    except OSError as exc:
        raise OutputError(f"stream {segmenter.stream_id!r}: cannot create the {what} folder {directory}: {exc}") from exc
    segmenter.cut()


def make_folder(directory: Path, what: str) -> None:
    """Create the folders of `directory` that are missing, each 0700; never change one that exists.

    An existing folder that others can write to (group or world writable, a 1777 /tmp included) is kept as it
    is, with a warning naming it: streamd's files in it are 0600 and opened so that nobody's link or file there
    is followed or replaced (open_new, publish), but others can see their names.
    """
    missing = []
    folder = directory
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        folder.mkdir(mode=FOLDER_MODE)
        folder.chmod(FOLDER_MODE)  # ours: the umask does not decide who reads a procedure's files
    mode = directory.stat().st_mode
    if not missing and mode & 0o022:
        log.warning("the %s folder %s is %s writable (mode %04o): streamd leaves its mode as it is; its files "
                    "there are 0600, but anyone who can write there sees their names",
                    what, directory, "world" if mode & 0o002 else "group", mode & 0o7777)


def open_new(path: Path) -> int:
    """A file descriptor of a new file (0600) at `path`: FileExistsError if anything is there, a symlink included."""
    return os.open(path, _OPEN_NEW, FILE_MODE)


def publish(temporary: Path, path: Path) -> Path:
    """Give a finished temporary file its name, never replacing what is there: `path`, else `stem.1.ext`, ... `.99`.

    A hard link then an unlink, so that a file or link someone else put at the name survives. The name it got.
    """
    for n in range(100):
        target = path if n == 0 else path.with_name(f"{path.stem}.{n}{path.suffix}")
        try:
            os.link(temporary, target, follow_symlinks=False)
        except FileExistsError:
            continue
        os.unlink(temporary)
        return target
    raise FileExistsError(f"{path} and {path.stem}.1..99{path.suffix} all exist")
