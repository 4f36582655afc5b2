"""Issue 14.1: the coordination store is bound to the named address and every value is sealed with the
run's secret. A real supervisor (fake ranks) against an attacker process running as another uid."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from resilient.core.errors import ConfigError
from resilient.core.exit_codes import ExitCode
from resilient.supervisor.auth import Forged, Sealer, load_or_create_secret
from tests.supervisor.harness import events, start, steps_done, wait_until, write_config

pytestmark = pytest.mark.timeout(120)
NOBODY = 65534

# Runs as root long enough to import torch (the interpreter lives under /root), then drops to uid
# nobody before touching the run: from there on it is an unprivileged local user.
ATTACK = r"""
import json, os, socket, sys
from datetime import timedelta
import torch.distributed as dist
run_dir, port = sys.argv[1], int(sys.argv[2])
os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)
out = {"uid": os.getuid()}
try:
    open(os.path.join(run_dir, ".secret")).read(); out["secret"] = "read"
except OSError as err:
    out["secret"] = type(err).__name__
with socket.socket() as s:
    out["other_address"] = s.connect_ex(("127.0.0.2", port))
store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10))
seen = {}
for key in ("status/0", "run/first_attempt", "a/0/report/0", "a/0/master_port"):
    if store.check([key]):
        seen[key] = store.get(key).hex()
out["read"] = seen
forged = json.dumps({"kind": "preempted", "reason": "forged", "node": 0, "pid": 1, "host": "x"})
out["stop_cas"] = store.compare_set("stop", "", forged).decode(errors="replace") == forged
for a in range(3):
    store.set(f"a/{a}/restart", json.dumps({"kind": "rank_exit", "rank": 0, "reason": "forged", "node": 0}))
store.add("ctl", 1)
print(json.dumps(out))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _progress(run_dir, step):
    return lambda: any(s["step"] >= step for s in steps_done(run_dir))


def test_another_uid_without_the_secret_can_neither_read_stop_nor_restart(tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", steps=400, nproc=2, health=False)
    run_dir, port = tmp_path / "run", _free_port()
    os.chmod(tmp_path, 0o755)  # the attacker may look around; the run dir itself is 0700
    proc = start(["supervise", str(cfg), "--run-dir", str(run_dir), "--node-rank", "0", "--nnodes", "1",
                  "--master-addr", "127.0.0.1", "--master-port", str(port)],
                 env={"FAKE_STEP_S": "0.05", "FAKE_CKPT_EVERY": "1"}, log=tmp_path / "supervisor.log")
    try:
        wait_until(_progress(run_dir, 5), 60, "step 5")
        secret = run_dir / ".secret"
        assert secret.stat().st_mode & 0o777 == 0o600
        got = subprocess.run([sys.executable, "-c", ATTACK, str(run_dir), str(port)], capture_output=True,
                             text=True, timeout=60)
        assert got.returncode == 0, got.stderr[-2000:]
        out = json.loads(got.stdout.strip().splitlines()[-1])
        assert out["uid"] == NOBODY and out["secret"] == "PermissionError"
        assert out["other_address"] != 0  # bound to 127.0.0.1 only
        assert "status/0" in out["read"]  # the attacker reached the store, and saw only ciphertext:
        for blob in out["read"].values():
            assert b'"pid"' not in bytes.fromhex(blob) and b"ranks" not in bytes.fromhex(blob)
        assert out["stop_cas"]  # it took the empty stop key first ...

        reached = max(s["step"] for s in steps_done(run_dir))
        wait_until(_progress(run_dir, reached + 10), 30, "steps after the attack")  # ... and nothing stopped
        assert proc.poll() is None
        rejected = {e["key"] for e in events(run_dir, "auth_rejected")}
        assert {"stop", "a/0/restart"} <= rejected
        assert not events(run_dir, "failure") and not events(run_dir, "restart")

        proc.send_signal(signal.SIGTERM)  # a genuine stop replaces the forged one and shows its origin
        assert proc.wait(60) == ExitCode.PREEMPTED
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    [preempted] = events(run_dir, "preempted")
    assert preempted["origin"] == {"node": 0, "pid": proc.pid, "host": socket.gethostname()}
    assert "SIGTERM" in preempted["reason"]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["stop"]["pid"] == proc.pid and "SIGTERM" in status["stop"]["reason"]


def test_secret_is_created_owner_only_and_a_readable_one_is_refused(tmp_path):
    secret = load_or_create_secret(tmp_path)
    path = tmp_path / ".secret"
    assert path.stat().st_mode & 0o777 == 0o600 and load_or_create_secret(tmp_path) == secret
    path.chmod(0o640)
    with pytest.raises(ConfigError, match="0640"):
        load_or_create_secret(tmp_path)


def test_sealed_values_bind_key_and_job_instance():
    sealer = Sealer(b"k" * 32, "slurm:7.0")
    blob = sealer.seal("stop", {"reason": "x"})
    assert sealer.open("stop", blob) == {"reason": "x"}
    for wrong in (lambda: sealer.open("a/0/restart", blob),                       # moved to another key
                  lambda: Sealer(b"k" * 32, "slurm:7.1").open("stop", blob),        # replayed into a requeue
                  lambda: Sealer(b"j" * 32, "slurm:7.0").open("stop", blob),        # another secret
                  lambda: sealer.open("stop", blob[:-1] + bytes([blob[-1] ^ 1]))):  # tampered
        with pytest.raises(Forged):
            wrong()


def test_rank_rendezvous_store_listens_on_master_addr_only():
    from trainer.distributed import _rendezvous_store

    port = _free_port()
    store = _rendezvous_store("127.0.0.1", port, 0, 1, 10.0)
    store.set("k", "v")
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.2", port)) != 0
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) == 0
    del store
    time.sleep(0.1)
