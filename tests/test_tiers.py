"""Tier 1 and Tier 2: every check passes on healthy models and fails on the fault planted for it."""

import json

import matplotlib
import pytest
import torch
import torch.nn as nn

from tests.user_models import DetachedLayer, EmitsNaN, IgnoresSequenceLength, OverflowsFp16, zero_initialized
from utils import plotting
from utils import tier1_critical_validation as t1
from utils.models import build_model
from utils.tier1_critical_validation import check_memory
from utils.tier2_advanced_analysis import analyze_amp_readiness, analyze_attention, sample_batch
from utils.tiers import run_tier, save_tier
from utils.precision import resolve as resolve_precision
from utils.verdicts import TierResult

BF16 = resolve_precision("bf16-mixed", "cpu")

matplotlib.use("Agg")


def statuses(result):
    return {v.check: v.status for v in result.verdicts}


@pytest.fixture(scope="module")
def reference_results():
    """Tiers 1 and 2 on both reference models, run once for every test that reads them."""
    return {name: (run_tier(1, {"device": "cpu"}, model=name), run_tier(2, {"device": "cpu"}, model=name)) for name in ("gpt-tiny", "encoder-tiny")}


def non_timing(result):
    return {v.check: v.status for v in result.verdicts if not v.timing}


@pytest.mark.parametrize("name", ["gpt-tiny", "encoder-tiny"])
def test_reference_models_pass_every_non_timing_check(name, reference_results):
    t1, t2 = reference_results[name]
    assert non_timing(t1) == dict.fromkeys(["shapes", "causality", "gradient_flow", "numerics", "initialization", "memory"],
                                           "pass"), \
        t1.verdict_table().to_string()
    assert [v.check for v in t1.verdicts if v.timing] == ["latency"]
    assert non_timing(t2) == dict.fromkeys(["attention", "robustness", "amp_readiness"], "pass"), t2.verdict_table().to_string()
    assert t1.status == t2.status == "pass"
    assert t2.checks["amp_readiness"].extra["fp16_safe"] and t2.checks["amp_readiness"].extra["bf16_safe"]


@pytest.mark.parametrize("spec", ["tests.user_models:make_hf_style", "tests.user_models:make_tuple_lm"])
def test_user_output_forms_work_in_every_check(spec):
    for result in (run_tier(1, model=spec), run_tier(2, model=spec)):
        assert set(non_timing(result).values()) == {"pass"}, result.verdict_table().to_string()
    assert len(run_tier(2, model=spec).checks["attention"].data) == 4  # found the wrapped model's heads


def test_detached_layer_fails_gradient_flow_naming_it():
    r = run_tier(1, model=DetachedLayer())
    assert non_timing(r) == {"shapes": "pass", "causality": "pass", "gradient_flow": "fail", "numerics": "pass", "initialization": "pass",
                             "memory": "pass"}
    v = r.checks["gradient_flow"].verdict
    assert v.status == "fail" and "unused_head.weight" in v.reason and "unused_head.bias" in v.reason
    assert statuses(r)["shapes"] == "pass"


def test_non_finite_values_fail_every_tier2_analysis_that_sees_them():
    r = run_tier(2, {"device": "cpu"}, model=EmitsNaN())  # NaN logits; the attention inside is finite, and is not blamed
    assert non_timing(r) == {"attention": "pass", "robustness": "fail", "amp_readiness": "fail"}
    assert "NaN/Inf" in r.checks["robustness"].verdict.reason and "not mixed precision" in r.checks["amp_readiness"].verdict.reason
    model = build_model("gpt-tiny")
    with torch.no_grad():
        model.blocks[1].attn.qkv.weight[0, 0] = float("nan")
    v = analyze_attention(model, torch.randint(0, 256, (2, 8))).verdict
    assert v.status == "fail" and "NaN/Inf in 1 layer(s), first blocks.1.attn" in v.reason


def test_nan_model_fails_numerics_and_gradients():
    r = run_tier(1, model=EmitsNaN())
    assert non_timing(r) == {"shapes": "pass", "causality": "fail", "gradient_flow": "fail", "numerics": "fail", "initialization": "pass",
                             "memory": "pass"}
    assert statuses(r)["numerics"] == "fail" and "NaN" in r.checks["numerics"].verdict.reason
    assert statuses(r)["gradient_flow"] == "fail"


