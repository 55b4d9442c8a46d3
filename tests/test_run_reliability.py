"""Batch runs that lose nothing and run nothing they should not: parameters are data, a run's identity is its
content, resume trusts content, one runner per folder, and every failure stays one run's problem."""

import ast
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from papermill.translators import PythonTranslator

from tests.processes import start
from utils import run as runner
from utils.runner import execute as execution, local
from utils.results import read_json, write_json_atomic
from utils.run import main, plan_runs, why_rerun

ROOT = Path(__file__).resolve().parents[1]
TINY1 = ["--tiers", "1", "-p", "seq_len=16", "-p", "latency_iters=3", "-p", "batch_sizes=[1]"]

EVIL = ["x'); open('PWNED', 'w'); ('", 'x"); open("PWNED", "w"); ("', 'x\\"); open("PWNED", "w"); #',
        '"""\nopen("PWNED", "w")\n"""', "x\nopen('PWNED', 'w')", "x\\\nopen('PWNED', 'w')"]


def pwned(*folders) -> list:
    return [p for folder in (*folders, ROOT, ROOT / "notebooks") for p in Path(folder).rglob("PWNED*")]


def test_papermill_writes_any_string_as_the_same_string():
    """The only non-JSON-safe values papermill renders are the ones we refuse; strings round-trip exactly."""
    for text in EVIL:
        assert ast.literal_eval(PythonTranslator.translate(text)) == text
        assert ast.literal_eval(PythonTranslator.translate({"k": [text]})) == {"k": [text]}


@pytest.mark.parametrize("value", [
    "('x', \"'); open('PWNED', 'w'); ('\")",       # tuple
    "{\"'); open('PWNED', 'w'); ('\"}",             # set
    "b\"'); open('PWNED', 'w'); ('\"",              # bytes
    "[1, (\"');open('PWNED','w');('\",)]",          # a tuple nested in a list
])
def test_code_shaped_values_are_refused_before_anything_runs(value, tmp_path, capsys):
    for name in ("seed", "model", "batch_sizes"):
        assert main([*TINY1, "-p", f"{name}={value}", "--out", str(tmp_path)]) == 2
    assert "expects" in capsys.readouterr().err
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"model_kwargs:\n  - {json.dumps('{' + repr('a') + ': ' + value + '}')}\n")  # a literal inside a mapping
    assert main([*TINY1, "--grid", str(grid), "--out", str(tmp_path / "g")]) == 2
    assert not (tmp_path / "default").exists() and not (tmp_path / "g").exists() and not pwned(tmp_path)


@pytest.mark.slow
def test_quote_breaking_strings_reach_the_notebook_as_strings(tmp_path):
    """Through -p and through a grid, each string is the model name the run reports, and nothing else. (As
    'module:factory' specs: a spec of no known form is refused before any notebook starts.)"""
    grid = tmp_path / "grid.yaml"
    grid.write_text("model:\n" + "".join(f"  - {json.dumps(text + ':make')}\n" for text in EVIL[:3]))
    code = main([*TINY1, "--grid", str(grid), "--out", str(tmp_path), "--name", "evil", "--timeout", "120"])
    code2 = main([*TINY1, "-p", f"model={EVIL[3]}:make", "--out", str(tmp_path), "--name", "evil2", "--timeout", "120"])
    assert code == code2 == 1  # no such module: every run crashes, with the reason
    summary = pd.concat([pd.read_csv(tmp_path / n / "summary.csv") for n in ("evil", "evil2")])
    assert summary["error"].str.startswith("ModelLoadError: cannot import module").all()  # the string, as given
    assert summary["error"].str.contains("PWNED").all()
    assert not pwned(tmp_path)


def test_run_ids_carry_a_content_digest_so_no_run_is_dropped():
    long = "x" * 60
    runs = plan_runs([1], {}, {"model": ["a_b.py:f", "a-b.py:f", long + "1:f", long + "2:f"]})
    assert len({r[0] for r in runs}) == 4
    assert plan_runs([1], {}, {})[0][0] == plan_runs([1], {"seed": 0}, {})[0][0]  # a default given is the same run
    assert plan_runs([1], {}, {})[0][0] != plan_runs([1], {"seed": 1}, {})[0][0]
    assert len(plan_runs([1, 3], {}, {"steps": [5, 6]})) == 3  # tier 1 ignores steps: one tier-1 run, not two


