"""The precision room owns what a precision does, the device room what the machine has: a precision added in one
register() call runs through tiers 2 and 3, no other module branches on a precision's identity, and only the device
and measurement rooms call torch.cuda."""

import ast
from pathlib import Path

import pytest
import torch

from utils import device, precision
from utils.tiers import run_tier

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "utils").rglob("*.py"))
# The rooms allowed to call torch.cuda: the device seam, and the timers that record CUDA events on its stream.
# Also allowed, outside utils/ and not scanned: the notebooks' set-up cell (notebooks/build.py SETUP), which runs
# before utils is importable, and which prints the GPU's name.
CUDA_ROOMS = {"utils/device.py", "utils/measure.py"}
PRECISION_CONSTANTS = {"FP32", "FP16", "BF16", "FP8", "FP8_EMULATED"}
# Modules that name precisions to choose what to run, deciding nothing about how one runs: the GPU check times the bare
# loop beside bf16 alone, and checks its expectations on the configurations it names.
CHOOSERS = {"utils/gpu_check.py"}
TIER3 = dict(steps=6, batch_size=2, seq_len=32, trials=1, timing_warmup_steps=1, timed_steps=1, device="cpu",
             emulated_amp="full", remedy_runs=0)


def _constants(side) -> set:
    """The precision constants a comparison's operand is, or holds (FP16, precision.BF16, (FP16, BF16))."""
    items = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
    return {getattr(n, "id", getattr(n, "attr", None)) for n in items} & PRECISION_CONSTANTS


def precision_comparisons(path: Path) -> list:
    """(line, code) of each comparison with a precision's constant: a branch on a precision's identity."""
    text = path.read_text()
    return sorted((node.lineno, ast.get_source_segment(text, node)) for node in ast.walk(ast.parse(text))
            if isinstance(node, ast.Compare) and any(_constants(side) for side in (node.left, *node.comparators)))


def cuda_calls(path: Path) -> list:
    """(line, code) of each use of torch.cuda (an attribute of torch, or an import of it)."""
    text = path.read_text()
    found = []
    for node in ast.walk(ast.parse(text)):
        if (isinstance(node, ast.Attribute) and node.attr == "cuda" and isinstance(node.value, ast.Name)
                and node.value.id == "torch"):
            found.append((node.lineno, ast.get_source_segment(text, node)))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [(node.lineno, m) for m in modules if m.startswith("torch.cuda")]
    return sorted(found)


def test_no_module_outside_the_precision_room_branches_on_a_precisions_identity():
    found = [f"{path.relative_to(ROOT)}:{line} {code}" for path in SOURCES
             if str(path.relative_to(ROOT)) not in {"utils/precision.py", *CHOOSERS} for line, code in precision_comparisons(path)]
    assert not found, f"precision comparisons outside utils/precision.py (ask the plan's Precision instead): {found}"


def test_torch_cuda_is_called_only_in_the_device_and_measurement_rooms():
    found = [f"{path.relative_to(ROOT)}:{line} {code}" for path in SOURCES
             if str(path.relative_to(ROOT)) not in CUDA_ROOMS for line, code in cuda_calls(path)]
    assert not found, f"torch.cuda outside {sorted(CUDA_ROOMS)} (ask utils.device): {found}"


def test_the_scans_find_what_they_look_for(tmp_path):
    """Both checks above can fail: planted code of each kind the old modules had is found, and code that only reads a
    precision (a dict keyed by one, a property of its plan) is not."""
    planted = tmp_path / "planted.py"
    planted.write_text("if plan.precision == FP16 and bf16_native(device):\n    pass\n"
                       "ok = ours[ours['precision'] == FP32]\n"
                       "scaled = p['amp_precision'] == precision.FP16\n"
                       "x = runs[FP32]\nif plan.use_scaler or plan.precision in runs:\n    pass\n"
                       "peak = torch.cuda.max_memory_allocated(device)\nfrom torch.cuda import amp\n")
    assert [line for line, _ in precision_comparisons(planted)] == [1, 3, 4]
    assert [line for line, _ in cuda_calls(planted)] == [8, 9]


@pytest.fixture
def bf16_by_another_name(monkeypatch):
    """A precision the suite has never seen, registered here alone: bf16 autocast under a label of its own. The
    registry is put back afterwards."""
    monkeypatch.setattr(precision, "_REGISTRY", dict(precision._REGISTRY))
    precision.register(precision.Precision("bf16-other", "bf16o", torch.bfloat16, aliases=("bfloat16-other",),
                                           color="tab:purple", emulation=device.bf16_emulated))
    return "bf16-other"


def test_a_precision_registered_in_one_call_runs_through_tier_2(bf16_by_another_name):
    r = run_tier(2, {"device": "cpu", "precision": "bfloat16-other"}, model="gpt-tiny", refusal_as_verdict=False)
    readiness = r.checks["amp_readiness"]
    assert r.record["precision"] == bf16_by_another_name and readiness.verdict.status == "pass", readiness.verdict
    assert readiness.extra["bf16o_safe"] and readiness.extra["fp16_safe"] and readiness.extra["bf16_safe"]
    table = readiness.data
    assert (table["rel_error"] == table[f"rel_error_{bf16_by_another_name}"]).all()
    assert (table[f"rel_error_{bf16_by_another_name}"] == table["rel_error_bf16-mixed"]).all()  # bf16, bitwise


def test_a_precision_registered_in_one_call_runs_through_tier_3_as_the_precision_it_names(bf16_by_another_name):
    other = run_tier(3, {**TIER3, "precision": bf16_by_another_name}, model="gpt-tiny", refusal_as_verdict=False)
    bf16 = run_tier(3, {**TIER3, "precision": precision.BF16}, model="gpt-tiny", refusal_as_verdict=False)
    assert other.record["precision"] == bf16_by_another_name
    assert other.checks["amp_safe"].verdict.status == bf16.checks["amp_safe"].verdict.status == "pass"
    ours, theirs = other.checks["amp_safe"].data, bf16.checks["amp_safe"].data
    assert ours["loss_amp"].tolist() == theirs["loss_amp"].tolist()  # the same autocast, bitwise
    assert ours["loss_fp32"].tolist() == theirs["loss_fp32"].tolist()
    assert "bf16o" in other.checks["amp_safe"].verdict.reason or bf16_by_another_name in other.checks["amp_safe"].verdict.reason
