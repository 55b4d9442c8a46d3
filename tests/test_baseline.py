"""A team's own model under a kept baseline: `python -m utils.run --baseline DIR` matches each run with the baseline's,
names every check that got worse and exits EXIT_REGRESSION; and nbval reruns a kept notebook copied out of the
checkout. The batches here run a user's factory file (tests/user_models.py's tiny GPT), healthy and then changed."""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from utils import run
from utils.results import EXIT_OK, EXIT_REGRESSION, EXIT_USAGE, write_json_atomic
from utils.runner import UsageError
from utils.runner.baseline import compare, gates, match_key, read_batch

ROOT = Path(__file__).resolve().parents[1]
# The README's CI example for a user's repository, whose small runs of tiers 1 and 3 every batch here runs: a detached
# block fails tier 1's gradient flow, an fp16 overflow fails tier 3's amp_safe.
WORKFLOW = yaml.safe_load((ROOT / "README.md").read_text().split("```yaml\n# .github/workflows/amp-gate.yml")[1]
                          .split("```")[0])["jobs"]["amp"]
SMALL = ["--tiers", *WORKFLOW["env"]["TIERS"].split(), *shlex.split(WORKFLOW["env"]["PARAMS"])]
HEALTHY = "from tests.user_models import TinyGPTWrapper as Model\n\n\ndef factory():\n    return Model()\n"
# The same file after a change: one layer now overflows fp16, and the first block's output is detached.
CHANGED = """from tests.user_models import OverflowsOneLayerFp16


class Model(OverflowsOneLayerFp16):
    def __init__(self):
        super().__init__()
        self.inner.blocks[0].register_forward_hook(lambda module, args, output: output.detach())


def factory():
    return Model()
"""