def test_zero_initialized_weight_fails_initialization_naming_it():
    r = run_tier(1, model=zero_initialized())
    # a zero matrix also starves the gradients behind it: gradient flow warns (vanishing), naming them
    assert non_timing(r) == {"shapes": "pass", "causality": "pass", "gradient_flow": "warn", "numerics": "pass", "initialization": "fail",
                             "memory": "pass"}
    v = r.checks["initialization"].verdict
    assert v.status == "fail" and "blocks.0.mlp.0.weight" in v.reason


def test_output_ignoring_sequence_length_fails_shapes():
    r = run_tier(1, model=IgnoresSequenceLength())
    # its every position is the last one, which saw the whole input: causality fails too, rightly
    assert non_timing(r) == {"shapes": "fail", "causality": "fail", "gradient_flow": "fail", "numerics": "pass", "initialization": "pass",
                             "memory": "fail"}
    v = r.checks["shapes"].verdict
    assert v.status == "fail" and "sequence length 1" in v.reason and "got (2, 8, 256), expected (2, 1, 256)" in v.reason
    # the loss cannot be formed either: that check's crash is its own fail verdict, the other checks still ran
    crashed = r.checks["gradient_flow"].verdict
    assert crashed.status == "fail" and crashed.reason.startswith("the check crashed: ValueError")
    assert statuses(r)["initialization"] == "pass"


def test_amp_readiness_names_the_layer_that_overflows_fp16():
    model = OverflowsFp16()
    r = analyze_amp_readiness(model, sample_batch(model), BF16)
    assert r.extra["first_fp16_overflow_layer"] == "inner.blocks.1.mlp.0"
    assert not r.extra["fp16_safe"] and r.extra["bf16_safe"]
    assert r.verdict.status == "warn" and "only bf16 is safe" in r.verdict.reason
    assert "fp16: overflows at inner.blocks.1.mlp.0" in r.verdict.reason
    layer = r.data.set_index("layer").loc["inner.blocks.1.mlp.0"]
    assert layer["beyond_fp16_range"] and layer["fp32_max_abs"] > 65504


def test_amp_readiness_fails_when_neither_precision_is_safe():
    model = build_model("gpt-tiny")
    model.blocks[0].mlp[0].register_forward_hook(lambda m, i, o: o * 1e6)
    # bf16 keeps ~3 significant digits: a 100-fold tighter tolerance than its rounding makes it "drift" too
    r = analyze_amp_readiness(model, sample_batch(model), BF16, tolerance=1e-5)
    assert r.verdict.status == "fail" and r.extra["first_drift_layer"] is not None


def test_attention_on_nn_multihead_attention_and_on_models_without_attention():
    class MHAModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(256, 32)
            self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2)
            self.head = nn.Linear(32, 256)

        def forward(self, x):
            return self.head(self.enc(self.emb(x)))

    x = torch.randint(0, 256, (2, 12))
    r = analyze_attention(MHAModel(), x)
    assert r.verdict.status == "pass" and len(r.data) == 8
    assert r.arrays["maps"]["enc.layers.0.self_attn"].shape == (4, 12, 12)
    mlp = nn.Sequential(nn.Embedding(256, 16), nn.Linear(16, 256))
    r = analyze_attention(mlp, x)
    assert r.verdict.status == "warn" and "no attention weights found" in r.verdict.reason


def test_collapsed_heads_are_flagged():
    model = build_model("gpt-tiny")
    with torch.no_grad():  # huge query/key weights: softmax saturates onto one key per query
        for block in model.blocks:
            block.attn.qkv.weight[:128].mul_(500)
    r = analyze_attention(model, torch.randint(0, 256, (2, 32)))
    assert r.data["collapsed"].all() and r.verdict.status == "warn"


def test_robustness_degrades_with_strength(reference_results):
    r = reference_results["gpt-tiny"][1].checks["robustness"]
    subs = r.data[r.data["perturbation"] == "token substitution"].sort_values("strength")
    assert subs["agreement"].iloc[0] > subs["agreement"].iloc[-1]
    assert (r.data["kl"] >= 0).all()


