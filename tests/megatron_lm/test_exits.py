"""Why Megatron-LM's loop ended, as the exit code the supervisor acts on (pure; no megatron import)."""

from __future__ import annotations

import pytest

from resilient.core.exit_codes import ExitCode
from trainer.megatron_lm.exits import LoopEnd, classify
from trainer.megatron_lm.wrapper import USAGE, check_argv


def _end(**kw) -> LoopEnd:
    base = {"megatron_code": None, "iteration": 100, "train_iters": 100, "stop_requested": False, "trained": True}
    return LoopEnd(**{**base, **kw})


@pytest.mark.parametrize(
    "end, code, words",
    [
        (_end(), ExitCode.FINISHED, "reached --train-iters 100"),
        (_end(megatron_code=0), ExitCode.FINISHED, "reached --train-iters 100"),
        (
            _end(megatron_code=0, iteration=40, stop_requested=True),
            ExitCode.PREEMPTED,
            "stopped on request at iteration 40",
        ),
        # a stop that arrives as the last iteration ends: the run is finished all the same
        (_end(megatron_code=0, stop_requested=True), ExitCode.FINISHED, "reached --train-iters"),
        (_end(megatron_code=0, iteration=50, exit_interval=25), ExitCode.PREEMPTED, "--exit-interval 25 reached"),
        (_end(megatron_code=0, iteration=37, exit_duration_mins=60), ExitCode.PREEMPTED, "--exit-duration-in-mins 60"),
        (_end(megatron_code=16, iteration=12), ExitCode.UNHEALTHY_NODE, "rerun state machine exited 16"),
        (_end(megatron_code=17, iteration=12), ExitCode.UNHEALTHY_NODE, "did not reproduce on this node"),
        (_end(megatron_code=2, trained=False, args_parsed=False, train_iters=None), ExitCode.CONFIG_ERROR, "exit 2"),
        (
            _end(error="AssertionError: bad", trained=False, args_parsed=False, train_iters=None),
            ExitCode.CONFIG_ERROR,
            "rejected its arguments (AssertionError: bad)",
        ),
        (_end(error="RuntimeError: gloo timeout", iteration=7), ExitCode.RANK_FAILED, "RuntimeError: gloo timeout at"),
        (_end(megatron_code=1, iteration=7), ExitCode.RANK_FAILED, "exited 1 at iteration 7"),
        # an exit 2 once training ran is a crash like any other, not a command-line problem
        (_end(megatron_code=2, iteration=7), ExitCode.RANK_FAILED, "exited 2"),
        (_end(megatron_code=0, iteration=40), ExitCode.RANK_FAILED, "without a reason"),
    ],
)
def test_classify(end, code, words):
    got, reason = classify(end)
    assert got == code and words in reason, reason


def test_argv_gets_the_exit_signal_handler_and_refuses_the_one_that_loses_work(tmp_path):
    script = tmp_path / "pretrain_gpt.py"
    script.write_text("")
    assert check_argv([str(script), "--save", "x"]) == (script, ["--save", "x", "--exit-signal-handler"])
    assert check_argv([str(script), "--exit-signal-handler"])[1] == ["--exit-signal-handler"]
    with pytest.raises(ValueError, match="drop the flag"):
        check_argv([str(script), "--exit-signal-handler-for-training"])
    with pytest.raises(ValueError, match="no such training script"):
        check_argv([str(tmp_path / "absent.py")])
    for bad in ([], ["--save", "x"]):
        with pytest.raises(ValueError) as err:
            check_argv(bad)
        assert str(err.value) == USAGE
