import json

import matplotlib
import pandas as pd
import pytest
import torch

from tests.user_models import EmitsNaN, OverflowsFp16, TinyGPTWrapper
from utils.loop import trainer as trainer_module
from utils.models import build_model, compute_loss, load_task_data
from utils.plotting import plot_loss_curves, plot_loss_scale, plot_memory, plot_speedup_sweep, plot_throughput
from utils.measure import (bootstrap_ratio, matmul_params, measured_flops_per_token, saved_activation_bytes,
                           training_flops_per_token)
from utils.precision import resolve as resolve_precision
from utils.precision import tf32_matmuls
from utils.training.amp_benchmark import main, test_amp_speedup_benchmark
from utils.verdicts import TierResult

matplotlib.use("Agg")

# emulated_amp="full": these tests time and compare the whole tier on any CPU, bf16 native there or not
TINY = dict(batch_size=4, seq_len=32, trials=3, warmup_steps=1, timed_steps=2, steps=12, device="cpu", emulated_amp="full")


class CountsCalls(TinyGPTWrapper):
    """The tiny GPT, counting its forwards: training must run on copies of the user's model."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, input_ids):
        self.calls += 1
        return self.inner(input_ids)


class NumberedTimer:
    """A step timer whose k-th step of a run "takes" k seconds: the median a trial reports says which steps it
    timed, with no clock involved."""

    def __init__(self, device):
        self.done, self.pending = 0, 0

    def start(self):
        pass

    def stop(self):
        self.pending += 1

    def read(self):
        times = [float(self.done + i + 1) for i in range(self.pending)]
        self.done, self.pending = self.done + self.pending, 0
        return times


@pytest.fixture(scope="module")
def tiny_result():
    return test_amp_speedup_benchmark("gpt-tiny", precision="bf16-mixed", minimal_loop=True, sweep_batch_sizes=[2, 4], **TINY)


def parts(result):
    """The benchmark's tables and figures: per-step parity, per-trial timing, and their summaries."""
    safe, worth = result.checks["amp_safe"], result.checks["amp_worth_it"]
    return safe.data, worth.data, safe.extra, worth.extra


def test_trials_are_interleaved(tiny_result):
    trials = parts(tiny_result)[1]
    ours = trials[trials["loop"] == "ours"]
    assert list(ours["precision"]) == ["32", "bf16-mixed"] * 3
    assert list(trials["trial"]) == [0] * 4 + [1] * 4 + [2] * 4
    assert list(trials["loop"]) == ["ours"] * 2 + ["minimal"] * 4 + ["ours"] * 4 + ["minimal"] * 2  # loops swap places


def test_warmup_steps_are_excluded_from_timing(monkeypatch):
    monkeypatch.setattr(trainer_module, "StepTimer", NumberedTimer)
    model = CountsCalls()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = test_amp_speedup_benchmark(model, **{**TINY, "trials": 1, "warmup_steps": 2, "timed_steps": 3, "steps": 2})
    assert (parts(r)[1]["step_time_s"] == 4.0).all()  # steps 3, 4, 5 of each trial timed: their median
    # The run probes the user's model once (one forward: its task and output shape), then trains copies.
    assert model.calls == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's weights are untouched
    r = test_amp_speedup_benchmark(CountsCalls(), **{**TINY, "trials": 1, "warmup_steps": 0, "timed_steps": 3, "steps": 2})
    assert (parts(r)[1]["step_time_s"] == 2.0).all()  # without warm-up steps 1, 2, 3 are timed: the check can fail


