import json
import time

import matplotlib
import pytest
import torch

from tests.user_models import OverflowsFp16, TinyGPTWrapper
from utils.models import build_model
from utils.plotting import plot_loss_curves, plot_loss_scale, plot_memory, plot_speedup_sweep, plot_throughput
from utils.training.amp_benchmark import (AmpBenchmarkResult, bootstrap_ratio, main, matmul_params, test_amp_speedup_benchmark,
                                          training_flops_per_token)
from utils.training.amp_utils import resolve_precision, saved_activation_bytes

matplotlib.use("Agg")

TINY = dict(batch_size=4, seq_len=32, trials=2, warmup_steps=1, timed_steps=2, parity_steps=12, device="cpu")


class SlowStart(TinyGPTWrapper):
    """The tiny GPT, but each copy's first `slow_calls` forwards sleep: what warm-up exclusion must hide."""

    def __init__(self, slow_calls):
        super().__init__()
        self.calls, self.slow_calls = 0, slow_calls

    def forward(self, input_ids):
        self.calls += 1
        if self.calls <= self.slow_calls:
            time.sleep(0.2)
        return self.inner(input_ids)


@pytest.fixture(scope="module")
def tiny_result():
    return test_amp_speedup_benchmark("gpt-tiny", precision="bf16-mixed", minimal_loop=True, batch_sizes=(2, 4), **TINY)


def test_trials_are_interleaved(tiny_result):
    ours = tiny_result.trials[tiny_result.trials["loop"] == "ours"]
    assert list(ours["precision"]) == ["32", "bf16-mixed", "32", "bf16-mixed"]
    assert list(tiny_result.trials["trial"]) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert list(tiny_result.trials["loop"]) == ["ours"] * 2 + ["minimal"] * 4 + ["ours"] * 2  # loops swap places


def test_warmup_steps_are_excluded_from_timing():
    slow = SlowStart(slow_calls=2)
    r = test_amp_speedup_benchmark(slow, **{**TINY, "warmup_steps": 2, "parity_steps": 2})
    assert (r.trials["step_time_s"] < 0.15).all()
    assert slow.calls == 0  # the benchmark trained copies; the user's model was not touched
    r = test_amp_speedup_benchmark(SlowStart(slow_calls=2), **{**TINY, "warmup_steps": 0, "timed_steps": 3, "parity_steps": 2})
    assert (r.trials["step_time_s"] > 0.15).all()  # without exclusion the slow start shows: the check can fail


def test_both_precisions_start_from_identical_weights(tiny_result):
    first = tiny_result.parity.iloc[0]
    # Same weights, same first batch: the step-1 losses differ only by bf16 rounding.
    assert first["loss_fp32"] == pytest.approx(first["loss_amp"], rel=0.01)
    assert first["loss_fp32"] == pytest.approx(5.55, abs=0.3)  # ~ln(256): an untrained byte model


def test_healthy_model_is_safe_and_summary_is_complete(tiny_result):
    s = tiny_result.summary
    verdicts = {v.check: v for v in tiny_result.verdicts}
    assert verdicts["amp_safe"].status == "pass", verdicts["amp_safe"].reason
    assert verdicts["amp_worth_it"].status in ("pass", "warn", "fail")
    assert s["amp_precision"] == "bf16-mixed" and s["parity"]["skipped_steps"] == 0
    assert s["memory"]["activation_bytes"]["bf16-mixed"] < s["memory"]["activation_bytes"]["32"]
    assert s["matmul_ratio"] > 0 and 0 < s["gemm_time_fraction_fp32"] < 1
    assert 0 < s["mfu"]["32"] < 1 and set(s["loop_efficiency"]) == {"32", "bf16-mixed"}
    assert list(tiny_result.sweep["batch_size"]) == [2, 4]


def test_fp16_overflow_flips_the_safe_verdict():
    r = test_amp_speedup_benchmark(OverflowsFp16(), precision="16-mixed", **TINY)
    safe = {v.check: v for v in r.verdicts}["amp_safe"]
    assert safe.status == "fail"
    assert "skipped for overflow" in safe.reason and "fp16's range" in safe.reason
    assert r.summary["parity"]["skipped_steps"] == 12
    assert r.parity["loss_scale"].iloc[-1] < r.parity["loss_scale"].iloc[0]


