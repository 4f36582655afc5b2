"""The coordination store is bound to the named address, admits only clients that prove
the run's secret, bounds keys and bytes, answers within a deadline, and every value is sealed with the run's
secret. A real supervisor (fake ranks) against an attacker process running as another uid."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket

import psutil
import pytest

from resilient.core import ledger
from resilient.core.errors import ConfigError
from resilient.core.events import LedgerEvent
from resilient.core.exit_codes import ExitCode
from resilient.core.kvstore import StoreClient, StoreLimits, StoreRefused, StoreUnavailable, host_store
from resilient.core.secret import load_or_create
from resilient.supervisor.auth import Forged, Sealer
from resilient.supervisor.ranks import free_port
from resilient.supervisor.records import StoreComplaints
from resilient.supervisor.store import SealedStore
from tests.safety.conftest import ATTACKER_PY, NOBODY, as_nobody
from tests.supervisor.harness import events, start, steps_done, supervise_args, wait_until, write_config

pytestmark = pytest.mark.timeout(120)

# The attacker: an unprivileged local user (setpriv to uid 65534), the system interpreter, the standard library.
ATTACK = r"""
import json, os, socket, struct, sys, time
run_dir, port = sys.argv[1], int(sys.argv[2])
out = {"uid": os.getuid()}
try:
    open(os.path.join(run_dir, ".secret")).read(); out["secret"] = "read"
except OSError as err:
    out["secret"] = type(err).__name__
with socket.socket() as s:
    out["other_address"] = s.connect_ex(("127.0.0.2", port))

def talk(data, wait=1.0):
    # send `data`, return what comes back before the store closes the connection
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(data)
    got, end = b"", time.monotonic() + wait
    s.settimeout(0.2)
    while time.monotonic() < end:
        try:
            chunk = s.recv(4096)
        except socket.timeout:
            continue
        except OSError:
            break
        if not chunk:
            out.setdefault("closed", 0); out["closed"] += 1
            break
        got += chunk
    s.close()
    return got

# torch's TCPStore protocol: set "stop", add "ctl" (what stopped a run before), a 4 GiB key
tcp = b"\x00" + struct.pack("<Q", 4) + b"stop" + struct.pack("<Q", 6) + b"forged"
out["tcpstore_set"] = talk(tcp).hex()
out["tcpstore_add"] = talk(b"\x05" + struct.pack("<Q", 3) + b"ctl" + struct.pack("<q", 1)).hex()
out["huge"] = talk(b"\x00" + struct.pack("<Q", 1 << 32) + b"k" * 65536).hex()
# this store's handshake without the secret: the server proves itself, the client cannot
hello = talk(b"RSTORE1\n" + os.urandom(16), wait=0.5)
out["hello_reply_bytes"] = len(hello)
bad_proof = talk(b"RSTORE1\n" + os.urandom(16) + os.urandom(32) + struct.pack(">I", 20) + os.urandom(20), wait=2.5)
out["bad_proof_reply_bytes"] = len(bad_proof)
# a flood of idle connections: each dropped within the authentication window
held = []
for _ in range(200):
    try:
        held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
    except OSError:
        break
time.sleep(3.0)
dead = 0
for s in held:
    s.settimeout(0.5)
    try:
        dead += s.recv(1) == b""
    except OSError:
        dead += 1
    s.close()
