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
