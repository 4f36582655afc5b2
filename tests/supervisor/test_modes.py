"""Supervisor modes from the config: rank argv placeholders, stop signal, exit-only progress (no processes)."""

import signal
import zipfile
from pathlib import Path

import pytest
from pydantic import ValidationError

from resilient.supervisor.config import RankProtocol, SupervisorConfig
from resilient.supervisor.progress import newest_complete_step, progress_dir
from trainer.checkpoint import layout
from trainer.megatron_lm import checkpoints as megatron_lm


def test_placeholders_are_filled_and_nothing_is_appended():
    cfg = SupervisorConfig(rank_command=["pretrain_gpt.py", "--save={run_dir}/ckpt", "--cfg", "{config}"])
    assert cfg.rank_argv(Path("/r/config.yaml"), Path("/r")) == ["pretrain_gpt.py", "--save=/r/ckpt", "--cfg",
                                                                "/r/config.yaml"]
    assert SupervisorConfig().rank_argv(Path("/r/c.yaml"), Path("/r"))[-2:] == ["--config", "/r/c.yaml"]


def test_unknown_placeholder_is_refused():
    with pytest.raises(ValidationError, match=r"unknown placeholder \{cfg\}"):
        SupervisorConfig(rank_command=["x", "{cfg}"])


@pytest.mark.parametrize("protocol,configured,expected", [
    ("heartbeat", None, signal.SIGUSR1), ("exit_only", None, signal.SIGTERM), ("exit_only", "SIGINT", signal.SIGINT)])
def test_stop_signal_follows_the_protocol_unless_configured(protocol, configured, expected):
    cfg = SupervisorConfig(rank_protocol=protocol, rank_stop_signal=configured)
    assert cfg.stop_signal() is expected and cfg.rank_protocol is RankProtocol(protocol)


def test_progress_dir_precedence_relative_to_the_run_dir(tmp_path):
    assert progress_dir(None, None, tmp_path) == tmp_path / "checkpoints"
    assert progress_dir(None, Path("/ck"), tmp_path) == Path("/ck")
    assert progress_dir(Path("save"), Path("/ck"), tmp_path) == tmp_path / "save"


def test_newest_complete_step_in_our_layout(tmp_path):
    assert newest_complete_step(tmp_path) is None
    for step, marked in ((10, True), (20, True), (30, False)):
        layout.step_dir(tmp_path, step).mkdir()
        if marked:
            (layout.step_dir(tmp_path, step) / layout.MARKER).write_text("{}")
    assert newest_complete_step(tmp_path) == 20


def test_newest_complete_step_in_megatron_lm_legacy_layout(tmp_path):
    for iteration in (5, 10):
        rank_dir = megatron_lm.iteration_dir(tmp_path, iteration) / "mp_rank_00"
        rank_dir.mkdir(parents=True)
        with zipfile.ZipFile(rank_dir / "model_optim_rng.pt", "w") as z:
            z.writestr("archive/data.pkl", b"x" * 100)
    megatron_lm.write_tracker(tmp_path, 10)
    assert newest_complete_step(tmp_path) == 10
    shard = megatron_lm.iteration_dir(tmp_path, 10) / "mp_rank_00" / "model_optim_rng.pt"
    shard.write_bytes(shard.read_bytes()[:50])  # truncated: the zip directory at its end is gone
    assert "truncated" in megatron_lm.check_iteration(megatron_lm.iteration_dir(tmp_path, 10))
    assert newest_complete_step(tmp_path) == 5