def suite(*args, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, "-m", "utils.run", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    """A baseline of the healthy factory in one checkout; the same file changed; the unchanged file in another checkout
    on another seed. Each batch is run once for the module."""
    tmp = tmp_path_factory.mktemp("baseline")
    first, second, out = tmp / "checkout-a", tmp / "checkout-b", tmp / "runs"
    for folder in (first, second):
        folder.mkdir()
        (folder / "model.py").write_text(HEALTHY)
    made = {"baseline": suite(*SMALL, "-p", f"model={first}/model.py:factory", "-p", "checkpoint_every=2", "--out", str(out),
                              "--name", "baseline")}  # checkpoints: a copy's rerun must not write into them
    assert made["baseline"].returncode == EXIT_OK, made["baseline"].stdout + made["baseline"].stderr
    made["seed"] = suite(*SMALL, "-p", f"model={second}/model.py:factory", "-p", "seed=1", "--out", str(out),
                         "--name", "seed", "--baseline", str(out / "baseline"), "--match-ignoring", "seed")
    (first / "model.py").write_text(CHANGED)
    made["changed"] = suite(*SMALL, "-p", f"model={first}/model.py:factory", "--out", str(out), "--name", "changed",
                            "--baseline", str(out / "baseline"))
    return {"out": out, "made": made, "factory": first / "model.py"}


@pytest.mark.slow
def test_a_changed_model_is_named_run_check_and_statuses_with_the_regression_exit_code(batches):
    out, made = batches["out"], batches["made"]
    changed = made["changed"]
    assert changed.returncode == EXIT_REGRESSION, changed.stdout + changed.stderr
    table = pd.read_csv(out / "changed" / "comparison.csv")
    worse = table[table["regression"]]
    found = {(row.tier, row.name, row.baseline, row.now) for row in worse.itertuples()}
    assert (1, "gradient_flow", "pass", "fail") in found
    assert (3, "amp_safe", "pass", "fail") in found
    for row in worse.itertuples():  # each named in the printed table: the run, the check, both statuses
        assert any(row.run_id in line and row.name in line and f"{row.baseline} -> {row.now}" in line
                   for line in changed.stdout.splitlines()), changed.stdout
    assert (out / "changed" / "comparison.png").stat().st_size > 0


@pytest.mark.slow
def test_another_checkout_and_seed_match_when_the_seed_is_ignored(batches):
    out, made = batches["out"], batches["made"]
    assert made["seed"].returncode == EXIT_OK, made["seed"].stdout + made["seed"].stderr
    table = pd.read_csv(out / "seed" / "comparison.csv")
    assert not table["gates"].any() and not table[table["kind"] == "check"]["regression"].any(), table
    assert set(table["kind"]) >= {"check"} and "missing now" not in set(table["outcome"])
    # the model paths differ (checkout-a, checkout-b) and match by the factory file's name
    ours, theirs = read_batch(out / "seed"), read_batch(out / "baseline")
    assert ours[0]["param.model"] != theirs[0]["param.model"]
    assert match_key(ours[0], ["seed"]) == match_key(theirs[0], ["seed"])


@pytest.mark.slow
def test_a_run_without_its_counterpart_is_listed_and_gates(batches):
    out = batches["out"]
    table = compare(read_batch(out / "seed"), read_batch(out / "baseline"))  # the seed differs: nothing matches
    counterparts = table[table["name"] == "counterpart"]
    assert sorted(counterparts["outcome"]) == ["missing now"] * 2 + ["no baseline run"] * 2
    assert counterparts["gates"].all()
    assert gates(table, fail_on_figures=False)


@pytest.mark.slow
def test_a_figure_past_its_tolerance_is_reported_and_gates_only_with_its_flag(batches):
    out = batches["out"]
    seed, base = read_batch(out / "seed"), read_batch(out / "baseline")
    strict = {"parity_gap": 0.0, "tokens_per_s_fp32": 0.0, "tokens_per_s_amp": 0.0, "speedup": 0.0}
    # another seed moves the figures: in one direction or the other, each that moved is worse
    tables = [compare(seed, base, ["seed"], strict), compare(base, seed, ["seed"], strict)]
    past = pd.concat(t[(t["kind"] == "figure") & t["regression"]] for t in tables)
    assert len(past), pd.concat(tables)
    assert past["outcome"].str.startswith("worse by more than").all() and not past["gates"].any()
    table = next(t for t in tables if (t["kind"] == "figure").any() and t[t["kind"] == "figure"]["regression"].any())
    assert not table["gates"].any()
    assert not gates(table, fail_on_figures=False) and gates(table, fail_on_figures=True)


@pytest.mark.slow
def test_the_batchs_own_folder_is_read_before_it_runs_and_resume_compares_each_skipped_run_with_itself(batches):
    out, factory = batches["out"], batches["factory"]
    shutil.copytree(out / "baseline", out / "own")
    again = suite(*SMALL, "-p", f"model={factory}:factory", "-p", "checkpoint_every=2", "--out", str(out), "--name", "own",
                  "--baseline", str(out / "own"), "--resume")
    assert again.returncode == EXIT_OK, again.stdout + again.stderr
    assert again.stdout.count("complete, skipped (--resume)") == 2
    table = pd.read_csv(out / "own" / "comparison.csv")
    assert len(table) and (table["outcome"] == "same").all() and (table["run_id"] == table["baseline_run_id"]).all()
    # Without --resume the runs execute again, with the factory changed since: compared with what the folder held
    assert factory.read_text() == CHANGED
    rerun = suite(*SMALL, "-p", f"model={factory}:factory", "-p", "checkpoint_every=2", "--out", str(out), "--name", "own",
                  "--baseline", str(out / "own"))
    assert rerun.returncode == EXIT_REGRESSION, rerun.stdout + rerun.stderr
    assert "gradient_flow: pass -> fail (worse)" in rerun.stdout


def fake_batch(folder: Path, *runs) -> Path:
    """A batch folder as the runner writes it, from (run_id, tier, params, run_status, verdicts, figures) tuples."""
    rows = []
    for run_id, tier, params, status, verdicts, figures in runs:
        row = {"run_id": run_id, "tier": tier, "run_status": status, **{f"param.{k}": v for k, v in params.items()}, **figures}
        rows.append(row)
        if status != "not_started":
            write_json_atomic(folder / run_id / "run.json", row)
        if status == "ok":
            write_json_atomic(folder / run_id / "results.json", {"record": {"device": "cpu"}, "verdicts": [
                {"check": c, "status": v, "timing": c == "latency"} for c, v in verdicts.items()]})
    pd.DataFrame(rows).to_csv(folder / "summary.csv", index=False)
    return folder


def test_a_folder_that_is_not_a_batch_is_refused_with_what_was_expected(tmp_path):
    with pytest.raises(UsageError, match="summary.csv does not exist; expected a batch folder"):
        read_batch(tmp_path)
    fake_batch(tmp_path, ("a", 1, {}, "ok", {"shapes": "pass"}, {}))
    (tmp_path / "a" / "results.json").unlink()  # a baseline committed without its verdicts would compare nothing
    with pytest.raises(UsageError, match="results.json is missing, though the run finished"):
        read_batch(tmp_path)
    (tmp_path / "a" / "results.json").write_text("{not json")
    with pytest.raises(UsageError, match="cannot be read as a batch"):
        read_batch(tmp_path)


def test_summary_rows_read_back_as_their_types_match_the_runs_they_were(tmp_path):
    """A run that never started has only its summary row: a CSV's text, and floats where a column has gaps."""
    params = {"precision": "32", "steps": 10, "batch_sizes": [1, 2]}
    fake_batch(tmp_path, ("t1", 1, {"batch_sizes": [1, 2]}, "ok", {"shapes": "pass"}, {}),
               ("t3", 3, {"precision": "32", "steps": 10}, "not_started", {}, {}))
    runs = {run["run_id"]: run for run in read_batch(tmp_path)}
    assert runs["t3"]["param.precision"] == "32" and runs["t3"]["param.steps"] == 10
    assert match_key(runs["t3"]) == match_key({"run_id": "x", "tier": 3, **{f"param.{k}": v for k, v in params.items()
                                                                             if k != "batch_sizes"}})


def test_a_failing_check_gates_where_the_baseline_run_had_crashed(tmp_path):
    base = fake_batch(tmp_path / "base", ("a", 3, {}, "crashed", {}, {}))
    now = fake_batch(tmp_path / "now", ("a", 3, {}, "ok", {"amp_safe": "fail", "fp32_baseline": "pass"}, {}))
    table = compare(read_batch(now), read_batch(base))
    assert table.set_index("name").loc["amp_safe", "gates"] and not table.set_index("name").loc["fp32_baseline", "gates"]


def test_a_figure_is_worse_past_its_tolerance_only(tmp_path):
    base = fake_batch(tmp_path / "base", ("a", 3, {}, "ok", {"amp_safe": "pass"}, {"speedup": 2.0, "parity_gap": 0.01}))
    now = fake_batch(tmp_path / "now", ("a", 3, {}, "ok", {"amp_safe": "pass"}, {"speedup": 1.6, "parity_gap": float("inf")}))
    figures = lambda tol: compare(read_batch(now), read_batch(base), tolerances=tol).set_index("name")
    assert figures({"speedup": 0.25}).loc["speedup", "outcome"] == "worse within 25%"
    assert figures({"speedup": 0.1}).loc["speedup", ["outcome", "regression", "gates"]].tolist() == [
        "worse by more than 10%", True, False]
    # no update compared: an infinite gap, which JSON keeps as null; listed, the failing amp_safe check is what gates
    assert figures({}).loc["parity_gap", ["now", "outcome"]].tolist() == [None, "not measured now"]
    with pytest.raises(UsageError, match="--tolerance 'speed=0.1'"):
        figures({"speed": 0.1})


def test_baseline_options_are_checked_before_anything_runs(tmp_path, capsys):
    base = fake_batch(tmp_path, ("a", 1, {}, "ok", {"shapes": "pass"}, {}))
    assert run.main(["--tiers", "1", "--dry-run", "--fail-on-figures"]) == EXIT_USAGE
    assert "--fail-on-figures compare(s) with a baseline" in capsys.readouterr().err
    assert run.main(["--tiers", "1", "--dry-run", "--baseline", str(base), "--tolerance", "speedup=fast"]) == EXIT_USAGE
    assert "expected FIGURE=FRACTION" in capsys.readouterr().err
    assert run.main(["--tiers", "1", "--dry-run", "--baseline", str(base), "--match-ignoring", "colour"]) == EXIT_USAGE
    assert "--match-ignoring 'colour' is not a parameter" in capsys.readouterr().err
    grid = tmp_path / "grid.yaml"
    grid.write_text("seed: [0, 1]\n")  # two runs that differ only in the ignored seed would match one baseline run
    assert run.main(["--tiers", "1", "--dry-run", "--baseline", str(base), "--grid", str(grid),
                     "--match-ignoring", "seed"]) == EXIT_USAGE
    assert "match the same run" in capsys.readouterr().err


@pytest.mark.slow
def test_a_kept_tier3_notebook_copied_out_passes_nbval_and_fails_it_with_the_planted_change(batches, tmp_path):
    """The README's commands: copy a kept notebook out, rerun it under nbval with the suite's sanitize file."""
    out, factory = batches["out"], batches["factory"]
    kept = next((out / "baseline").glob("tier3_*/tier3_training.ipynb"))
    kept_checkpoints = lambda: sorted((str(p), p.stat().st_mtime_ns) for p in (out / "baseline" / "checkpoints").rglob("*"))
    checkpoints = kept_checkpoints()
    assert checkpoints
    copy = tmp_path / "check" / kept.name
    copy.parent.mkdir()
    shutil.copy(kept, copy)
    nbval = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval", "--nbval-current-env",
             "--nbval-sanitize-with", str(ROOT / "tests" / "nbval_sanitize.cfg"), str(copy)]
    env = {**os.environ, "SUITE_ROOT": str(ROOT)}
    try:
        factory.write_text(HEALTHY)  # the file as the baseline ran it
        passed = subprocess.run(nbval, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert passed.returncode == 0, passed.stdout[-3000:]
        assert (copy.parent / "results.json").is_file()  # output_dir='.': written beside the copy
        assert kept_checkpoints() == checkpoints  # the kept run untouched: the copy's went beside the copy
        assert list((tmp_path / "checkpoints" / kept.parent.name).rglob("step_*.pt"))
        factory.write_text(CHANGED)
        failed = subprocess.run(nbval, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert failed.returncode != 0 and "amp_safe" in failed.stdout, failed.stdout[-3000:]
    finally:
        factory.write_text(CHANGED)


def test_a_notebook_that_cannot_find_the_suite_says_so_in_one_line(tmp_path):
    copy = tmp_path / "tier1_validation.ipynb"
    shutil.copy(ROOT / "notebooks" / copy.name, copy)
    env = {k: v for k, v in os.environ.items() if k not in ("SUITE_ROOT", "PYTHONPATH")}
    ran = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
                          "--nbval-current-env", str(copy)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert ran.returncode != 0
    assert "the suite (its utils/ folder) was not found" in ran.stdout and "SUITE_ROOT" in ran.stdout
    assert "StopIteration" not in ran.stdout


@pytest.mark.slow
def test_the_readme_ci_example_runs_on_a_user_model(batches, tmp_path):
    """The workflow in the README, its run steps in order (the suite's own checkout stands in for the clone), on the
    healthy factory in a repository of its own, against the baseline kept above: it passes."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "model.py").write_text(HEALTHY)
    shutil.copytree(batches["out"] / "baseline", repo / "amp-baseline")
    env = {**os.environ, **WORKFLOW["env"], "GITHUB_WORKSPACE": str(repo)}
    steps = [s for s in WORKFLOW["steps"] if "run" in s and "git clone" not in s["run"]]
    assert steps
    for step in steps:
        cwd = ROOT if step.get("working-directory") == "suite" else repo
        ran = subprocess.run(["bash", "-ec", step["run"]], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert ran.returncode == 0, f"{step['run']}\n{ran.stdout[-3000:]}\n{ran.stderr[-3000:]}"
    assert (repo / "amp-runs" / "pr" / "comparison.csv").is_file()
