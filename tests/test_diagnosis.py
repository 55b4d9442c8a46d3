"""When AMP is not safe: the diagnosis names the layer or parameter to blame and the step, the remedies are re-run on
the same model and data, and the one that passes parity is named. Planted models, each with its exact cause."""

import copy
import os
from dataclasses import replace
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from tests.user_models import GradientOverflowsFp16, OverflowsOneLayerFp16, bf16_weights
from utils.diagnosis import candidates, cause, drifting_layers
from utils.measure import op_time_shares, peak_activation_bytes, saved_activation_bytes
from utils.models import UnsupportedModel, build_model, checkpoint_blocks
from utils.precision import BF16, FP16, keep_in_fp32, resolve
from utils.run import run_digest
from utils.tier3_training_utilities import where_time_goes
from utils.tier3_training_utilities import test_fine_tuning
from utils.tiers import run_tier, save_tier

ROOT = Path(__file__).resolve().parents[1]
TIER3 = dict(batch_size=4, seq_len=32, trials=1, warmup_steps=1, timed_steps=1, device="cpu", emulated_amp="full")
LAYER = "inner.blocks.1.mlp.0"


@pytest.fixture(scope="module")
def overflowing_layer():
    return run_tier(3, {**TIER3, "steps": 8, "max_skipped_in_a_row": 3, "precision": FP16}, model=OverflowsOneLayerFp16())


def test_the_layer_that_overflows_fp16_is_named_with_its_step_and_keeping_it_in_fp32_passes(overflowing_layer):
    r = overflowing_layer
    assert r.checks["amp_safe"].verdict.status == "fail"
    text = (f"cause: {LAYER!r} output Inf/NaN at step 1 under 16-mixed (a value in it passed fp16's largest, 65504); "
            f"the remedy that passes parity: {LAYER} in fp32.")
    assert r.checks["diagnosis"].verdict.status == "warn" and r.checks["diagnosis"].verdict.reason == text
    assert r.checks["amp_safe"].verdict.reason.endswith(f" Diagnosis: {text}")
    found = r.checks["diagnosis"].extra["cause"]
    assert (found["kind"], found["layer"], found["step"], found["layers"]) == ("activation", LAYER, 1, [LAYER])
    table = r.checks["diagnosis"].data
    assert list(table["remedy"]) == ["none: 16-mixed as asked", f"{LAYER} in fp32"]
    assert list(table["passed"]) == [False, True] and list(table["fp32_modules"]) == ["", LAYER]
    assert table["skipped_steps"].iloc[1] == 0 and table["max_relative_gap"].iloc[1] <= 0.05
    # each row's speedup divides the same fp32 parity run's median step time by the row's own
    assert (table["speedup_vs_fp32_parity_run"] * table["median_step_time_s"]).round(12).nunique() == 1
    assert r.figures["remedy"] == f"{LAYER} in fp32" and r.figures["diagnosis"] == found["text"]


def test_the_diagnosis_is_in_results_json_and_its_chart_is_drawn(overflowing_layer, tmp_path):
    r = copy.copy(overflowing_layer)
    r.parameters = {**r.parameters, "output_dir": str(tmp_path)}
    charts = save_tier(r)
    assert charts["diagnosis"] == [tmp_path / "remedies.png"] and (tmp_path / "remedies.png").read_bytes()[:4] == b"\x89PNG"
    saved = (tmp_path / "results.json").read_text()
    assert f"the remedy that passes parity: {LAYER} in fp32" in saved


def test_bf16_passes_the_same_model_without_a_remedy():
    r = run_tier(3, {**TIER3, "steps": 8, "precision": BF16}, model=OverflowsOneLayerFp16())
    assert r.checks["amp_safe"].verdict.status == "pass"
    assert r.checks["diagnosis"].verdict.reason == "nothing to diagnose: amp_safe passed."
    assert r.checks["diagnosis"].data.empty and r.figures["remedy"] is None