@pytest.mark.parametrize("name, message", [("../x", "must be a plain folder name"), ("/abs", "must be a plain folder name"),
                                           ("", "must be a plain folder name")])
def test_name_stays_inside_out(name, message, tmp_path, capsys):
    assert main([*TINY1, "--out", str(tmp_path / "out"), "--name", name]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_an_unusable_out_is_a_usage_error(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    assert main([*TINY1, "--out", str(blocker / "sub")]) == 2
    assert f"cannot write runs into {str(blocker / 'sub' / 'default')!r}" in capsys.readouterr().err


@pytest.fixture(scope="module")
def done_batch(tmp_path_factory):
    """One complete tier-1 batch, run once for the resume tests (each works on a copy)."""
    out = tmp_path_factory.mktemp("batch")
    assert main([*TINY1, "--out", str(out), "--name", "b"]) == 0
    return out / "b"


def copy_of(batch: Path, tmp_path: Path) -> Path:
    subprocess.run(["cp", "-a", str(batch), str(tmp_path / "b")], check=True, timeout=120)
    return tmp_path / "b"


def resume(batch: Path, *extra) -> tuple:
    return main([*TINY1, *extra, "--out", str(batch.parent), "--name", batch.name, "--resume"])


def the_run(batch: Path) -> Path:
    return next(p for p in batch.iterdir() if p.is_dir() and not p.name.startswith("."))


@pytest.mark.parametrize("damage, reason", [
    (lambda run: (run / "run.json").write_text("{not json"), "run.json is corrupt"),
    (lambda run: (run / "run.json").write_text("[1, 2]"), "run.json is corrupt (not a run record)"),
    (lambda run: (run / "results.json").write_text(""), "results.json is corrupt"),
    (lambda run: (run / "tier1_validation.ipynb").unlink(), "tier1_validation.ipynb is missing"),
    (lambda run: (run / "tier1_validation.ipynb").write_text('{"cells": 3}'), "tier1_validation.ipynb is corrupt"),
    (lambda run: write_json_atomic(run / "run.json", {**read_json(run / "run.json"), "verdict": "fail"}),
     "results.json does not match run.json"),
    # Forged files that parse and agree with run.json: only the checksums the run kept tell them from its own
    (lambda run: write_json_atomic(run / "results.json", {"status": read_json(run / "run.json")["verdict"]}),
     "results.json is not the file the run wrote (its sha256 differs from run.json's)"),
    (lambda run: nbformat.write(nbformat.v4.new_notebook(), run / "tier1_validation.ipynb"),
     "tier1_validation.ipynb is not the file the run wrote (its sha256 differs from run.json's)"),
    (lambda run: write_json_atomic(run / "run.json", {**read_json(run / "run.json"), "checksums": ["forged"]}),
     "run.json is corrupt (its checksums are not a mapping of file names to sha256)"),
])
def test_resume_redoes_a_damaged_run_and_names_the_file(done_batch, tmp_path, capsys, damage, reason):
    batch = copy_of(done_batch, tmp_path)
    run = the_run(batch)
    assert why_rerun(run, 1, plan_runs([1], runner.parse_assignments(TINY1[3::2]), {})[0][2]) is None
    damage(run)
    assert resume(batch) == 0
    out = capsys.readouterr().out
    assert reason in out and "complete, skipped" not in out
    summary = pd.read_csv(batch / "summary.csv")
    assert reason in summary.loc[0, "rerun_reason"] and summary.loc[0, "run_status"] == "ok"
    assert read_json(the_run(batch) / "results.json")["status"] == "pass"


def test_a_record_from_before_checksums_is_trusted_as_it_was(done_batch, tmp_path):
    """Runs recorded by an older version (no checksums in run.json) are not all redone on --resume."""
    run = the_run(copy_of(done_batch, tmp_path))
    write_json_atomic(run / "run.json", {k: v for k, v in read_json(run / "run.json").items() if k != "checksums"})
    assert why_rerun(run, 1, plan_runs([1], runner.parse_assignments(TINY1[3::2]), {})[0][2]) is None


def test_resume_with_other_parameters_runs_them(done_batch, tmp_path, capsys):
    batch = copy_of(done_batch, tmp_path)
    assert resume(batch) == 0 and "complete, skipped (--resume)" in capsys.readouterr().out
    assert resume(batch, "-p", "seed=3") == 0
    assert "complete, skipped" not in capsys.readouterr().out
    assert len([p for p in batch.iterdir() if p.is_dir() and not p.name.startswith(".")]) == 2


@pytest.mark.slow
def test_sigkill_during_a_rerun_keeps_the_earlier_results_and_resume_finishes(done_batch, tmp_path):
    batch = copy_of(done_batch, tmp_path)
    before = (the_run(batch) / "results.json").read_text()
    with start([sys.executable, "-m", "utils.run", *TINY1, "--out", str(tmp_path), "--name", "b"], cwd=ROOT,
               new_session=True) as child:
        child.wait_for(lambda: list(batch.glob(".tier1*")), 60, "the re-run's temporary folder")
        os.killpg(child.proc.pid, signal.SIGKILL)  # the runner and its kernel, mid-run
        child.finish(60)
    assert (the_run(batch) / "results.json").read_text() == before
    assert read_json(the_run(batch) / "run.json")["run_status"] == "ok"
    assert resume(batch) == 0  # the dead runner's lock is stale: taken over; its temporary folder removed
    assert not list(batch.glob(".tier1*")) and not (batch / ".lock").exists()
    assert (the_run(batch) / "results.json").read_text() == before  # complete and unchanged: skipped


def test_one_runner_per_folder_and_a_stale_lock_is_taken_over(tmp_path, capsys, monkeypatch):
    batch = tmp_path / "b"
    batch.mkdir()
    holder = subprocess.Popen(["sleep", "60"])
    try:
        (batch / ".lock").write_text(str(holder.pid))
        assert main([*TINY1, "--out", str(tmp_path), "--name", "b"]) == 2
        assert f"another runner (pid {holder.pid} on {socket.gethostname()}) is writing" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait(30)
    monkeypatch.setattr(runner, "run_all", lambda runs, out_dir, *a, **k: runner.write_summary(
        [{"run_id": "r", "run_status": "ok", "verdict": "pass", "timing_failed": False}], out_dir))
    assert main([*TINY1, "--out", str(tmp_path), "--name", "b"]) == 0  # the holder is dead: its lock is stale
    assert not (batch / ".lock").exists()


@pytest.mark.slow
def test_a_hanging_model_times_out_and_the_others_finish(tmp_path, capfd):
    grid = tmp_path / "grid.yaml"
    grid.write_text("model: ['tests.user_models:Hangs', gpt-tiny]\n")
    assert main([*TINY1, "--grid", str(grid), "--out", str(tmp_path), "--timeout", "20"]) == 1
    summary = pd.read_csv(tmp_path / "default" / "summary.csv")
    assert sorted(summary["run_status"]) == ["ok", "timeout"]
    assert "--timeout 20" in summary.set_index("run_status").loc["timeout", "error"]
    out, err = capfd.readouterr()  # the kernel's own stderr too: the runner's and its kernels' file descriptors
    assert "timeout: tier1_model-tests.user-models-Hangs_" in out
    assert "Traceback" not in out + err and "ZMQError" not in out + err  # a killed kernel logs to its run's kernel.log


def test_an_all_crashed_batch_still_writes_its_summary(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text("model: ['tests.user_models:no_such_a', 'tests.user_models:no_such_b']\n")
    assert main([*TINY1, "--grid", str(grid), "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert out.count("crashed: tier1_model-tests.user-models-no-suc") == 2
    assert len(pd.read_csv(tmp_path / "default" / "summary.csv")) == 2
    assert (tmp_path / "default" / "summary.png").read_bytes()[:4] == b"\x89PNG"


def test_a_file_system_error_is_one_runs_problem(tmp_path, monkeypatch):
    def disk_full(**kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(execution.tempfile, "mkdtemp", disk_full)
    row = execution.execute("r0", 1, {}, tmp_path)
    assert row["run_status"] == "crashed" and row["error"] == "file system: [Errno 28] No space left on device"


def test_the_summary_is_rewritten_after_every_run(tmp_path, monkeypatch):
    seen = []

    def fake_execute(run_id, tier, params, out_dir, progress, timeout, **engine):
        seen.append(len(pd.read_csv(out_dir / "summary.csv")) if (out_dir / "summary.csv").exists() else 0)
        return {"run_id": run_id, "run_status": "ok", "verdict": "pass", "timing_failed": False, "duration_s": 0.0}

    monkeypatch.setattr(local, "execute", fake_execute)
    runner.run_all(plan_runs([1], {}, {"seed": [1, 2, 3]}), tmp_path, log=lambda line: None)
    assert seen == [0, 1, 2] and len(pd.read_csv(tmp_path / "summary.csv")) == 3


@pytest.mark.parametrize("flags, code", [([], 0), (["--fail-on-verdict"], 0), (["--fail-on-timing"], 1)])
def test_only_fail_on_timing_gates_on_a_timing_verdict(flags, code, tmp_path, monkeypatch):
    """The default gates read non-timing verdicts only, so an idle and a loaded machine give the same exit code."""
    monkeypatch.setattr(local, "execute", lambda run_id, *a, **engine: {
        "run_id": run_id, "run_status": "ok", "verdict": "pass", "timing_failed": True, "duration_s": 0.0})
    assert main([*TINY1, "--out", str(tmp_path), *flags]) == code


def test_a_batch_stopped_between_two_runs_lists_the_unstarted_one_and_exits_1(tmp_path, monkeypatch, capsys):
    """Ctrl-C as the first run of two ends (sent by the run itself, so it comes before the second starts, not by luck):
    not a success, the unstarted run has its row, and --resume runs it."""
    real = execution.execute

    def first_then_ctrl_c(run_id, *args, **kwargs):
        row = real(run_id, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        return row

    monkeypatch.setattr(local, "execute", first_then_ctrl_c)
    grid = tmp_path / "grid.yaml"
    grid.write_text("seed: [1, 2]\n")
    assert main([*TINY1, "--grid", str(grid), "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "SIGINT: 1 run(s) not started; --resume runs them" in out
    assert "(1 ok, 0 interrupted and 1 not started (--resume continues them), 0 crashed or timed out" in out
    rows = pd.read_csv(tmp_path / "default" / "summary.csv")
    assert rows["run_status"].tolist() == ["ok", "not_started"]
    assert rows.loc[1, "error"] == "SIGINT came before it started; --resume runs it"
    monkeypatch.setattr(local, "execute", real)
    assert main([*TINY1, "--grid", str(grid), "--out", str(tmp_path), "--resume"]) == 0
    assert pd.read_csv(tmp_path / "default" / "summary.csv")["run_status"].tolist() == ["ok", "ok"]


def test_a_folder_that_fails_mid_batch_keeps_the_finished_run_for_resume(tmp_path, monkeypatch, capsys):
    """The output folder refuses writes as a run ends (read-only, full): the finished run stays in its temporary
    folder, the end says the summary was not written, and the next runner puts the run in place for --resume."""
    def read_only(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted", str(tmp_path / "default"))

    monkeypatch.setattr(execution, "_replace_dir", read_only)
    monkeypatch.setattr(pd.DataFrame, "to_csv", read_only)
    assert main([*TINY1, "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    batch = tmp_path / "default"
    kept = [p for p in batch.glob(".tier1*") if p.is_dir()]
    assert len(kept) == 1 and read_json(kept[0] / "run.json")["run_status"] == "ok"
    assert f"summary: NOT written to {batch / 'summary.csv'}: Operation not permitted ({batch})" in out
    assert (f"crashed: {kept[0].name[1:].rsplit('.', 1)[0]}: file system: [Errno 1] Operation not permitted: '{batch}'; its "
            f"finished results are kept in {kept[0]}, which the next run into {batch} puts in place") in out
    monkeypatch.undo()
    assert main([*TINY1, "--out", str(tmp_path), "--resume"]) == 0
    assert "complete, skipped (--resume)" in capsys.readouterr().out and not list(batch.glob(".tier1*"))
