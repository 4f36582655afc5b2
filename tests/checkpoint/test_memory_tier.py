"""The in-memory checkpoint tier (own node), its choice at restart and its fallbacks.

The decision (`choose_tier`) is tested as a pure function; real ranks check that a resume from memory
lands on the reference run's bits and that a flipped byte in shared memory falls back to the next
valid tier (disk here), never further. Replication without processes: test_memory_replication.py."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from resilient.core import ledger
from resilient.core.secret import RunKey
from tests.conftest import REFERENCE
from tests.ranks import digest, resilient_cli, run_ranks, spawn_ranks, train_losses, wait_all
from trainer.checkpoint.config import CheckpointConfig
from trainer.checkpoint.memory.choice import Inventory, choose_tier, mark_failed
from trainer.checkpoint.policy import should_snapshot

MEMORY = REFERENCE + ["checkpoint.memory_interval_steps=5"]  # memory 5, 10, 15, 20; disk 12, 24


# -- the decision ---------------------------------------------------------------------------


def test_own_memory_newer_than_disk_wins():
    invs = [Inventory({10: None, 15: None}), Inventory({10: None, 15: None})]
    choice = choose_tier(invs, disk_step=12)
    assert (choice.step, choice.sources, choice.tier) == (15, ("own", "own"), "memory-own")


def test_lost_node_uses_the_replica_its_peer_holds():
    # 2 nodes x 1 rank: rank 0 holds rank 1's replica and vice versa; node 1 lost its own memory
    invs = [Inventory({15: None}, replica_of=1, replica={15: None}), Inventory({}, replica_of=0, replica={15: None})]
    choice = choose_tier(invs, disk_step=12)
    assert (choice.step, choice.sources, choice.tier) == (15, ("own", "replica@0"), "memory-replica")


def test_stale_replica_falls_back_to_the_step_every_rank_has():
    invs = [
        Inventory({15: None, 20: None}, replica_of=1, replica={15: None}),
        Inventory({}, replica_of=0, replica={15: None, 20: None}),
    ]
    choice = choose_tier(invs, disk_step=12)
    assert choice.step == 15 and "step 20: no valid copy for rank 1" in choice.reason


def test_corrupt_copy_falls_back_only_as_far_as_needed():
    invs = [Inventory({10: None, 15: None}), Inventory({10: None, 15: "checksum mismatch"})]
    assert choose_tier(invs, disk_step=None).step == 10
    choice = choose_tier(invs, disk_step=12)
    assert choice.step is None and choice.tier == "disk" and "checksum mismatch" in choice.reason


def test_a_copy_that_fails_its_checksum_at_load_is_replaced_by_the_next_valid_one():
    # A restart checks only metadata up front and verifies the copies it picks: a bad one is marked
    # and the choice taken again, a replica of the same step before an older step.
    invs = [
        Inventory({10: None, 15: None}, replica_of=1, replica={10: None, 15: None}),
        Inventory({10: None, 15: None}, replica_of=0, replica={10: None, 15: None}),
    ]
    first = choose_tier(invs, disk_step=None)
    assert (first.step, first.sources) == (15, ("own", "own"))
    invs = mark_failed(invs, first, [None, "checksum mismatch"])
    second = choose_tier(invs, disk_step=None)
    assert (second.step, second.sources) == (15, ("own", "replica@0"))
    invs = mark_failed(invs, second, [None, "checksum mismatch"])
    third = choose_tier(invs, disk_step=None)
    assert third.step == 10
    assert "step 15: no valid copy for rank 1 (own: checksum mismatch; replica: checksum mismatch)" in third.reason
    assert choose_tier(invs, disk_step=12).tier == "disk"


def test_disk_wins_ties_and_no_memory_means_disk():
    assert choose_tier([Inventory({12: None})], disk_step=12).step is None
    assert choose_tier([Inventory({}), Inventory({})], disk_step=None).step is None


def test_should_snapshot():
    assert should_snapshot(5, step=10, final_step=24, disk_saved=False).yes
    assert not should_snapshot(5, step=12, final_step=24, disk_saved=False).yes
    assert not should_snapshot(5, step=10, final_step=24, disk_saved=True).yes
    assert not should_snapshot(5, step=25, final_step=25, disk_saved=False).yes
    assert not should_snapshot(0, step=10, final_step=24, disk_saved=False).yes


# -- real ranks -----------------------------------------------------------------------------


def memory_root(run_dir: Path) -> Path:
    return CheckpointConfig().memory_root(run_dir, RunKey.of(run_dir))


# Two "nodes" of one rank each on this host: rank r's node is r // LOCAL_WORLD_SIZE.
TWO_NODES = {"LOCAL_WORLD_SIZE": "1"}


def kill_after(
    run_dir: Path, overrides: list[str], step: int, extra_env: dict | None = None, committed: Path | None = None
) -> None:
    """Train until rank 0 logged `step` (and `committed` exists), then SIGKILL every rank."""
    procs = spawn_ranks(run_dir, overrides, extra_env=extra_env)
    log = run_dir / "train_log.jsonl"
    while not (
        log.exists()
        and max(train_losses(run_dir), default=0) >= step
        and (committed is None or (memory_root(run_dir) / committed).exists())
    ):
        assert all(p.poll() is None for p in procs), (run_dir / "rank0.log").read_text()[-3000:]
        time.sleep(0.1)
    for p in procs:
        p.kill()
    wait_all(procs)


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """A run SIGKILLed after step 18: memory snapshots 10 and 15 committed, disk 12."""
    run_dir = tmp_path_factory.mktemp("memtier") / "killed"
    kill_after(run_dir, MEMORY, 18)
    yield run_dir
    shutil.rmtree(memory_root(run_dir), ignore_errors=True)


@pytest.fixture(scope="module")
def killed_two_nodes(tmp_path_factory):
    """As `killed_run`, each rank on its own node: each holds the other's replica of 10 and 15."""
    run_dir = tmp_path_factory.mktemp("memtier2") / "killed"
    kill_after(run_dir, MEMORY, 18, TWO_NODES, committed=Path("node1/replica/node0/step_0000015/COMMITTED"))
    yield run_dir
    shutil.rmtree(memory_root(run_dir), ignore_errors=True)


