"""The shape of the code, held by tests: short functions with few parameters, precision names in one module,
one set of loop defaults, and the spellings the runner and the Python API accept being the same."""

import ast
from pathlib import Path

import pytest

from utils import precision
from utils.loop.config import TrainConfig
from utils.loop.stops import STOP_WINDOW_S
from utils.params import FINE_TUNING, SHOWN_CHARS, check_params
from utils.run import MAX_FOLDER_NAME, MAX_GRID_BYTES, MAX_GRID_DEPTH, run_digest
from utils.tier3_training_utilities import STILL, test_fine_tuning
from utils.training.amp_utils import AmpWandbCallback

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "utils").rglob("*.py"))
MAX_LINES, MAX_PARAMS = 60, 10
# The seed's entry points keep its keywords (test_fine_tuning takes the loop's settings as **settings).
SEED_ENTRY_POINTS = {"test_fine_tuning", "test_amp_speedup_benchmark"}


def functions():
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(ROOT), node


def test_no_function_in_utils_is_longer_than_a_screen_or_takes_too_many_parameters():
    long = [f"{path}:{f.lineno} {f.name} ({f.end_lineno - f.lineno + 1} lines)" for path, f in functions()
            if f.end_lineno - f.lineno + 1 > MAX_LINES]
    assert not long, f"functions over {MAX_LINES} lines: split them: {long}"
    wide = []
    for path, f in functions():
        a = f.args
        count = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) - int(bool(a.args) and a.args[0].arg in ("self", "cls"))
        if count > MAX_PARAMS and f.name not in SEED_ENTRY_POINTS:
            wide.append(f"{path}:{f.lineno} {f.name} ({count} parameters)")
    assert not wide, f"functions over {MAX_PARAMS} parameters: group them in a config: {wide}"


def _docstrings(tree) -> set:
    return {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}


def precision_literals(path: Path) -> list:
    """(line, string) of each string constant in `path` that is a precision's name (prose in messages and docstrings
    may mention one; 'auto' is also a device and a task word)."""
    spellings = {a for p in precision._REGISTRY.values() for a in (p.name, *p.aliases)} | set(precision._TRUE_HALF)
    tree = ast.parse(path.read_text())
    skip = _docstrings(tree)
    return [(n.lineno, n.value) for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in skip and n.value.strip().lower() in spellings]


def test_precision_names_are_written_in_one_module_only():
    """Outside utils/precision.py no code writes a precision's name as a string to compare, map or label it."""
    found = [f"{path.relative_to(ROOT)}:{line} {value!r}" for path in SOURCES if path.name != "precision.py"
             for line, value in precision_literals(path)]
    assert not found, f"precision names outside utils/precision.py (ask the plan, or use its constants): {found}"


def test_the_limits_the_readme_states_are_the_codes():
    """Each number the README gives a newcomer is the constant the code uses: changing one fails here, not in a user's
    reading."""
    readme = " ".join((ROOT / "README.md").read_text().split())  # wrapped lines as one
    for said in (f"Signals within {STOP_WINDOW_S:g} s of the first", f"at most {MAX_GRID_BYTES // 1024} KiB",
                 f"nested more than {MAX_GRID_DEPTH} deep", f"at most {MAX_FOLDER_NAME} bytes",
                 f"shortened to {SHOWN_CHARS} characters", f"under {STILL:.1%}"):
        assert said in readme, said


def test_a_planted_precision_literal_is_found(tmp_path):
    """The check above can fail: its scan finds literals written the way the old modules did, and not a message
    that mentions a name or the device word 'auto'."""
    planted = tmp_path / "plotting.py"
    planted.write_text('PRECISION_COLORS = {"32": "tab:blue", "16-mixed": "tab:red"}\n'
                       'if plan.name == " BF16-Mixed " or device == "auto":\n    raise ValueError("try 16-mixed")\n')
    assert precision_literals(planted) == [(1, "32"), (1, "16-mixed"), (2, " BF16-Mixed ")]


def test_the_loop_config_is_the_spec_one_field_per_parameter_with_its_default():
    config = TrainConfig()
    assert list(config.__dataclass_fields__) == [p.name for p in FINE_TUNING]
    assert {p.name: getattr(config, p.name) for p in FINE_TUNING} == {p.name: p.default for p in FINE_TUNING}


@pytest.mark.parametrize("spelling", ["fp16", "16", "float16", "16-mixed", "FP16"])
def test_the_runner_and_the_python_api_accept_the_same_spellings(spelling):
    assert check_params(3, {"precision": spelling})["precision"] == precision.FP16
    assert run_digest(3, {"precision": spelling}) == run_digest(3, {"precision": precision.FP16})  # the same run
    r = test_fine_tuning("gpt-tiny", precision=spelling, steps=1, batch_size=2, seq_len=8, eval_batches=1, progress=False,
                         device="cpu")
    assert r.plan.precision == precision.FP16 and r.plan.use_scaler


def test_the_callback_reads_a_lightning_trainers_scale_through_its_method():
    scaler = type("Scaler", (), {"get_scale": lambda self: 1024.0})()
    trainer = type("Trainer", (), {})()
    trainer.strategy = type("Strategy", (), {"precision_plugin": type("Plugin", (), {"scaler": scaler})()})()
    assert AmpWandbCallback(enabled=True, precision="16")._get_loss_scale(trainer) == 1024.0


def test_a_deprecation_warned_from_the_projects_code_fails_the_tests():
    """pyproject.toml turns a DeprecationWarning or FutureWarning attributed to a utils module into an error."""
    for category in (DeprecationWarning, FutureWarning):
        with pytest.raises(category):
            exec(compile(f"import warnings; warnings.warn('removed next release', {category.__name__})", "utils/x.py", "exec"),
                 {"__name__": "utils.planted"})


def _names(path: Path) -> set:
    """Every name a module uses, imports or reads as an attribute."""
    nodes = list(ast.walk(ast.parse(path.read_text())))
    return ({n.id for n in nodes if isinstance(n, ast.Name)} | {n.attr for n in nodes if isinstance(n, ast.Attribute)}
            | {a.name for n in nodes if isinstance(n, ast.ImportFrom) for a in n.names})


def test_the_runners_stop_state_is_read_and_changed_only_through_its_functions():
    """execute.ask_stop, stop_reason and clear_stop own the runner's stop: no other module touches its list."""
    touching = [str(path.relative_to(ROOT)) for path in SOURCES if "_STOP" in _names(path)]
    assert touching == ["utils/runner/execute.py"], touching