out["flood"], out["flood_dropped"] = len(held), dead
print(json.dumps(out))
"""


def _progress(run_dir, step):
    return lambda: any(s["step"] >= step for s in steps_done(run_dir))


def test_an_unprivileged_client_can_neither_read_write_stop_restart_nor_flood_the_store(tmp_path):
    """What a local user who reaches the store port can do to a running supervisor: nothing."""
    cfg = write_config(tmp_path / "cfg.yaml", steps=300, nproc=2, health=False)
    run_dir, port = tmp_path / "run", free_port()
    os.chmod(tmp_path, 0o755)  # the attacker may look around; the run dir itself is 0700
    proc = start(
        supervise_args(cfg, run_dir, port),
        env={"FAKE_STEP_S": "0.05", "FAKE_CKPT_EVERY": "1"},
        log=tmp_path / "supervisor.log",
    )
    try:
        wait_until(_progress(run_dir, 5), 60, "step 5")
        secret = run_dir / ".secret"
        assert secret.stat().st_mode & 0o777 == 0o600
        rss_before = psutil.Process(proc.pid).memory_info().rss
        got = as_nobody(ATTACKER_PY, "-c", ATTACK, str(run_dir), str(port), check=False, timeout=120)
        assert got.returncode == 0, got.stderr[-2000:]
        out = json.loads(got.stdout.strip().splitlines()[-1])
        assert out["uid"] == NOBODY and out["secret"] == "PermissionError"
        assert out["other_address"] != 0  # bound to 127.0.0.1 only
        assert out["tcpstore_set"] == out["tcpstore_add"] == out["huge"] == ""  # closed, nothing answered
        assert out["hello_reply_bytes"] == 48  # the server's nonce and proof: nothing of the run
        assert out["bad_proof_reply_bytes"] <= 48  # at most that, then closed: a wrong proof gets no further
        assert out["flood"] == 200 and out["flood_dropped"] == 200  # every idle connection dropped
        reached = max(s["step"] for s in steps_done(run_dir))
        wait_until(_progress(run_dir, reached + 10), 60, "steps after the attack")  # ... and nothing stopped
        assert proc.poll() is None
        assert not events(run_dir, "failure") and not events(run_dir, "restart")
        assert psutil.Process(proc.pid).memory_info().rss < rss_before + 64 * 2**20  # it held none of it

        proc.send_signal(signal.SIGTERM)  # a genuine stop still works and shows its origin
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


def test_the_store_bounds_keys_and_bytes_and_says_so_once():
    said = []
    sealer = Sealer(b"k" * 32, "test")
    server = host_store("127.0.0.1", 0, sealer.store_key, StoreLimits(max_keys=3, max_bytes=10_000), said.append)
    client = StoreClient("127.0.0.1", server.port, sealer.store_key, connect_timeout_s=5, op_timeout_s=5)
    try:
        for key in ("a", "b", "c"):
            client.set(key, b"v")
        client.set("a", b"w" * 100)  # replacing a value is not a new key
        for _ in range(2):
            with pytest.raises(StoreRefused, match="key limit of 3"):
                client.set("d", b"v")
        with pytest.raises(StoreRefused, match="byte limit of 10000"):
            client.set("b", b"x" * 20_000)
        assert client.multi_get(["a", "b", "d"]) == [b"w" * 100, b"v", None]  # nothing half-written
        assert said == ["key limit of 3 reached", "byte limit of 10000 reached"]  # one line per bound
        assert client.delete_prefix("") == 3 and server.bytes_held == 0
    finally:
        client.close()
        server.close()


def test_a_forged_value_is_ignored_and_recorded_once_per_key(tmp_path):
    """A value another job's key (or a tamperer) wrote reads as absent; the slot records each such key once."""
    sealer = Sealer(b"k" * 32, "test")
    server = host_store("127.0.0.1", 0, sealer.store_key, StoreLimits(max_keys=10, max_bytes=10_000))
    client = StoreClient("127.0.0.1", server.port, sealer.store_key, connect_timeout_s=5, op_timeout_s=5)
    store = SealedStore(client, sealer, StoreComplaints(tmp_path, 3).forged)
    try:
        client.set("stop", Sealer(b"j" * 32, "test").seal("stop", {"reason": "not ours"}))
        client.set("a/0/restart", sealer.seal("stop", {"reason": "moved from another key"}))
        store.set("a/0/decision", {"restart": False})
        for _ in range(3):
            assert store.get_many(["stop", "a/0/restart", "a/0/decision"]) == [None, None, {"restart": False}]
        rejected = [e for e in ledger.read(tmp_path) if e["event"] == LedgerEvent.AUTH_REJECTED]
        assert [(e["key"], e["node"]) for e in rejected] == [("stop", 3), ("a/0/restart", 3)]
    finally:
        client.close()
        server.close()


def test_a_frozen_store_is_lost_within_the_deadline_not_never():
    """torch's TCPStore client waits forever on a frozen server; this one gives up after its deadline."""
    sealer = Sealer(b"k" * 32, "test")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()  # accepts connections, never answers: what a SIGSTOPped coordinator looks like
    try:
        with pytest.raises(StoreUnavailable, match="no answer|bad proof|cannot reach"):
            StoreClient(
                "127.0.0.1", listener.getsockname()[1], sealer.store_key, connect_timeout_s=0.5, op_timeout_s=0.5
            )
    finally:
        listener.close()