def clone(run_dir: Path, dst: Path) -> Path:
    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns("rank*.log"))
    shutil.rmtree(memory_root(dst), ignore_errors=True)
    shutil.copytree(memory_root(run_dir), memory_root(dst))
    return dst


def loads(run_dir: Path) -> list[dict]:
    return [r for r in ledger.read(run_dir) if r["event"] == "ckpt_load"]


@pytest.mark.slow
def test_resume_from_memory_is_bit_identical(reference_run, killed_run, tmp_path):
    run_dir = clone(killed_run, tmp_path / "resumed")
    try:
        rows = json.loads(resilient_cli("ckpt", "list", str(run_dir), "--json").stdout)
        assert {(r["tier"], r["step"], r["state"]) for r in rows} >= {
            ("disk", 12, "complete"),
            ("memory-own", 10, "complete"),
            ("memory-own", 15, "complete"),
        }
        snapshots = [e["step"] for e in ledger.read(run_dir) if e["event"] == "mem_snapshot"]
        assert snapshots[:2] == [5, 10]  # commits reach the ledger (status.json shows the newest)
        assert run_ranks(run_dir, MEMORY) == [0, 0]
        load = loads(run_dir)[-1]
        assert (load["tier"], load["step"], load["sources"]) == ("memory-own", 15, ["own", "own"])
        assert digest(run_dir) == digest(reference_run)
        ref, got = train_losses(reference_run), train_losses(run_dir)
        assert {s: got[s] for s in range(16, 25)} == {s: ref[s] for s in range(16, 25)}
        assert not memory_root(run_dir).exists(), "a finished run leaves nothing in /dev/shm"
    finally:
        shutil.rmtree(memory_root(run_dir), ignore_errors=True)