def test_json_round_trip(tiny_result, tmp_path):
    path = tiny_result.save(tmp_path / "bench.json")
    loaded = AmpBenchmarkResult.load(path)
    assert loaded.summary == tiny_result.summary
    assert loaded.verdicts == tiny_result.verdicts
    assert loaded.trials.equals(tiny_result.trials.reset_index(drop=True))
    assert list(loaded.parity.columns) == list(tiny_result.parity.columns)
    assert not list(tmp_path.glob("*.tmp"))  # the temp file was renamed, not left behind


def test_flop_and_memory_accounting():
    model = build_model("gpt-tiny")
    cfg = model.config
    # tied embedding counted once (as the lm_head matmul), position embedding not at all
    per_block = 3 * cfg.d_model**2 + cfg.d_model**2 + 8 * cfg.d_model**2
    assert matmul_params(model) == cfg.n_layer * per_block + cfg.vocab_size * cfg.d_model
    assert training_flops_per_token(model, 64) == 6 * matmul_params(model) + 12 * cfg.n_layer * 64 * cfg.d_model
    batch = (torch.randint(0, 256, (4, 32)), torch.randint(0, 256, (4, 32)))
    fp32 = saved_activation_bytes(model, resolve_precision("32", "cpu"), batch)
    bf16 = saved_activation_bytes(model, resolve_precision("bf16-mixed", "cpu"), batch)
    assert 0 < bf16 < fp32


def test_bootstrap_ratio_brackets_the_truth():
    lo, hi = bootstrap_ratio([2.0, 2.1, 1.9, 2.0, 2.05], [1.0, 1.02, 0.98, 1.0, 1.01])
    assert lo <= 2.0 <= hi and hi - lo < 0.3


def test_charts_render_with_expected_axes(tiny_result, tmp_path):
    s = tiny_result.summary
    fig = plot_loss_curves(tiny_result.parity, s["amp_precision"], s["parity"]["tolerance"], path=tmp_path / "loss.png")
    assert fig.axes[0].get_ylabel().startswith("training loss") and fig.axes[1].get_xlabel() == "optimizer step"
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["fp32", "bf16-mixed"]
    fig = plot_throughput(tiny_result.trials, path=tmp_path / "throughput.png")
    assert "tokens / s" in fig.axes[0].get_ylabel() and len(fig.axes[0].patches) == 4
    fig = plot_memory(s["memory"], path=tmp_path / "memory.png")
    assert fig.axes[0].get_ylabel() == "MiB"
    fig = plot_loss_scale(tiny_result.parity, path=tmp_path / "scale.png")
    assert fig.axes[0].get_yscale() == "log"
    fig = plot_speedup_sweep(tiny_result.sweep, path=tmp_path / "sweep.png")
    assert fig.axes[0].get_xlabel() == "batch size"
    for name in ("loss", "throughput", "memory", "scale", "sweep"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kwargs, message", [({"trials": 0}, "trials must be an integer >= 1; got 0"),
                                             ({"timed_steps": 2.5}, "timed_steps must be an integer >= 1; got 2.5"),
                                             ({"parity_tolerance": 5}, "parity_tolerance must be a fraction")])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        test_amp_speedup_benchmark("gpt-tiny", **{**TINY, **kwargs})


def test_benchmark_command_prints_the_figures_as_json(tmp_path, capsys):
    code = main(["--model", "gpt-tiny", "--device", "cpu", "--batch-size", "4", "--seq-len", "32", "--trials", "2",
                 "--parity-steps", "4", "--sweep", "2", "--json", "--out", str(tmp_path / "bench.json")])
    printed = json.loads(capsys.readouterr().out)
    s = printed["summary"]
    for key in ("speedup", "matmul_ratio", "mfu", "amdahl_speedup_bound", "loop_efficiency", "minimal_loop_tokens_per_s"):
        assert key in s, key
    assert set(s["mfu"]) == {"32", "bf16-mixed"} and s["wall_time_s"] > 0
    assert [v["check"] for v in printed["verdicts"]] == ["amp_safe", "amp_worth_it"]
    assert code == (1 if any(v["status"] == "fail" for v in printed["verdicts"]) else 0)
    assert AmpBenchmarkResult.load(tmp_path / "bench.json").summary["trials"] == 2