def test_both_precisions_start_from_identical_weights(tiny_result):
    """Step 1 of each run is exactly the loss of the seeded initial weights on the seeded first batch, each in its
    own precision: the runs start from the same weights and data, and differ in precision alone."""
    first = parts(tiny_result)[0].iloc[0]
    torch.manual_seed(0)  # what tier 3 does before building the model
    model = build_model("gpt-tiny")
    x, y = load_task_data(model, None, TINY["seq_len"]).get_batch("train", TINY["batch_size"], TINY["seq_len"],
                                                                  torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert first["loss_fp32"] == float(compute_loss(model, x, y))
        with resolve_precision("bf16-mixed", "cpu").autocast():
            assert first["loss_amp"] == float(compute_loss(model, x, y))


def test_healthy_model_is_safe_and_summary_is_complete(tiny_result):
    _, _, parity, s = parts(tiny_result)
    verdicts = {v.check: v for v in tiny_result.verdicts}
    assert verdicts["amp_safe"].status == "pass", verdicts["amp_safe"].reason
    assert verdicts["fp32_baseline"].status == "pass", verdicts["fp32_baseline"].reason
    assert verdicts["amp_worth_it"].timing and not verdicts["amp_safe"].timing
    assert tiny_result.status == "pass"  # decided by amp_safe alone: the speed verdict is a timing one
    assert s["amp_precision"] == "bf16-mixed" and parity["skipped_steps"] == 0
    assert s["memory"]["activation_bytes"]["bf16-mixed"] < s["memory"]["activation_bytes"]["32"]
    assert s["matmul_ratio"] > 0 and 0 < s["gemm_time_fraction_fp32"] < 1
    assert 0 < s["mfu"]["32"] < 1 and set(s["loop_efficiency"]) == {"32", "bf16-mixed"}
    assert [row["batch_size"] for row in s["sweep"]] == [2, 4]
    assert s["speedup"]["ci_low"] <= s["speedup"]["median"] <= s["speedup"]["ci_high"]
    assert tiny_result.record["precision"] == "bf16-mixed" and tiny_result.record["device"] == "cpu"
    assert tiny_result.figures["skipped_steps"] == 0 and tiny_result.figures["amp_precision"] == "bf16-mixed"


@pytest.mark.parametrize("model, lr, problem", [("gpt-tiny", 10.0, "diverged"), (EmitsNaN(), 1e-3, "went NaN/Inf")])
def test_a_broken_fp32_baseline_is_blamed_not_amp(model, lr, problem):
    r = test_amp_speedup_benchmark(model, precision="bf16-mixed", **{**TINY, "trials": 1, "lr": lr})
    verdicts = {v.check: v for v in r.verdicts}
    assert verdicts["fp32_baseline"].status == "fail" and problem in verdicts["fp32_baseline"].reason
    assert verdicts["amp_safe"].status == "warn" and verdicts["amp_safe"].reason.startswith("not judged")
    assert r.status == "fail"


def test_fewer_than_three_trials_give_no_interval_and_no_speed_verdict():
    r = test_amp_speedup_benchmark("gpt-tiny", precision="bf16-mixed", **{**TINY, "trials": 2, "steps": 2})
    worth = r.checks["amp_worth_it"]
    assert worth.extra["speedup"]["ci_low"] is None and worth.extra["speedup"]["ci_high"] is None
    assert worth.verdict.status == "warn" and "no interval with fewer than 3 trials" in worth.verdict.reason


def test_fp16_overflow_flips_the_safe_verdict():
    r = test_amp_speedup_benchmark(OverflowsFp16(), precision="16-mixed", **{**TINY, "trials": 1})
    safe = {v.check: v for v in r.verdicts}["amp_safe"]
    assert safe.status == "fail" and r.status == "fail"
    assert "overflow storm: 20 optimizer steps in a row" in safe.reason and "fp16's 65504" in safe.reason
    table, _, parity, _ = parts(r)
    # every step skips, the steps that make them up too, until the storm (20 in a row) stops the run: no update made
    assert parity["skipped_steps"] == 20 and parity["updates"] == {"reference": 12, "amp": 0}
    assert table["loss_amp"].isna().all() and parity["calibration_skips"] == 0 and parity["other_skips"] == 20


def test_json_round_trip(tiny_result, tmp_path):
    path = tiny_result.save(tmp_path / "bench.json")
    loaded = TierResult.load(path)
    assert loaded.to_dict() == json.loads(path.read_text())
    assert loaded.verdicts == tiny_result.verdicts and loaded.parameters == tiny_result.parameters
    assert loaded.checks["amp_worth_it"].data["step_time_s"].tolist() == parts(tiny_result)[1]["step_time_s"].tolist()
    assert list(loaded.checks["amp_safe"].data.columns) == list(parts(tiny_result)[0].columns)
    assert not list(tmp_path.glob("*.tmp"))  # the temp file was renamed, not left behind


def test_flop_and_memory_accounting():
    model = build_model("gpt-tiny")
    cfg = model.config
    # tied embedding counted once (as the lm_head matmul), position embedding not at all
    per_block = 3 * cfg.d_model**2 + cfg.d_model**2 + 8 * cfg.d_model**2
    assert matmul_params(model) == cfg.n_layer * per_block + cfg.vocab_size * cfg.d_model
    assert training_flops_per_token(model, 64) == 6 * matmul_params(model) + 12 * cfg.n_layer * 64 * cfg.d_model
    x = torch.randint(0, 256, (2, 64))
    assert measured_flops_per_token(model, (x, x)) == pytest.approx(training_flops_per_token(model, 64), rel=0.05)
    assert training_flops_per_token(TinyGPTWrapper(), 64) is None  # a user's model: no formula, only the count
    batch = (torch.randint(0, 256, (4, 32)), torch.randint(0, 256, (4, 32)))
    fp32 = saved_activation_bytes(model, resolve_precision("32", "cpu"), batch)
    bf16 = saved_activation_bytes(model, resolve_precision("bf16-mixed", "cpu"), batch)
    assert 0 < bf16 < fp32


def test_bootstrap_ratio_brackets_the_truth():
    lo, hi = bootstrap_ratio([2.0, 2.1, 1.9, 2.0, 2.05], [1.0, 1.02, 0.98, 1.0, 1.01])
    assert lo <= 2.0 <= hi and hi - lo < 0.3


def test_charts_render_with_expected_axes(tiny_result, tmp_path):
    parity_table, trials, parity, s = parts(tiny_result)
    fig = plot_loss_curves(parity_table, s["amp_precision"], parity["tolerance"], path=tmp_path / "loss.png")
    assert fig.axes[0].get_ylabel().startswith("training loss") and fig.axes[1].get_xlabel() == "optimizer update"
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["fp32", "bf16-mixed"]
    fig = plot_throughput(trials, path=tmp_path / "throughput.png")
    assert "tokens / s" in fig.axes[0].get_ylabel() and len(fig.axes[0].patches) == 4
    fig = plot_memory(s["memory"], path=tmp_path / "memory.png")
    assert fig.axes[0].get_ylabel() == "MiB"
    fig = plot_loss_scale(parity, path=tmp_path / "scale.png")
    assert fig.axes[0].get_yscale() == "log"
    fig = plot_speedup_sweep(pd.DataFrame(s["sweep"]), path=tmp_path / "sweep.png")
    assert fig.axes[0].get_xlabel() == "batch size"
    for name in ("loss", "throughput", "memory", "scale", "sweep"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kwargs, message", [({"trials": 0}, "'trials' expects an integer >= 1; got 0"),
                                             ({"timed_steps": 2.5}, "'timed_steps' expects an integer >= 1; got 2.5"),
                                             ({"parity_tolerance": 5}, "'parity_tolerance' expects a number from 1e-06 to 1"),
                                             ({"batch_sizes": [2]}, "unknown parameter 'batch_sizes' for tier 3")])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        test_amp_speedup_benchmark("gpt-tiny", **{**TINY, **kwargs})


