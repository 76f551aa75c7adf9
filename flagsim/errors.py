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


class AmbiguousNameError(UnknownNameError):
    """A query names several images (a shared display name): the message lists their ids."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, `kill` or `ray job stop` stopping the command), raised where the
    program is, so that it stops the way Ctrl-C does: what finished is kept, exit 143."""


def terminate_like_an_interrupt() -> None:
    """Make SIGTERM raise `Terminated` in the main thread (elsewhere: left as it is)."""
    import signal

    def on_term(signum: int, frame: object) -> None:
        raise Terminated()

    try:
        signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        pass
