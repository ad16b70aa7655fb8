"""Expected failures: the CLI turns these into one line on stderr and a non-zero exit."""


class SemibenchError(Exception):
    """A user-facing error (bad input, missing archive, divergent loss, ...)."""


class DataError(SemibenchError):
    """Corrupt, truncated or inconsistent input data."""


class ConfigError(SemibenchError):
    """Unknown names or invalid values in the configuration."""


class TrainingError(SemibenchError):
    """Training cannot go on (non-finite loss, incompatible checkpoint, missing GPU)."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message ("" when it has none): a library's multi-line
    message would otherwise break the CLI's one-line error."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""


def describe(e: BaseException) -> str:
    """``"Type: first line"`` of a foreign exception, for a one-line error naming its cause."""
    line = first_line(e)
    return f"{type(e).__name__}: {line}" if line else type(e).__name__
