"""streamd's error hierarchy, classified at the stage boundary.

Recoverable errors (a corrupt packet, a dropped connection) are logged,
counted, and the stage goes on. Fatal errors (a bad bundle, an engine that
will not load, a CUDA error) stop the pipeline and make the process exit
non-zero.
"""


class StreamdError(Exception):
    """Base of every error streamd raises on purpose."""


class FatalError(StreamdError):
    """The pipeline cannot go on."""


class RecoverableError(StreamdError):
    """One item or one connection failed; the stage goes on."""


class ConfigError(FatalError):
    """The configuration file is invalid; the message names file, line and field."""


class BundleError(FatalError):
    """A model bundle is missing, malformed, or does not match its checksum."""


class BackendError(FatalError):
    """An inference backend could not load or run."""


class SourceError(RecoverableError):
    """A video source could not be opened or stopped delivering frames."""


class OutputError(FatalError):
    """A recording, log or socket could not be written."""
