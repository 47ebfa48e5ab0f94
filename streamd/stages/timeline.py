"""A stream's presentation times on one strictly increasing line (streamd.stages.decode's Timing)."""

from __future__ import annotations


class TimeLine:
    """A stream's pts on one strictly increasing line, continuous across loops, reopens and clock jumps.

    A missing pts is one frame after the last. The first frame after a reopen
    goes on after the gap (by the wall clock). A source clock that goes back,
    or forward by more than it may (JUMP_S or 10 frames, plus the wall-clock
    time since the last packet for a paced source), has jumped (a corrupted
    timestamp, a reset): the frame is placed one frame after the last, and the
    jump is returned, to be flagged, and removed from every later frame.
    """

    JUMP_S = 1.0

    def __init__(self, paced: bool):
        self.paced = paced
        self.offset_s = 0.0  # added to the source's time
        self.last_pts_s: float | None = None
        self.last_received: float | None = None
        self._restarted = False

    def restart(self) -> None:
        """The source's clock starts again on purpose (a file loops): go on one frame later, no jump."""
        self._restarted = True

    def place(self, source_pts_s: float | None, received: float, gap_s: float, frame_s: float) -> tuple[float, float]:
        """(pts_s, jump_s) of a frame whose packet left the demuxer at monotonic `received`."""
        last, jump_s = self.last_pts_s, 0.0
        if last is None:
            pts_s = 0.0 if source_pts_s is None else source_pts_s + self.offset_s
        elif gap_s or self._restarted or source_pts_s is None:
            pts_s = last + max(frame_s, gap_s)
        else:
            raw = source_pts_s + self.offset_s
            # How far pts may move on: by the wall clock for a paced source (it may move less: the consumer was
            # late and the frames were buffered), by a few frames for a file read as fast as it decodes.
            allowed_s = max(self.JUMP_S, 10 * frame_s)
            if self.paced and self.last_received is not None:
                allowed_s += max(0.0, received - self.last_received)
            if raw <= last or raw - last > allowed_s:
                pts_s, jump_s = last + frame_s, raw - (last + frame_s)
            else:
                pts_s = raw
        if source_pts_s is not None:
            self.offset_s += pts_s - (source_pts_s + self.offset_s)
        self._restarted = False
        self.last_pts_s, self.last_received = pts_s, received
        return pts_s, jump_s
