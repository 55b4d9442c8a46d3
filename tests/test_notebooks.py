"""The notebooks: valid, built by notebooks/build.py (never hand-edited), executable by papermill with
parameters, and guarded by nbval (a changed verdict fails it, a rerun with other timings does not)."""

import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import papermill
import pytest
import torch
from traitlets import CaselessStrEnum

from utils.params import TIER_PARAMS, check_params
from utils.runner import execute as execution
from utils.runner.execute import run_notebook
from utils.results import read_json

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
KERNEL_WARNING = "[IPKernelApp] WARNING"  # what a kernel over TCP prints (unencrypted transport) into every run
NAMES = ["tier1_validation.ipynb", "tier2_analysis.ipynb", "tier3_training.ipynb"]
TIER_NOTEBOOKS = list(enumerate(NAMES, 1))
SMALL = {
    "tier1_validation.ipynb": {"seq_len": 16, "batch_sizes": [1, 2], "latency_iters": 5},
    "tier2_analysis.ipynb": {"batch_size": 2, "seq_len": 16, "strengths": [0.05, 0.2]},
    "tier3_training.ipynb": {"model": "gpt-tiny", "steps": 6, "batch_size": 4, "seq_len": 32, "trials": 1,
                             "timing_warmup_steps": 1, "timed_steps": 2, "sweep_batch_sizes": [2]},
}
EXPECTED = {1: dict.fromkeys(["shapes", "causality", "gradient_flow", "numerics", "initialization", "memory"], "pass"),
            2: dict.fromkeys(["attention", "robustness", "amp_readiness"], "pass"),
            3: {"fp32_baseline": "pass", "amp_safe": "pass", "diagnosis": "pass"}}
CHARTS = {1: {"gradient_norms.png", "init_std.png", "memory_vs_batch.png", "latency.png"},
          2: {"attention_maps.png", "attention_entropy.png", "robustness.png", "amp_layer_error.png"},
          3: {"loss_curves.png", "loss_scale.png", "throughput.png", "memory.png", "speedup_sweep.png"}}


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


@pytest.mark.parametrize("tier, name", TIER_NOTEBOOKS)
def test_committed_notebook_matches_its_builder_and_carries_outputs(tier, name):
    """Edits go through notebooks/build.py; the committed file is its output, executed."""
    committed = nbformat.read(NOTEBOOKS / name, as_version=4)
    built = load_builder().NOTEBOOKS[tier]()
    assert [c.source for c in committed.cells] == [c.source for c in built], \
        "notebook differs from notebooks/build.py: run `python notebooks/build.py --execute`"
    code = [c for c in committed.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "not executed: run `python notebooks/build.py --execute`"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]


@pytest.mark.parametrize("tier, name", TIER_NOTEBOOKS)
def test_parameters_cell_is_the_tiers_spec(tier, name):
    """papermill skips parameter lines it cannot parse: every knob of the spec must be seen, with the spec's default."""
    found = papermill.inspect_notebook(str(NOTEBOOKS / name))
    assert {k: ast.literal_eval(v["default"]) for k, v in found.items()} == {p.name: p.default for p in TIER_PARAMS[tier]}
    assert list(found) == [p.name for p in TIER_PARAMS[tier]]


def test_a_renamed_parameter_keeps_its_former_name_under_papermill():
    """papermill sets -p warmup_steps 5 as a variable of that name (an unknown parameter, with a warning): tier 3's run
    cell takes it as timing_warmup_steps, its name now; without it, the parameters cell's value counts."""
    cell = next(c.source for c in load_builder().NOTEBOOKS[3]() if "run_tier(3" in c.source)
    call = re.search(r"run_tier\(3, (dict\(.*?\))\)\n", cell, re.S)[1]
    defaults = {p.name: p.default for p in TIER_PARAMS[3]}
    assert eval(call, {**defaults, "warmup_steps": 5})["timing_warmup_steps"] == 5
    assert eval(call, dict(defaults))["timing_warmup_steps"] == defaults["timing_warmup_steps"] != 5


@pytest.mark.versions
@pytest.mark.parametrize("tier, name", TIER_NOTEBOOKS)
def test_notebook_runs_under_papermill_with_parameters(tier, name, tmp_path, capfd):
    out = tmp_path / name
    run_notebook(NOTEBOOKS / name, out, parameters={**SMALL[name], "output_dir": str(tmp_path)}, cwd=str(NOTEBOOKS),
                 progress_bar=False)
    assert KERNEL_WARNING not in capfd.readouterr().err  # quiet: the kernel talks over local sockets
    results = read_json(tmp_path / "results.json")
    non_timing = {v["check"]: v["status"] for v in results["verdicts"] if not v["timing"]}
    assert non_timing == EXPECTED[tier] and results["status"] == "pass"
    assert results["parameters"] == check_params(tier, {**SMALL[name], "output_dir": str(tmp_path)})
    assert results["record"]["device"] in ("cpu", "cuda:0") and results["record"]["torch"] == torch.__version__
    charts = {p.name for p in tmp_path.glob("*.png")}
    assert charts == CHARTS[tier], charts
    executed = nbformat.read(out, as_version=4)
    printed = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    assert f"Tier {tier}: pass" in printed and "Traceback" not in printed


