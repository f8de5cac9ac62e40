"""Errors meant for people: each names the input (file, line, field) and what was expected."""


class JaxswiftError(Exception):
    """Base class; the CLI prints these as one line instead of a traceback."""


class ConfigError(JaxswiftError):
    """A flag, YAML key or model config value is wrong."""


class CheckpointError(JaxswiftError):
    """A checkpoint folder or file cannot be read or written."""


class DataError(JaxswiftError):
    """A dataset file or row is malformed."""
