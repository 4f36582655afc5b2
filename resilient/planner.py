"""Capacity and checkpoint-interval planning: parameters, memory, checkpoint cost, Young/Daly intervals.

Pure functions of an architecture, a parallel layout and a few hardware/reliability assumptions.
Sources (formulas reproduced from memory of the papers, no network at hand):
- parameters: Llama layout (untied embeddings, GQA attention, SwiGLU MLP, RMSNorm);
- memory: Megatron-LM distributed-optimizer table (bf16 params + fp32 grads: 18 B/param, or
  6 + 12/d with the optimizer sharded over d data-parallel ranks); activations per layer
  34*s*b*h/t bytes with sequence parallelism and selective recompute (Korthikanti et al. 2022);
- interval: Young 1974 sqrt(2*delta*M); Daly 2006 higher-order optimum and expected wall time.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from trainer.checkpoint.interval import daly_interval, young_interval
from trainer.flops import flops_per_token, layer_params, padded_vocab, parameter_count
from trainer.presets import Architecture
from trainer.stages import stage_layers

H100_BF16_DENSE_TFLOPS = 989.0
H100_HBM_GIB = 80.0

# Llama 3 (Dubey et al. 2024, section 3.3.4): 419 unexpected interruptions in a 54-day snapshot on 16,384 H100s.
LLAMA3_FAILURES_PER_GPU_HOUR = 419 / (54 * 24 * 16384)


# -- parameters -------------------------------------------------------------------------------


# -- memory -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """A parallel layout; world = tp * pp * cp * dp."""

    tp: int
    pp: int
    cp: int
    dp: int
    distributed_optimizer: bool = True

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter of each training state (defaults: bf16 weights, fp32 grads, fp32 master + Adam)."""

    weights: float = 2.0
    grads: float = 4.0
    master: float = 4.0
    moments: float = 8.0

    @classmethod
    def fp32(cls) -> StateBytes:
        """fp32 parameters (the CPU trainer): the optimizer updates them in place, no master copy."""
        return cls(weights=4.0, grads=4.0, master=0.0, moments=8.0)

    @property
    def checkpoint(self) -> float:
        """What a checkpoint holds per parameter: weights, fp32 master copy, two Adam moments (14 B)."""
        return self.weights + self.master + self.moments


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on the busiest GPU (the pipeline stage with the largest total)."""

    stage: int
    params: float
    weights: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


def memory_per_stage(
    arch: Architecture,
    layout: Layout,
    *,
    seq_len: int,
    micro_batch: int,
    grad_accum: int,
    state: StateBytes = StateBytes(),
    act_bytes_factor: float = 34.0,
) -> list[MemoryEstimate]:
    """Weights, grads, optimizer state and 1F1B activations of one GPU of each pipeline stage.

    Matrices are split over TP (norms replicated); master weights and Adam moments are sharded
    over DP x CP with the distributed optimizer (megatron shards over the data-parallel group that
    includes context parallelism). Stage i holds activations of min(pp - i, grad_accum) micro-batches.
    """
    h, t = arch.hidden_size, layout.tp
    per_layer = (layer_params(arch) - 2 * h) / t + 2 * h
    vocab = padded_vocab(arch.vocab_size, t) * h / t
    shard = layout.dp * layout.cp if layout.distributed_optimizer else 1
    tokens = seq_len / layout.cp * micro_batch
    stages = []
    for i, n_layers in enumerate(stage_layers(arch.num_layers, layout.pp)):
        params = n_layers * per_layer + (vocab if i == 0 else 0) + (vocab + h if i == layout.pp - 1 else 0)
        in_flight = min(layout.pp - i, grad_accum)
        acts = act_bytes_factor * tokens * h / t * n_layers * in_flight
        if i == layout.pp - 1:
            acts += 4 * tokens * padded_vocab(arch.vocab_size, t) / t  # fp32 logits for the loss
        stages.append(
            MemoryEstimate(
                stage=i,
                params=params,
                weights=params * state.weights,
                grads=params * state.grads,
                optimizer=params * (state.master + state.moments) / shard,
                activations=acts,
            )
        )
    return stages


def memory_per_gpu(arch: Architecture, layout: Layout, **workload: Any) -> MemoryEstimate:
    """The busiest pipeline stage of `memory_per_stage`, which takes the same keyword arguments."""
    return max(memory_per_stage(arch, layout, **workload), key=lambda m: m.total)


# -- time and checkpoint intervals --------------------------------------------------------------


def daly_wall_time(solve_time: float, tau: float, delta: float, restart: float, mtbf: float) -> float:
    """Daly's expected wall time: M e^(R/M) (e^((tau+delta)/M) - 1) T_s / tau."""
    return mtbf * math.exp(restart / mtbf) * math.expm1((tau + delta) / mtbf) * solve_time / tau


