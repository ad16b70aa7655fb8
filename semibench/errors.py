"""Expected failures: the CLI turns these into one line on stderr and a non-zero exit."""


class SemibenchError(Exception):
    """A user-facing error (bad input, missing archive, divergent loss, ...)."""


class DataError(SemibenchError):
    """Corrupt, truncated or inconsistent input data."""


class ConfigError(SemibenchError):
    """Unknown names or invalid values in the configuration."""


class TrainingError(SemibenchError):
    """Training cannot go on (non-finite loss, incompatible checkpoint, missing GPU)."""