def test_asking_for_the_layer_in_fp32_by_name_makes_fp16_safe():
    r = run_tier(3, {**TIER3, "steps": 8, "max_skipped_in_a_row": 3, "precision": FP16, "fp32_modules": [LAYER]},
                 model=OverflowsOneLayerFp16())
    assert r.checks["amp_safe"].verdict.status == "pass" and r.checks["amp_safe"].extra["skipped_steps"] == 0


def test_a_gradient_that_overflows_in_one_parameter_is_named_and_the_scale_collapse_dated():
    r = run_tier(3, {**TIER3, "steps": 24, "precision": FP16}, model=GradientOverflowsFp16())
    assert r.checks["amp_safe"].verdict.status == "fail"
    found = r.checks["diagnosis"].extra["cause"]
    assert (found["kind"], found["first_step"], found["step"]) == ("gradient", 1, 20)  # the storm stopped it at 20
    assert set(found["parameters"][:2]) == {f"{LAYER}.weight", f"{LAYER}.bias"}  # backward reaches them first
    assert found["collapse"] == {"step": 18, "from": 65536.0, "to": 0.125}  # 65536 halved 17 times is 0.5
    reason = r.checks["diagnosis"].verdict.reason
    assert f"below 1 at step 18: {found['parameters'][0]!r} overflows even unscaled" in reason
    assert reason.endswith("the remedy that passes parity: bf16 instead of fp16.")
    assert list(r.checks["diagnosis"].data["remedy"]) == ["none: 16-mixed as asked", f"{LAYER} in fp32",
                                                         "bf16 instead of fp16"]


def test_remedy_runs_0_diagnoses_but_runs_no_remedy():
    r = run_tier(3, {**TIER3, "steps": 8, "max_skipped_in_a_row": 3, "precision": FP16, "remedy_runs": 0},
                 model=OverflowsOneLayerFp16())
    assert r.checks["diagnosis"].verdict.status == "fail"
    assert r.checks["diagnosis"].verdict.reason.endswith("; remedies are off (remedy_runs=0).")
    assert list(r.checks["diagnosis"].data["remedy"]) == ["none: 16-mixed as asked"]


def test_new_tier3_parameters_leave_the_ids_of_finished_runs_unchanged():
    """The ids these runs had before remedy_runs and fp32_modules existed (computed at d43150a)."""
    assert run_digest(3, {}) == "838bb6bf20"
    assert run_digest(3, {"precision": "16-mixed", "steps": 12}) == "13bdeac0fa"
    assert run_digest(3, {"remedy_runs": 0}) != run_digest(3, {})  # set, they are part of the run


BF16_REASON = ("TinyGPTWrapper has bfloat16 parameters ('inner.tok_emb.weight' and 27 more): training needs fp32 master "
               "weights.")


def test_a_model_already_in_bf16_is_refused_before_training_by_tier3_and_test_fine_tuning():
    r = run_tier(3, {**TIER3, "steps": 2}, model=bf16_weights())
    assert list(r.checks) == ["supported"] and r.checks["supported"].verdict.reason.startswith(BF16_REASON)
    assert "an update (lr x gradient) is often below a 16-bit weight's last digit" in r.checks["supported"].verdict.reason
    with pytest.raises(UnsupportedModel, match=r"training needs fp32 master weights"):
        test_fine_tuning(bf16_weights(), precision="bf16-mixed", steps=2, batch_size=2, seq_len=16, device="cpu")


def test_a_model_already_in_bf16_is_refused_by_utils_train_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "utils.train", "--model", "tests.user_models:bf16_weights", "--steps",
                           "2", "--output-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and proc.stderr.startswith(f"utils.train: error: {BF16_REASON}")
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "results.json").exists()


