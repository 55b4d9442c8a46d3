"""The batch runner: grid expansion, parameter checks before anything runs, failure isolation, resume."""

import pandas as pd
import pytest

from utils.results import read_json
from utils.run import UsageError, expand_grid, main, parse_assignments, plan_runs


def test_expand_grid_is_the_cross_product():
    runs = expand_grid({"precision": ["32", "bf16-mixed"], "batch_size": [4, 8], "lr": 0.001})
    assert len(runs) == 4 and {"precision": "bf16-mixed", "batch_size": 8, "lr": 0.001} in runs
    assert expand_grid({}) == [{}]
    assert expand_grid({"batch_sizes": [[1, 2, 4]]}) == [{"batch_sizes": [1, 2, 4]}]  # nested: one list value
    with pytest.raises(UsageError, match="empty list"):
        expand_grid({"seed": []})


def test_parse_assignments_reads_yaml_values():
    assert parse_assignments(["steps=10", "lr=1e-3", "model=gpt-small", "batch_sizes=[1, 2]"]) == \
        {"steps": 10, "lr": 1e-3, "model": "gpt-small", "batch_sizes": [1, 2]}
    with pytest.raises(UsageError, match="'steps' is not name=value"):
        parse_assignments(["steps"])


def test_unknown_parameters_are_rejected_before_anything_runs(tmp_path, capsys):
    with pytest.raises(UsageError, match="unknown parameter 'stepz'.*known parameters: .*'steps'"):
        plan_runs([3], {"stepz": 3}, {})
    assert main(["--tiers", "1", "-p", "stepz=3", "--out", str(tmp_path)]) == 2
    assert "unknown parameter 'stepz'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    with pytest.raises(UsageError, match="output_dir is set by the runner"):
        plan_runs([1], {"output_dir": "x"}, {})


def test_parameters_go_only_to_tiers_that_have_them():
    runs = plan_runs([1, 3], {"steps": 5, "seed": 1}, {"precision": ["16-mixed", "bf16-mixed"]})
    assert [r[0].rsplit("_", 1)[0] for r in runs] == ["tier1", "tier3_precision-16-mixed", "tier3_precision-bf16-mixed"]
    assert all(len(r[0].rsplit("_", 1)[1]) == 10 for r in runs)  # each id ends in its content digest
    assert runs[0][2] == {"seed": 1} and runs[1][2] == {"steps": 5, "seed": 1, "precision": "16-mixed"}


TINY_TIER3 = ["-p", "model=gpt-tiny", "-p", "steps=4", "-p", "seq_len=32", "-p", "trials=1",
              "-p", "warmup_steps=1", "-p", "timed_steps=2", "-p", "emulated_amp=full"]  # timed on any CPU


def test_grid_of_precisions_and_batch_sizes_and_resume(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text("precision: [bf16-mixed, 16-mixed]\nbatch_size: [2, 4]\n")
    assert main(["--tiers", "3", "--grid", str(grid), "--out", str(tmp_path), "--name", "sweep", *TINY_TIER3]) == 0
    summary = pd.read_csv(tmp_path / "sweep" / "summary.csv")
    assert len(summary) == 4 and (summary["run_status"] == "ok").all()
    assert sorted(zip(summary["param.precision"], summary["param.batch_size"])) == \
        [("16-mixed", 2), ("16-mixed", 4), ("bf16-mixed", 2), ("bf16-mixed", 4)]
    assert summary["speedup"].notna().all() and (summary["speedup"] > 0).all()
    assert set(summary["amp_precision"]) == {"bf16-mixed", "16-mixed"}
    assert (tmp_path / "sweep" / "summary.png").stat().st_size > 1000
    first = {p: p.stat().st_mtime_ns for p in (tmp_path / "sweep").glob("*/run.json")}

    assert main(["--tiers", "3", "--grid", str(grid), "--out", str(tmp_path), "--name", "sweep", "--resume", *TINY_TIER3]) == 0
    assert "complete, skipped (--resume)" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "sweep").glob("*/run.json")} == first
    assert len(pd.read_csv(tmp_path / "sweep" / "summary.csv")) == 4


