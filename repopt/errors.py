"""The project's own exception types: every user-facing failure is one of these.

Each message names what is wrong and how to fix it; callers catch ``RepOptError`` at the
command-line boundary and print it without a traceback.
"""


class RepOptError(Exception):
    """Base class for every error this package raises on purpose."""


class ConfigError(RepOptError, ValueError):
    """A configuration value is invalid or inconsistent."""


class ScalesError(RepOptError, ValueError):
    """A scales file is missing, unreadable, unsafe or does not fit the architecture."""


class CheckpointError(RepOptError, ValueError):
    """A checkpoint is missing, unreadable, unsafe or does not fit the run."""


class DataError(RepOptError, ValueError):
    """A dataset is missing, malformed or does not fit the configuration."""


class DivergenceError(RepOptError, FloatingPointError):
    """Training produced a non-finite loss."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class Interrupted(RepOptError):
    """The run was stopped by a signal after writing ``last.pt``; resume with ``resume=true``."""


class DiskFullError(RepOptError):
    """No space was left while writing a file; the previous version of the file is intact."""

    def __init__(self, path):
        self.path = path
        super().__init__(
            f"no space left on the device while writing {path}; the previous {path.name} (if any) is "
            f"intact. Free some space and run the same command with resume=true"
        )
