"""Exceptions the CLI prints as one line instead of a traceback."""


class BidmError(ValueError):
    """A user-fixable problem: bad config, missing file, unknown method, wrong shape."""


class ConfigError(BidmError):
    """Malformed or unknown configuration keys/values."""


class DataError(BidmError):
    """Missing or malformed dataset files."""


class CheckpointError(BidmError):
    """Missing, corrupt or incompatible checkpoint."""


class TrainingDiverged(BidmError):
    """The loss became NaN or inf; the last good checkpoint is kept."""
