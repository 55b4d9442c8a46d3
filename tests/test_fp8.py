"""fp8 (torchao float8 training) as a third precision: refused with the reason where it cannot run, and run
end to end in torchao's emulation (fp8-emulated) on this CPU, through tier 2's readiness and tier 3's parity."""

import importlib.util
import sys

import pytest
import torch

from utils.models import build_model
from utils.tiers import run_tier
from utils.training.amp_benchmark import test_amp_speedup_benchmark
from utils.precision import UnsupportedPrecision, convert_for
from utils.precision import resolve as resolve_precision

TIER3 = dict(model="gpt-tiny", device="cpu", steps=30, batch_size=8, seq_len=32, lr=3e-3, trials=1, warmup_steps=1,
             timed_steps=1)


@pytest.mark.versions
def test_fp8_on_a_cpu_is_refused_with_the_reason():
    with pytest.raises(UnsupportedPrecision, match="fp8 needs a CUDA GPU with float8 tensor cores .sm_89"):
        resolve_precision("fp8", "cpu")
    r = run_tier(3, {**TIER3, "precision": "fp8"})  # one 'supported' verdict, no traceback
    assert list(r.checks) == ["supported"] and "fp8 needs a CUDA GPU" in r.verdicts[0].reason and r.status == "fail"
    assert resolve_precision("auto", "cpu").precision != "fp8"  # auto never offers it


def test_fp8_without_torchao_is_refused_saying_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(UnsupportedPrecision, match="needs torchao, which is not installed: pip install torchao"):
        resolve_precision("fp8-emulated", "cpu")


needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed")


@needs_torchao
def test_a_model_without_float8_sized_layers_is_refused():
    model = build_model("gpt-tiny", d_model=24, n_head=2)  # 24 is not a multiple of 16
    with pytest.raises(UnsupportedPrecision, match="none of the model's 9 nn.Linear layers has in and out features divisible by 16"):
        convert_for(resolve_precision("fp8-emulated", "cpu"), model)


@needs_torchao
@pytest.mark.versions
def test_only_linear_layers_of_float8_size_are_converted_and_once():
    model = build_model("gpt-tiny")
    plan = resolve_precision("fp8-emulated", "cpu")
    converted = convert_for(plan, model)
    kinds = {type(m).__name__ for m in converted.modules()}
    assert "Float8Linear" in kinds and "Linear" not in kinds
    assert convert_for(plan, converted) is converted
    assert convert_for(resolve_precision("bf16-mixed", "cpu"), build_model("gpt-tiny")).blocks[0].mlp[0].__class__ is torch.nn.Linear


@pytest.fixture(scope="module")
def fp8_tier3():
    return run_tier(3, {**TIER3, "precision": "fp8-emulated"})


@needs_torchao
@pytest.mark.versions
def test_fp8_emulated_trains_and_its_parity_with_fp32_is_judged(fp8_tier3):
    verdicts = {v.check: v for v in fp8_tier3.verdicts}
    assert fp8_tier3.record["precision"] == "fp8-emulated" and "float8" in fp8_tier3.record["reason"]
    assert verdicts["fp32_baseline"].status == "pass"
    assert verdicts["amp_safe"].status == "pass" and "fp8-emulated tracks fp32" in verdicts["amp_safe"].reason
    parity = fp8_tier3.checks["amp_safe"].extra
    start, end = fp8_tier3.checks["amp_safe"].data["loss_amp"].iloc[[0, -1]]
    assert end < 0.8 * start and parity["final_eval_relative_gap"] < 0.05
    assert "says nothing about fp8 hardware" in verdicts["amp_worth_it"].reason  # no speed verdict on emulation


@needs_torchao
@pytest.mark.versions
def test_tier2_readiness_tabulates_fp8_beside_fp16_and_bf16():
    r = run_tier(2, {"model": "gpt-tiny", "device": "cpu", "precision": "fp8-emulated"})
    check = r.checks["amp_readiness"]
    assert {"rel_error_fp8-emulated", "rel_error_16-mixed", "rel_error_bf16-mixed"} <= set(check.data.columns)
    df, tolerance = check.data, check.extra["tolerance"]
    inner = df[df["layer"] != "<output>"]
    output_error = float(df[df["layer"] == "<output>"]["rel_error_fp8-emulated"].iloc[0])
    assert check.extra["fp8_safe"] == (not inner["nonfinite_fp8-emulated"].any() and output_error <= tolerance)
    assert f"fp8 (emulated): output error {output_error:.2%}" in check.verdict.reason
    # float8's 3 mantissa bits: more error than bf16's 7, layer by layer
    out = check.data.set_index("layer").loc["<output>"]
    assert out["rel_error_fp8-emulated"] > out["rel_error_bf16-mixed"]


def test_the_seed_benchmark_raises_a_refusal_and_the_tier_makes_it_its_verdict():
    """test_amp_speedup_benchmark (the seed's path) raises as it always has; run_tier and the benchmark command
    line give the tier's one 'supported' verdict instead."""
    with pytest.raises(UnsupportedPrecision, match="fp8 needs a CUDA GPU"):
        test_amp_speedup_benchmark("gpt-tiny", precision="fp8", device="cpu")
    result = run_tier(3, {"model": "gpt-tiny", "precision": "fp8", "device": "cpu"})
    assert list(result.checks) == ["supported"] and "fp8 needs a CUDA GPU" in result.checks["supported"].verdict.reason
