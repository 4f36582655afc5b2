"""Errors that end a command with a one-line message and a distinct exit code."""

from resilient.core.exit_codes import ExitCode


class ResilientError(Exception):
    """An expected failure: printed as one line, mapped to `exit_code`."""

    exit_code: ExitCode = ExitCode.INTERNAL_ERROR
    label: str = "error"

    def one_line(self) -> str:
        """The message as printed: `label: message`, on one line."""
        return f"{self.label}: {' '.join(str(self).split())}"


class ConfigError(ResilientError):
    """Bad configuration or input files (config, data directory, tokenizer)."""

    exit_code = ExitCode.CONFIG_ERROR
    label = "config error"


class CheckpointError(ResilientError):
    """A checkpoint is damaged, missing or incompatible with the run."""

    exit_code = ExitCode.CHECKPOINT_DAMAGED
    label = "checkpoint error"


class RunDirBusy(ResilientError):
    """Another run (a live supervisor or an active Slurm job) owns the run directory."""

    exit_code = ExitCode.RUN_DIR_BUSY
    label = "run dir busy"


class StorageFault(ResilientError):
    """The run or checkpoint directory vanished, was replaced, or holds something that must not be used
    (a link in place of a log): the run stops as a storage fault, never blamed on a node."""

    exit_code = ExitCode.STORAGE_FAULT
    label = "storage fault"