@pytest.mark.versions
@pytest.mark.parametrize("precision", [FP16, BF16])
def test_a_module_kept_in_fp32_runs_in_fp32_inside_autocast_and_nothing_else_changes(precision):
    torch.manual_seed(0)
    model = build_model("gpt-tiny")
    keys = list(model.state_dict())
    seen = {}
    for name in ("blocks.0.mlp.0", "blocks.0.mlp.2"):
        model.get_submodule(name).register_forward_hook(
            lambda m, args, out, name=name: seen.__setitem__(name, (args[0].dtype, out.dtype)))
    keep_in_fp32(model, ["blocks.0.mlp.0"])
    keep_in_fp32(model, ["blocks.0.mlp.0"])  # idempotent: one pair of hooks
    x = torch.randint(256, (2, 16))
    for m in (model, copy.deepcopy(model)):  # a copy (the tiers copy models) keeps the behaviour
        with resolve(precision, "cpu").autocast():
            m(x)
            assert torch.is_autocast_enabled("cpu")  # put back after the module
        low = torch.float16 if precision == FP16 else torch.bfloat16
        assert seen == {"blocks.0.mlp.0": (torch.float32, torch.float32), "blocks.0.mlp.2": (torch.float32, low)}
    assert list(model.state_dict()) == keys
    with pytest.raises(UnsupportedModel, match=r"fp32_modules \['blocks.9'\] name no module of GPT; expected names from "
                                               r"model.named_modules\(\), such as \['tok_emb', 'pos_emb', 'blocks'"):
        keep_in_fp32(model, ["blocks.9"])


@pytest.mark.versions
def test_autocast_is_back_after_a_module_in_fp32_raises():
    model = keep_in_fp32(nn.Sequential(nn.Linear(4, 4)), ["0"])
    with resolve(BF16, "cpu").autocast():
        with pytest.raises(RuntimeError):
            model(torch.ones(2, 5))  # the wrong width
        assert torch.is_autocast_enabled("cpu") is True


# --- why AMP does not pay: where a step's time goes ------------------------------------------------------------

def test_op_time_is_sorted_into_what_autocast_speeds_up_and_what_it_costs():
    a = torch.randn(64, 64)
    assert op_time_shares(lambda: a @ a, torch.device("cpu")) == {"matmul_attention": 1.0, "casts": 0.0,
                                                                 "optimizer": 0.0, "other": 0.0}
    assert op_time_shares(lambda: a.to(torch.bfloat16), torch.device("cpu"))["casts"] == 1.0
    assert op_time_shares(lambda: torch._foreach_mul([a], 2.0), torch.device("cpu"))["optimizer"] == 1.0
    shares = op_time_shares(lambda: (a @ a).relu().to(torch.bfloat16), torch.device("cpu"))
    assert sum(shares.values()) == pytest.approx(1.0) and all(v > 0 for k, v in shares.items() if k != "optimizer")


def test_tier3_records_where_each_precisions_step_goes(overflowing_layer):
    shares = overflowing_layer.checks["amp_worth_it"].extra["time_shares"]
    assert set(shares) == {"32", FP16}
    for kinds in shares.values():
        assert set(kinds) == {"matmul_attention", "casts", "optimizer", "other"} and sum(kinds.values()) == pytest.approx(1)
    assert shares[FP16]["casts"] > 0 and shares["32"]["optimizer"] > 0


def test_the_reason_amp_does_not_pay_quotes_the_share_that_limits_it():
    speed = {"amp_precision": BF16, "matmul_ratio": 2.0,
             "time_shares": {"32": {"matmul_attention": 0.4, "casts": 0.0, "optimizer": 0.2, "other": 0.4},
                             BF16: {"matmul_attention": 0.3, "casts": 0.15, "optimizer": 0.25, "other": 0.3}},
             "sweep": [{"batch_size": 4, "ci_low": 0.8}, {"batch_size": 32, "ci_low": 1.1}]}
    assert where_time_goes(speed) == (
        "what limits it: 60% of an fp32 step's op time (aten ops timed on the host) is outside matmuls and attention, "
        "which autocast does not speed up (so at most 1.25x with 2.0x faster matmuls); under bf16-mixed, casts take 15% and the optimizer 25%; AMP "
        "starts to win at batch 32 (the sweep)")
    assert where_time_goes({**speed, "sweep": []}).endswith("the optimizer 25%")


# --- where the memory goes ------------------------------------------------------------------------------------