def predicted_goodput(tau: float, delta: float, restart: float, mtbf: float) -> float:
    """Solve time over expected wall time in Daly's model (independent of the solve time)."""
    return 1.0 / daly_wall_time(1.0, tau, delta, restart, mtbf)


# -- restart cost -----------------------------------------------------------------------------

RESTART_COORDINATION_FIT = Path(__file__).with_name("restart_coordination.json")
"""bench/scale's power-law fits (y = a * nodes^b) of failure -> all ranks stopped and of the restart
decision -> all nodes past the next barrier, from 2 to 1024 simulated nodes."""


def restart_coordination_seconds(nodes: int, fit_path: Path = RESTART_COORDINATION_FIT) -> tuple[float, str]:
    """The supervisors' share of a restart at `nodes` nodes, from the measured fit, with its source."""
    data = json.loads(fit_path.read_text())
    parts = [data["fits"][k]["a"] * nodes ** data["fits"][k]["b"] for k in ("fail_to_stop_s", "decide_to_go_s")]
    largest = max(data["nodes_measured"])
    how = f"extrapolated beyond the {largest} measured" if nodes > largest else "measured"
    return sum(parts), (
        f"{sum(parts):.1f} s at {nodes} nodes ({how}; bench/scale: stop {parts[0]:.2f} s + "
        f"barrier {parts[1]:.2f} s, {data['source']})"
    )


# -- the whole plan -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Assumptions:
    """Hardware and reliability figures the plan depends on."""

    mtbf_hours: float | None = None
    """Job mean time between failures (None: Llama 3's per-GPU failure rate scaled to the GPU count)."""
    ckpt_write_gbps: float = 100.0
    """Aggregate checkpoint write (and read) bandwidth, GB/s."""
    restart_overhead_s: float = 300.0
    """Restart cost besides the supervisors' coordination (measured, see restart_coordination_seconds) and
    reading the checkpoint: rank start after the barrier (interpreter, imports, process groups, model
    build), not measurable on a CPU-only machine."""
    gpus_per_node: int = 8
    """GPUs per node: the node count sets the measured coordination cost."""
    mfu: float = 0.40
    """Model FLOPs utilisation expected (Llama 3 405B: 38-43%)."""
    peak_tflops: float = H100_BF16_DENSE_TFLOPS
    """Per-GPU dense bf16 peak."""
    hbm_gib: float = H100_HBM_GIB
    """Per-GPU memory."""
    state: StateBytes = StateBytes()
    """Bytes per parameter of the training state."""
    spare_nodes: int = 0
    """Spare nodes in the allocation (slurm.spare_nodes): a node failure costs one instead of a requeue."""
    allocation_hours: float = 24.0
    """Time between two allocations (the Slurm time limit): the spares are replenished only then."""
    node_failure_share: float = 0.78
    """Failures that take a node out (Llama 3: 78% of the 419 unplanned interruptions were hardware)."""
    requeue_s: float = 600.0
    """A Slurm requeue: the scheduler's wait and the new allocation's start (cred_expire alone is 120 s by
    default; on a busy partition it can be hours)."""
    replacement_s: float = 30.0
    """Replacing a node with a spare in-job, besides the coordination (lease expiry, warm ranks, the lost
    node's state from its peer replica); bench/node_loss measures it on the local cluster."""


@dataclass(frozen=True)
class Plan:
    gpus: int
    layout: Layout
    params: int
    published_params: float | None
    checkpoint_bytes: float
    memory: MemoryEstimate
    hbm_bytes: float
    step_seconds: float
    tokens_per_gpu_per_second: float
    mtbf_seconds: float
    ckpt_write_seconds: float
    restart_seconds: float
    restart_coordination_seconds: float
    restart_coordination_source: str
    young_seconds: float
    daly_seconds: float
    daly_interval_steps: int
    predicted_goodput: float
    spare_nodes: int = 0
    node_failures_per_allocation: float = 0.0
    """Expected failures that take a node out between two allocations."""
    spares_cover_probability: float = 1.0
    """Probability that the spares cover every node failure between two allocations (Poisson)."""
    node_restart_seconds: float = 0.0
    """Expected cost of a node failure: replaced by a spare while one is left, else a requeue."""
    node_restart_without_spares_seconds: float = 0.0
    predicted_goodput_without_spares: float = 0.0

    def to_json(self) -> dict:
        out = asdict(self)
        out["memory"]["total"] = self.memory.total
        out["layout"]["world"] = self.layout.world
        return out


