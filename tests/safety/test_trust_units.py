"""The rules behind the trust tests, in-process: whose directories, the run's keys, the seals of
checkpoints and snapshots, the names and staleness of memory-tier roots."""

from __future__ import annotations

import json
import os
import stat

import pytest

from resilient.core import guarded, permissions, secret
from resilient.core.errors import CheckpointError, ConfigError
from resilient.core.secret import RunKey
from resilient.supervisor.run_dirs import RunDirs
from tests.safety.conftest import NOBODY
from trainer.checkpoint import manifest
from trainer.checkpoint.memory import files, naming, stale
from trainer.checkpoint.memory.snapshot import FORMAT, SnapshotFormat, Staged

A, B = RunKey(b"a" * 32), RunKey(b"b" * 32)


def _st(uid: int, mode: int) -> os.stat_result:
    return os.stat_result((stat.S_IFDIR | mode, 0, 0, 2, uid, 0, 0, 0, 0, 0))


@pytest.mark.parametrize(
    "uid, mode, leaf, problem",
    [
        (1000, 0o700, True, None),
        (0, 0o700, True, "owned by uid 0, not by this user"),
        (1000, 0o770, True, "writable by other users (mode 0770)"),
        (1000, 0o1777, True, "writable by other users"),  # sticky does not make the run's own dir private
        (0, 0o755, False, None),
        (1000, 0o755, False, None),
        (0, 0o1777, False, None),  # /tmp
        (0, 0o777, False, "writable by other users and not sticky"),
        (2000, 0o755, False, "owned by uid 2000 (neither root nor this user"),
    ],
)
def test_the_directory_rule(uid, mode, leaf, problem):
    got = permissions.judge_dir(permissions.Path("/x"), _st(uid, mode), 1000, leaf=leaf)
    assert (got is None) if problem is None else (problem in got)


def test_the_whole_path_is_walked_links_included(tmp_path):
    (tmp_path / "mine").mkdir(mode=0o700)
    assert permissions.path_problem(tmp_path / "mine" / "not" / "yet") is None
    (tmp_path / "evil").mkdir()
    os.chown(tmp_path / "evil", NOBODY, NOBODY)
    assert "evil, a parent directory, is owned by uid 65534" in permissions.path_problem(tmp_path / "evil" / "run")
    (tmp_path / "to_evil").symlink_to(tmp_path / "evil")  # root's link: its target is checked
    assert "evil, a parent directory" in permissions.path_problem(tmp_path / "to_evil" / "run")
    (tmp_path / "theirs").symlink_to(tmp_path / "mine")
    os.lchown(tmp_path / "theirs", NOBODY, NOBODY)
    assert "theirs is a symbolic link owned by uid 65534" in permissions.path_problem(tmp_path / "theirs" / "run")