@pytest.mark.parametrize("transport, warned", [("tcp", True), ("ipc", False)])
def test_only_a_tcp_kernel_prints_the_warning_the_papermill_test_looks_for(transport, warned, tmp_path, capfd, monkeypatch):
    """The control of the check above: one cell run the same way, with the kernel forced onto TCP, prints it."""
    transport_trait = CaselessStrEnum(["tcp", "ipc"], default_value=transport)
    forced = type("Forced", (execution.LocalKernelManager,), {"transport": transport_trait})
    monkeypatch.setattr(execution, "LocalKernelManager", forced)
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 + 1")]), tmp_path / "one.ipynb")
    run_notebook(tmp_path / "one.ipynb", tmp_path / "ran.ipynb", cwd=str(tmp_path), progress_bar=False)
    assert (KERNEL_WARNING in capfd.readouterr().err) is warned


def run_nbval(notebook: Path, cwd: Path, root: Path = ROOT, **env):
    env = {**os.environ, "SUITE_ROOT": str(root), **env}
    return subprocess.run([sys.executable, "-m", "pytest", str(notebook), "--nbval", "--nbval-current-env",
                           "--nbval-sanitize-with", str(ROOT / "tests" / "nbval_sanitize.cfg"), "-p", "no:cacheprovider", "-q"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=900)  # one notebook's full run


def planted(tmp_path, name, old, new):
    """A copy of a committed notebook with one line of its source changed, as a regression would."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    cell = next(c for c in nb.cells if old in c.source)
    cell.source = cell.source.replace(old, new)
    nbformat.write(nb, tmp_path / name)
    return tmp_path / name


def test_nbval_ignores_new_timings_but_not_a_flipped_timing_free_verdict(tmp_path):
    nb = nbformat.read(NOTEBOOKS / "tier1_validation.ipynb", as_version=4)
    # Pretend the committed run's latency verdict said otherwise (a quiet or a busy moment). A rerun must still pass.
    summary = nb.cells[-1].outputs[0]
    committed = re.search(r"\[(pass|warn|fail)\] \(timing\) latency", summary.text).group(1)
    other = "warn" if committed == "pass" else "pass"
    assert "Tier 1: pass" in summary.text and "[pass] numerics" in summary.text
    summary.text = summary.text.replace(f"[{committed}] (timing) latency", f"[{other}] (timing) latency")
    nbformat.write(nb, tmp_path / "tier1_validation.ipynb")
    rerun = run_nbval(tmp_path / "tier1_validation.ipynb", tmp_path)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    # The same edit to a timing-free verdict is a regression.
    summary.text = summary.text.replace("[pass] numerics", "[warn] numerics")
    nbformat.write(nb, tmp_path / "tier1_validation.ipynb")
    assert run_nbval(tmp_path / "tier1_validation.ipynb", tmp_path).returncode != 0


@pytest.mark.parametrize("old, new, failing", [
    # a planted zero-initialized default model: initialization flips to fail
    ("model = 'gpt-tiny'", "model = 'tests.user_models:zero_initialized'", ('present(result, "initialization", charts)',)),
    # a planted layer cut off from the graph: gradient flow flips to fail
    ("model = 'gpt-tiny'", "model = 'tests.user_models:DetachedLayer'", ('present(result, "gradient_flow", charts)',)),
    # a planted exception in the library call the notebook makes
    ("model_kwargs = {}", "model_kwargs = {'no_such_field': 1}", ("ParamError", "unknown field 'no_such_field'")),
])
def test_nbval_catches_a_real_regression(tmp_path, old, new, failing):
    result = run_nbval(planted(tmp_path, "tier1_validation.ipynb", old, new), tmp_path)
    assert result.returncode != 0
    for text in failing:  # the cell that shows the regression is among nbval's failures
        assert text in result.stdout, result.stdout[-3000:]


def lookalike_root(tmp_path) -> Path:
    """A copy of utils/ whose built-in corpus reads other text, as another Python's standard library would."""
    root = tmp_path / "other_python"
    shutil.copytree(ROOT / "utils", root / "utils", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "tests", root / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    with open(root / "utils" / "data.py", "a") as f:
        f.write("\n\n_this_python = _stdlib_text\n\n\ndef _stdlib_text(module):  # another Python: same modules, other text\n"
                "    return _this_python(module).replace('def ', 'def  ').replace('return', 'return  ')\n")
    return root


@pytest.mark.slow
def test_nbval_passes_on_a_machine_that_looks_like_another(tmp_path):
    """Committed outputs from this machine, rerun as on another: older CPU kernels (AVX2 in ATen and oneDNN,
    so no native bf16 and 'auto' picks fp32), one thread, and a Python whose built-in corpus differs."""
    env = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"}
    root = lookalike_root(tmp_path)
    for name in ("tier1_validation.ipynb", "tier2_analysis.ipynb"):
        result = run_nbval(NOTEBOOKS / name, tmp_path, root, **env)
        assert result.returncode == 0, result.stdout[-3000:]