def test_benchmark_command_prints_the_figures_as_json(tmp_path, capsys):
    code = main(["--model", "gpt-tiny", "--device", "cpu", "--batch-size", "4", "--seq-len", "32", "--trials", "1",
                 "--steps", "4", "--sweep-batch-sizes", "[2]", "--minimal-loop", "True", "--json",
                 "--out", str(tmp_path / "bench.json")])
    printed = json.loads(capsys.readouterr().out)
    s = printed["extra"]["amp_worth_it"]
    for key in ("speedup", "matmul_ratio", "mfu", "amdahl_speedup_bound", "loop_efficiency", "minimal_loop_tokens_per_s"):
        assert key in s, key
    assert set(s["mfu"]) == {"32", "bf16-mixed"} and printed["figures"]["wall_time_s"] > 0
    assert [v["check"] for v in printed["verdicts"]] == ["fp32_baseline", "amp_safe", "amp_worth_it", "diagnosis"]
    assert code == (1 if printed["status"] == "fail" else 0)
    assert TierResult.load(tmp_path / "bench.json").parameters["trials"] == 1


def test_benchmark_command_refuses_a_bad_value_by_name(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--steps", "ten"])
    assert exit_.value.code == 2 and "parameter 'steps' expects an integer >= 1; got 'ten' (str)" in capsys.readouterr().err


def test_tf32_is_switched_for_the_run_and_put_back_and_a_cpu_has_none(tiny_result):
    assert tiny_result.record["tf32"] is None and tiny_result.checks["amp_worth_it"].extra["baseline"] == "fp32"
    before = torch.get_float32_matmul_precision()
    for enabled, inside in ((True, "high"), (False, "highest")):
        with tf32_matmuls(enabled, torch.device("cuda")):  # sets torch's flag only: runs without a GPU
            assert torch.get_float32_matmul_precision() == inside
        assert torch.get_float32_matmul_precision() == before
    with tf32_matmuls(True, torch.device("cpu")):
        assert torch.get_float32_matmul_precision() == before


@pytest.mark.gpu
@pytest.mark.parametrize("tf32, baseline", [(False, "fp32 (TF32 off)"), (True, "fp32 with TF32 matmuls")])
def test_on_a_gpu_the_speedup_says_what_fp32_it_is_measured_against(tf32, baseline):
    r = test_amp_speedup_benchmark("gpt-tiny", **{**TINY, "device": "cuda", "tf32": tf32})
    assert r.record["tf32"] is tf32 and r.checks["amp_worth_it"].extra["baseline"] == baseline
    assert baseline in r.checks["amp_worth_it"].verdict.reason


@pytest.mark.versions
@pytest.mark.slow
def test_compiled_and_eager_are_timed_in_the_same_interleaved_trials():
    r = test_amp_speedup_benchmark("gpt-tiny", precision="bf16-mixed", compile=True, **{**TINY, "trials": 1, "steps": 4})
    speed, trials = r.checks["amp_worth_it"].extra, r.checks["amp_worth_it"].data
    assert sorted(set(trials["loop"])) == ["compiled", "ours"]
    compiled = speed["compile"]
    assert compiled["fallback"] is None and set(compiled["speedup_over_eager"]) == {"32", "bf16-mixed"}
    assert all(t > 0 for t in compiled["compile_time_s"].values())  # measured apart from the step times
    assert trials[trials["loop"] == "ours"]["compile_time_s"].isna().all()
    # the fine-tuning runs were compiled too, and their parity verdicts hold
    assert all(run["compiled"] for run in r.checks["amp_safe"].extra["compile"].values())
    assert r.checks["amp_safe"].verdict.status == "pass" and r.checks["fp32_baseline"].verdict.status == "pass"


def test_a_failed_compile_is_reported_by_the_benchmark_not_raised(monkeypatch):
    def no_compiler(model, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("BackendCompilerFailed: no working C++ compiler found")
        return call

    monkeypatch.setattr(torch, "compile", no_compiler)
    r = test_amp_speedup_benchmark("gpt-tiny", precision="bf16-mixed", compile=True, **{**TINY, "trials": 1, "steps": 2})
    compiled = r.checks["amp_worth_it"].extra["compile"]
    assert "no working C++ compiler" in compiled["fallback"] and compiled["why"] == compiled["fallback"]
    assert compiled["graph_breaks"] is None


class Wrapped(torch.Tensor):
    """A wrapper tensor subclass, as torchao's Float8Tensor is one: its data lives in an inner tensor, and its own
    storage has no data pointer to read. Its declared shape and dtype may differ from the inner tensor's (a float8
    tensor declares its logical shape and dtype, and holds its data and scale)."""

    @staticmethod
    def __new__(cls, inner, shape=None, dtype=None):
        return torch.Tensor._make_wrapper_subclass(cls, shape or inner.shape, dtype=dtype or inner.dtype, device=inner.device)

    def __init__(self, inner, shape=None, dtype=None):
        self.inner = inner

    def __tensor_flatten__(self):
        return ["inner"], None

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrap = lambda t: t.inner if isinstance(t, Wrapped) else t  # noqa: E731
        return func(*[unwrap(a) for a in args], **{k: unwrap(v) for k, v in (kwargs or {}).items()})


class Doubles(torch.autograd.Function):
    """Doubles its input and saves a wrapper for backward, as a float8 matmul saves its float8 operands: it declares
    10 float32 (40 bytes) and holds 1000 float64 (8000 bytes). With saves=False it saves nothing (the control)."""

    @staticmethod
    def forward(ctx, x, saves):
        if saves:
            ctx.save_for_backward(Wrapped(torch.zeros(1000, dtype=torch.float64), shape=(10,), dtype=torch.float32))
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2, None


@pytest.mark.versions
def test_activation_memory_counts_a_tensor_subclass_by_the_tensors_it_holds():
    x = torch.randint(0, 256, (2, 16))
    plan = resolve_precision("32", "cpu")
    with pytest.raises(RuntimeError):  # what the probe read before: torchao 0.10's Float8Tensor crashed it
        Wrapped(torch.zeros(3)).untyped_storage().data_ptr()

    def counted(saves: bool) -> int:
        model = build_model("gpt-tiny")
        model.blocks[0].register_forward_hook(lambda module, args, out: Doubles.apply(out, saves))
        return saved_activation_bytes(model, plan, (x, x))

    # The same model and graph either way: the only difference is the saved wrapper, counted by the 8000 bytes it
    # holds, not the 40 it declares.
    assert counted(saves=True) - counted(saves=False) == 8000
