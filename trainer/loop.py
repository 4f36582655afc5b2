"""One Megatron rank: build everything, resume, train to the final step, checkpoint, stop on request."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NoReturn

import psutil
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from resilient.core import ledger, permissions
from resilient.core.errors import ConfigError
from resilient.core.events import LedgerEvent
from resilient.core.exit_codes import ExitCode
from resilient.core.rundir import RunDir
from resilient.rank import Phase, RankEnv, StopFlag, connect
from resilient.rank.env import assigned_at
from trainer import distributed, numerics
from trainer.bitflip import BitFlipper
from trainer.checkpoint import ondisk
from trainer.checkpoint.checkpointer import Checkpointer
from trainer.checkpoint.state import TrainState
from trainer.config import TrainerConfig, cpu_refusal
from trainer.data.loader import build_train_loader, build_validation_batches
from trainer.data.prepare import check_inputs, prepare_if_needed
from trainer.flops import device_peak_flops, flops_per_token, padded_vocab
from trainer.init import init_layout_invariant
from trainer.injection import FaultInjection
from trainer.model import ModelBuild, build_model
from trainer.optim import build_optimizer, build_scheduler
from trainer.sdc import verdicts
from trainer.sdc.guard import MISMATCH, Check, Finding, SdcGuard, SilentDataCorruption
from trainer.sdc.replicas import Topology
from trainer.step import StepRunner

log = logging.getLogger("trainer")


def model_build(cfg: TrainerConfig, *, on_gpu: bool) -> ModelBuild:
    """The config's parallel and precision fields, as the model and optimizer builders take them: every
    field of ModelBuild but `bf16` is the parallel.* or train.* field of its name."""
    t = cfg.train
    named = {**cfg.parallel.model_dump(), **t.model_dump()}
    same = {f.name: named[f.name] for f in fields(ModelBuild) if f.name != "bf16"}
    return ModelBuild(**same, bf16=t.precision == "bf16" or (t.precision == "auto" and on_gpu))


@dataclass(frozen=True)
class StepResult:
    loss: float
    """The data-parallel mean loss (the same on every rank)."""
    grad_norm: float
    """The global gradient norm before clipping (the same on a replica's ranks)."""
    own_bits: int
    """The bits of this rank's per-token losses, summed (its replica's, on the last pipeline stage; else 0):
    what the replica computed before any collective of the step."""
    window: int
    """The global sample the step's data window starts at."""
    compute_time: float
    """This rank's seconds before the gradient reduction."""
    stop_requested: bool
    """Some rank was asked to stop."""


class _AwaitStop(Exception):
    """A finding blames another node: this rank waits for its supervisor to stop it."""


class Trainer:
    """Holds the rank's objects; `run` is the whole life of the rank."""

    def __init__(self, cfg: TrainerConfig, env: RankEnv, run_dir: Path) -> None:
        self.cfg, self.env, self.run_dir = cfg, env, run_dir
        self.stop_flag = StopFlag().install(env)
        self.heartbeat = connect(env)
        self.is_logger = env.rank == 0

    def storage_problem(self) -> str | None:
        """Why the checkpoint directory is no longer the one this rank started with (removed or replaced),
        or None: an error while it vanished is the storage's fault, not this rank's."""
        checkpointer = getattr(self, "checkpointer", None)
        return checkpointer.root_problem() if checkpointer is not None else None

    def _beat(self, phase: Phase, step: int, **figures) -> None:
        self._last_beat = (phase, step)
        self.heartbeat.send(phase, step, **figures)

    def _on_commit(self, step: int, total_s: float, size: int) -> None:
        # Same phase and step as the last heartbeat: reports the commit without counting as progress.
        self._beat(*self._last_beat, ckpt_step=step, ckpt_total_s=total_s, ckpt_bytes=size)

    def _build(self) -> None:
        cfg, env = self.cfg, self.env
        # Every attempt, before the first collective: the whole path to the directories this rank writes is
        # this user's alone (the supervisor checked too; a rank run without one checks on its own).
        permissions.require_private(
            [self.run_dir, cfg.checkpoint.root(self.run_dir)],
            allowed=env.allow_shared_dir,
            flag="supervisor.allow_shared_dir=true",
        )
        arch = cfg.model.architecture()
        # Input checks run on every rank before the first collective, so a bad path fails all ranks
        # at once with the config exit code instead of leaving the others waiting at a barrier.
        vocab = check_inputs(cfg.data)
        if vocab > arch.vocab_size:
            raise ConfigError(
                f"data.tokenizer: vocabulary of {vocab} tokens exceeds the model's vocab_size {arch.vocab_size}"
            )
        p = cfg.parallel
        on_gpu = torch.cuda.is_available()
        if not on_gpu and (problem := cpu_refusal(cfg)):
            raise ConfigError(problem)
        self.model_build = model_build(cfg, on_gpu=on_gpu)
        self.device = distributed.init_distributed(env, self.model_build, timeout_s=p.timeout_s)
        self._beat(Phase.BUILD, 0)
        distributed.seed_all(cfg.train.seed)
        self.chunks = build_model(arch, self.model_build, device=self.device)
        if not on_gpu:
            init_layout_invariant(self.chunks, cfg.train.seed)
        self.optimizer = build_optimizer(self.chunks, cfg.train, self.model_build)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self.runner = StepRunner(
            self.chunks, self.optimizer, seq_len=cfg.seq_len, micro_batch=cfg.train.micro_batch, device=self.device
        )
        if env.rank == 0:
            prepare_if_needed(cfg.data, self.run_dir)
        dist.barrier()
        dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        loader = build_train_loader(
            cfg.data,
            run_dir=self.run_dir,
            seq_len=cfg.seq_len,
            global_batch=cfg.train.global_batch,
            micro_batch=cfg.train.micro_batch,
            dp_rank=dp_rank,
            dp_size=dp_size,
            seed=cfg.train.seed,
        )
        self.val_batches = (
            build_validation_batches(
                cfg.data,
                run_dir=self.run_dir,
                seq_len=cfg.seq_len,
                micro_batch=cfg.train.micro_batch,
                dp_rank=dp_rank,
                dp_size=dp_size,
            )
            if cfg.train.eval_every
            else []
        )
        if p.vpp:  # the interleaved schedule runs whole groups of pp micro-batches
            self.val_batches = self.val_batches[: len(self.val_batches) - len(self.val_batches) % p.pp]
            if cfg.train.eval_every and not self.val_batches:
                raise ConfigError(f"data.validation_docs: too few validation windows for pp={p.pp} with vpp")
        identity = arch.model_dump(exclude={"published_params"})
        identity["padded_vocab"] = padded_vocab(arch.vocab_size, p.tp)
        self.state = TrainState(
            self.chunks, self.optimizer, self.scheduler, numerics.SkippingLoader(loader), identity=identity
        )
        self.losses = numerics.LossHistory()
        self.grad_norms = numerics.LossHistory()
        self.injection = FaultInjection(self.run_dir, env.attempt, env.rank)
        self.flipper = BitFlipper(self.chunks)
        self.runner.after_grad_reduce = self.flipper.after_grad_reduce
        self.sdc = (
            SdcGuard(
                cfg.numerics,
                self.chunks,
                Topology.gather(env),
                device=self.device,
                run_dir=self.run_dir,
                attempt=env.attempt,
            )
            if cfg.numerics.replica_check_interval_steps
            else None
        )
        self._withdrawn: dict[str, list[int]] = {"disk": [], "memory": []}
        self.checkpointer = Checkpointer(
            cfg.checkpoint,
            self.run_dir,
            env,
            final_step=cfg.train.steps,
            device=self.device,
            on_commit=self._on_commit,
            on_save_start=self._on_save_start,
        )
        self.flops_per_token = flops_per_token(arch, cfg.seq_len)
        self.peak = device_peak_flops(self.device, cfg.train.peak_flops)

    def _train_step(self) -> StepResult:
        """Forward/backward over this rank's micro-batches, reduce, clip, update."""
        started = time.perf_counter()
        step = self.state.step + 1
        micro_batches = self.state.loader.next_step()
        window = self.state.loader.position - self.cfg.train.global_batch  # after any skipped window
        poison = self.injection.poison(step, window)
        self.flipper.arm(self.injection.bitflip(step))
        loss, grad_norm = self.runner.train(micro_batches, poison=poison)
        compute_time = self.runner.compute_done - started  # up to the gradient reduction (stragglers)
        self.scheduler.step(1)
        # One small all-reduce per step carries both the loss (known on the last pipeline stage, equal
        # on its tensor- and context-parallel peers) and the stop flags: every rank then sees the same
        # data-parallel mean loss, judges it the same way and stops after the same step (Megatron's
        # signal-handler idea).
        flags = torch.stack([loss.detach().float(), torch.tensor(float(self.stop_flag.requested), device=self.device)])
        dist.all_reduce(flags)
        loss_sum, stops = flags.tolist()
        return StepResult(
            loss_sum / self._loss_ranks, grad_norm, int(self.runner.loss_bits), window, compute_time, stops > 0
        )

    @property
    def _loss_ranks(self) -> int:
        """Ranks whose loss enters the world sum: the last pipeline stage."""
        return dist.get_world_size() // parallel_state.get_pipeline_model_parallel_world_size()

    def _evaluate(self) -> float:
        total = self.runner.evaluate(self.val_batches).reshape(1).float()
        dist.all_reduce(total)
        return total.item() / self._loss_ranks

    def _on_save_start(self, step: int) -> None:
        # The save blocks the loop: the supervisor applies its checkpoint timeout, not the step timeout.
        self._beat(Phase.CHECKPOINT, step, ckpt_step=step)

    def run(self) -> ExitCode:
        try:
            return self._run()
        except _AwaitStop:
            return self._await_stop()

    def _await_stop(self) -> ExitCode:
        """Leave only when the supervisor says so: exiting first would report a failure on a healthy node,
        racing the suspect node's own report (unsupervised: at once)."""
        deadline = time.monotonic() + self.cfg.parallel.timeout_s
        while self.env.supervised and not self.stop_flag.requested and time.monotonic() < deadline:
            time.sleep(0.05)
        return ExitCode.RANK_FAILED

    def _run(self) -> ExitCode:
        started = assigned_at() or psutil.Process().create_time()  # a warm spare: from its assignment
        self._beat(Phase.INIT, 0)
        self._build()
        cfg, state = self.cfg, self.state
        if self.is_logger:
            ledger.append(
                self.run_dir,
                LedgerEvent.RANK_INIT,
                rank=0,
                attempt=self.env.attempt,
                seconds=round(time.time() - started, 3),
            )
        self._beat(Phase.RESTORE, 0)
        resumed = self.checkpointer.resume(state)
        if resumed is not None:
            log.info("resumed from step %d (%d samples consumed)", resumed, state.consumed_samples)
        if state.step > cfg.train.steps:  # would end at once with its final step neither trained nor saved
            raise ConfigError(
                f"train.steps: {cfg.train.steps} is below the step the run resumed at ({state.step}); "
                "raise it to continue the run"
            )
        self.checkpointer.start(state.step)
        self._beat(Phase.STEP, state.step, consumed_samples=state.consumed_samples)  # training starts here
        tokens_per_step = cfg.train.global_batch * cfg.seq_len
        outcome = ExitCode.FINISHED
        if self.sdc is not None:
            self._first_check()
        while state.step < cfg.train.steps:
            t0 = time.perf_counter()
            r = self._train_step()
            step_time = time.perf_counter() - t0
            state.step += 1
            state.consumed_samples += cfg.train.global_batch
            state.consumed_tokens += tokens_per_step
            verdict = self._judge(r)
            check = None
            if self.sdc is not None and verdict.fault is None and not self.sdc.reexecuting and self.sdc.due(state.step):
                check = self.sdc.check(state.step)
                self.checkpointer.last_agreeing_step = self.sdc.last_agreeing
            self._record_step(
                r.loss,
                r.grad_norm,
                step_time,
                r.compute_time,
                tokens_per_step,
                **({"replica_check_s": check.seconds} if check is not None else {}),
            )
            self.losses.add(state.step, r.loss)
            self.grad_norms.add(state.step, r.grad_norm)
            if self.sdc is not None:
                self.sdc.record(state.step, r.own_bits, r.grad_norm)
                if self.sdc.reexecuting:  # neither judged, saved nor evaluated again until the suspicious step
                    if r.stop_requested:  # nothing saved: the next attempt resumes from trusted state
                        outcome = ExitCode.PREEMPTED
                        break
                    if state.step == self.sdc.suspicion.step:
                        self._conclude(verdict, r)
                    continue
            if verdict.fault is not None:  # same loss everywhere: every rank acts together
                if self.sdc is not None:
                    self._suspect(verdict, r)
                else:
                    self._roll_back(verdict, r.loss, r.window)
                continue
            if check is not None and not check.verdict.agree:
                self._on_mismatch(check)
                continue
            eval_s = 0.0
            if cfg.train.eval_every and (state.step % cfg.train.eval_every == 0 or state.step == cfg.train.steps):
                self._beat(Phase.EVAL, state.step)
                eval_started = time.perf_counter()
                self._record_eval(self._evaluate())
                eval_s = time.perf_counter() - eval_started
            stop_requested = r.stop_requested or state.step == cfg.train.exit_at_step
            saved = self.checkpointer.after_step(state, stop_requested=stop_requested, excluded_s=eval_s)
            if saved.tier == "disk":
                log.info("checkpoint step %d (%s): loop blocked %.3fs", state.step, saved.reason, saved.blocking_s)
                self._beat(Phase.STEP, state.step, ckpt_blocking_s=saved.blocking_s, ckpt_step=state.step)
            elif saved.tier == "memory":
                log.info("memory snapshot step %d: loop blocked %.3fs", state.step, saved.blocking_s)
            if stop_requested:
                outcome = ExitCode.PREEMPTED
                break
        self._beat(Phase.FINALIZE, state.step)  # the last write may take long: not the step timeout
        self.checkpointer.finish()
        if outcome == ExitCode.FINISHED:
            self.checkpointer.discard_memory()
        state.loader.close()
        self._beat(Phase.DONE, state.step)
        distributed.shutdown()
        return outcome

    def _judge(self, r: StepResult) -> numerics.Verdict:
        """The step's loss, then its gradient norm (the same values on every rank: one verdict)."""
        train, factor = self.cfg.train, self.cfg.numerics.grad_norm_spike_factor
        step = self.state.step
        verdict = numerics.judge_loss(
            r.loss, self.losses.before(step), spike_factor=train.loss_spike_factor, window=train.loss_spike_window
        )
        if verdict.fault is None:
            verdict = numerics.judge_grad_norm(
                r.grad_norm,
                self.grad_norms.before(step) if factor else [],
                spike_factor=factor,
                window=train.loss_spike_window,
            )
        return verdict

    # -- silent data corruption ---------------------------------------------------------------------

    def _first_check(self) -> None:
        """The attempt's first replica check, on the state it resumed: trust starts here. Replicas that
        disagree now loaded different bits (per-rank memory snapshots taken after a fault): only the disk
        checkpoint, one copy for all replicas, is trusted."""
        assert self.sdc is not None
        check = self.sdc.check(self.state.step)
        self.checkpointer.last_agreeing_step = self.sdc.last_agreeing
        if check.verdict.agree:
            return
        committed = ondisk.committed_steps(self.checkpointer.root)
        trusted = max((s for s in committed if s <= self.state.step), default=None)
        if check.verdict.needs_reexecution:
            self._found(self.sdc.unattributed(check, trusted, "replicas disagree on the state they resumed"))
        else:
            self._found(self.sdc.by_vote(check, trusted))

    def _suspect(self, verdict: numerics.Verdict, r: StepResult) -> None:
        """A NaN/Inf or spike: re-execute from the newest checkpoint at or before the last agreeing step
        before acting; with none, the numerical-fault policy acts at once."""
        assert self.sdc is not None
        self.sdc.suspect(self.state.step, verdict.fault or "", verdict.reason)
        loaded = self._load_trusted(self.sdc.last_agreeing)
        if loaded is None:
            self.sdc.suspicion = None
            log.warning(
                "step %d: no checkpoint at or before the last agreeing step %s to re-execute from",
                self.state.step,
                self.sdc.last_agreeing,
            )
            self._roll_back(verdict, r.loss, r.window)
            return
        self.sdc.reexecute_from(loaded)

    def _on_mismatch(self, check: Check) -> None:
        """Replicas disagree: a majority names the odd ranks; otherwise re-execute from trusted state. State
        saved after the last agreeing step is withdrawn either way: one replica's bits in it were wrong."""
        assert self.sdc is not None
        bound = self.sdc.last_agreeing
        if not check.verdict.needs_reexecution:
            self._found(self.sdc.by_vote(check, bound))
        self.sdc.suspect(check.step, MISMATCH, check.verdict.reason, check)
        self._distrust_after(bound)
        loaded = self._load_trusted(bound)
        if loaded is None:
            self._found(
                self.sdc.unattributed(check, bound, f"no checkpoint at or before step {bound} to re-execute from")
            )
        self.sdc.reexecute_from(loaded)

    def _conclude(self, verdict: numerics.Verdict, r: StepResult) -> None:
        """The re-execution reached the suspicious step: reproduced is a real numerical event (the
        numerical-fault policy acts), not reproduced a fault of the ranks that differed first."""
        assert self.sdc is not None
        suspicion, attribution, again = self.sdc.conclude()
        if not attribution.reproduced:
            self._found(self.sdc.by_reexecution(suspicion, attribution, again))
        if suspicion.kind == MISMATCH:
            raise numerics.NumericFaultError(
                f"step {suspicion.step}: replicas diverge the same way again when "
                f"re-executed from step {suspicion.from_step} ({suspicion.reason}): "
                "not a transient fault"
            )
        log.warning(
            "step %d: the re-execution from step %d reproduced it: %s",
            suspicion.step,
            suspicion.from_step,
            suspicion.reason,
        )
        if verdict.fault is not None:  # every result reproduced bitwise, so the verdict did too
            self._roll_back(verdict, r.loss, r.window, reexecuted_from=suspicion.from_step)

    def _load_trusted(self, at_most: int | None) -> int | None:
        """Load the newest checkpoint (memory or disk) at or before `at_most` for a re-execution; None
        (nothing changed) when there is none."""
        state = self.state
        self.checkpointer.finish()
        previous = self.scheduler
        # megatron's scheduler adds the loaded step count to its own: load into a fresh one, as a new process does
        state.scheduler = build_scheduler(self.optimizer, self.cfg.train)
        loaded = self.checkpointer.resume(state, at_most=at_most) if at_most is not None else None
        if loaded is None:
            state.scheduler = previous
            previous.step(0)  # the fresh scheduler set its learning rate on the optimizer: set ours again
            return None
        self.scheduler = state.scheduler
        self.losses.forget_after(loaded)
        self.grad_norms.forget_after(loaded)
        self._beat(Phase.STEP, state.step, consumed_samples=state.consumed_samples)
        return loaded

    def _distrust_after(self, step: int | None) -> None:
        self.checkpointer.finish()
        for tier, steps in self.checkpointer.distrust_after(step).items():
            self._withdrawn[tier] = sorted({*self._withdrawn[tier], *steps})

    def _found(self, finding: Finding) -> NoReturn:
        """Silent data corruption found: withdraw what is saved after the trusted step, record the evidence,
        then the suspect nodes' ranks leave (UNHEALTHY_NODE removes the node, RANK_FAILED restarts every
        rank) while the others wait for their supervisor to stop them."""
        assert self.sdc is not None
        action = self.cfg.numerics.sdc_action
        self._distrust_after(finding.trusted_until)
        self.sdc.report(finding, action=action, withdrawn=self._withdrawn)
        nodes = self.sdc.topology.nodes_of(finding.suspects)
        code = verdicts.exit_code_for(self.env.rank, self.env.node_rank, nodes, action)
        named = f"rank(s) {', '.join(map(str, finding.suspects))}" if finding.suspects else "no rank could be named"
        message = (
            f"step {finding.step}: silent data corruption ({finding.kind}, {finding.how}): {named}; resuming "
            f"from the newest checkpoint at or before step {finding.trusted_until}"
        )
        log.error("%s", message)
        if code is not None:
            raise SilentDataCorruption(message, code)
        raise _AwaitStop(message)

    def _roll_back(
        self, verdict: numerics.Verdict, loss: float, window_start: int, *, reexecuted_from: int | None = None
    ) -> None:
        """Undo the faulty step: reload the newest checkpoint and skip the samples that step consumed."""
        state, train = self.state, self.cfg.train
        step, window = state.step, (window_start, state.loader.position)
        self.checkpointer.finish()  # a save in flight holds good state: commit it first
        committed = ondisk.committed_steps(self.checkpointer.root)
        allowed, why = numerics.rollback_allowed(
            len(state.loader.skips), train.max_rollbacks, committed[-1] if committed else None
        )
        if self.is_logger:
            reproduced = {} if reexecuted_from is None else {"reproduced_from": reexecuted_from}
            ledger.append(
                self.run_dir,
                LedgerEvent.NUMERIC_FAULT,
                step=step,
                kind=verdict.fault,
                loss=str(loss),
                reason=verdict.reason,
                action=train.numeric_fault_action if allowed else "fail",
                **reproduced,
            )
        if train.numeric_fault_action == "fail" or not allowed:
            raise numerics.NumericFaultError(f"step {step}: {verdict.reason}; {why if not allowed else 'policy fail'}")
        state.loader.skip(*window)
        # megatron's scheduler adds the loaded step count to its own: load into a fresh one, as a new process does
        self.scheduler = state.scheduler = build_scheduler(self.optimizer, train)
        resumed = self.checkpointer.resume(state, memory=False)  # the rollback bound counts disk steps
        self.losses.forget_after(resumed)
        self.grad_norms.forget_after(resumed)
        if self.is_logger:
            ledger.append(
                self.run_dir,
                LedgerEvent.DATA_SKIP,
                step=step,
                from_sample=window[0],
                to_sample=window[1],
                rollback_to=resumed,
            )
        log.warning(
            "step %d: %s; rolled back to step %d, skipping samples [%d, %d)", step, verdict.reason, resumed, *window
        )
        self._beat(Phase.STEP, state.step, consumed_samples=state.consumed_samples)

    def _record_step(
        self, loss: float, grad_norm: float, step_time: float, compute_time: float, tokens_per_step: int, **extra: float
    ) -> None:
        state = self.state
        tokens_per_s = tokens_per_step / step_time
        mfu = tokens_per_s * self.flops_per_token / (self.peak * self.env.world_size)
        lr = self.optimizer.param_groups[0]["lr"]
        # The step's figures as the train log and the heartbeat both carry them.
        figures = {
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "step_time": step_time,
            "tokens": state.consumed_tokens,
            "tokens_per_s": tokens_per_s,
            "mfu": mfu,
            "consumed_samples": state.consumed_samples,
        }
        self._beat(
            Phase.STEP, state.step, **figures, compute_time=compute_time, ckpt_intervals=self.checkpointer.intervals
        )
        if not self.is_logger:
            return
        record = {"ts": time.time(), "attempt": self.env.attempt, "step": state.step, **figures, **extra}
        if self.device.type == "cuda":  # rank 0's high-water mark, for checking the planner's memory model
            record["max_memory_allocated"] = torch.cuda.max_memory_allocated(self.device)
        ledger.append_jsonl(RunDir(self.run_dir).train_log, record)
        if state.step % self.cfg.train.log_every == 0 or state.step == self.cfg.train.steps:
            log.info(
                "step %d/%d loss %.4f lr %.2e grad_norm %.3f %.0f tok/s step %.3fs mfu %.2f%%",
                state.step,
                self.cfg.train.steps,
                loss,
                lr,
                grad_norm,
                tokens_per_s,
                step_time,
                100 * mfu,
            )

    def _record_eval(self, val_loss: float) -> None:
        self._beat(Phase.STEP, self.state.step, val_loss=val_loss)  # back to the step timeout
        if self.is_logger:
            ledger.append_jsonl(
                RunDir(self.run_dir).train_log,
                {
                    "ts": time.time(),
                    "attempt": self.env.attempt,
                    "step": self.state.step,
                    "val_loss": val_loss,
                    "val_log_ppl": val_loss,
                    "val_ppl": math.exp(min(val_loss, 50)),
                },
            )
            log.info("step %d validation loss %.4f (ppl %.1f)", self.state.step, val_loss, math.exp(min(val_loss, 50)))
