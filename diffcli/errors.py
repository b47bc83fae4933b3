"""The exceptions the library raises; the CLI maps each class to one documented exit code."""


class DiffcliError(Exception):
    """A failure at run time (exit code 1)."""

    exit_code = 1


class UsageError(DiffcliError):
    """A bad option or value (exit code 2)."""

    exit_code = 2


class OutputExistsError(DiffcliError):
    """An output file exists and overwriting was not allowed (exit code 3)."""

    exit_code = 3


class InputError(DiffcliError):
    """Bad or missing input: a data folder or a model file (exit code 4)."""

    exit_code = 4


class Interrupted(DiffcliError):
    """Stopped by SIGINT/SIGTERM after saving what could be saved (exit code 130)."""

    exit_code = 130
