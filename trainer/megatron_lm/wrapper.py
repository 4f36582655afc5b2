"""Run Megatron-LM's own training loop, unmodified, as a supervised rank.

    python -m trainer.megatron_lm pretrain_gpt.py ARGS...

The script runs as `__main__`, as `python pretrain_gpt.py ARGS...` would run it. Around it:
- heartbeats: resilient's hook adapter (`resilient.rank.ft_hooks`) is chained onto Megatron's
  `ft_integration` hooks (Megatron calls them as module attributes; its own FT client, if enabled,
  still runs first), and onto its model build, checkpoint load and final wait for async saves, so
  the supervisor sees init, build, restore, every iteration, evaluation, saves and the final write,
  each with its own timeout;
- signals: every stop signal the supervisor names (its stop request, SIGTERM, the scheduler's
  warning signal) becomes Megatron's `--exit-signal-handler` request, so all ranks save the same
  iteration and exit; no stop signal kills a rank;
- the exit code says why the loop ended (`exits.classify`): finished, preempted (stop request,
  `--exit-interval`, `--exit-duration-in-mins`: requeue), unhealthy node (the rerun state machine's
  16/17), configuration error, or a failure;
- on a CPU-only machine, megatron's CUDA-only calls go through `trainer.cpu_bridge`.
"""

from __future__ import annotations

import logging
import os
import runpy
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from resilient.core.exit_codes import ExitCode
from resilient.rank import Phase, RankEnv, StopFlag, die_with_parent, ft_hooks
from trainer.megatron_lm import exits

log = logging.getLogger("trainer.megatron_lm")

# Chained after Megatron's own; `setup` and `shutdown` are the wrapper's (before and after the script).
_FT_HOOKS = (
    "on_training_step_start",
    "on_training_step_end",
    "on_eval_step_start",
    "on_eval_step_end",
    "on_checkpointing_start",
    "on_checkpointing_end",
    "on_checkpoint_loaded",
)
USAGE = "usage: python -m trainer.megatron_lm SCRIPT [ARGS...]  (a Megatron-LM training script and its arguments)"


class MegatronStop(StopFlag):
    """A stop signal sets this flag and Megatron's own exit-signal flag (its handler, once installed,
    listens for one signal only; the supervisor and the scheduler may send others)."""

    def _on_signal(self, signum: int, frame: Any) -> None:
        super()._on_signal(signum, frame)
        self.forward()

    def forward(self) -> None:
        """Hand a stop request to Megatron's signal handler, if it exists yet (called again at each hook)."""
        if not self.requested:
            return
        from megatron.training import global_vars

        handler = getattr(global_vars, "_GLOBAL_SIGNAL_HANDLER", None)
        if handler is not None:
            handler._signal_received = True


def check_argv(args: list[str]) -> tuple[Path, list[str]]:
    """(script, its arguments with `--exit-signal-handler`), or ValueError with the one-line reason."""
    if not args or args[0].startswith("-"):
        raise ValueError(USAGE)
    script = Path(args[0])
    if not script.is_file():
        raise ValueError(f"{script}: no such training script")
    rest = list(args[1:])
    if "--exit-signal-handler-for-training" in rest:
        raise ValueError(
            "--exit-signal-handler-for-training exits without saving on SIGTERM; under resilient a "
            "stop saves first (--exit-signal-handler, added for you): drop the flag"
        )
    if "--exit-signal-handler" not in rest:
        rest.append("--exit-signal-handler")  # a stop request saves, then exits
    return script, rest


