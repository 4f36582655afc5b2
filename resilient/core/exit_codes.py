"""Process exit codes shared by the trainer, the supervisor, the CLI and the Slurm batch script.

The batch script maps these to scheduler actions, so they are part of the public contract.
"""

from enum import IntEnum


class ExitCode(IntEnum):
    FINISHED = 0
    """The run reached its final step."""
    INTERNAL_ERROR = 1
    """An unexpected exception (a bug); do not requeue blindly."""
    CONFIG_ERROR = 64
    """Invalid configuration or input files; requeueing cannot help."""
    PREEMPTED = 75
    """Stopped on request (preemption, time limit) after saving: requeue me."""
    UNHEALTHY_NODE = 76
    """This node failed a health check: requeue without it."""
    RESTART_BUDGET_EXHAUSTED = 77
    """Too many in-job restarts: do not requeue."""
    NO_PROGRESS = 78
    """Several attempts in a row made no progress: do not requeue."""
    CHECKPOINT_DAMAGED = 79
    """`ckpt verify` found a damaged checkpoint, or no loadable checkpoint exists for --load-step."""
    RANK_FAILED = 80
    """A rank exited abnormally (used by ranks and by an unsupervised run)."""
