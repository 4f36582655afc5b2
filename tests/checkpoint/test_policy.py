"""Checkpoint decisions and manifest checks, without processes."""

import json

import pytest

from trainer.checkpoint import manifest, ondisk, policy
from trainer.checkpoint.config import CheckpointConfig


def test_save_triggers():
    cfg = CheckpointConfig(interval_steps=10, interval_minutes=5)
    kw = dict(interval_steps=10, final_step=100, last_save_step=None, seconds_since_save=0.0, stop_requested=False)
    assert policy.should_save(cfg, step=10, **kw).yes
    assert not policy.should_save(cfg, step=11, **kw).yes
    assert policy.should_save(cfg, step=11, **{**kw, "seconds_since_save": 301}).reason.startswith("5 minutes")
    assert policy.should_save(cfg, step=13, **{**kw, "stop_requested": True}).reason == "stop requested"
    assert policy.should_save(cfg, step=100, **kw).reason == "final step"
    assert not policy.should_save(cfg, step=10, **{**kw, "last_save_step": 10, "stop_requested": True}).yes
    off = CheckpointConfig(interval_steps=0, save_on_finish=False)
    assert not policy.should_save(off, step=100, **{**kw, "interval_steps": 0}).yes
    # the interval is the schedule's current one, not the configured start
    assert policy.should_save(cfg, step=11, **{**kw, "interval_steps": 11}).reason == "every 11 steps"
    assert not policy.should_save(cfg, step=10, **{**kw, "interval_steps": 11}).yes


def test_retention_keeps_last_k_and_every_mth_and_protected():
    committed = list(range(10, 110, 10))
    doomed = policy.to_delete(committed, keep_last=2, keep_every=40, protected={30})
    assert set(committed) - set(doomed) == {90, 100, 40, 80, 30}
    assert policy.to_delete([50], keep_last=1, keep_every=0, protected=set()) == []


def test_load_candidates_newest_first_or_the_requested_one():
    assert policy.load_candidates([10, 30, 20], load_step=None) == [30, 20, 10]
    assert policy.load_candidates([10, 30, 20], load_step=20) == [20]


def test_latest_pointer_is_replaced_atomically(tmp_path):
    ondisk.write_latest(tmp_path, 7)
    ondisk.write_latest(tmp_path, 12)
    assert ondisk.read_latest(tmp_path) == 12
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]
    assert oct((tmp_path / "latest").stat().st_mode & 0o777) == "0o600"


def test_verify_reports_size_checksum_missing_and_marker(tmp_path):
    ckpt = tmp_path / "step_0000005"
    ckpt.mkdir()
    (ckpt / "__0_0.distcp").write_bytes(b"a" * 1000)
    (ckpt / "common.pt").write_bytes(b"c" * 10)
    assert "no completion marker" in manifest.verify(ckpt, checksums=True)
    manifest.write_rank_sums(ckpt, 0)
    written = manifest.commit(ckpt, {"step": 5}, None)
    assert set(written["files"]) == {"__0_0.distcp", "common.pt"} and written["bytes"] == 1010
    assert manifest.verify(ckpt, checksums=True) is None
    data = bytearray((ckpt / "__0_0.distcp").read_bytes())
    data[500] ^= 0xFF
    (ckpt / "__0_0.distcp").write_bytes(bytes(data))
    assert manifest.verify(ckpt, checksums=False) is None  # same size: only a checksum can tell
    assert "checksum mismatch" in manifest.verify(ckpt, checksums=True)
    (ckpt / "__0_0.distcp").write_bytes(b"a" * 10)
    assert "size 10 != 1000" in manifest.verify(ckpt, checksums=False)
    (ckpt / "__0_0.distcp").unlink()
    assert "missing" in manifest.verify(ckpt, checksums=False)
    (ckpt / ondisk.MARKER).write_text("{torn")
    assert "not valid JSON" in manifest.verify(ckpt, checksums=False)
    assert json.loads(json.dumps(written))  # the manifest is plain JSON


@pytest.mark.parametrize("legacy_algorithm", ["crc32", "blake2b"])
def test_checkpoints_written_with_older_sums_still_verify(tmp_path, legacy_algorithm):
    ckpt = tmp_path / "step_0000005"
    ckpt.mkdir()
    shard = ckpt / "__0_0.distcp"
    shard.write_bytes(b"a" * 1000)
    written = manifest.commit(ckpt, {"step": 5}, None)
    assert set(written["files"]["__0_0.distcp"]) == {"size", manifest.CHECKSUM}
    legacy = {"size": 1000, legacy_algorithm: manifest.hash_file(shard, legacy_algorithm)}
    marker = json.loads((ckpt / ondisk.MARKER).read_text())
    marker["files"]["__0_0.distcp"] = legacy
    (ckpt / ondisk.MARKER).write_text(json.dumps(marker))
    assert manifest.verify(ckpt, checksums=True) is None
    shard.write_bytes(b"b" * 1000)
    assert "checksum mismatch" in manifest.verify(ckpt, checksums=True)
