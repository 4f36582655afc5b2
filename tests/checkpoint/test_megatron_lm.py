"""`resilient ckpt list|verify|repair` on every checkpoint format Megatron-LM writes, each written by the
real save calls of megatron-core 0.16.1 and 0.19 (the session fixture `megatron_lm_saves`)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest

from resilient.core.exit_codes import ExitCode
from tests.checkpoint.megatron_lm_writer import SAVE_FORMATS
from tests.ranks import resilient_cli
from trainer.checkpoint import safe_pickle
from trainer.megatron_lm import checkpoints as mlm
from trainer.megatron_lm import save_formats


@pytest.fixture
def copy(megatron_lm_saves, tmp_path):
    """A private copy of one format's save, to damage."""
    return lambda name: Path(shutil.copytree(megatron_lm_saves.path(name), tmp_path / name))


def _damaged_lines(out) -> list[str]:
    assert "Traceback" not in out.stderr and out.returncode == ExitCode.CHECKPOINT_DAMAGED, (out.stdout, out.stderr)
    return [line for line in out.stdout.splitlines() if "DAMAGED" in line]


def _member_data_offset(path: Path, member: zipfile.ZipInfo) -> int:
    """Where a zip member's data starts: after its local header, name and (local) extra field."""
    with open(path, "rb") as f:
        f.seek(member.header_offset)
        header = f.read(30)
    return member.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


# -- what each writer wrote, and that all of it is understood ---------------------------------------------


@pytest.mark.parametrize("name", sorted(SAVE_FORMATS))
def test_every_save_format_lists_verifies_and_needs_no_repair(megatron_lm_saves, name):
    fmt, save = SAVE_FORMATS[name], megatron_lm_saves.path(name)
    rows = mlm.listing(save)
    assert rows and all(r["state"] == "complete" and r["problem"] is None for r in rows), rows
    assert {r["format"] for r in rows} == {fmt.format}
    assert [r["step"] for r in rows if r["latest"] and r["tier"] == mlm.PERSISTENT] == [fmt.tracked]
    assert mlm.read_tracker(save) == fmt.tracked
    assert all(c.problem is None for c in mlm.verify(save, checksums=True))
    assert all(mlm.tracker_problem(path) is None for _, path in mlm.tiers(save))  # repair leaves it
    assert mlm.newest_complete(save) == fmt.newest


def test_the_writers_wrote_what_each_line_writes(megatron_lm_saves):
    def files(name: str, iteration: int | str = 10) -> set[str]:
        ckpt = mlm.checkpoint_dir(megatron_lm_saves.path(name), iteration)
        return {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file()}

    # 0.16.1 keeps the common state in common.pt; 0.19 inside the .distcp files (and no common.pt).
    assert {"common.pt", "metadata.json", ".metadata"} <= files("core16-torch_dist-common.pt")
    assert "common.pt" not in files("core19-torch_dist+non_persistent", 20)
    assert "metadata.json" in files("core19-torch_dist+non_persistent", 20)
    np = megatron_lm_saves.path("core19-torch_dist+non_persistent") / mlm.NON_PERSISTENT
    assert mlm.read_tracker(np) == 25 and list(mlm.iterations(np)) == [25]
    integrity = json.loads(
        (mlm.iteration_dir(megatron_lm_saves.path("core19-verify_integrity"), 10) / "integrity.json").read_text()
    )
    assert integrity["algorithm"] == "sha256" and set(integrity["files"]) == files("core19-verify_integrity") - {
        "integrity.json"
    }
    assert files("core19-release", "release") >= {"metadata.json", ".metadata"}
    for name in ("core16-torch_dcp", "core19-torch_dcp", "core19-fsdp_dtensor"):
        assert "metadata.json" not in files(name) and ".metadata" in files(name), name
    assert files("core16-torch-distrib_optim") == {"mp_rank_00/model_optim_rng.pt", "mp_rank_00/distrib_optim.pt"}
    assert files("core19-torch-distrib_optim-2x2") == {
        f"mp_rank_{tp:02d}_{pp:03d}/{f}"
        for tp in (0, 1)
        for pp in (0, 1)
        for f in ("model_optim_rng.pt", "distrib_optim.pt")
    }


