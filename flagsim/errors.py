"""Exception types whose message is the one line a user sees."""

from __future__ import annotations


class FlagsimError(Exception):
    """A user-facing error: the CLI prints `flagsim: error: <message>` and exits non-zero."""

    exit_code = 2


class ConfigError(FlagsimError):
    """A configuration file or argument is invalid."""


class UnknownModelError(FlagsimError, KeyError):
    """A model name is not in the registry."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class WeightsUnavailableError(FlagsimError):
    """A model's weights cannot be found locally or fetched."""


class DataError(FlagsimError):
    """An input or output file is missing, corrupt or inconsistent."""


class UnknownNameError(FlagsimError):
    """A query names an image that is not in the run."""
