"""Opening a checkpoint never runs code: a planted `.metadata` pickle with a recomputed manifest is
refused by verify, digest and resume before anything unpickles it."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from resilient.core.exit_codes import ExitCode
from resilient.core.secret import RunKey
from tests.ranks import run_ranks
from tests.supervisor.harness import REPO
from trainer.checkpoint import manifest, ondisk, safe_pickle

pytestmark = pytest.mark.timeout(300)


class _Payload:
    """Unpickling this runs `code` (what an attacker would plant)."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def plant(root: Path, step: int, marker: Path, key: RunKey | None = None) -> Path:
    """A checkpoint whose .metadata pickle writes `marker`, committed with a correct manifest (sealed with
    `key`: what an attacker who had the run's secret could do)."""
    ckpt = ondisk.step_dir(root, step)
    ckpt.mkdir(parents=True)
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Payload(f"open({str(marker)!r}, 'w').write('ran')")))
    (ckpt / "metadata.json").write_text(
        json.dumps(
            {
                "sharded_backend": "torch_dist",
                "sharded_backend_version": 1,
                "common_backend": "torch",
                "common_backend_version": 1,
            }
        )
    )
    (ckpt / "common.pt").write_bytes(b"")
    manifest.commit(ckpt, {"step": step}, key)
    ondisk.write_latest(root, step)
    return ckpt


@pytest.mark.parametrize("command", ["verify", "digest"])
def test_ckpt_commands_refuse_a_planted_metadata_pickle_without_running_it(tmp_path, command):
    marker = tmp_path / "pwned"
    plant(tmp_path / "checkpoints", 8, marker)
    p = subprocess.run(
        [sys.executable, "-m", "resilient.cli", "ckpt", command, str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert not marker.exists(), "the planted pickle ran"
    assert p.returncode == ExitCode.CHECKPOINT_DAMAGED, p.stdout + p.stderr
    assert "builtins.exec is not a checkpoint metadata type" in p.stdout + p.stderr
    assert "Traceback" not in p.stderr


def test_real_checkpoint_metadata_passes_the_allowlist(reference_run):
    root = reference_run / "checkpoints"
    for step in ondisk.committed_steps(root):
        assert manifest.verify(ondisk.step_dir(root, step), checksums=False) is None


def test_the_allowlist_names_every_dtype_torch_pickles_and_rebuilds_them_inert(tmp_path):
    import torch

    pickled = {value.__reduce__() for value in vars(torch).values() if isinstance(value, torch.dtype)}
    assert pickled <= safe_pickle.DTYPES, sorted(pickled - safe_pickle.DTYPES)
    (tmp_path / ".metadata").write_bytes(pickle.dumps({"dtype": torch.bfloat16, "shape": torch.Size([2, 3])}))
    loaded = safe_pickle.load_metadata(tmp_path)
    assert isinstance(loaded["dtype"], type) and issubclass(loaded["dtype"], safe_pickle.Record)
    assert loaded["shape"].args == ((2, 3),) and not isinstance(loaded["shape"], torch.Size)


@pytest.mark.parametrize("sealed", [False, True])
def test_resume_refuses_a_planted_checkpoint_without_running_it(tmp_path, sealed):
    """Unsealed, it is refused by its missing seal; sealed with the run's own key (as if the secret had
    leaked), by the metadata allowlist: either way before anything is unpickled."""
    marker, run_dir = tmp_path / "pwned", tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    plant(run_dir / "checkpoints", 8, marker, RunKey.of(run_dir) if sealed else None)
    codes = run_ranks(run_dir, ["train.steps=10", "train.eval_every=0"], timeout=280)
    log = (run_dir / "rank0.log").read_text()
    assert not marker.exists(), "the planted pickle ran in a rank"
    assert codes == [ExitCode.CHECKPOINT_DAMAGED] * 2, log[-2000:]
    assert ("not a checkpoint metadata type" if sealed else "is sealed by no run") in log