@pytest.mark.slow
def test_flipped_byte_in_memory_falls_back_to_disk(reference_run, killed_run, tmp_path):
    run_dir = clone(killed_run, tmp_path / "flipped")
    try:
        victim = memory_root(run_dir) / "node0" / "own" / "step_0000015" / "rank1.bin"
        data = bytearray(victim.read_bytes())
        data[len(data) // 3] ^= 0x01
        victim.write_bytes(bytes(data))
        rows = json.loads(resilient_cli("ckpt", "list", str(run_dir), "--json").stdout)
        assert [r["state"] for r in rows if r["tier"] == "memory-own" and r["step"] == 15] == ["damaged"]
        assert run_ranks(run_dir, MEMORY) == [0, 0]
        # 15 is damaged on rank 1; 10 is older than disk 12: disk 12, not a memory step further back
        load = loads(run_dir)[-1]
        assert (load["tier"], load["step"]) == ("disk", 12)
        assert "checksum mismatch" in load["reason"]
        assert digest(run_dir) == digest(reference_run)
    finally:
        shutil.rmtree(memory_root(run_dir), ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("lost", ["own", "own_and_replica_15"])
def test_lost_node_memory_resumes_from_the_peer_replica(reference_run, killed_two_nodes, tmp_path, lost):
    """Node 1 lost its memory: rank 1 gets its step-15 copy from the replica rank 0 holds; when that
    replica is stale (15 gone, 10 older than disk 12) the run resumes from disk."""
    run_dir = clone(killed_two_nodes, tmp_path / lost)
    root = memory_root(run_dir)
    try:
        shutil.rmtree(root / "node1" / "own")
        if lost == "own_and_replica_15":
            shutil.rmtree(root / "node0" / "replica" / "node1" / "step_0000015")
        rows = json.loads(resilient_cli("ckpt", "list", str(run_dir), "--json").stdout)
        assert ("memory-replica", 0, 1, 10) in {(r["tier"], r.get("node"), r.get("of_node"), r["step"]) for r in rows}
        assert run_ranks(run_dir, MEMORY, extra_env=TWO_NODES) == [0, 0]
        load = loads(run_dir)[-1]
        if lost == "own":
            assert (load["tier"], load["step"], load["sources"]) == ("memory-replica", 15, ["own", "replica@0"])
        else:
            assert (load["tier"], load["step"]) == ("disk", 12)
            assert "step 15: no valid copy for rank 1" in load["reason"]
        assert digest(run_dir) == digest(reference_run)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_prune_keeps_the_newest_committed_and_what_is_in_flight(tmp_path):
    from trainer.checkpoint.memory.naming import COMMITTED, step_dir, steps_in
    from trainer.checkpoint.memory.retention import prune

    for step, committed in [(5, True), (10, False), (15, True), (20, True), (25, False)]:
        step_dir(tmp_path, step).mkdir()
        if committed:
            (step_dir(tmp_path, step) / COMMITTED).write_text("{}")
    prune(tmp_path, keep_last=2)
    assert list(steps_in(tmp_path)) == [15, 20, 25]


def test_snapshots_reuse_the_pruned_file_and_its_mapping(tmp_path):
    from trainer.checkpoint.memory.naming import COMMITTED, SPARE, step_dir, steps_in
    from trainer.checkpoint.memory.retention import prune
    from trainer.checkpoint.memory.slots import Slots

    slots, taken = Slots(tmp_path, rank=0), []
    for step in range(1, 8):
        slots.forget_gone()
        path = step_dir(tmp_path, step) / "rank0.bin"
        path.parent.mkdir()
        buffer = slots.take(path, 1000 + step)  # the size varies a little, as the common blob does
        buffer[:8] = step.to_bytes(8, "little")
        taken.append((path.stat().st_ino, id(buffer)))
        (path.parent / COMMITTED).write_text("{}")
        prune(tmp_path, keep_last=2)
        assert len(slots.maps) <= 3 and list(steps_in(tmp_path))[-2:] == [step - 1, step][-min(step, 2) :]
    # Steps 1-3 needed fresh files; from step 4 on each reuses the one pruned two steps before, mapping
    # included, so three files (two kept, one spare) serve every snapshot.
    assert len({ino for ino, _ in taken}) == 3 and taken[3] == taken[0] and taken[6] == taken[3]
    assert sorted(p.name for p in tmp_path.iterdir()) == [SPARE, "step_0000006", "step_0000007"]
    assert (tmp_path / "step_0000007" / "rank0.bin").read_bytes()[:8] == (7).to_bytes(8, "little")

    slots.forget_gone()
    fresh = step_dir(tmp_path, 8) / "rank0.bin"
    fresh.parent.mkdir()
    slots.take(fresh, 4 << 20)  # larger than the spare: a new file, the spare is left to the next prune
    assert fresh.stat().st_ino not in {ino for ino, _ in taken} and (tmp_path / SPARE / "rank0.bin").exists()
    slots.close()


def test_memory_root_made_by_someone_else_or_open_to_others_or_of_another_run_is_refused(tmp_path):
    from trainer.checkpoint.memory.tier import root_problem

    assert root_problem(tmp_path / "mine", "run-a", tmp_path / "a") is None
    assert (tmp_path / "mine").stat().st_mode & 0o777 == 0o700
    assert root_problem(tmp_path / "mine", "run-a", tmp_path / "moved") is None  # the same run, moved
    assert "holds the snapshots of run run-a, not of this run (run-b)" in root_problem(
        tmp_path / "mine", "run-b", tmp_path / "b"
    )
    (tmp_path / "open").mkdir(mode=0o777)
    (tmp_path / "open").chmod(0o777)
    assert "owner-only" in root_problem(tmp_path / "open", "run-a", tmp_path / "a")
    (tmp_path / "link").symlink_to(tmp_path / "mine")
    assert "owner-only" in root_problem(tmp_path / "link", "run-a", tmp_path / "a")
