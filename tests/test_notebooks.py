"""The notebooks: valid, built by notebooks/build.py (never hand-edited), executable by papermill with
parameters, and guarded by nbval (a changed verdict fails it, a rerun with other timings does not)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import papermill
import pytest

from utils.results import read_json

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ["tier1_validation.ipynb", "tier2_analysis.ipynb", "tier3_training.ipynb"]
SMALL = {
    "tier1_validation.ipynb": {"seq_len": 16, "batch_sizes": [1, 2], "latency_iters": 5},
    "tier2_analysis.ipynb": {"batch_size": 2, "seq_len": 16, "strengths": [0.05, 0.2]},
    "tier3_training.ipynb": {"model": "gpt-tiny", "steps": 6, "batch_size": 4, "seq_len": 32, "trials": 1,
                             "warmup_steps": 1, "timed_steps": 2, "sweep_batch_sizes": [2]},
}


def load_builder():
    spec = importlib.util.spec_from_file_location("notebook_builder", NOTEBOOKS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_valid_and_colab_ready(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert "colab.research.google.com/github/" in nb.cells[0].source and name in nb.cells[0].source
    assert 'IN_COLAB = "google.colab" in sys.modules' in nb.cells[1].source and "pip" in nb.cells[1].source
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is nb.cells[2]
    assert all(line.split("#")[1].strip() for line in tagged[0].source.splitlines()[1:]), "every knob has a comment"
    assert nb.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_matches_its_builder_and_carries_outputs(name):
    """Edits go through notebooks/build.py; the committed file is its output, executed."""
    committed = nbformat.read(NOTEBOOKS / name, as_version=4)
    built = load_builder().NOTEBOOKS[name]()
    assert [c.source for c in committed.cells] == [c.source for c in built], \
        "notebook differs from notebooks/build.py: run `python notebooks/build.py --execute`"
    code = [c for c in committed.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "not executed: run `python notebooks/build.py --execute`"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]


@pytest.mark.parametrize("name", NAMES)
def test_papermill_reads_every_parameter(name):
    """papermill skips parameter lines it cannot parse; every knob the builder declares must be seen."""
    found = papermill.inspect_notebook(str(NOTEBOOKS / name))
    declared = load_builder().NOTEBOOKS[name]()[2].source.splitlines()[1:]
    assert list(found) == [line.split("=")[0].strip() for line in declared]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_under_papermill_with_parameters(name, tmp_path):
    out = tmp_path / name
    papermill.execute_notebook(str(NOTEBOOKS / name), str(out), parameters={**SMALL[name], "output_dir": str(tmp_path)},
                               cwd=str(NOTEBOOKS), progress_bar=False, kernel_name="python3")
    results = read_json(tmp_path / "results.json")
    verdicts = {v["check"]: v["status"] for v in results["verdicts"]}
    if name == "tier3_training.ipynb":
        # the tiny model is too small for bf16 to pay (a timing verdict), but its training must be safe
        assert verdicts["amp_safe"] == "pass" and verdicts["amp_worth_it"] in ("pass", "warn", "fail")
    else:
        assert results["status"] in ("pass", "warn") and verdicts
    assert results["parameters"] == {**{k: v for k, v in results["parameters"].items() if k not in SMALL[name]}, **SMALL[name]}
    assert len(list(tmp_path.glob("*.png"))) >= 3
    if name == "tier3_training.ipynb":
        assert (tmp_path / "speedup_sweep.png").exists() and results["figures"]["amp_precision"] == "bf16-mixed"


def run_nbval(notebook: Path, cwd: Path):
    env = {**os.environ, "SUITE_ROOT": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pytest", str(notebook), "--nbval", "--nbval-current-env",
                           "--nbval-sanitize-with", str(ROOT / "tests" / "nbval_sanitize.cfg"), "-p", "no:cacheprovider", "-q"],
                          cwd=cwd, env=env, capture_output=True, text=True)


def test_nbval_catches_a_flipped_verdict_but_not_new_timings(tmp_path):
    copy = tmp_path / "tier1_validation.ipynb"
    nb = nbformat.read(NOTEBOOKS / "tier1_validation.ipynb", as_version=4)
    # Pretend the committed run hit a slow moment: its latency verdict, and so the tier status, said warn.
    summary = nb.cells[-1].outputs[0]
    assert "[pass] (timing) latency" in summary.text and "Tier 1: pass" in summary.text
    summary.text = summary.text.replace("[pass] (timing) latency", "[warn] (timing) latency").replace("Tier 1: pass", "Tier 1: warn")
    nbformat.write(nb, copy)
    rerun = run_nbval(copy, tmp_path)  # a rerun: timings and the timing verdict differ, nothing else does
    assert rerun.returncode == 0, rerun.stdout[-3000:]

    nb = nbformat.read(copy, as_version=4)
    nb.cells[2].source = nb.cells[2].source.replace("model = 'gpt-tiny'", "model = 'tests.user_models:zero_initialized'")
    assert "zero_initialized" in nb.cells[2].source
    nbformat.write(nb, copy)
    flipped = run_nbval(copy, tmp_path)  # the committed outputs say initialization: pass
    assert flipped.returncode != 0
    assert "are all zero: blocks.0.mlp.0.weight" in flipped.stdout  # the initialization verdict's new reason
    assert "::Cell 10 - " in flipped.stdout  # the verdict summary cell
