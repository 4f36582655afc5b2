"""`python -m trainer --config RUN_DIR/config.yaml [--set k=v ...]`: one Megatron rank.

Started by the supervisor (or torchrun) with RANK/WORLD_SIZE/MASTER_ADDR/... in the environment.
Exits with an ExitCode: FINISHED, PREEMPTED (saved on request), CONFIG_ERROR, CHECKPOINT_DAMAGED.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import traceback

from resilient.core.exit_codes import ExitCode

LEAVE_TIMEOUT_S = 10.0
"""How long an error exit waits to leave the process group before exiting without tearing it down."""


def _leave_group(code: int) -> int:
    """Leave the process group after an error, and return `code`, the rank's verdict. A gloo thread still
    joinable when the interpreter tears down aborts the process (SIGABRT), and the verdict would be lost.
    Bounded: if leaving hangs on a peer, exit with `code` at once, without teardown (nothing of a committed
    checkpoint depends on it)."""
    distributed = sys.modules.get("trainer.distributed")
    if distributed is None:  # never joined one
        return code

    def leave() -> None:
        try:
            distributed.shutdown()
        except Exception:  # noqa: BLE001 - the exit code is the verdict; a failed teardown does not change it
            pass

    leaving = threading.Thread(target=leave, name="leave-group", daemon=True)
    leaving.start()
    leaving.join(LEAVE_TIMEOUT_S)
    if leaving.is_alive():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def main(argv: list[str] | None = None) -> int:
    from resilient.rank import Phase, RankEnv, connect, die_with_parent

    env = RankEnv.from_environ()
    die_with_parent(env)  # first: a rank must never outlive its supervisor
    os.umask(0o077)  # checkpoints, logs and caches are the operator's alone
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="run config YAML")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, e.g. train.steps=50 (repeatable)",
    )
    args = parser.parse_args(argv)

    from resilient.core.errors import ResilientError
    from trainer.config import load_trainer_config

    # Our own progress lines on rank 0 only; libraries (megatron logs at import) only when they warn.
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s rank{env.rank} %(name)s: %(message)s")
    logging.getLogger("trainer").setLevel(logging.INFO if env.rank == 0 else logging.WARNING)
    heartbeat = connect(env)
    trainer = None
    try:
        from pathlib import Path

        from resilient.core.rundir import RunDir

        written_by_supervisor = env.run_dir is not None and Path(args.config) == RunDir(env.run_dir).config
        cfg = load_trainer_config(args.config, args.overrides, world_size=env.world_size, no_link=written_by_supervisor)
        from trainer.loop import Trainer

        trainer = Trainer(cfg, env, env.run_dir or cfg.run_dir)
        return int(trainer.run())  # a finished or stopped run has left its process group
    except ResilientError as err:
        print(f"resilient trainer: {err.one_line()}", file=sys.stderr)
        heartbeat.send(Phase.ERROR, -1, message=str(err), exit_code=int(err.exit_code))
        code = int(err.exit_code)
    except Exception as err:
        vanished = trainer.storage_problem() if trainer is not None else None
        if vanished:  # e.g. a file of a checkpoint directory being removed: a storage fault, as the check would say
            print(f"resilient trainer: storage fault: {vanished} ({type(err).__name__}: {err})"[:1000], file=sys.stderr)
            heartbeat.send(Phase.ERROR, -1, message=vanished, exit_code=int(ExitCode.STORAGE_FAULT))
            code = int(ExitCode.STORAGE_FAULT)
        else:
            traceback.print_exc()
            heartbeat.send(Phase.ERROR, -1, message=f"{type(err).__name__}: {err}"[:500])
            code = int(ExitCode.RANK_FAILED)
    return _leave_group(code)


if __name__ == "__main__":
    sys.exit(main())
