"""`python -m trainer --config RUN_DIR/config.yaml [--set k=v ...]`: one Megatron rank.

Started by the supervisor (or torchrun) with RANK/WORLD_SIZE/MASTER_ADDR/... in the environment.
Exits with an ExitCode: FINISHED, PREEMPTED (saved on request), CONFIG_ERROR, CHECKPOINT_DAMAGED.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from resilient.exit_codes import ExitCode


def main(argv: list[str] | None = None) -> int:
    from resilient.orphan import die_with_parent

    die_with_parent()  # first: a rank must never outlive its supervisor
    os.umask(0o077)  # checkpoints, logs and caches are the operator's alone
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="run config YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. train.steps=50 (repeatable)")
    args = parser.parse_args(argv)

    from resilient.config import load_config
    from resilient.errors import ResilientError
    from trainer.distributed import RankEnv, run_dir_from_environ

    env = RankEnv.from_environ()
    logging.basicConfig(level=logging.INFO if env.rank == 0 else logging.WARNING,
                        format=f"%(asctime)s rank{env.rank} %(name)s: %(message)s")
    heartbeat = None
    try:
        cfg = load_config(args.config, args.overrides)
        from resilient.channel import HeartbeatClient
        from trainer.loop import Trainer

        heartbeat = HeartbeatClient.from_env()
        trainer = Trainer(cfg, env, run_dir_from_environ(cfg.run_dir))
        return int(trainer.run())
    except ResilientError as err:
        print(f"resilient trainer: {err.one_line()}", file=sys.stderr)
        if heartbeat is not None:
            heartbeat.send("error", -1, message=str(err))
        return int(err.exit_code)
    except Exception as err:
        traceback.print_exc()
        if heartbeat is not None:
            heartbeat.send("error", -1, message=f"{type(err).__name__}: {err}"[:500])
        return int(ExitCode.RANK_FAILED)


if __name__ == "__main__":
    sys.exit(main())