class Wrapper:
    """One rank's run of the script, with the chained hooks and the facts `exits.classify` needs."""

    def __init__(self, env: RankEnv) -> None:
        self.env = env
        self.stop = MegatronStop().install(env)
        self.trained = False
        self.started = time.monotonic()

    # -- chaining onto Megatron ----------------------------------------------------------------

    def chain(self) -> None:
        """Our heartbeat after each of Megatron's hook calls, and around its checkpoint load."""
        from megatron.training import ft_integration, training

        for name in _FT_HOOKS:
            setattr(ft_integration, name, self._chained(getattr(ft_integration, name), getattr(ft_hooks, name)))
        ft_hooks.setup(self.env)  # before the script: init covers imports, argument parsing, process groups
        load = training.load_checkpoint

        def load_checkpoint(*args: Any, **kwargs: Any) -> Any:
            ft_hooks.send(Phase.RESTORE)
            result = load(*args, **kwargs)
            self.trained = True
            ft_hooks.resumed(int(result[0]))  # (iteration, floating-point operations so far)
            return result

        training.load_checkpoint = load_checkpoint
        build, finalize = training.setup_model_and_optimizer, training.maybe_finalize_async_save

        def setup_model_and_optimizer(*args: Any, **kwargs: Any) -> Any:
            ft_hooks.send(Phase.BUILD)  # model and optimizer construction (then the load): its own timeout
            return build(*args, **kwargs)

        def maybe_finalize_async_save(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("blocking", args[0] if args else False):
                ft_hooks.send(Phase.FINALIZE)  # waits for a whole write: not the calibrated save timeout
            return finalize(*args, **kwargs)

        training.setup_model_and_optimizer = setup_model_and_optimizer
        training.maybe_finalize_async_save = maybe_finalize_async_save

    def _chained(self, megatron_hook: Callable[..., Any], ours: Callable[..., Any]) -> Callable[..., Any]:
        def hook(*args: Any, **kwargs: Any) -> Any:
            result = megatron_hook(*args, **kwargs)
            if megatron_hook.__name__ == "on_training_step_start":
                self.trained = True
            self.stop.forward()  # a stop that came before Megatron's handler existed
            ours(*args, **kwargs)
            return result

        return hook

    # -- running --------------------------------------------------------------------------------

    def run(self, script: Path, args: list[str]) -> int:
        sys.argv = [str(script), *args]
        sys.path.insert(0, str(script.resolve().parent))  # as `python SCRIPT` does
        code: int | None = None
        error: str | None = None
        try:
            runpy.run_path(str(script), run_name="__main__")
        except SystemExit as stop:
            code = _code(stop.code)
        except Exception as err:  # said to the supervisor (classified below) after its traceback
            traceback.print_exc()
            error = _describe(err)
        exit_code, reason = exits.classify(self._end(code, error))
        print(f"resilient: rank {self.env.rank}: {reason} (exit {int(exit_code)})", file=sys.stderr, flush=True)
        if exit_code in (ExitCode.FINISHED, ExitCode.PREEMPTED):
            ft_hooks.shutdown(reason)
        else:
            ft_hooks.abort(reason, exit_code)
        return exit_code

    def _end(self, code: int | None, error: str | None) -> exits.LoopEnd:
        args = _megatron_args()
        return exits.LoopEnd(
            megatron_code=code,
            iteration=ft_hooks.iteration(),
            train_iters=getattr(args, "train_iters", None),
            stop_requested=self.stop.requested or _megatron_stopped(),
            exit_interval=getattr(args, "exit_interval", None),
            exit_duration_mins=getattr(args, "exit_duration_in_mins", None),
            trained=self.trained,
            error=error,
            args_parsed=args is not None,
        )


def _describe(err: Exception) -> str:
    """`Type: message`, or for a bare assertion (megatron validates arguments with them) where it failed."""
    text = str(err).strip()
    if not text:
        frame = traceback.extract_tb(err.__traceback__)[-1]
        text = f"{Path(frame.filename).name}:{frame.lineno}: {frame.line}"
    return f"{type(err).__name__}: {text}"


def _code(value: object) -> int:
    if value is None:
        return 0
    return value if isinstance(value, int) else 1  # sys.exit("message") exits 1


def _megatron_args() -> Any:
    from megatron.training import global_vars

    return getattr(global_vars, "_GLOBAL_ARGS", None)


def _megatron_stopped() -> bool:
    from megatron.training import global_vars

    handler = getattr(global_vars, "_GLOBAL_SIGNAL_HANDLER", None)
    return bool(getattr(handler, "_signal_received", False))


def main(argv: list[str]) -> int:
    env = RankEnv.from_environ()
    die_with_parent(env)
    try:
        script, args = check_argv(argv)
    except ValueError as err:
        print(f"resilient: {err}", file=sys.stderr)
        return ExitCode.CONFIG_ERROR
    wrapper = Wrapper(env)  # stop signals are handled from here on
    import torch

    if not torch.cuda.is_available():
        from trainer.cpu_bridge import install_megatron_training_bridge

        install_megatron_training_bridge()
    from trainer.compat import use_packaged_dataset_helpers

    use_packaged_dataset_helpers()
    wrapper.chain()
    # a second SIGINT from a terminal still interrupts; everything else the supervisor sends is a stop
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    return wrapper.run(script, args)
