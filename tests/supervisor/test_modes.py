"""Supervisor modes from the config: rank argv placeholders, stop signal, exit-only progress (no rank
processes; the Megatron-LM save formats come from the session's writers, tests/checkpoint/megatron_lm_writer.py)."""

import os
import shutil
import signal
from pathlib import Path

import pytest
from pydantic import ValidationError

from resilient.supervisor.config import RankProtocol, SupervisorConfig
from resilient.supervisor.decisions import made_progress
from resilient.supervisor.progress import newest_complete_step, progress_dir
from tests.checkpoint.megatron_lm_writer import SAVE_FORMATS
from trainer.checkpoint import ondisk
from trainer.megatron_lm import checkpoints as megatron_lm


def test_placeholders_are_filled_and_nothing_is_appended():
    cfg = SupervisorConfig(rank_command=["pretrain_gpt.py", "--save={run_dir}/ckpt", "--cfg", "{config}"])
    assert cfg.rank_argv(Path("/r/config.yaml"), Path("/r")) == [
        "pretrain_gpt.py",
        "--save=/r/ckpt",
        "--cfg",
        "/r/config.yaml",
    ]
    assert SupervisorConfig().rank_argv(Path("/r/c.yaml"), Path("/r"))[-2:] == ["--config", "/r/c.yaml"]


def test_unknown_placeholder_is_refused():
    with pytest.raises(ValidationError, match=r"unknown placeholder \{cfg\}"):
        SupervisorConfig(rank_command=["x", "{cfg}"])


@pytest.mark.parametrize(
    "protocol,configured,expected",
    [("heartbeat", None, signal.SIGUSR1), ("exit_only", None, signal.SIGTERM), ("exit_only", "SIGINT", signal.SIGINT)],
)
def test_stop_signal_follows_the_protocol_unless_configured(protocol, configured, expected):
    cfg = SupervisorConfig(rank_protocol=protocol, rank_stop_signal=configured)
    assert cfg.stop_signal() is expected and cfg.rank_protocol is RankProtocol(protocol)


def test_progress_dir_precedence_relative_to_the_run_dir(tmp_path):
    assert progress_dir(None, None, tmp_path) == tmp_path / "checkpoints"
    assert progress_dir(None, Path("/ck"), tmp_path) == Path("/ck")
    assert progress_dir(Path("save"), Path("/ck"), tmp_path) == tmp_path / "save"


def test_newest_complete_step_in_our_format(tmp_path):
    assert newest_complete_step(tmp_path) is None
    for step, marked in ((10, True), (20, True), (30, False)):
        ondisk.step_dir(tmp_path, step).mkdir()
        if marked:
            (ondisk.step_dir(tmp_path, step) / ondisk.MARKER).write_text("{}")
    assert newest_complete_step(tmp_path) == 20


@pytest.mark.parametrize("name", sorted(SAVE_FORMATS))
def test_newest_complete_step_in_every_megatron_lm_save_format(megatron_lm_saves, name):
    """Every format Megatron-LM writes (both megatron-core lines); a release checkpoint is no progress."""
    assert newest_complete_step(megatron_lm_saves.path(name)) == SAVE_FORMATS[name].newest


def test_a_newer_non_persistent_save_is_progress_until_it_is_damaged(megatron_lm_saves, tmp_path):
    save = Path(shutil.copytree(megatron_lm_saves.path("core19-torch_dist+non_persistent"), tmp_path / "save"))
    assert made_progress(20, newest_complete_step(save)) == (True, "reached step 25 from step 20")
    newest_of_each_tier = (
        megatron_lm.iteration_dir(save / megatron_lm.NON_PERSISTENT, 25),
        megatron_lm.iteration_dir(save, 20),
    )
    for damaged in newest_of_each_tier:
        shard = damaged / "__0_0.distcp"
        os.truncate(shard, shard.stat().st_size - 1)
    assert newest_complete_step(save) == 10
    assert not made_progress(20, newest_complete_step(save))[0]
