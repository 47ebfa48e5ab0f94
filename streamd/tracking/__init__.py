"""Tracks over a stream's frames: stable ids, confirmation (N of the last M frames) and track events."""

from streamd.tracking.tracker import TrackEvent, Tracker, TrackSettings, TrackUpdate, make_tracker

__all__ = ["TrackEvent", "TrackSettings", "TrackUpdate", "Tracker", "make_tracker"]
