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
    return subprocess.run([exe, *command[1:]], cwd=tree, capture_output=True, text=True, timeout=300)


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
    plant(module, '    config = TrainConfig.from_params(settings, "test_fine_tuning")\n',
          '    from torch.amp import autocast  # noqa: F401\n    config = TrainConfig.from_params(settings, "test_fine_tuning")\n')
    result = gate(tree, "ruff", "check", "utils", "tests")
    assert result.returncode != 0 and "F821" in result.stdout and "autocast" in result.stdout


def test_cycle_between_engine_and_benchmark_fails_import_linter(tree):
    # The seed's cycle: the engine importing the benchmark, which imports the engine (even inside a function).
    plant(tree / "utils" / "tier3_training_utilities.py", "def minimal_loop_step_times",
          "def _uses_benchmark():\n    from utils.training.amp_benchmark import test_amp_speedup_benchmark\n"
          "    return test_amp_speedup_benchmark\n\n\ndef minimal_loop_step_times")
    result = gate(tree, "lint-imports")
    assert result.returncode != 0 and "BROKEN" in result.stdout


STUBS = {  # .ci/run's commands, faked: the venv, pip, the gates, and pytest exiting $STUB_PYTEST_EXIT
    "python3": 'mkdir -p .venv/bin && echo "deactivate() { :; }" > .venv/bin/activate',
    "python": 'case "$1 $2" in "-c import platform"*) echo "Python 3.99 (stub)";; "-m pytest") exit "$STUB_PYTEST_EXIT";; esac',
    "pip": "", "ruff": "", "lint-imports": "",
}


def stub_ci(tmp_path: Path, pytest_exit: int, pythons=()) -> subprocess.CompletedProcess:
    """.ci/run in a copy of its scripts, with no venv built: its commands are stubs and only the shell tools it uses
    are on PATH. No Python 3.13 or 3.11 is on PATH or under pyenv (HOME is empty) unless `pythons` names a stub one,
    which answers `-c pass` and makes a venv without pip (its install then fails)."""
    tree = tmp_path / "tree"
    for path in (".ci/run", "tests/environments/all.sh", "tests/environments/check.sh"):
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / path, tree / path)
    (tree / "utils").mkdir()
    (tree / "utils" / "__init__.py").write_text("")
    stubs, tools, home = tmp_path / "stubs", tmp_path / "tools", tmp_path / "home"
    for folder in (stubs, tools, home):
        folder.mkdir()
    for name, body in {**STUBS, **{f"python{v}": "" for v in pythons}}.items():
        (stubs / name).write_text(f"#!/bin/bash\n{body}\n")
        (stubs / name).chmod(0o755)
    for tool in ("bash", "dirname", "find", "sed", "sort", "ls", "tail", "mkdir"):
        (tools / tool).symlink_to(shutil.which(tool))
    env = {"PATH": f"{stubs}:{tools}", "HOME": str(home), "TMPDIR": str(tmp_path), "STUB_PYTEST_EXIT": str(pytest_exit)}
    return subprocess.run([shutil.which("bash"), str(tree / ".ci" / "run")], env=env, capture_output=True, text=True,
                          timeout=60)


SKIPPED = {v: f"SKIPPED: no Python {v} here (pyenv install {v}, or put python{v} on PATH)" for v in ("3.13", "3.11")}


@pytest.mark.parametrize("pytest_exit, pythons, code, newest, colab", [
    (0, (), 0, "PASSED (Python 3.99 (stub))", SKIPPED["3.13"]),
    (1, (), 1, "FAILED (pytest exit 1) (Python 3.99 (stub))", SKIPPED["3.13"]),
    (0, ("3.13",), 1, "PASSED (Python 3.99 (stub))", "FAILED: pip could not install the constraints of tests/environments/colab.txt"),
])
def test_ci_ends_with_every_environment_and_why_one_was_skipped(tmp_path, pytest_exit, pythons, code, newest, colab):
    """The last lines of .ci/run name each environment with its result: the newest's pytest (a failure still lets the
    others run, and fails CI), a missing Python SKIPPED with its reason (not a failure), any other failure fails CI."""
    result = stub_ci(tmp_path, pytest_exit, pythons)
    assert result.stdout.splitlines()[-3:] == [f"environment newest: {newest}", f"environment colab: {colab}",
                                               f"environment floor: {SKIPPED['3.11']}"], result.stdout + result.stderr
    assert result.returncode == code, result.stdout + result.stderr


def test_test_importing_a_missing_module_fails_pytest(tree):
    (tree / "tests" / "test_planted.py").write_text(
        "from utils.training.no_such_module import compute_effective_precision\n\n\n"
        "def test_x():\n    assert compute_effective_precision\n")
    result = gate(tree, "python", "-m", "pytest", "tests/test_planted.py", "-q")
    assert result.returncode != 0 and "ModuleNotFoundError" in result.stdout