def test_a_directory_that_vanished_or_was_replaced(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    seen = permissions.capture([run, tmp_path / "missing"])
    assert list(seen) == [run] and permissions.changed_dirs(seen) is None
    run.rename(tmp_path / "old")
    assert permissions.changed_dirs(seen) == (run, f"{run} vanished while the run was using it")
    run.mkdir()
    assert "was replaced by another directory" in permissions.changed_dirs(seen)[1]


def test_the_supervisor_fences_a_replaced_run_dir_and_refuses_one_made_shared(tmp_path):
    run, ckpt = tmp_path / "run", tmp_path / "ckpt"
    run.mkdir(mode=0o700)
    ckpt.mkdir(mode=0o700)
    dirs = RunDirs(run, [run, ckpt])
    assert dirs.changed() is None and dirs.changed_now(100.0) is None and dirs.shared() is None
    ckpt.chmod(0o777)
    assert f"{ckpt}" in dirs.shared() and "supervisor.allow_shared_dir" in dirs.shared()
    ckpt.chmod(0o700)
    ckpt.rename(tmp_path / "ckpt-old")
    assert dirs.changed_now(100.5) is None  # looked 0.5 s ago: not yet
    assert dirs.changed_now(101.0) == f"{ckpt} vanished while the run was using it"
    assert guarded.write(run / "status.json", lambda: (run / "status.json").write_text("{}"))
    run.rename(tmp_path / "run-old")
    run.mkdir(mode=0o700)  # someone else's directory now stands at the run's path
    assert "was replaced by another directory" in dirs.changed()
    assert not guarded.write(run / "status.json", lambda: (run / "status.json").write_text("{}"))
    assert not (run / "status.json").exists()  # fenced: nothing of the run is written into it


def test_the_secret_is_one_0600_file_and_each_key_has_one_purpose(tmp_path):
    key = RunKey.of(tmp_path)
    assert stat.S_IMODE((tmp_path / ".secret").stat().st_mode) == 0o600 and RunKey.of(tmp_path) == key
    assert key.verify("x", b"data", key.mac("x", b"data")) and not key.verify("y", b"data", key.mac("x", b"data"))
    assert key.run_id != RunKey(b"c" * 32).run_id and key.secret.hex() not in key.run_id
    (tmp_path / ".secret").chmod(0o644)
    with pytest.raises(ConfigError, match="lets others read it"):
        secret.load(tmp_path)
    for name, make in (("fifo", os.mkfifo), ("dir", os.mkdir)):
        (tmp_path / name).mkdir()
        make(tmp_path / name / ".secret")
        with pytest.raises(ConfigError, match="not a regular file"):
            secret.load_or_create(tmp_path / name)


def _manifest() -> dict:
    return {"format": 1, "meta": {"step": 5}, "files": {"a": {"size": 1, "xxh3": "00"}}, "bytes": 1}


def test_a_manifest_seal_names_its_run(tmp_path):
    sealed = manifest.seal(_manifest(), A)
    assert sealed["run_id"] == A.run_id and manifest.seal_problem(sealed, A, "step_5") is None
    foreign, why = manifest.seal_problem(sealed, B, "step_5")
    assert foreign and f"belongs to run {A.run_id}, not to this run ({B.run_id})" in why
    foreign, why = manifest.seal_problem(_manifest(), A, "step_5")
    assert foreign and "sealed by no run" in why and manifest.ADOPT_HINT in why
    edited = {**sealed, "files": {"a": {"size": 1, "xxh3": "ff"}}}
    assert manifest.seal_problem(edited, A, "step_5") == (
        False,
        "step_5: its seal does not verify (the manifest was altered or forged)",
    )
    ckpt = tmp_path / "step_0000005"
    ckpt.mkdir()
    (ckpt / manifest.MARKER).write_text(json.dumps(sealed))
    with pytest.raises(CheckpointError, match="refusing to load another run's checkpoint"):
        manifest.verify(ckpt, checksums=False, key=B)


def test_a_snapshot_seal_names_its_run(tmp_path):
    data = bytearray(b"x" * 100)
    meta = {
        "format": FORMAT,
        "step": 5,
        "rank": 0,
        "layout": None,
        "tensors": [],
        "common": {"start": 0, "nbytes": 0},
        "bytes": len(data),
    }
    SnapshotFormat(A).seal(Staged(5, tmp_path, meta, data))  # type: ignore[arg-type]
    written = json.loads(naming.meta_file(tmp_path, 0).read_text())
    assert SnapshotFormat(A).verify(written, data, 0) == data
    with pytest.raises(ValueError, match=f"a snapshot of run {A.run_id}, not of this run"):
        SnapshotFormat(B).verify(written, data, 0)
    with pytest.raises(ValueError, match="seal does not verify"):
        SnapshotFormat(A).verify({**written, "step": 6}, data, 0)
    with pytest.raises(ValueError, match="format 2, not 3"):
        SnapshotFormat(A).verify({**written, "format": 2}, data, 0)


def test_memory_roots_are_named_from_the_secret_and_go_stale_with_their_run(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    key = RunKey.of(run)
    root = naming.default_root(run, key)
    assert root == naming.default_root(run, key) != naming.default_root(run, A) != naming.default_root(tmp_path, key)
    monkeypatch.setattr(naming, "SHM", tmp_path / "shm")
    (tmp_path / "shm").mkdir()
    live = naming.default_root(run, key)
    assert files.root_problem(live) is None and files.claim_root(live / naming.OWNER, key.run_id, run) is None
    legacy = tmp_path / "shm" / "resilient-0123456789abcdef"
    legacy.mkdir()
    assert stale.stale_reason(live) is None and "no run record" in stale.stale_reason(legacy)
    (run / ".secret").unlink()
    RunKey.of(run)  # the run dir re-created: a new run
    assert f"{run} now holds another run" in stale.stale_reason(live)
    os.unlink(run / ".secret")
    os.rmdir(run)
    assert f"its run directory {run} is gone" in stale.stale_reason(live)
    assert {r["path"] for r in stale.stale_roots(tmp_path / "shm")} == {str(live), str(legacy)}