def test_memory_stops_cleanly_at_out_of_memory(monkeypatch):
    real = t1.saved_activation_bytes

    def fake(model, plan, batch):
        if batch[0].shape[0] >= 8:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, plan, batch)

    monkeypatch.setattr(t1, "saved_activation_bytes", fake)
    r = check_memory(build_model("gpt-tiny"), resolve_precision("32", "cpu"), batch_sizes=(1, 2, 4, 8, 16))
    assert list(r.data["batch_size"]) == [1, 2, 4]
    assert r.extra == {"largest_batch": 4, "oom_at": 8}
    assert r.verdict.status == "warn" and "largest batch that fit: 4" in r.verdict.reason


def test_tier_results_round_trip_through_results_json(reference_results, tmp_path):
    for r in reference_results["gpt-tiny"]:
        path = r.save(tmp_path / f"tier{r.tier}.json")
        loaded = TierResult.load(path)
        assert loaded.to_dict() == json.loads(path.read_text())
        assert loaded.verdicts == r.verdicts and loaded.status == "pass" and loaded.record == r.record
        assert loaded.parameters["seq_len"] == 32 and loaded.figures == {"parameters": 120576}


def test_save_tier_writes_results_and_every_chart(reference_results, tmp_path):
    for r in reference_results["gpt-tiny"]:
        r.parameters["output_dir"] = str(tmp_path / f"tier{r.tier}")
        charts = save_tier(r)
        assert TierResult.load(tmp_path / f"tier{r.tier}" / "results.json").status == "pass"
        for paths in charts.values():
            assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
        assert not list((tmp_path / f"tier{r.tier}").glob(".*"))  # no temp file left behind
    assert sorted(p.name for p in (tmp_path / "tier1").glob("*.png")) == \
        ["gradient_norms.png", "init_std.png", "latency.png", "memory_vs_batch.png"]
    assert sorted(p.name for p in (tmp_path / "tier2").glob("*.png")) == \
        ["amp_layer_error.png", "attention_entropy.png", "attention_maps.png", "robustness.png"]


def test_a_crashed_check_keeps_the_other_checks_charts_and_results(tmp_path):
    r = run_tier(1, {"seq_len": 16, "latency_iters": 5, "batch_sizes": [1], "output_dir": str(tmp_path)},
                 model=IgnoresSequenceLength())
    assert r.checks["gradient_flow"].crashed and not r.checks["initialization"].crashed
    charts = save_tier(r)
    assert "gradient_flow" not in charts and "initialization" in charts
    assert TierResult.load(tmp_path / "results.json").checks["gradient_flow"].verdict.status == "fail"


def test_tier_charts(reference_results, tmp_path):
    t1, t2 = reference_results["gpt-tiny"]
    figs = {
        "grads": plotting.plot_gradient_norms(t1.checks["gradient_flow"].data, path=tmp_path / "grads.png"),
        "memory": plotting.plot_memory_vs_batch(t1.checks["memory"].data, path=tmp_path / "memory.png"),
        "maps": plotting.plot_attention_maps(t2.checks["attention"].arrays["maps"], path=tmp_path / "maps.png"),
        "amp": plotting.plot_amp_layer_error(t2.checks["amp_readiness"].data, 0.05, path=tmp_path / "amp.png"),
        "robust": plotting.plot_robustness(t2.checks["robustness"].data, path=tmp_path / "robust.png"),
    }
    assert figs["grads"].axes[0].get_xscale() == "log"
    assert figs["memory"].axes[0].get_xlabel() == "batch size"
    assert len(figs["maps"].axes) == 4  # 2 layers x 2 heads
    assert [t.get_text() for t in figs["amp"].axes[0].get_legend().get_texts()] == ["fp16", "bf16", "tolerance 5%"]
    assert figs["robust"].axes[0].get_ylabel().startswith("agreement")


def test_a_users_attention_with_a_record_flag_is_analyzed():
    class MyAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.record_attention, self.last_attention = nn.Linear(16, 16), False, None

        def forward(self, x):
            att = (self.q(x) @ x.transpose(1, 2)).softmax(-1)[:, None]  # (batch, 1 head, query, key)
            if self.record_attention:
                self.last_attention = att.detach()
            return att[:, 0] @ x

    model = nn.Sequential(nn.Embedding(256, 16), MyAttention(), nn.Linear(16, 256))
    r = analyze_attention(model, torch.randint(0, 256, (2, 10)))
    assert r.verdict.status in ("pass", "warn") and list(r.data["layer"]) == ["1"]
    assert r.arrays["maps"]["1"].shape == (1, 10, 10)
    assert model[1].record_attention is False and model[1].last_attention is None  # restored after capture
