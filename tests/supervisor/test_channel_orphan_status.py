"""Heartbeat channel, parent-death arming and status.json with real sockets, processes and files."""

import dataclasses
import os
import stat
import subprocess
import sys

import pytest
from rich.console import Console

from resilient.core.errors import ConfigError
from resilient.rank.env import FailureHistory, RankEnv
from resilient.rank.heartbeat import HeartbeatClient, HeartbeatServer, NullHeartbeat, connect
from resilient.status import read_status, render_status, write_status


def test_heartbeats_arrive_with_identity_fields(tmp_path):
    server = HeartbeatServer(tmp_path / "sock" / "node0.hb")
    client = HeartbeatClient(RankEnv(heartbeat_socket=server.path, attempt=3, rank=5, local_rank=1))
    client.send("step", 7, loss=2.5, step_time=0.1)
    client.send("error", 7, message="boom")
    got = server.drain()
    assert [(m["phase"], m["step"], m["rank"], m["local_rank"], m["attempt"], m["pid"]) for m in got] == [
        ("step", 7, 5, 1, 3, os.getpid()),
        ("error", 7, 5, 1, 3, os.getpid()),
    ]
    assert got[0]["loss"] == 2.5 and got[1]["message"] == "boom"
    assert server.drain() == []
    server.close()
    assert not server.path.exists()


def test_socket_and_directory_are_owner_only(tmp_path):
    server = HeartbeatServer(tmp_path / "sock" / "node0.hb")
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(server.path.parent).st_mode) == 0o700
    server.close()


def test_client_never_raises_or_blocks_without_a_reader(tmp_path):
    client = HeartbeatClient(RankEnv(heartbeat_socket=tmp_path / "absent.hb"))
    client.send("step", 1)  # no socket at all
    server = HeartbeatServer(tmp_path / "s.hb")
    client = HeartbeatClient(RankEnv(heartbeat_socket=server.path))
    for i in range(20000):  # far beyond the receive buffer: the extra datagrams are dropped
        client.send("step", i, message="x" * 200)
    client.send("step", 1, message=object())  # not JSON-serialisable natively: sent as str
    with pytest.raises(TypeError, match="unknown heartbeat fields"):
        client.send("step", 1, typo=1.0)  # every field is declared in one place
    assert 0 < len(server.drain()) < 20001
    server.close()


def test_client_is_null_when_unsupervised(monkeypatch):
    monkeypatch.delenv("RESILIENT_HEARTBEAT_SOCKET", raising=False)
    assert isinstance(connect(), NullHeartbeat)
    connect().send("step", 1, loss=1.0)  # same API, goes nowhere


def test_rank_env_round_trips_through_the_environment(tmp_path):
    unlike_default = {
        "rank": 9,
        "local_rank": 1,
        "world_size": 16,
        "local_world_size": 8,
        "node_rank": 1,
        "node_name": "n1",
        "master_addr": "10.0.0.1",
        "master_port": 1234,
        "attempt": 2,
        "run_dir": tmp_path,
        "heartbeat_socket": tmp_path / "s.hb",
        "supervisor_pid": 77,
        "stop_signals": ("SIGTERM", "SIGUSR2"),
        "history": FailureHistory(3, 1234.567890123),
        "allow_shared_dir": True,
    }
    # every field, each away from its default: a field the environment drops cannot pass unnoticed
    assert set(unlike_default) == {f.name for f in dataclasses.fields(RankEnv)}
    env = RankEnv(**unlike_default)
    assert all(getattr(env, name) != getattr(RankEnv(), name) for name in unlike_default)
    assert RankEnv.from_environ(env.to_environ()) == env
    plain = RankEnv.from_environ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})  # torchrun's variables only
    assert (plain.rank, plain.world_size, plain.local_world_size, plain.supervised) == (3, 4, 4, False)
    assert plain.history == FailureHistory(0, 0.0)


def test_overlong_socket_path_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="longer than"):
        HeartbeatServer(tmp_path / ("d" * 120) / "node0.hb")


def _child(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=60
    )


def test_rank_with_a_different_parent_kills_itself():
    code = "from resilient.rank.orphan import die_with_parent; die_with_parent(); print('survived')"
    wrong = _child(code, {"RESILIENT_SUPERVISOR_PID": "1"})
    assert wrong.returncode == -9 and "survived" not in wrong.stdout
    right = _child(code, {"RESILIENT_SUPERVISOR_PID": str(os.getpid())})
    assert right.returncode == 0 and "survived" in right.stdout


def test_die_with_parent_is_a_no_op_unsupervised(monkeypatch):
    from resilient.rank.orphan import die_with_parent

    monkeypatch.delenv("RESILIENT_SUPERVISOR_PID", raising=False)
    assert die_with_parent() is False


def test_status_round_trip_owner_only_and_rendered(tmp_path):
    status = {
        "state": "running",
        "attempt": 2,
        "step": 40,
        "last_checkpoint": 30,
        "last_memory_snapshot": 38,
        "restarts": 1,
        "last_failure": {"kind": "hang", "rank": 1, "node": 0, "step": 33, "reason": "no progress"},
        "metrics_ports": {"n0": 9464},
        "ranks": [
            {"rank": 0, "node": 0, "node_name": "n0", "pid": 11, "phase": "step", "step": 40, "last_heartbeat": 1000.0}
        ],
    }
    write_status(tmp_path, status)
    assert stat.S_IMODE(os.stat(tmp_path / "status.json").st_mode) == 0o600
    back = read_status(tmp_path)
    assert back["step"] == 40 and "written_at" in back
    console = Console(record=True, width=200)
    render_status(back, console, now=1002.5)
    text = console.export_text()
    assert "last checkpoint 30 (memory 38)" in text
    assert "running" in text and "hang rank 1" in text and "2.5s" in text and "n0:9464" in text
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]  # no temp file left behind


def test_missing_status_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="no status.json"):
        read_status(tmp_path)