def test_secret_is_created_owner_only_and_a_readable_one_is_refused(tmp_path):
    secret = load_or_create(tmp_path)
    path = tmp_path / ".secret"
    assert path.stat().st_mode & 0o777 == 0o600 and load_or_create(tmp_path) == secret
    path.chmod(0o640)
    with pytest.raises(ConfigError, match="0640"):
        load_or_create(tmp_path)
    path.unlink()
    path.mkdir()  # a directory (was a traceback)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_or_create(tmp_path)
    path.rmdir()
    (tmp_path / "elsewhere").write_text("00" * 32)
    path.symlink_to(tmp_path / "elsewhere")  # a symlink is never followed
    with pytest.raises(ConfigError, match="symbolic link"):
        load_or_create(tmp_path)


def test_sealed_values_bind_key_and_job_instance():
    sealer = Sealer(b"k" * 32, "slurm:7.0")
    blob = sealer.seal("stop", {"reason": "x"})
    assert sealer.open("stop", blob) == {"reason": "x"}
    for wrong in (
        lambda: sealer.open("a/0/restart", blob),  # moved to another key
        lambda: Sealer(b"k" * 32, "slurm:7.1").open("stop", blob),  # replayed into a requeue
        lambda: Sealer(b"j" * 32, "slurm:7.0").open("stop", blob),  # another secret
        lambda: sealer.open("stop", blob[:-1] + bytes([blob[-1] ^ 1])),
    ):  # tampered
        with pytest.raises(Forged):
            wrong()


RENDEZVOUS_ATTACK = r"""
import json, socket, struct, sys
port = int(sys.argv[1])
out = {}
for name, data in (("tcpstore_get", b"\x02" + struct.pack("<Q", 5) + b"rank0"),
                   ("tcpstore_set", b"\x00" + struct.pack("<Q", 5) + b"rank0" + struct.pack("<Q", 1) + b"x")):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(data)
    s.settimeout(3)
    try:
        out[name] = s.recv(4096).hex()
    except OSError as err:
        out[name] = type(err).__name__
    s.close()
print(json.dumps(out))
"""


def test_the_rank_rendezvous_store_admits_only_this_attempts_ranks(tmp_path):
    """The process group's store (MASTER_PORT) is bound to MASTER_ADDR and admits only ranks of this
    run and attempt; another local user reads and writes nothing there."""
    from resilient.rank.env import RankEnv
    from resilient.rank.rendezvous import rendezvous_key, rendezvous_store

    load_or_create(tmp_path)
    port = free_port()
    env = RankEnv(
        rank=0,
        world_size=2,
        master_addr="127.0.0.1",
        master_port=port,
        attempt=3,
        run_dir=tmp_path,
        supervisor_pid=os.getpid(),
    )
    rank0 = rendezvous_store(env, rendezvous_key(env), 10.0)
    rank0.set("rank0", b"10.0.0.1:4242")
    rank1 = rendezvous_store(dataclasses.replace(env, rank=1), rendezvous_key(env), 10.0)
    assert rank1.get("rank0") == b"10.0.0.1:4242" and rank1.add("n", 2) == 2 and rank0.add("n", 1) == 3
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.2", port)) != 0  # MASTER_ADDR only
    stale = rendezvous_key(dataclasses.replace(env, attempt=2))  # a rank left over from the last attempt
    with pytest.raises(StoreUnavailable, match="bad proof"):
        StoreClient("127.0.0.1", port, stale, connect_timeout_s=0.5, op_timeout_s=0.5)
    got = as_nobody(ATTACKER_PY, "-c", RENDEZVOUS_ATTACK, str(port), check=False, timeout=60)
    assert got.returncode == 0, got.stderr[-2000:]
    assert json.loads(got.stdout) == {"tcpstore_get": "", "tcpstore_set": ""}  # closed: nothing read or written
    assert rank1.get("rank0") == b"10.0.0.1:4242" and rank1.num_keys() == 2