def make_plan(
    arch: Architecture,
    layout: Layout,
    *,
    seq_len: int,
    micro_batch: int,
    global_batch: int,
    assume: Assumptions = Assumptions(),
) -> Plan:
    """Everything `resilient plan` prints, for one architecture on one layout."""
    gpus = layout.world
    params = parameter_count(arch)
    ckpt_bytes = params * assume.state.checkpoint
    grad_accum = max(1, global_batch // (micro_batch * layout.dp))
    memory = memory_per_gpu(
        arch, layout, seq_len=seq_len, micro_batch=micro_batch, grad_accum=grad_accum, state=assume.state
    )
    tokens_per_step = global_batch * seq_len
    step_s = tokens_per_step * flops_per_token(arch, seq_len) / (gpus * assume.peak_tflops * 1e12 * assume.mfu)
    mtbf_h = assume.mtbf_hours if assume.mtbf_hours is not None else 1 / (LLAMA3_FAILURES_PER_GPU_HOUR * gpus)
    mtbf = mtbf_h * 3600
    write_s = ckpt_bytes / (assume.ckpt_write_gbps * 1e9)
    coordination, source = restart_coordination_seconds(-(-gpus // assume.gpus_per_node))
    restart = coordination + assume.restart_overhead_s + write_s  # reading back at the write bandwidth
    spares = spare_cover(assume.spare_nodes, assume.allocation_hours * assume.node_failure_share / mtbf_h)
    requeued = restart + assume.requeue_s
    replaced = coordination + assume.replacement_s
    # Of the failures that take a node out, those a spare covers cost a replacement, the rest a requeue.
    node_cost = spares.covered_share * replaced + (1 - spares.covered_share) * requeued
    share = assume.node_failure_share
    with_spares = share * node_cost + (1 - share) * restart
    without = share * requeued + (1 - share) * restart
    daly = daly_interval(write_s, mtbf)
    return Plan(
        gpus=gpus,
        layout=layout,
        params=params,
        published_params=arch.published_params,
        checkpoint_bytes=ckpt_bytes,
        memory=memory,
        hbm_bytes=assume.hbm_gib * 2**30,
        step_seconds=step_s,
        tokens_per_gpu_per_second=tokens_per_step / step_s / gpus,
        mtbf_seconds=mtbf,
        ckpt_write_seconds=write_s,
        restart_seconds=restart,
        restart_coordination_seconds=coordination,
        restart_coordination_source=source,
        young_seconds=young_interval(write_s, mtbf),
        daly_seconds=daly,
        daly_interval_steps=max(1, round(daly / step_s)),
        predicted_goodput=predicted_goodput(daly, write_s, with_spares, mtbf),
        spare_nodes=assume.spare_nodes,
        node_failures_per_allocation=spares.expected,
        spares_cover_probability=spares.probability,
        node_restart_seconds=node_cost,
        node_restart_without_spares_seconds=requeued,
        predicted_goodput_without_spares=predicted_goodput(daly, write_s, without, mtbf),
    )


@dataclass(frozen=True)
class SpareCover:
    expected: float
    """Expected node failures in one allocation."""
    probability: float
    """P(failures <= spares): the spares cover the whole allocation."""
    covered_share: float
    """Expected share of the node failures a spare covers: E[min(N, k)] / E[N]."""


def spare_cover(spares: int, expected: float) -> SpareCover:
    """Node failures in an allocation as a Poisson count with mean `expected`; `spares` cover the first ones."""
    if expected <= 0:
        return SpareCover(0.0, 1.0, 1.0)
    pmf = [math.exp(-expected)]
    for i in range(1, spares + 1):
        pmf.append(pmf[-1] * expected / i)
    probability = min(1.0, sum(pmf))
    covered = sum(i * p for i, p in enumerate(pmf)) + spares * (1 - probability)  # E[min(N, k)]
    return SpareCover(expected, probability, covered / expected)


def render_plan(plan: Plan) -> str:
    """Human-readable plan."""
    gib, m = 2**30, plan.memory
    lay = plan.layout
    published = f" (published {plan.published_params / 1e9:.1f}B)" if plan.published_params else ""
    fits = "fits" if m.total <= plan.hbm_bytes else "DOES NOT FIT"
    return "\n".join(
        [
            f"parameters        {plan.params / 1e9:.2f}B{published}",
            f"layout            {plan.gpus} GPUs = TP{lay.tp} x PP{lay.pp} x CP{lay.cp} x DP{lay.dp}"
            f"{' (distributed optimizer)' if lay.distributed_optimizer else ''}",
            f"checkpoint        {plan.checkpoint_bytes / 1e12:.2f} TB, write {plan.ckpt_write_seconds:.0f} s",
            f"memory per GPU    {m.total / gib:.1f} GiB on stage {m.stage} ({fits} in {plan.hbm_bytes / gib:.0f} GiB): "
            f"weights {m.weights / gib:.1f}, grads {m.grads / gib:.1f}, optimizer {m.optimizer / gib:.1f}, "
            f"activations {m.activations / gib:.1f}",
            f"step time         {plan.step_seconds:.1f} s ({plan.tokens_per_gpu_per_second:.0f} tokens/s per GPU)",
            f"job MTBF          {plan.mtbf_seconds / 3600:.1f} h, restart {plan.restart_seconds / 60:.1f} min "
            f"(coordination {plan.restart_coordination_seconds:.1f} s + rank start "
            f"{plan.restart_seconds - plan.restart_coordination_seconds - plan.ckpt_write_seconds:.0f} s + "
            f"checkpoint read {plan.ckpt_write_seconds:.0f} s)",
            f"coordination      {plan.restart_coordination_source}",
            f"interval          Young {plan.young_seconds / 60:.1f} min, Daly {plan.daly_seconds / 60:.1f} min "
            f"= every {plan.daly_interval_steps} steps",
            f"predicted goodput {plan.predicted_goodput:.1%} (Daly's expected-wall-time model)",
            f"spare nodes       {plan.spare_nodes}: cover all {plan.node_failures_per_allocation:.2f} expected node "
            f"failures per allocation with probability {plan.spares_cover_probability:.1%}; a node failure costs "
            f"{plan.node_restart_seconds / 60:.1f} min (requeue {plan.node_restart_without_spares_seconds / 60:.1f} "
            f"min); goodput without spares {plan.predicted_goodput_without_spares:.1%}",
        ]
    )


# -- replica checks (silent data corruption) --------------------------------------------------------

H100_HBM_GBPS = 3350.0
"""H100 SXM HBM3 bandwidth, GB/s."""
COLLECTIVE_HOP_S = 8e-6
"""Latency of one hop of a small-message ring collective between nodes (NCCL's LL protocol, a few us)."""


def replica_check_seconds(
    weight_bytes: float, world: int, *, hbm_gbps: float = H100_HBM_GBPS, hop_s: float = COLLECTIVE_HOP_S
) -> float:
    """One replica check on one GPU: its parameters read once at HBM bandwidth (the 64-bit bit sums run on
    the device) plus one all-gather of 8 bytes per rank, latency-bound (a ring of `world` - 1 hops)."""
    return weight_bytes / (hbm_gbps * 1e9) + (world - 1) * hop_s


def replica_check_overhead(
    plan: Plan, interval_steps: int, *, hbm_gbps: float = H100_HBM_GBPS, hop_s: float = COLLECTIVE_HOP_S
) -> tuple[float, str]:
    """The share of step time replica checks every `interval_steps` steps cost the plan's busiest GPU."""
    check = replica_check_seconds(plan.memory.weights, plan.gpus, hbm_gbps=hbm_gbps, hop_s=hop_s)
    share = check / (interval_steps * plan.step_seconds)
    return share, (
        f"{check * 1e3:.1f} ms per check ({plan.memory.weights / 2**30:.1f} GiB of weights at "
        f"{hbm_gbps:g} GB/s + {plan.gpus - 1} hops of {hop_s * 1e6:g} us) every {interval_steps} steps of "
        f"{plan.step_seconds:.1f} s: {share:.4%} of step time"
    )
