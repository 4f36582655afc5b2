"""Heartbeats from a training loop with Megatron-LM's fault-tolerance hook points.

Megatron-LM's `megatron/training/training.py` calls `ft_integration.<hook>()` at these points, with
these arguments; `python -m trainer.megatron_lm` chains the function of the same name here onto each
(another loop may call them itself):

    setup()                                    before initialize_megatron        -> init
    resumed(iteration)                         after load_checkpoint returned    -> restore at the resume point
    on_checkpoint_loaded(is_local_chkpt)       inside load_checkpoint            (no heartbeat: `resumed` follows)
    on_training_step_start()                   before train_step                 -> step, when training (re)starts
                                                                                    or an evaluation ended
    on_training_step_end()                     after train_step                  -> step (one more), with its step time
    on_eval_step_start() / on_eval_step_end()  around each evaluation step       -> eval
    on_checkpointing_start()                   before save_checkpoint / async finalization -> checkpoint
    on_checkpointing_end(is_async_finalization) after them                       -> step (and the save's time)
    shutdown()                                 at the end of pretrain            -> done

Every function is a no-op before `setup()` and when the process is not supervised (null client).
"""

from __future__ import annotations

import time

from resilient.rank.env import RankEnv
from resilient.rank.heartbeat import HeartbeatClient, NullHeartbeat, Phase, connect


class MegatronLMHeartbeats:
    """The hook points of one rank; the module functions below drive one instance."""

    def __init__(self, client: HeartbeatClient | NullHeartbeat) -> None:
        self.client = client
        self.iteration = 0
        self.phase = Phase.INIT
        self._step_started: float | None = None
        self._save_started: float | None = None

    def _send(self, phase: Phase, **fields: object) -> None:
        self.phase = phase
        self.client.send(phase, self.iteration, **fields)  # type: ignore[arg-type]

    def setup(self) -> None:
        self._send(Phase.INIT)

    def resumed(self, iteration: int) -> None:
        self.iteration = iteration
        self._send(Phase.RESTORE)

    def on_training_step_start(self) -> None:
        if self.phase is not Phase.STEP:  # the first step (its one-off costs get their own timeout) or after eval
            self._send(Phase.STEP)
        self._step_started = time.monotonic()

    def on_training_step_end(self, iteration: int | None = None, **fields: object) -> None:
        """`iteration`: the loop's count after the step (default: one more than the last)."""
        self.iteration = self.iteration + 1 if iteration is None else iteration
        if self._step_started is not None:
            fields.setdefault("step_time", time.monotonic() - self._step_started)
        self._send(Phase.STEP, **fields)

    def on_eval_step_start(self) -> None:
        if self.phase is not Phase.EVAL:  # the eval timeout covers the whole evaluation
            self._send(Phase.EVAL)

    def on_eval_step_end(self) -> None:
        pass  # the next training step (or save) ends the eval phase

    def on_checkpointing_start(self) -> None:
        self._save_started = time.monotonic()
        self._send(Phase.CHECKPOINT)

    def on_checkpointing_end(self, is_async_finalization: bool = False) -> None:
        """Back to stepping; a save (not the per-iteration async finalization) reports its blocking time."""
        blocked = time.monotonic() - (self._save_started or time.monotonic())
        if is_async_finalization:
            self._send(Phase.STEP)
        else:
            self._send(Phase.STEP, ckpt_step=self.iteration, ckpt_blocking_s=blocked)

    def shutdown(self, message: str | None = None) -> None:
        self._send(Phase.DONE, **({"message": message} if message else {}))
        self.client.close()

    def abort(self, message: str, exit_code: int) -> None:
        """A fatal end instead of `shutdown`: the supervisor acts on `exit_code` (e.g. no retry for a
        configuration error, the node taken out for 76)."""
        self._send(Phase.ERROR, message=message[:2000], exit_code=exit_code)
        self.client.close()

    def send(self, phase: Phase) -> None:
        """A phase the hook points above do not mark (e.g. model build, the final wait for saves)."""
        self._send(phase)


_hooks: MegatronLMHeartbeats | None = None


def setup(env: RankEnv | None = None) -> MegatronLMHeartbeats:
    """Connect to the supervisor (a null client when unsupervised) and report `init`."""
    global _hooks
    _hooks = MegatronLMHeartbeats(connect(env))
    _hooks.setup()
    return _hooks


def resumed(iteration: int) -> None:
    """The loop continues after `iteration` (0: from scratch)."""
    if _hooks is not None:
        _hooks.resumed(iteration)


def on_checkpoint_loaded(is_local_chkpt: bool = False) -> None:
    """Megatron's call inside load_checkpoint; the resume point follows with `resumed`."""


def on_training_step_start() -> None:
    if _hooks is not None:
        _hooks.on_training_step_start()


def on_training_step_end(iteration: int | None = None, **fields: object) -> None:
    """Optional `fields` as in `resilient.rank.Fields` (loss, lr, grad_norm, tokens_per_s, ...)."""
    if _hooks is not None:
        _hooks.on_training_step_end(iteration, **fields)


def on_eval_step_start() -> None:
    if _hooks is not None:
        _hooks.on_eval_step_start()


def on_eval_step_end() -> None:
    if _hooks is not None:
        _hooks.on_eval_step_end()


def on_checkpointing_start() -> None:
    if _hooks is not None:
        _hooks.on_checkpointing_start()


def on_checkpointing_end(is_async_finalization: bool = False) -> None:
    if _hooks is not None:
        _hooks.on_checkpointing_end(is_async_finalization)


def shutdown(message: str | None = None) -> None:
    """The loop is done (`message`: why it ended)."""
    global _hooks
    if _hooks is not None:
        _hooks.shutdown(message)
        _hooks = None


def abort(message: str, exit_code: int) -> None:
    """The loop failed: an `error` heartbeat with the code the process exits with."""
    global _hooks
    if _hooks is not None:
        _hooks.abort(message, exit_code)
        _hooks = None


def send(phase: Phase) -> None:
    if _hooks is not None:
        _hooks.send(phase)


def iteration() -> int:
    """The iteration the hooks counted to (0 before `setup`)."""
    return _hooks.iteration if _hooks is not None else 0
