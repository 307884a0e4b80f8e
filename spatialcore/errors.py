"""Errors that end a command with one line (no traceback): the CLI prints them and exits 1.
(Config mistakes are :class:`spatialcore.config.ConfigError`, exit 2.)"""


class RunError(RuntimeError):
    """A run that cannot start or go on; the message says where and why."""


class CheckpointError(RunError):
    """A run folder's checkpoints cannot be resumed from (the message names the file)."""


class TrainingError(RunError):
    """Training hit something it must not continue past (non-finite losses or rewards)."""
