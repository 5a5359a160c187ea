"""User-facing error types of the engine (one-line messages that say what to do)."""


class TitanserveError(Exception):
    """Base of every error titanserve raises on purpose."""


class ConfigError(TitanserveError, ValueError):
    """A checkpoint, flag or setting is wrong."""


class InvalidRequest(TitanserveError, ValueError):
    """A request cannot be served as given (empty prompt, bad sampling parameter, ...)."""
