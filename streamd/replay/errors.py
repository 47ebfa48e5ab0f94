"""The replay's errors: each names the file (or option) at fault."""

from __future__ import annotations

from streamd.errors import FatalError


class ReplayError(FatalError):
    """A replay that cannot start or finish: a source that is not a video, an output folder already used."""


class TruthError(ReplayError):
    """A ground-truth file that cannot be read: the message names the file, the line and the field."""