def test_a_crashing_notebook_does_not_stop_the_others(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text("model: ['tests.user_models:no_such_model', gpt-tiny]\n")  # well-formed: found missing in the run
    code = main(["--tiers", "1", "--grid", str(grid), "--out", str(tmp_path), "--name", "mixed",
                 "-p", "seq_len=16", "-p", "latency_iters=5", "-p", "batch_sizes=[1, 2]"])
    assert code == 1
    summary = pd.read_csv(tmp_path / "mixed" / "summary.csv")
    summary.index = summary["run_id"].str.rsplit("_", n=1).str[0]
    bad, good = summary.loc["tier1_model-tests.user-models-no-suc"], summary.loc["tier1_model-gpt-tiny"]
    assert bad["run_status"] == "crashed" and "ModelLoadError" in bad["error"] and "no_such_model" in bad["error"]
    assert pd.isna(bad["verdict"])
    assert good["run_status"] == "ok" and good["verdict"] == "pass"
    executed = (tmp_path / "mixed" / bad["run_id"] / "tier1_validation.ipynb").read_text()
    assert "ModelLoadError" in executed  # the executed notebook keeps the error cell
    assert f"crashed: {bad['run_id']}: ModelLoadError" in capsys.readouterr().out
    assert read_json(tmp_path / "mixed" / good["run_id"] / "results.json")["tier"] == 1


def test_fail_on_verdict_exit_code(tmp_path):
    args = ["--tiers", "1", "-p", "model=tests.user_models:zero_initialized", "-p", "seq_len=16", "-p", "latency_iters=5",
            "-p", "batch_sizes=[1]", "--out", str(tmp_path)]
    assert main(args) == 0  # a failing verdict is a finding, not a crash
    summary = pd.read_csv(tmp_path / "default" / "summary.csv")
    assert summary.loc[0, "run_status"] == "ok" and summary.loc[0, "verdict"] == "fail"
    assert summary.loc[0, "verdict.initialization"] == "fail"
    assert main([*args, "--fail-on-verdict", "--resume"]) == 1


# Run ids of tier 3 as they were before its timing warm-up was renamed (warmup_steps -> timing_warmup_steps): a finished
# run's folder and --resume must find it under either spelling.
TIER3_IDS = {"default": "tier3_838bb6bf20", "warmup 5": "tier3_df0039d6de",
             "grid": ["tier3_warmup_steps-1_29b3f63283", "tier3_warmup_steps-2_08a01ba339"]}


@pytest.mark.parametrize("name", ["warmup_steps", "timing_warmup_steps"])
def test_a_renamed_parameter_keeps_the_run_ids_of_finished_runs(name):
    assert [r[0] for r in plan_runs([3], {}, {})] == [TIER3_IDS["default"]]
    assert [r[0] for r in plan_runs([3], {name: 3}, {})] == [TIER3_IDS["default"]]
    assert plan_runs([3], parse_assignments([f"{name}=5"]), {}) == [(TIER3_IDS["warmup 5"], 3, {"timing_warmup_steps": 5})]
    assert [r[0] for r in plan_runs([3], {}, {name: [1, 2]})] == TIER3_IDS["grid"]
    with pytest.raises(UsageError, match="given twice, also by its former name"):
        plan_runs([3], {"warmup_steps": 1, "timing_warmup_steps": 1}, {})
    with pytest.raises(UsageError, match="'timing_warmup_steps' is given both by -p"):
        plan_runs([3], {"warmup_steps": 1}, {"timing_warmup_steps": [1]})
    with pytest.raises(UsageError, match="unknown parameter 'warmup_steps' for tier"):  # tier 1 never had it
        plan_runs([1], {"warmup_steps": 1}, {})