def test_reading_a_megatron_lm_save_imports_neither_torch_nor_megatron(copy):
    from tests.test_cli import _heavy_imports

    save = copy("core19-torch_dist+non_persistent")
    for command in ("list", "verify", "repair"):
        got = _heavy_imports("ckpt", command, str(save))
        assert got == {"code": 0, "heavy": []}, (command, got)


# -- the acceptance: 0.19's save_checkpoint, verified, then a truncated shard caught ----------------------


def test_verify_accepts_a_save_checkpoint_save_and_catches_a_truncated_shard(copy):
    save = copy("core19-torch_dist+non_persistent")
    out = resilient_cli("ckpt", "verify", str(save))
    assert out.returncode == 0 and out.stdout.splitlines() == ["non_persistent step 25: intact", "step 20: intact"]
    shard = mlm.iteration_dir(save, 20) / "__0_0.distcp"
    os.truncate(shard, shard.stat().st_size - 100)
    [damaged] = _damaged_lines(resilient_cli("ckpt", "verify", str(save)))
    assert damaged.startswith("step 20: DAMAGED") and "iter_0000020/__0_0.distcp: truncated" in damaged
    out = resilient_cli("ckpt", "verify", str(save), "--step", "20")
    assert out.returncode == ExitCode.CHECKPOINT_DAMAGED and out.stderr == ""
    [line] = out.stdout.splitlines()
    assert line.startswith("step 20: DAMAGED: iter_0000020/__0_0.distcp: truncated")


def test_missing_shard_repair_points_the_tracker_back_and_leaves_the_other_tier(copy):
    save = copy("core19-torch_dist+non_persistent")
    (mlm.iteration_dir(save, 20) / "__0_0.distcp").unlink()
    assert [r["state"] for r in mlm.listing(save)] == ["complete", "incomplete", "complete"]
    out = resilient_cli("ckpt", "repair", str(save))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines()[0].endswith("tracker now names iteration 10")
    assert out.stdout.splitlines()[1] == "non_persistent tracker already names complete iteration 25"
    assert (save / mlm.TRACKER).read_text() == "10" and os.stat(save / mlm.TRACKER).st_mode & 0o777 == 0o600
    assert mlm.iteration_dir(save, 20).is_dir()  # nothing deleted
    assert not [p for p in save.iterdir() if p.name.startswith(".")]  # no temp file left


# -- non-persistent global checkpoints ---------------------------------------------------------------------


def test_a_newer_non_persistent_save_is_what_megatron_resumes_from(megatron_lm_saves):
    save = megatron_lm_saves.path("core19-torch_dist+non_persistent")
    assert mlm.resumes_from(save) == (mlm.NON_PERSISTENT, 25)
    assert [(r["step"], r["tier"], r["latest"]) for r in mlm.listing(save)] == [
        (10, "persistent", False),
        (20, "persistent", True),
        (25, "non_persistent", True),
    ]
    out = resilient_cli("ckpt", "verify", str(save), "--json")
    assert json.loads(out.stdout)["step"] == 25 and json.loads(out.stdout)["ok"]


def test_a_damaged_non_persistent_save_is_damage_repair_cannot_undo_without_deleting(copy):
    save = copy("core19-torch_dist+non_persistent")
    np = save / mlm.NON_PERSISTENT
    (mlm.iteration_dir(np, 25) / ".metadata").unlink()
    assert mlm.newest_complete(save) == 20
    [damaged] = _damaged_lines(resilient_cli("ckpt", "verify", str(save)))
    assert damaged.startswith("non_persistent step 25: DAMAGED") and "no .metadata" in damaged
    out = resilient_cli("ckpt", "repair", str(save))
    assert out.returncode == ExitCode.CHECKPOINT_DAMAGED and "move it aside" in out.stdout
    assert mlm.read_tracker(np) == 25 and mlm.read_tracker(save) == 20 and mlm.iteration_dir(np, 25).is_dir()


# -- torch_dist: common state, unfinished saves, integrity.json --------------------------------------------


