"""The batch script: rendered from the config, valid bash, the directives the run depends on."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from resilient.config import load_config
from resilient.core.errors import ConfigError
from resilient.core.exit_codes import ExitCode
from resilient.slurm.render import render_batch_script
from resilient.slurm.timing import checkpoint_seconds, signal_seconds

LLAMA_405B_128x8 = {
    "model": {"preset": "llama31-405b"},
    "nodes": 128,
    "supervisor": {"nproc_per_node": 8},
    "parallel": {"tp": 8, "pp": 16, "distributed_optimizer": True},
    "train": {"global_batch": 2048, "micro_batch": 1},
    "slurm": {
        "gpus_per_node": 8,
        "partition": "gpu",
        "time_limit_minutes": 2880,
        "extra_directives": ["--constraint=h100"],
    },
}


def directives(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_launch_dry_run_for_405b_on_128_nodes_is_valid_bash_with_the_directives(tmp_path):
    config = tmp_path / "405b.yaml"
    config.write_text(yaml.safe_dump(LLAMA_405B_128x8))
    run_dir = tmp_path / "runs" / "llama405b"
    out = subprocess.run(
        [sys.executable, "-m", "resilient.cli", "launch", str(config), "--run-dir", str(run_dir), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    script = out.stdout
    assert not run_dir.exists(), "a dry run writes nothing"
    check = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    d = directives(script)
    for expected in (
        "--nodes=128",
        "--ntasks-per-node=1",
        "--gres=gpu:8",
        "--time=2-00:00:00",
        "--partition=gpu",
        "--requeue",
        "--open-mode=append",
        "--exclusive",
        "--constraint=h100",
        f"--output={run_dir}/logs/slurm-%j.out",
        "--job-name=resilient-llama405b",
    ):
        assert expected in d, expected
    signal_line = next(x for x in d if x.startswith("--signal="))
    assert signal_line == f"--signal=B:USR2@{signal_seconds(load_config(config))[0]}"
    assert "srun --kill-on-bad-exit=0" in script
    assert f"resilient.cli supervise {run_dir}/config.yaml &" in script
    assert "trap forward USR2 TERM" in script and 'kill -s USR2 "$STEP_PID"' in script
    assert 'slurm on-exit "$RUN_DIR" "$STEP_RC"' in script


def test_signal_lead_time_covers_step_two_saves_and_margin():
    cfg = load_config(
        None,
        [
            f"{k}={v}"
            for k, v in {
                "model.preset": "llama31-405b",
                "nodes": 128,
                "supervisor.nproc_per_node": 8,
                "parallel.tp": 8,
                "parallel.pp": 16,
                "train.global_batch": 2048,
                "train.micro_batch": 1,
            }.items()
        ],
    )
    save = checkpoint_seconds(cfg)
    # 405.9e9 parameters x 14 B over 128 nodes at 2 GB/s each: ~22 s per node.
    assert 20 < save < 25
    seconds, reason = signal_seconds(cfg)
    assert seconds == int(30 + 2 * save + 60) + 1 and "margin 60s" in reason
    cfg.slurm.signal_seconds = 300
    assert signal_seconds(cfg)[0] == 300


def test_tiny_run_renders_without_gres_and_with_the_configured_signal(tmp_path):
    cfg = load_config(
        None,
        [
            "nodes=2",
            "supervisor.nproc_per_node=1",
            "train.global_batch=4",
            "supervisor.preempt_signal=SIGUSR1",
            "slurm.exclude=[n7]",
            "slurm.exclusive=false",
        ],
    )
    script = render_batch_script(cfg, tmp_path, python="/opt/py bin/python")
    d = directives(script)
    assert "--nodes=2" in d and "--exclude=n7" in d and not any(x.startswith("--gres") for x in d)
    assert "--exclusive" not in d
    assert any(x.startswith("--signal=B:USR1@") for x in d)
    assert "PYTHON='/opt/py bin/python'" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["supervisor.nproc_per_node=4", "slurm.gpus_per_node=8"], "differs from supervisor.nproc_per_node"),
        (["slurm.time_limit_minutes=1"], "leaves no time to train"),
        (["supervisor.preempt_signal=SIGKILL"], "cannot be trapped"),
        (["nodes=2", "slurm.min_nodes=3"], "exceeds nodes"),
        (
            [
                "nodes=3",
                "supervisor.nproc_per_node=1",
                "train.global_batch=3",
                "train.micro_batch=1",
                "slurm.min_nodes=2",
            ],
            "on 2 node(s)",
        ),
    ],
)
def test_configs_slurm_cannot_run_are_one_line_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        render_batch_script(load_config(None, overrides), tmp_path, python="python")


@pytest.mark.parametrize(
    "override", ['slurm.extra_directives=["--x\\n rm -rf /"]', "slurm.partition='a b'", "slurm.exclude=['n1;reboot']"]
)
def test_shell_injection_through_the_config_is_refused(override):
    with pytest.raises(ConfigError):
        load_config(None, [override])


def test_relative_run_dir_is_refused():
    with pytest.raises(ConfigError, match="absolute"):
        render_batch_script(load_config(None), Path("runs/x"), python="python")


def test_launch_reports_a_bad_config_with_the_config_error_code(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "resilient.cli", "launch", str(tmp_path / "missing.yaml"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == ExitCode.CONFIG_ERROR and "no such file" in out.stderr


def test_a_megatron_lm_runs_lead_time_comes_from_its_command_line():
    # Llama 3.1 405B as a Megatron-LM command line (SwiGLU, GQA), synchronous saves: one save to finish
    args = [
        "--num-layers",
        "126",
        "--hidden-size",
        "16384",
        "--ffn-hidden-size",
        "53248",
        "--num-attention-heads",
        "128",
        "--group-query-attention",
        "--num-query-groups",
        "8",
        "--swiglu",
        "--vocab-size",
        "128256",
    ]
    command = ["{python}", "-m", "trainer.megatron_lm", "pretrain_gpt.py", *args]
    cfg = load_config(None, ["nodes=128", f"supervisor.rank_command={command}"])  # train.* is not its business
    seconds, reason = signal_seconds(cfg)
    assert 20 < checkpoint_seconds(cfg) < 25  # the same model as the 405B preset above
    assert seconds == int(30 + checkpoint_seconds(cfg) + 60) + 1 and "1 x checkpoint" in reason
    assert "from the Megatron-LM command line" in reason
    cfg.supervisor.rank_command = [*command, "--async-save"]
    assert "2 x checkpoint" in signal_seconds(cfg)[1]
    cfg.supervisor.rank_command = command[:4]  # no model size on the command line
    with pytest.raises(ConfigError, match="set it, in seconds"):
        signal_seconds(cfg)
