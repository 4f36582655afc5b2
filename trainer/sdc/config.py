"""The numerics section: silent-data-corruption defence (replica agreement, re-execution, what to do)."""

from typing import Literal

from pydantic import Field

from resilient.core.configbase import Section


class NumericsConfig(Section):
    """Catching silent data corruption: data-parallel replicas compare parameter digests, a suspicious
    step is re-executed on the same inputs, and a node found corrupting is removed or restarted."""

    replica_check_interval_steps: int = Field(10, ge=0)
    """Every N steps (and when an attempt starts) every data-parallel replica digests its parameters after
    the optimizer step and the digests are compared (one small all-gather); a NaN/Inf, a loss or
    gradient-norm spike or a mismatch is then re-executed from the last agreeing checkpoint before anything
    is acted on (0: off; a NaN or spike is rolled back at once, as train.numeric_fault_action says)."""
    sdc_action: Literal["remove", "restart"] = "remove"
    """A node found corrupting data: `remove` it (its ranks exit UNHEALTHY_NODE: a spare node takes its
    place where there is one, else Slurm requeues the job without it) or `restart` every rank and keep it
    (a single machine). Either way the run resumes from the newest checkpoint at or before the last step
    whose replica check agreed."""
    grad_norm_spike_factor: float = Field(0.0, ge=0)
    """A gradient norm above this multiple of the median of the last `train.loss_spike_window` norms is a
    numerical fault, like a loss spike (0: off)."""