def test_torch_dist_needs_its_common_state(copy):
    save = copy("core16-torch_dist-common.pt")
    (mlm.iteration_dir(save, 20) / "common.pt").unlink()
    assert "no common state" in mlm.check(mlm.iteration_dir(save, 20))
    save = copy("core19-torch_dist+non_persistent")
    ckpt = mlm.iteration_dir(save, 20)
    metadata = safe_pickle.load_metadata(ckpt)
    info = next(i for k, i in metadata.storage_data.items() if k.fqn == save_formats.COMMON_STATE_ITEM)
    assert mlm.check(ckpt, checksums=True) is None
    _flip_byte(ckpt / info.relative_path, info.offset + info.length // 2)  # inside the common state's archive
    assert mlm.check(ckpt) is None  # sizes are whole
    assert "item 'common_state/shard_0_1'" in mlm.check(ckpt, checksums=True)


@pytest.mark.parametrize("name", ["core16-torch_dist-common.pt", "core19-torch_dist+non_persistent"])
def test_torch_dist_without_metadata_json_is_unfinished(copy, name):
    save = copy(name)
    (mlm.iteration_dir(save, 20) / "metadata.json").unlink()  # written last, after .metadata
    assert "unfinished torch_dist save" in mlm.check(mlm.iteration_dir(save, 20))
    assert [d[2] for d in mlm.repair(save)][0] == 10


def test_integrity_json_digests_are_checked(copy):
    save = copy("core19-verify_integrity")
    ckpt = mlm.iteration_dir(save, 10)
    _flip_byte(ckpt / "__0_0.distcp", 10)
    assert mlm.check(ckpt) is None  # same size: only the digest can tell
    [damaged] = _damaged_lines(resilient_cli("ckpt", "verify", str(save)))
    assert "iter_0000010/__0_0.distcp: sha256 differs from integrity.json" in damaged
    assert resilient_cli("ckpt", "verify", str(save), "--sizes-only").returncode == 0
    (ckpt / "integrity.json").write_text("{")
    assert "integrity.json: not valid JSON" in mlm.check(ckpt)


# -- torch_dcp / fsdp_dtensor --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["core16-torch_dcp", "core19-torch_dcp", "core19-fsdp_dtensor"])
def test_dcp_saves_truncated_or_unfinished_are_incomplete(copy, name):
    save = copy(name)
    ckpt = mlm.iteration_dir(save, 10)
    shard = ckpt / "__0_0.distcp"
    os.truncate(shard, shard.stat().st_size // 2)
    assert "__0_0.distcp: truncated" in mlm.check(ckpt)
    (ckpt / ".metadata").unlink()  # torch.distributed.checkpoint writes it last
    assert "the save never finished" in mlm.check(ckpt)
    assert "no complete iteration" in mlm.repair(save)[0][3]


# -- legacy torch format with the distributed optimizer -----------------------------------------------------


def test_legacy_rank_grid_and_distrib_optim_are_checked(copy):
    save = copy("core19-torch-distrib_optim-2x2")
    ckpt = mlm.iteration_dir(save, 10)
    shutil.rmtree(ckpt / "mp_rank_01_000")
    assert "mp_rank_01_000: missing" in mlm.check(ckpt)

    save = copy("core16-torch-distrib_optim")
    ckpt = mlm.iteration_dir(save, 10)
    optim = ckpt / "mp_rank_00" / "distrib_optim.pt"
    with zipfile.ZipFile(optim) as archive:
        member = archive.infolist()[-1]
    _flip_byte(optim, _member_data_offset(optim, member) + member.file_size // 2)
    assert mlm.check(ckpt) is None and "fails its CRC-32" in mlm.check(ckpt, checksums=True)
    os.truncate(optim, optim.stat().st_size - 10)
    assert "distrib_optim.pt: not a whole torch.save archive" in mlm.check(ckpt)


def test_a_missing_distrib_optim_beside_the_others_is_missing(copy):
    save = copy("core19-torch-distrib_optim-2x2")
    ckpt = mlm.iteration_dir(save, 10)
    (ckpt / "mp_rank_00_001" / "distrib_optim.pt").unlink()
    assert "mp_rank_00_001/distrib_optim.pt: missing" in mlm.check(ckpt)
    (ckpt / "mp_rank_00_000" / "model_optim_rng.pt").unlink()
    assert "model_optim_rng.pt: missing" in mlm.check(ckpt)


# -- release -------------------------------------------------------------------------------------------------


def test_release_tracker_names_the_release_directory(copy):
    save = copy("core19-release")
    assert [(r["step"], r["latest"]) for r in mlm.listing(save)] == [("release", True)]
    (save / "release" / ".metadata").unlink()
    [damaged] = _damaged_lines(resilient_cli("ckpt", "verify", str(save)))
    assert damaged.startswith("step release: DAMAGED") and "names the release checkpoint" in damaged
    out = resilient_cli("ckpt", "repair", str(save))  # a release is never replaced by guessing
    assert out.returncode == ExitCode.CHECKPOINT_DAMAGED and mlm.read_tracker(save) == "release"


# -- bad input: one line, a distinct exit code, nothing lost --------------------------------------------------


def test_a_non_utf8_or_garbage_tracker_is_one_line_and_repair_rewrites_it(copy):
    save = copy("core19-torch_dcp")
    (save / mlm.TRACKER).write_bytes(b"\xff\xfe1\x00")
    [damaged] = _damaged_lines(resilient_cli("ckpt", "verify", str(save)))
    assert "not UTF-8 text" in damaged
    out = resilient_cli("ckpt", "repair", str(save))
    assert out.returncode == 0 and mlm.read_tracker(save) == 10
    (save / mlm.TRACKER).write_text("latest please")
    assert "names neither an iteration nor `release` ('latest please')" in mlm.tracker_problem(save)


def test_a_tracker_that_is_a_directory_is_refused_and_kept(copy):
    save = copy("core19-torch_dcp")
    (save / mlm.TRACKER).unlink()
    (save / mlm.TRACKER).mkdir()
    assert "unreadable" in _damaged_lines(resilient_cli("ckpt", "verify", str(save)))[0]
    out = resilient_cli("ckpt", "repair", str(save))
    assert out.returncode == ExitCode.CHECKPOINT_DAMAGED and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"resilient: checkpoint error: {save / mlm.TRACKER} is a directory; repair deletes nothing: move it aside"
    ]
    assert (save / mlm.TRACKER).is_dir()


def test_garbage_storage_metadata_is_one_line(copy):
    save = copy("core16-torch_dist-common.pt")
    metadata = mlm.iteration_dir(save, 20) / ".metadata"
    real = pickle.loads(metadata.read_bytes())  # the writer's own file: trusted here
    first = next(iter(real.storage_data.values()))
    first.offset = "0"
    metadata.write_bytes(pickle.dumps(real))
    assert f"bad byte range for {first.relative_path}" in mlm.check(metadata.parent)
    metadata.write_bytes(os.urandom(256))
    [damaged] = _damaged_lines(resilient_cli("ckpt", "verify", str(save)))
    assert "refusing to load" in damaged and "iter_0000020/.metadata" in damaged
    assert mlm.repair(save)[0][2] == 10


def test_hostile_storage_metadata_is_refused_unexecuted(copy, tmp_path):
    save = copy("core19-torch_dist+non_persistent")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (mlm.iteration_dir(save, 20) / ".metadata").write_bytes(pickle.dumps(Evil()))
    problem = mlm.check(mlm.iteration_dir(save, 20))
    assert "not a checkpoint metadata type" in problem and not marker.exists()


def test_not_a_directory_is_a_one_line_config_error(tmp_path):
    out = resilient_cli("ckpt", "list", str(tmp_path / "absent"))
    assert out.returncode == ExitCode.CONFIG_ERROR and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_repair_points_our_latest_back_to_the_newest_step_that_verifies(tmp_path):
    from trainer.checkpoint import inspect as ck
    from trainer.checkpoint import ondisk

    for step in (10, 20):
        ckpt = ondisk.step_dir(tmp_path, step)
        ckpt.mkdir()
        (ckpt / "__0_0.distcp").write_bytes(b"abc")
        (ckpt / ondisk.MARKER).write_text(json.dumps({"files": {"__0_0.distcp": {"size": 3, "blake2b": "-"}}}))
    ondisk.write_latest(tmp_path, 20)
    assert ck.repair(tmp_path) == (20, 20, "latest already names complete step 20")
    os.truncate(ondisk.step_dir(tmp_path, 20) / "__0_0.distcp", 1)
    before, after, what = ck.repair(tmp_path)
    assert (before, after) == (20, 10) and "size 1 != 3" in what and ondisk.read_latest(tmp_path) == 10
