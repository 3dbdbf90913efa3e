"""Errors raised on bad input. Each names the file, row or field at fault."""


class AttnRLError(Exception):
    """Base class for every error attnrl raises on purpose."""


class ConfigError(AttnRLError, ValueError):
    """A configuration key is unknown, missing or out of range."""


class DataError(AttnRLError, ValueError):
    """A data file or record is malformed; the message names the file and row."""


class ModelLoadError(AttnRLError, FileNotFoundError):
    """A model or tokenizer could not be loaded from a local path."""


class TrainingStalled(AttnRLError, RuntimeError):
    """Training rounds in a row left nothing to train on; the message says how many and why."""


class CheckpointError(AttnRLError, ValueError):
    """A checkpoint file is missing, of another format or version, or holds objects whose loading could run code;
    the message names the file."""


# Errors that fail the same way every time: bad configuration, data or checkpoint, a missing model, a stalled
# run (seeded rounds with nothing to train on stall again from the same checkpoint). A retry only delays them:
# Prefect's retries (tasks/retry.py) skip them and a trainer rank (infra/trainer_group.py) passes them on.
DETERMINISTIC_ERRORS: tuple[type[AttnRLError], ...] = (
    ConfigError, DataError, ModelLoadError, TrainingStalled, CheckpointError)