def test_weights_gradients_and_adamw_state_are_measured_apart_and_only_activations_shrink(overflowing_layer):
    memory = overflowing_layer.checks["amp_worth_it"].extra["memory"]
    model = OverflowsOneLayerFp16()
    tensors = list(model.parameters())
    weights = sum(p.numel() * 4 for p in tensors)
    for precision, parts in memory["parts"].items():
        assert parts["weights"] == weights and parts["gradients"] == weights  # fp32 master weights, fp32 gradients
        assert parts["optimizer_state"] == 2 * weights + 4 * len(tensors)  # AdamW: two moments and a step count each
        assert parts["activations"] == memory["activation_bytes"][precision] and parts["cuda_peak"] is None  # a CPU
    assert memory["parts"][FP16]["activations"] < memory["parts"]["32"]["activations"]


# --- activation checkpointing ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpointed():
    # gpt-tiny at 8 x 64 tokens: activations outweigh the step's weight-sized temporaries (at 4 x 32 they do not, and
    # checkpointing saves nothing: the measurement says so)
    return run_tier(3, {**TIER3, "model": "gpt-tiny", "batch_size": 8, "seq_len": 64, "steps": 6, "precision": BF16,
                        "activation_checkpointing": True})


def test_checkpointing_trains_the_same_losses_and_its_memory_is_measured_inside_the_blocks(checkpointed):
    r = checkpointed
    assert r.checks["amp_safe"].verdict.status == "pass"
    ckpt = r.checks["amp_worth_it"].extra["memory"]["checkpointing"]
    assert ckpt["amp_loss_max_abs_diff_vs_plain"] == 0.0  # recomputation gives the same numbers on a CPU
    assert set(ckpt["peak_activation_bytes"]) == {"32", BF16}
    for peaks in ckpt["peak_activation_bytes"].values():
        assert 0 < peaks["checkpointed"] < peaks["plain"]
    assert "sees what activation checkpointing recomputes" in ckpt["method"]


def test_saved_tensor_hooks_alone_cannot_see_inside_checkpointed_blocks_the_peak_can():
    torch.manual_seed(0)
    plain = build_model("gpt-tiny")
    inside = checkpoint_blocks(copy.deepcopy(plain))
    plan, batch = resolve(BF16, "cpu"), (torch.randint(256, (4, 32)), torch.randint(256, (4, 32)))
    saved = {name: saved_activation_bytes(m, plan, batch) for name, m in (("plain", plain), ("checkpointed", inside))}
    peak = {name: peak_activation_bytes(m, plan, batch) for name, m in (("plain", plain), ("checkpointed", inside))}
    assert saved["checkpointed"] < peak["checkpointed"] < peak["plain"]  # the hooks see only what lives between blocks


def test_a_model_without_blocks_is_refused_for_checkpointing():
    with pytest.raises(UnsupportedModel, match=r"activation checkpointing: Sequential has no nn.ModuleList of blocks"):
        checkpoint_blocks(nn.Sequential(nn.Linear(4, 4)))


def test_without_an_overflow_the_layers_that_drift_most_are_blamed():
    torch.manual_seed(0)
    model = build_model("gpt-tiny")
    drift = drifting_layers(model, torch.randint(256, (2, 16)), resolve(BF16, "cpu"))
    names = dict(model.named_modules())
    assert len(drift) == 3 and all(d["layer"] in names for d in drift)
    assert [d["rel_error"] for d in drift] == sorted((d["rel_error"] for d in drift), reverse=True)
    assert drift[0]["rel_error"] > 1e-3  # bf16 keeps 8 bits: every layer drifts a little
    found = cause(resolve(BF16, "cpu"), None, None, None, drift)
    assert found["kind"] == "drift" and found["layers"] == [drift[0]["layer"]]
    assert found["text"].startswith(f"no overflow; the outputs that drift most from fp32 are {drift[0]['layer']!r} (")
    fp16 = resolve(FP16, "cpu")
    assert [what for what, _ in candidates(found, fp16, torch.device("cpu"))] == [
        f"{drift[0]['layer']} in fp32", "bf16 instead of fp16",
        "a gentler loss scale (initial 256, doubling after 500 clean steps)"]
    kept = candidates(found, replace(fp16, fp32_modules=("lm_head",)), torch.device("cpu"))
    assert [plan.fp32_modules for _, plan in kept] == [("lm_head", drift[0]["layer"]), ("lm_head",), ("lm_head",)]
