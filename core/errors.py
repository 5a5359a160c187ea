"""User-facing error types of the engine (one-line messages that say what to do)."""

from titanserve.ipc.errors import TitanserveError, WorkerLost

__all__ = ["ConfigError", "InvalidRequest", "TitanserveError", "WorkerLost"]


class ConfigError(TitanserveError, ValueError):
    """A checkpoint, flag or setting is wrong."""


class InvalidRequest(TitanserveError, ValueError):
    """A request cannot be served as given (empty prompt, bad sampling parameter, ...)."""
