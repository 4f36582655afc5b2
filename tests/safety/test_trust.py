"""Trust, round two: what an unprivileged local user (uid 65534, through setpriv) can do to a run.

Each test performs the attack as that user and checks the run is unharmed, or refuses up front with
one line. Runs are shared where one run can take several attacks: a fake-rank run under a parent the
attacker owns (metrics flood, then the run dir swapped), and a real-trainer pair in a working
directory the attacker planted packages in (memory snapshot of a dead run, checkpoint dir removed).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from resilient.core import ledger
from resilient.core.exit_codes import ExitCode
from resilient.core.secret import RunKey
from tests.ranks import REPO, TINY, resilient_cli, run_ranks
from tests.safety.conftest import ATTACKER_PY, NOBODY, as_nobody, nobody_popen
from tests.supervisor.harness import events, ranks_of, steps_done, wait_until, write_config
from trainer.checkpoint import ondisk
from trainer.checkpoint.config import CheckpointConfig

pytestmark = pytest.mark.timeout(420)


def supervisor(args: list[str], log: Path, cwd: Path = REPO, env: dict | None = None) -> subprocess.Popen:
    """`resilient ARGS` as the operator starts it: `-P`, as the console script does not put the working
    directory on sys.path either (what is under test is what the supervisor's children import)."""
    out = open(log, "ab")
    return subprocess.Popen(
        [sys.executable, "-P", "-m", "resilient.cli", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        stdout=out,
        stderr=out,
    )


# -- a parent directory the attacker owns --------------------------------------------------------

FLOOD = """
import socket, sys, time
socks = [socket.create_connection(("127.0.0.1", int(sys.argv[1]))) for _ in range(400)]
print("open", flush=True)
time.sleep(600)
"""


def test_an_attacker_owned_parent_gets_neither_threads_nor_the_run_dir(shared, tmp_path):
    """With the override (`supervisor.allow_shared_dir`), a parent the attacker owns: 400 idle connections
    to the metrics port hold a bounded number of supervisor threads; renaming the live run dir and
    planting one in its place (config, a checkpoint of "another run") ends the run as a storage fault
    within a poll, touching nothing planted."""
    parent = shared / "evil"
    as_nobody("mkdir", "-m", "0755", str(parent))
    run_dir = parent / "run"
    cfg = write_config(tmp_path / "cfg.yaml", steps=2000, supervisor={"allow_shared_dir": True})
    proc = supervisor(["run", str(cfg), "--run-dir", str(run_dir)], tmp_path / "sup.log", env={"FAKE_STEP_S": "0.1"})
    flood = None
    try:
        wait_until(lambda: len(steps_done(run_dir)) >= 5, 120, "training")
        port = wait_until(
            lambda: next(iter(json.loads((run_dir / "status.json").read_text())["metrics_ports"].values()), None),
            30,
            "the metrics port",
        )
        threads = psutil.Process(proc.pid).num_threads()
        flood = nobody_popen(ATTACKER_PY, "-I", "-c", FLOOD, str(port), stdout=subprocess.PIPE, text=True)
        assert flood.stdout.readline().strip() == "open"
        time.sleep(1.0)
        assert psutil.Process(proc.pid).num_threads() <= threads + 4, "a thread per idle connection"
        flood.kill()
        flood.wait()
        before = len(steps_done(run_dir))
        wait_until(lambda: len(steps_done(run_dir)) > before + 3, 60, "training to go on after the flood")

        planted = {"config.yaml": "train: {steps: 1}\n", "checkpoints/step_0000060/COMMITTED.json": '{"files": {}}'}
        script = (
            f"import os; os.rename({str(run_dir)!r}, {str(run_dir) + '.old'!r}); os.mkdir({str(run_dir)!r})\n"
            f"for name, text in {planted!r}.items():\n"
            f"    p = os.path.join({str(run_dir)!r}, name); os.makedirs(os.path.dirname(p), exist_ok=True)\n"
            f"    open(p, 'w').write(text)\n"
        )
        as_nobody(ATTACKER_PY, "-I", "-c", script)
        code = proc.wait(60)
    finally:
        proc.kill()
        if flood is not None:
            flood.kill()
    log = (tmp_path / "sup.log").read_text()
    assert code == ExitCode.STORAGE_FAULT, log[-3000:]
    assert f"{run_dir} was replaced by another directory" in log and "Traceback" not in log
    for name, text in planted.items():
        assert (run_dir / name).read_text() == text  # nothing planted was touched
        assert os.stat(run_dir / name).st_uid == NOBODY
    old = Path(str(run_dir) + ".old")
    assert {e["attempt"] for e in events(old, "attempt_start")} == {0}, "no attempt started from the planted dir"
    assert not (run_dir / "ledger.jsonl").exists(), "the supervisor wrote its ledger into the attacker's directory"


def test_a_path_opened_to_others_mid_run_ends_the_run_at_the_next_attempt(tmp_path):
    """The whole path is checked at every attempt, not only at the start: a parent made writable by others
    while the run trains ends it before the next attempt's ranks start (one line, exit 64)."""
    parent = tmp_path / "parent"
    parent.mkdir(mode=0o755)
    run_dir = parent / "run"
    cfg = write_config(tmp_path / "cfg.yaml", steps=2000)
    proc = supervisor(["run", str(cfg), "--run-dir", str(run_dir)], tmp_path / "sup.log", env={"FAKE_STEP_S": "0.1"})
    try:
        wait_until(lambda: len(steps_done(run_dir)) >= 3, 120, "training")
        parent.chmod(0o777)
        wait_until(lambda: ranks_of(proc.pid).get(0), 30, "rank 0").kill()  # a crash: the next attempt checks again
        code = proc.wait(120)
    finally:
        proc.kill()
    log = (tmp_path / "sup.log").read_text()
    assert code == ExitCode.CONFIG_ERROR, log[-3000:]
    assert (
        f"{parent}, a parent directory, is writable by other users and not sticky (mode 0777); refusing to go on"
    ) in log
    assert {e["attempt"] for e in events(run_dir, "attempt_start")} == {0}


def test_a_link_in_place_of_a_rank_log_is_refused_not_written_through(shared, tmp_path):
    """A run dir the operator opened to others (0777, with the override): the attacker pre-creates logs/
    with links named as the next rank logs, pointing at a file of root's. The supervisor refuses to open
    them (a storage fault before any rank starts); the file is unchanged."""
    target = tmp_path / "root_owned"
    target.write_text("root's file\n")
    run_dir = shared / "run"
    run_dir.mkdir(mode=0o777)
    run_dir.chmod(0o777)
    logs = run_dir / "logs"
    names = ["spares.node0.log", *(f"attempt0.node0.rank{r}.log" for r in range(2))]
    as_nobody(
        ATTACKER_PY,
        "-I",
        "-c",
        f"import os; os.mkdir({str(logs)!r}, 0o777)\n"
        f"for n in {names!r}: os.symlink({str(target)!r}, os.path.join({str(logs)!r}, n))",
    )
    cfg = write_config(tmp_path / "cfg.yaml", steps=5, supervisor={"allow_shared_dir": True})
    proc = supervisor(["run", str(cfg), "--run-dir", str(run_dir)], tmp_path / "sup.log")
    code = proc.wait(120)
    log = (tmp_path / "sup.log").read_text()
    assert code == ExitCode.STORAGE_FAULT, log[-3000:]
    assert "attempt0.node0.rank0.log: a symbolic link is in its place; refusing to write through it" in log
    assert "Traceback" not in log
    assert target.read_text() == "root's file\n"
    assert not steps_done(run_dir), "a rank ran"


def test_a_linked_config_is_refused_by_the_rank(tmp_path):
    """RUN_DIR/config.yaml is read by the ranks without following a link (the supervisor wrote it)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    (tmp_path / "planted.yaml").write_text("train: {steps: 1}\n")
    (run_dir / "config.yaml").symlink_to(tmp_path / "planted.yaml")
    p = subprocess.run(
        [sys.executable, "-m", "trainer", "--config", str(run_dir / "config.yaml")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RESILIENT_RUN_DIR": str(run_dir), "PYTHONWARNINGS": "ignore"},
    )
    assert p.returncode == ExitCode.CONFIG_ERROR, p.stderr[-2000:]
    assert "config.yaml: is a symbolic link; refusing to read the run's config through it" in p.stderr
    assert "Traceback" not in p.stderr


# -- a working directory the attacker planted packages in; a dead run's memory snapshot -----------

PLANT = "import pathlib; pathlib.Path({marker!r}).write_text('ran as ' + __name__)\n"


def _real_run(run_dir: Path, cwd: Path, log: Path, *extra: str) -> subprocess.Popen:
    data = REPO / "examples"
    sets = [
        "train.eval_every=0",
        "train.warmup_steps=2",
        f"data.path={data / 'data' / 'c4-sample'}",
        f"data.tokenizer={data / 'tokenizer.json'}",
        "checkpoint.memory_interval_steps=2",
        *extra,
    ]
    return supervisor(
        ["run", str(TINY), "--run-dir", str(run_dir), *(a for s in sets for a in ("--set", s))], log, cwd=cwd
    )


@pytest.fixture(scope="module")
def planted_cwd_runs(tmp_path_factory):
    """Run A in a shared working directory where the attacker planted `megatron` and `trainer` packages,
    SIGKILLed once a memory snapshot is committed; its run dir is removed and re-created for run B (other
    settings), whose checkpoint directory is removed mid-run. Yields what the tests look at."""
    tmp = tmp_path_factory.mktemp("planted")
    cwd = Path(tempfile.mkdtemp(prefix="resilient-cwd-", dir="/tmp"))
    cwd.chmod(0o1777)
    marker = cwd / "marker"
    for package in ("megatron", "trainer"):
        as_nobody("mkdir", str(cwd / package))
        as_nobody(
            ATTACKER_PY,
            "-I",
            "-c",
            f"open({str(cwd / package / '__init__.py')!r}, 'w').write({PLANT.format(marker=str(marker))!r})",
        )
    run_dir = tmp / "run"
    out = {"cwd": cwd, "marker": marker, "run_dir": run_dir, "tmp": tmp}
    try:
        a = _real_run(run_dir, cwd, tmp / "a.log", "train.steps=200", "checkpoint.interval_steps=100")
        try:
            wait_until(lambda: events(run_dir, "mem_snapshot") or a.poll() is not None, 300, "run A's memory snapshot")
            assert a.poll() is None, (tmp / "a.log").read_text()[-3000:]
            out["root_a"] = CheckpointConfig().memory_root(run_dir, RunKey.of(run_dir))
            out["marker_after_a"] = marker.exists()
            a.send_signal(signal.SIGKILL)
            a.wait(60)
        finally:
            a.kill()
        wait_until(
            lambda: (
                not [
                    p
                    for p in psutil.process_iter(["environ"])
                    if (p.info["environ"] or {}).get("RESILIENT_RUN_DIR") == str(run_dir)
                ]
            ),
            60,
            "run A's ranks to die with their supervisor",
        )
        shutil.rmtree(run_dir)  # the operator starts over in the same place
        b = _real_run(run_dir, cwd, tmp / "b.log", "train.steps=100", "checkpoint.interval_steps=4")
        try:
            wait_until(lambda: events(run_dir, "ckpt_save") or b.poll() is not None, 300, "run B's first checkpoint")
            # Gone from its path in one step (a save writing into it meanwhile would make rmtree fail), then removed.
            (run_dir / "checkpoints").rename(tmp / "checkpoints-removed")
            shutil.rmtree(tmp / "checkpoints-removed", ignore_errors=True)
            out["code_b"] = b.wait(240)
        finally:
            b.kill()
        out["root_b"] = CheckpointConfig().memory_root(run_dir, RunKey.of(run_dir))
        yield out
    finally:
        shutil.rmtree(cwd, ignore_errors=True)
        for key in ("root_a", "root_b"):
            if key in out:
                shutil.rmtree(out[key], ignore_errors=True)


def test_spares_and_ranks_never_import_from_the_working_directory(planted_cwd_runs):
    r = planted_cwd_runs
    assert not r["marker_after_a"] and not r["marker"].exists(), r["marker"].read_text()
    parked = [e["spare_ranks"] for e in events(r["run_dir"], "attempt_start")]
    assert parked and parked[0] == 2, "the ranks were parked spares (what imported megatron while parked)"


def test_a_new_run_never_resumes_a_dead_runs_snapshot_which_ckpt_list_and_clean_report_and_remove(planted_cwd_runs):
    r = planted_cwd_runs
    assert r["root_a"] != r["root_b"], "snapshot directories are named from the run's secret"
    assert not [e for e in events(r["run_dir"], "ckpt_load")], "run B resumed something"
    rows = json.loads(resilient_cli("ckpt", "list", str(r["run_dir"]), "--json").stdout)
    stale = {row["path"]: row["problem"] for row in rows if row["tier"] == "memory-stale"}
    assert f"{r['run_dir']} now holds another run" in stale[str(r["root_a"])]
    assert str(r["root_b"]) not in stale
    refused = resilient_cli("ckpt", "clean", str(r["root_b"]))
    assert refused.returncode == ExitCode.CONFIG_ERROR and "not a stale memory-tier directory" in refused.stderr
    cleaned = resilient_cli("ckpt", "clean", str(r["root_a"]))
    assert cleaned.returncode == 0 and f"removed {r['root_a']}" in cleaned.stdout, cleaned.stderr
    assert not r["root_a"].exists() and r["root_b"].exists()


def test_a_checkpoint_dir_removed_mid_run_is_a_storage_fault_not_a_crash(planted_cwd_runs):
    r = planted_cwd_runs
    log = (r["tmp"] / "b.log").read_text()
    assert r["code_b"] == ExitCode.STORAGE_FAULT, log[-3000:]
    # gone, or (when a save re-created the path meanwhile) another directory: never written to either way
    assert re.search(
        f"{re.escape(str(r['run_dir'] / 'checkpoints'))} (vanished|was replaced by another directory) while the run",
        log,
    ), log[-3000:]
    assert [e["event"] for e in ledger.read(r["run_dir"]) if e["event"] in ("storage_fault", "gave_up")][:1] == [
        "storage_fault"
    ]
    assert {e["kind"] for e in events(r["run_dir"], "failure")} <= {"storage"}, "a rank or node was blamed"
    assert not [p for p in (r["run_dir"] / "logs").glob("attempt*.log") if "Traceback" in p.read_text()]


# -- checkpoints bound to their run --------------------------------------------------------------


def test_another_runs_checkpoint_is_refused_and_one_of_before_is_adopted_explicitly(reference_run, shared, tmp_path):
    """Another run's step 24 in this run's checkpoint directory: refused by `ckpt verify` and by the ranks,
    never loaded. With its seal stripped (a checkpoint of before run seals) it is refused with the
    migration line; `ckpt adopt` seals it for this run, which then resumes from it. That run's memory
    directory was squatted by the attacker: the tier falls back to disk with a warning."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True, mode=0o700)
    shutil.copytree(ondisk.step_dir(reference_run / "checkpoints", 24), ondisk.step_dir(run_dir / "checkpoints", 24))
    ondisk.write_latest(run_dir / "checkpoints", 24)
    mine, theirs = RunKey.of(run_dir).run_id, RunKey.of(reference_run).run_id

    verify = resilient_cli("ckpt", "verify", str(run_dir))
    assert verify.returncode == ExitCode.CHECKPOINT_DAMAGED and "Traceback" not in verify.stderr
    assert f"step_0000024 belongs to run {theirs}, not to this run ({mine})" in verify.stderr
    codes = run_ranks(run_dir, ["train.steps=30", "train.eval_every=0"], timeout=280)
    assert codes == [ExitCode.CHECKPOINT_DAMAGED] * 2, (run_dir / "rank0.log").read_text()[-2000:]
    assert "refusing to load another run's checkpoint" in (run_dir / "rank0.log").read_text()
    assert not events(run_dir, "ckpt_load")

    marker = ondisk.step_dir(run_dir / "checkpoints", 24) / ondisk.MARKER
    legacy = {k: v for k, v in json.loads(marker.read_text()).items() if k not in ("mac", "run_id")}
    marker.write_text(json.dumps(legacy))
    verify = resilient_cli("ckpt", "verify", str(run_dir))
    assert verify.returncode == ExitCode.CHECKPOINT_DAMAGED
    assert "is sealed by no run" in verify.stderr and "resilient ckpt adopt RUN_DIR" in verify.stderr
    adopt = resilient_cli("ckpt", "adopt", str(run_dir))
    assert adopt.returncode == 0 and f"step 24: adopted by run {mine} (was: sealed by no run)" in adopt.stdout

    squatted = shared / "squatted"
    as_nobody("mkdir", "-m", "0700", str(squatted))
    codes = run_ranks(
        run_dir,
        [
            "train.steps=24",
            "train.eval_every=0",
            "checkpoint.memory_interval_steps=2",
            f"checkpoint.memory_dir={squatted}",
        ],
        timeout=280,
    )
    assert codes == [0, 0], (run_dir / "rank0.log").read_text()[-2000:]
    assert [e["step"] for e in events(run_dir, "ckpt_load")] == [24]
    [off] = events(run_dir, "mem_tier_off")
    assert f"{squatted} is owned by uid {NOBODY}" in off["reason"]
    assert "memory tier off" in (run_dir / "rank0.log").read_text()
    assert os.listdir(squatted) == []


# -- what the operator's terminal and browser show ----------------------------------------------


def test_status_spells_out_control_characters(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    reason = "\x1b[2J\x1b]0;pwned\x07 [bold]not markup[/bold]"
    (run_dir / "status.json").write_text(
        json.dumps(
            {
                "state": "running\x1b[31m",
                "attempt": 1,
                "step": 5,
                "written_at": time.time(),
                "last_failure": {"kind": "rank_exit", "rank": 0, "node": 0, "step": 5, "reason": reason},
                "ranks": [{"rank": 0, "node": 0, "pid": 1, "phase": "step\x1b[1A", "step": 5}],
            }
        )
    )
    p = resilient_cli("status", str(run_dir), env={"COLUMNS": "400"})
    assert p.returncode == 0, p.stderr
    assert "\x1b" not in p.stdout and "\x07" not in p.stdout
    assert "\\x1b[2J\\x1b]0;pwned\\x07 [bold]not markup[/bold]" in p.stdout
