"""The gates in .ci/run catch each of the seed's three defects: put one back and a gate fails.

Each test copies the tree to a temporary folder, plants one defect, and runs the same gate
command .ci/run runs. The clean tree passing the same gates is checked first."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def gate(tree: Path, *command: str) -> subprocess.CompletedProcess:
    exe = shutil.which(command[0], path=str(BIN)) or command[0]
    return subprocess.run([exe, *command[1:]], cwd=tree, capture_output=True, text=True)


@pytest.fixture
def tree(tmp_path):
    dst = tmp_path / "repo"
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "__pycache__", "*cache*", "wandb"))
    return dst


def plant(path: Path, old: str, new: str):
    text = path.read_text()
    assert old in text, f"anchor {old!r} not found in {path}"
    path.write_text(text.replace(old, new, 1))


def test_clean_tree_passes_the_static_gates(tree):
    assert gate(tree, "ruff", "check", "utils", "tests").returncode == 0
    assert gate(tree, "lint-imports").returncode == 0


def test_name_imported_inside_another_function_fails_ruff(tree):
    # The seed's NameError: autocast imported only inside test_fine_tuning, used in another function of the module.
    module = tree / "utils" / "tier3_training_utilities.py"
    plant(module, "    with plan.autocast():\n        loss = compute_loss(model, x, y)",
          "    with autocast():\n        loss = compute_loss(model, x, y)")
    plant(module, '    device = resolve_device(device)\n', '    from torch.amp import autocast  # noqa: F401\n    device = resolve_device(device)\n')
    result = gate(tree, "ruff", "check", "utils", "tests")
    assert result.returncode != 0 and "F821" in result.stdout and "autocast" in result.stdout


def test_cycle_between_engine_and_benchmark_fails_import_linter(tree):
    # The seed's cycle: the engine importing the benchmark, which imports the engine (even inside a function).
    plant(tree / "utils" / "tier3_training_utilities.py", "def minimal_loop_step_times",
          "def _uses_benchmark():\n    from utils.training.amp_benchmark import test_amp_speedup_benchmark\n"
          "    return test_amp_speedup_benchmark\n\n\ndef minimal_loop_step_times")
    result = gate(tree, "lint-imports")
    assert result.returncode != 0 and "BROKEN" in result.stdout


def test_test_importing_a_missing_module_fails_pytest(tree):
    (tree / "tests" / "test_planted.py").write_text(
        "from utils.training.no_such_module import compute_effective_precision\n\n\n"
        "def test_x():\n    assert compute_effective_precision\n")
    result = gate(tree, "python", "-m", "pytest", "tests/test_planted.py", "-q")
    assert result.returncode != 0 and "ModuleNotFoundError" in result.stdout
