"""fp32 vs AMP, measured: is AMP safe for this model, and is it worth it here?

Speed: both precisions start from the same weights, data order, seed and schedule; trials are
interleaved (fp32, AMP, fp32, AMP, ...) so drift in the machine hits both alike; warm-up steps are
dropped; our loop times each step on the device's clock (CUDA events; the wall clock on a CPU) and reads
nothing back within a step, the bare reference loop synchronizes around each; the speedup is a ratio of
medians with a bootstrap interval. Memory: CUDA peak per trial, and on any device the bytes of activations saved
for backward. Parity: both precisions train the same steps; the AMP loss curve is compared with
fp32's. Context: tokens/s and model-FLOPs utilization against matmul peaks measured here, and an
Amdahl bound on the speedup (only matmuls get faster).

Run it: python -m utils.training.amp_benchmark --json   (options: tier 3's parameters, see --help)
"""

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from utils.models import compute_loss, count_parameters
from utils.params import TIER_PARAMS, ParamError, add_arguments, output_folder, prepare
from utils.tier3_training_utilities import adamw, test_fine_tuning
from utils.training.amp_utils import (PrecisionPlan, convert_for, precision_label, resolve_precision, saved_activation_bytes,
                                      synchronize, tf32_matmuls)
from utils.verdicts import CheckResult, TierResult, Verdict

GEMM_OPS = ("mm", "addmm", "bmm", "baddbmm", "addbmm")


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """FLOP/s of a large square matmul in `dtype` on `device`: the practical ceiling for this run.
    A dtype the device only emulates (fp16 on most CPUs: ~2 GFLOP/s) gets a smaller problem, so the
    measurement stays within about `seconds` instead of taking minutes."""
    def matmul_time(n):
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        a @ b  # warm-up
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        return time.perf_counter() - t0

    n, probe = (8192 if device.type == "cuda" else 2048), 512
    if matmul_time(probe) * (n / probe) ** 3 > seconds / 4:
        n = probe
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    synchronize(device)
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
        if count % 4 == 0:
            synchronize(device)
    synchronize(device)
    return 2 * n ** 3 * count / (time.perf_counter() - t0)


def matmul_params(model: nn.Module) -> int:
    """Parameters that take part in matmuls (2-D weights not only used as embedding lookups).
    A weight tied between an embedding and the output layer counts once, as a matmul."""
    counted = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.dim() >= 2 and not isinstance(module, nn.Embedding):
                counted[id(p)] = p.numel()
    return sum(counted.values()) or sum(p.numel() for p in model.parameters())


def training_flops_per_token(model: nn.Module, seq_len: int):
    """The analytic count for this project's GPT layout: 6 N per token (forward 2N, backward 4N) plus
    attention's 12 * layers * seq_len * d_model (PaLM, appendix B). None for a model without n_layer and
    d_model on its config: the formula would be a guess there. A cross-check of measured_flops_per_token."""
    cfg = getattr(model, "config", None)
    if not (hasattr(cfg, "n_layer") and hasattr(cfg, "d_model")):
        return None
    return 6 * matmul_params(model) + 12 * cfg.n_layer * seq_len * cfg.d_model


def _sdpa_cpu(query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode knows the CUDA attention kernels; the CPU one (what SDPA runs here) gets the same formula.
_CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
                        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward}


def measured_flops_per_token(model: nn.Module, batch) -> float:
    """Training FLOPs per token of the actual model, counted by torch's FlopCounterMode over one forward
    and backward of `batch`: right for any architecture, where a formula assumes one layout."""
    x, y = batch
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS)
    with counter:
        compute_loss(model, x, y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / x.numel()


def state_bytes(model: nn.Module) -> dict:
    """Parameter and AdamW state bytes. Autocast keeps fp32 master weights, so these are the same
    for fp32 and AMP: AMP saves activation memory, not weight memory."""
    param = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"parameter_bytes": param, "optimizer_state_bytes": 2 * sum(p.numel() * 4 for p in model.parameters())}


class _OpTimer(TorchDispatchMode):
    """Times every aten op run under it (synchronized on CUDA), and the GEMMs among them. Unlike
    torch.profiler it prints nothing, so notebook outputs stay clean."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device, self.total, self.gemm = device, 0.0, 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        synchronize(self.device)
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        synchronize(self.device)
        dt = time.perf_counter() - t0
        self.total += dt
        if func.overloadpacket.__name__ in GEMM_OPS:
            self.gemm += dt
        return out


def matmul_time_fraction(model: nn.Module, plan: PrecisionPlan, batch, repeats: int = 3) -> float:
    """Share of forward+backward op time spent in GEMMs, over `repeats` passes. By Amdahl's law
    only this share speeds up under autocast."""
    x, y = batch
    compute_loss(model, x, y).backward()  # warm-up, untimed
    timer = _OpTimer(x.device)
    with timer:
        for _ in range(repeats):
            with plan.autocast():
                loss = compute_loss(model, x, y)
            loss.backward()
    model.zero_grad(set_to_none=True)
    return timer.gemm / timer.total if timer.total else float("nan")


def minimal_loop_step_times(model: nn.Module, plan: PrecisionPlan, data, steps: int, batch_size: int, seq_len: int,
                            lr: float, seed: int, device) -> list:
    """The plainest correct AMP loop (autocast forward, scaled backward, AdamW step), timed per step:
    the yardstick for the engine's own overhead."""
    model = convert_for(plan, model)
    optimizer = adamw(model.parameters(), lr, device)
    scaler = plan.grad_scaler()
    generator = torch.Generator().manual_seed(seed)
    times = []
    for _ in range(steps):
        synchronize(device)
        t0 = time.perf_counter()
        x, y = data.get_batch("train", batch_size, seq_len, generator)
        with plan.autocast():
            loss = compute_loss(model, x.to(device), y.to(device))
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def bootstrap_ratio(numerator, denominator, n_resamples: int = 2000, seed: int = 0):
    """95% bootstrap interval of median(numerator) / median(denominator), resampling trials."""
    rng = np.random.default_rng(seed)
    num, den = np.asarray(numerator, float), np.asarray(denominator, float)
    ratios = [np.median(rng.choice(num, len(num))) / np.median(rng.choice(den, len(den))) for _ in range(n_resamples)]
    return float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))


def _smooth(series: pd.Series, window: int = 10) -> pd.Series:
    """Rolling median: a one-step loss spike that recovers does not count, a lasting drift does."""
    return series.rolling(min(window, len(series)), min_periods=1).median()


class Interrupted(Exception):
    """Ctrl-C or SIGTERM stopped a run: the tier ends with what it can say, marked interrupted."""


def _speed_trials(model0, plans, data, device, batch_size, seq_len, trials, *, warmup_steps, timed_steps, lr, seed,
                  minimal_loop, compile=False):
    """Interleaved timing: in each trial every (loop, precision) runs once from the same initial
    weights, precisions alternating fp32, AMP. The loops ('ours'; 'compiled', our loop on the
    torch.compile'd model; 'minimal', a bare loop) change order every trial so none always runs first.
    Returns one row per run with the median of its timed steps, and for 'compiled' the compile time."""
    rows = []
    loops = ("ours", *(("compiled",) if compile else ()), *(("minimal",) if minimal_loop else ()))
    for trial in range(trials):
        for loop in loops if trial % 2 == 0 else loops[::-1]:
            for plan in plans:
                model = copy.deepcopy(model0)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                compiled = {}
                if loop == "minimal":
                    times = minimal_loop_step_times(model, plan, data, warmup_steps + timed_steps, batch_size, seq_len,
                                                    lr, seed, device)
                else:
                    result = test_fine_tuning(model, data=data, plan=plan, steps=warmup_steps + timed_steps,
                                              batch_size=batch_size, seq_len=seq_len, lr=lr, seed=seed, device=device,
                                              eval_batches=0, progress=False, max_skipped_in_a_row=None,
                                              compile=loop == "compiled")
                    if result.interrupted:
                        raise Interrupted(f"a {precision_label(plan.precision)} speed trial was {result.stop['message']}")
                    times, compiled = list(result.history["step_time_s"]), result.config.get("compile", {})
                step_time = statistics.median(times[warmup_steps:])
                rows.append({"trial": trial, "loop": loop, "precision": plan.precision, "step_time_s": step_time,
                             "tokens_per_s": batch_size * seq_len / step_time,
                             "cuda_peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                             "compile_time_s": compiled.get("compile_time_s"), "compile_fallback": compiled.get("fallback"),
                             "graph_breaks": compiled.get("graph_breaks")})
    return pd.DataFrame(rows)


def _compile_figures(trials: pd.DataFrame, amp_precision: str, gemm_fraction: dict) -> dict:
    """Compiled against eager, per precision, from the same interleaved trials; compile time apart (the
    first compile of each precision: later copies of the model reuse the compiled code); and why the gain
    is what it is. GEMMs run the same library kernels compiled or not, so compiling can only shorten the
    rest of the step: with GEMMs a share g of it, the gain is at most 1/g (all the rest fused away)."""
    eager, compiled = _median_tokens_per_s(trials), _median_tokens_per_s(trials, "compiled")
    rows = trials[trials["loop"] == "compiled"]
    fallbacks = rows["compile_fallback"].dropna()
    fallback = fallbacks.iloc[0] if len(fallbacks) else None
    gain = {p: compiled[p] / eager[p] for p in compiled}
    ceiling = {p: 1 / g for p, g in gemm_fraction.items()}
    counted = rows["graph_breaks"].dropna()  # None where compiling failed and the run fell back to eager
    breaks = int(counted.max()) if len(counted) else None
    why = fallback or (
        f"compiled runs {', '.join(f'{gain[p]:.2f}x eager in {precision_label(p)}' for p in gain)} with {breaks} graph "
        f"break(s). GEMMs take {', '.join(f'{gemm_fraction[p]:.0%} ({precision_label(p)})' for p in gemm_fraction)} of an "
        "eager step and run the same kernels compiled or not, so fusing all the rest away would give at most "
        f"{', '.join(f'{ceiling[p]:.2f}x ({precision_label(p)})' for p in ceiling)}; the AdamW step is one fused kernel "
        "either way.")
    return {"tokens_per_s": compiled, "speedup_over_eager": gain, "amp_speedup": _speedup(trials, amp_precision, "compiled")["median"],
            "compile_time_s": {p: float(g.max()) for p, g in rows.groupby("precision", sort=False)["compile_time_s"]},
            "gemm_time_fraction": gemm_fraction, "gain_ceiling": ceiling, "graph_breaks": breaks,
            "fallback": fallback, "why": why}


def _median_tokens_per_s(trials: pd.DataFrame, loop: str = "ours") -> dict:
    """Median tokens/s of one loop's trials, per precision."""
    rows = trials[trials["loop"] == loop]
    return {p: float(g.median()) for p, g in rows.groupby("precision", sort=False)["tokens_per_s"]}


MIN_TRIALS_FOR_INTERVAL = 3  # fewer trials give a bootstrap interval of (almost) zero width: no interval at all


def _speedup(trials: pd.DataFrame, amp_precision: str, loop: str = "ours") -> dict:
    """Median speedup and its 95% bootstrap interval (None below MIN_TRIALS_FOR_INTERVAL trials)."""
    ours = trials[trials["loop"] == loop]
    fp32 = ours[ours["precision"] == "32"]["step_time_s"]
    amp = ours[ours["precision"] == amp_precision]["step_time_s"]
    low, high = bootstrap_ratio(fp32, amp) if len(fp32) >= MIN_TRIALS_FOR_INTERVAL else (None, None)
    return {"median": float(fp32.median() / amp.median()), "ci_low": low, "ci_high": high}


def _baseline_name(device: torch.device, tf32: bool) -> str:
    """What a speedup is measured against: on CUDA, fp32 with or without TF32 matmuls."""
    return "fp32" if device.type != "cuda" else "fp32 with TF32 matmuls" if tf32 else "fp32 (TF32 off)"


DIVERGED = 1.25  # an fp32 eval loss that ends 25% above where it started diverged (short noisy runs wobble ~5%)


def _baseline_verdict(ref) -> Verdict:
    """Is the fp32 run itself sound? If not, a gap to it says nothing about AMP."""
    start, end = ref.initial_eval_loss, ref.final_eval_loss
    if ref.stop:
        return Verdict("fp32_baseline", "fail", f"the fp32 run itself stopped: {ref.stop['message']} The model or the "
                       "learning rate is at fault, not AMP.")
    bad = ref.history["step"][~np.isfinite(ref.history["loss"])]
    if len(bad) or not np.isfinite(end):
        return Verdict("fp32_baseline", "fail", "the fp32 run itself went NaN/Inf" + (f" at step {int(bad.min())}" if len(bad) else "")
                       + ": the model or the learning rate is at fault, not AMP. Lower lr, check Tier 1 numerics.")
    if end > DIVERGED * start:
        return Verdict("fp32_baseline", "fail", f"the fp32 run itself diverged: eval loss {start:.3f} -> {end:.3f}. "
                       "The learning rate is likely too high; AMP is not judged against a diverging baseline.")
    return Verdict("fp32_baseline", "pass", f"fp32 trains: eval loss {start:.3f} -> {end:.3f}.")


def _verdicts(p: dict, speed: dict, precision: str, baseline: Verdict) -> tuple:
    tol, skip_frac = p["tolerance"], p["skipped_fraction"]
    problems = []
    if p["stop"]:  # a run cut short: its stop says what went wrong; gaps and fractions of it add nothing
        problems.append(f"the run stopped: {p['stop']['message'].rstrip('.')}")
    elif not p["finite"]:
        problems.append("the AMP loss became NaN/Inf")
    elif p["max_relative_gap"] > tol:
        problems.append(f"the AMP loss (rolling median of 10 steps) strays {p['max_relative_gap']:.1%} from fp32 "
                        f"(tolerance {tol:.0%}) at step {p['max_gap_step']}")
    if p["finite"] and not p["stop"] and p["final_eval_relative_gap"] > tol:
        problems.append(f"final eval loss differs by {p['final_eval_relative_gap']:.1%} (tolerance {tol:.0%})")
    if skip_frac > p["max_skipped_fraction"] and not p["stop"]:
        problems.append(f"{p['skipped_steps']} of {p['steps']} steps were skipped for overflow "
                        f"({skip_frac:.0%} > {p['max_skipped_fraction']:.0%}): look for activations beyond fp16's range "
                        "(Tier 2 AMP readiness) or use bf16")
    if baseline.status == "fail":
        safe = Verdict("amp_safe", "warn", f"not judged: the fp32 baseline failed (see fp32_baseline), so a gap between "
                       f"{precision} and fp32 says nothing about AMP. Fix the baseline first.")
    elif problems:
        safe = Verdict("amp_safe", "fail", f"{precision} is not safe for this model: " + "; ".join(problems) + ".")
    else:
        safe = Verdict("amp_safe", "pass", f"{precision} tracks fp32 within {tol:.0%} (max gap of 10-step rolling medians "
                       f"{p['max_relative_gap']:.2%}, final eval gap {p['final_eval_relative_gap']:.2%}), "
                       f"{p['skipped_steps']} skipped step(s).")
    s = speed["speedup"]
    act = speed["memory"]["activation_saving"]
    memory = f"activations saved for backward shrink by {act:.0%}" if act > 0 else "no activation memory saved"
    if precision == "fp8-emulated":
        worth = Verdict("amp_worth_it", "warn", timing=True, reason=f"not judged: fp8-emulated runs torchao's emulated float8 "
                        f"matmuls ({s['median']:.2f}x here), which says nothing about fp8 hardware; {memory}.")
    elif s["ci_low"] is None:
        worth = Verdict("amp_worth_it", "warn", timing=True, reason=f"{s['median']:.2f}x from {speed['trials']} trial(s): "
                        f"no interval with fewer than {MIN_TRIALS_FOR_INTERVAL} trials, so no verdict on speed; {memory}.")
    elif s["ci_low"] > 1:
        worth = Verdict("amp_worth_it", "pass", timing=True, reason=f"{s['median']:.2f}x faster than {speed['baseline']} "
                        f"(95% CI {s['ci_low']:.2f}-{s['ci_high']:.2f}) at batch {speed['batch_size']} x {speed['seq_len']} "
                        f"tokens; {memory}.")
    elif s["ci_high"] < 1:
        worth = Verdict("amp_worth_it", "fail", timing=True, reason=f"{s['median']:.2f}x: slower than {speed['baseline']} "
                        f"at batch {speed['batch_size']} (95% CI {s['ci_low']:.2f}-{s['ci_high']:.2f}); {memory}. Small batches leave the matmuls too "
                        "small to gain: try a larger batch (see the batch-size sweep).")
    else:
        worth = Verdict("amp_worth_it", "warn", timing=True, reason=f"no clear speedup over {speed['baseline']}: "
                        f"{s['median']:.2f}x (95% CI {s['ci_low']:.2f}-{s['ci_high']:.2f}); {memory}. Worth it only for the memory, or with a larger batch.")
    return safe, worth


def test_amp_speedup_benchmark(model=None, /, *, data=None, progress: bool = False, **params) -> TierResult:
    """Tier 3: benchmark fp32 against the AMP precision `precision` resolves to, on `model` (module
    or spec; default: the `model` parameter). params: tier 3's parameters (utils.params), e.g.
    steps, batch_size, trials, sweep_batch_sizes (also measure the speedup at each batch size, with
    fewer trials, to show where AMP pays), minimal_loop (also time a bare hand-written loop)."""
    run = prepare(3, model, params, data)
    cuda = run.device.type == "cuda"
    run.record["tf32"] = run.params["tf32"] if cuda else None
    try:
        with tf32_matmuls(run.params["tf32"], run.device):
            return _benchmark(run, progress)
    except Interrupted as e:  # Ctrl-C / SIGTERM: say so, keep the checkpoints, judge nothing
        verdict = Verdict("interrupted", "warn", f"{e}. Nothing was judged: run again with resume=True (the batch "
                          "runner: --resume) to continue from the checkpoints.")
        return TierResult(3, {"interrupted": CheckResult(verdict, pd.DataFrame())}, run.params, run.record,
                          {"parameters": count_parameters(run.model), "interrupted": str(e)})


test_amp_speedup_benchmark.__test__ = False  # a library function, not a pytest test


def _benchmark(run, progress: bool) -> TierResult:
    p, model0, device, amp_plan, record, data = run.params, run.model, run.device, run.plan, run.record, run.data
    fp32_plan = resolve_precision("32", device)
    plans = (fp32_plan, amp_plan)
    batch_size, seq_len, seed, lr = p["batch_size"], run.seq_len, p["seed"], p["lr"]
    timing = dict(warmup_steps=p["warmup_steps"], timed_steps=p["timed_steps"], lr=lr, seed=seed)

    trials_df = _speed_trials(model0, plans, data, device, batch_size, seq_len, p["trials"], minimal_loop=p["minimal_loop"],
                              compile=p["compile"], **timing)

    # Memory, on one fixed batch from the same initial weights.
    batch = tuple(t.to(device) for t in data.get_batch("train", batch_size, seq_len, torch.Generator().manual_seed(seed)))
    act = {plan.precision: saved_activation_bytes(convert_for(plan, copy.deepcopy(model0)), plan, batch) for plan in plans}

    # Loss parity: same weights, data, seed and schedule; only precision differs. Each run checkpoints
    # into its own folder, so an interrupted tier resumes both where they stopped.
    steps = p["steps"]
    checkpoints = Path(p["checkpoint_dir"]) if p["checkpoint_dir"] else output_folder(3, p["output_dir"]) / "checkpoints"
    runs = {}
    for plan in plans:
        runs[plan.precision] = test_fine_tuning(
            copy.deepcopy(model0), data=data, plan=plan, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr,
            seed=seed, device=device, eval_interval=steps, eval_batches=4, progress=progress,
            checkpoint_dir=checkpoints / plan.precision, checkpoint_every=p["checkpoint_every"], resume=p["resume"],
            max_skipped_in_a_row=p["max_skipped_in_a_row"], compile=p["compile"])
        if runs[plan.precision].interrupted:
            raise Interrupted(f"the {precision_label(plan.precision)} fine-tuning run was {runs[plan.precision].stop['message']}")
    ref, amp = runs["32"], runs[amp_plan.precision]
    # Outer join on the step: a run that stopped early (overflow storm, NaN) has fewer rows.
    parity_df = (ref.history[["step", "loss"]].rename(columns={"loss": "loss_fp32"})
                 .merge(amp.history[["step", "loss", "loss_scale", "skipped"]].rename(columns={"loss": "loss_amp"}),
                        on="step", how="outer"))
    gap = (_smooth(parity_df["loss_amp"]) - _smooth(parity_df["loss_fp32"])).abs() / _smooth(parity_df["loss_fp32"])
    parity_df.insert(3, "relative_gap", gap)
    judged = gap.fillna(float("inf"))  # a NaN loss is an infinite gap
    parity = {"amp_precision": amp_plan.precision, "steps": steps, "tolerance": p["parity_tolerance"],
              "max_skipped_fraction": p["max_skipped_fraction"],
              "max_relative_gap": float(judged.max()), "max_gap_step": int(parity_df["step"][judged.idxmax()]),
              "final_relative_gap": float(gap.iloc[-1]),
              "final_eval_loss": {prec: r.final_eval_loss for prec, r in runs.items()},
              "final_eval_relative_gap": abs(amp.final_eval_loss - ref.final_eval_loss) / ref.final_eval_loss,
              "finite": bool(np.isfinite(amp.history["loss"]).all()),
              "skipped_steps": int(amp.history["skipped"].sum()),
              "skipped_fraction": float(amp.history["skipped"].mean()),
              "final_loss_scale": float(amp.history["loss_scale"].iloc[-1]),
              "stop": amp.stop, "checkpoints": {prec: r.checkpoints for prec, r in runs.items()},
              "compile": {prec: r.config.get("compile") for prec, r in runs.items()}}

    # Throughput context: model FLOPs against matmul peaks measured now, and Amdahl's bound.
    peaks = {plan.precision: measure_matmul_peak(device, plan.autocast_dtype or torch.float32) for plan in plans}
    matmul_ratio = peaks[amp_plan.precision] / peaks["32"]
    gemm_fraction = matmul_time_fraction(copy.deepcopy(model0), fp32_plan, batch)
    amdahl = 1 / ((1 - gemm_fraction) + gemm_fraction / matmul_ratio)
    flops_per_token = measured_flops_per_token(copy.deepcopy(model0), batch)
    analytic = training_flops_per_token(model0, seq_len)
    ours = trials_df[trials_df["loop"] == "ours"]
    tokens = _median_tokens_per_s(trials_df)
    speedup = _speedup(trials_df, amp_plan.precision)
    speed = {"amp_precision": amp_plan.precision, "batch_size": batch_size, "seq_len": seq_len, "trials": p["trials"],
             "speedup": speedup, "baseline": _baseline_name(device, p["tf32"]), "tokens_per_s": tokens,
             "matmul_peak_flops": peaks, "matmul_ratio": matmul_ratio,
             "gemm_time_fraction_fp32": gemm_fraction, "amdahl_speedup_bound": amdahl,
             "speedup_of_amdahl_bound": speedup["median"] / amdahl,
             "flops_per_token": flops_per_token, "flops_counted_by": "torch.utils.flop_counter.FlopCounterMode",
             "flops_per_token_analytic": analytic,
             "mfu": {prec: tokens[prec] * flops_per_token / peaks[prec] for prec in peaks},
             "memory": {**state_bytes(model0), "activation_bytes": act,
                        "activation_saving": 1 - act[amp_plan.precision] / act["32"],
                        "cuda_peak_bytes": {prec: (int(ours[ours["precision"] == prec]["cuda_peak_bytes"].max())
                                                   if device.type == "cuda" else None) for prec in peaks}}}
    if p["compile"]:
        gemm = {"32": gemm_fraction, amp_plan.precision: matmul_time_fraction(copy.deepcopy(model0), amp_plan, batch)}
        speed["compile"] = _compile_figures(trials_df, amp_plan.precision, gemm)
    if p["minimal_loop"]:
        speed["minimal_loop_tokens_per_s"] = _median_tokens_per_s(trials_df, "minimal")
        speed["loop_efficiency"] = {prec: tokens[prec] / speed["minimal_loop_tokens_per_s"][prec] for prec in peaks}
    sweep = []
    for bs in p["sweep_batch_sizes"]:
        t = _speed_trials(model0, plans, data, device, bs, seq_len, max(MIN_TRIALS_FOR_INTERVAL, p["trials"] // 2),
                          minimal_loop=False, **timing)
        s = _speedup(t, amp_plan.precision)
        sweep.append({"batch_size": bs, "speedup": s["median"], "ci_low": s["ci_low"], "ci_high": s["ci_high"],
                      **{f"tokens_per_s_{prec}": v for prec, v in _median_tokens_per_s(t).items()}})
    speed["sweep"] = sweep

    baseline = _baseline_verdict(ref)
    safe, worth = _verdicts(parity, speed, amp_plan.precision, baseline)
    checks = {"fp32_baseline": CheckResult(baseline, ref.history[["step", "loss", "grad_norm", "skipped"]],
                                           {"initial_eval_loss": ref.initial_eval_loss, "final_eval_loss": ref.final_eval_loss,
                                            "stop": ref.stop}),
              "amp_safe": CheckResult(safe, parity_df, parity), "amp_worth_it": CheckResult(worth, trials_df, speed)}
    figures = {"parameters": count_parameters(model0), "amp_precision": amp_plan.precision, "speedup": speedup["median"],
               "speedup_ci_low": speedup["ci_low"], "speedup_ci_high": speedup["ci_high"],
               "tokens_per_s_fp32": tokens["32"], "tokens_per_s_amp": tokens[amp_plan.precision],
               "activation_saving": speed["memory"]["activation_saving"], "matmul_ratio": matmul_ratio,
               "amdahl_speedup_bound": amdahl, "mfu_fp32": speed["mfu"]["32"], "mfu_amp": speed["mfu"][amp_plan.precision],
               "final_eval_loss_fp32": ref.final_eval_loss, "final_eval_loss_amp": amp.final_eval_loss,
               "skipped_steps": parity["skipped_steps"]}
    return TierResult(3, checks, p, record, figures)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Tier 3 from the command line: fp32 vs AMP speedup, memory, loss "
                                     "parity, MFU. Every option is a tier 3 parameter (see README: Parameters).")
    cli_params = [p for p in TIER_PARAMS[3] if p.name != "output_dir"]
    add_arguments(parser, cli_params)
    parser.add_argument("--out", default=None, help="also write the full result (results.json layout) here")
    parser.add_argument("--json", action="store_true", help="print the result as JSON (default: a short text report)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        result = test_amp_speedup_benchmark(**{p.name: getattr(args, p.name) for p in cli_params})
    except ParamError as e:
        parser.error(str(e))
    result.figures["wall_time_s"] = time.perf_counter() - t0
    if args.out:
        result.save(args.out)
    if args.json:
        d = result.to_dict()
        print(json.dumps({k: d[k] for k in ("status", "record", "figures", "verdicts", "extra")}, indent=2, default=float))
    else:
        if "amp_worth_it" in result.checks:
            speed = result.checks["amp_worth_it"].extra
            print(f"{args.model} on {result.record['device']}, batch {args.batch_size} x {args.seq_len}: "
                  f"{speed['amp_precision']} vs fp32")
            print(f"  speedup {speed['speedup']['median']:.2f}x; matmul ratio {speed['matmul_ratio']:.2f}x; "
                  f"Amdahl bound {speed['amdahl_speedup_bound']:.2f}x ({speed['speedup_of_amdahl_bound']:.0%} of it reached)")
            if "compile" in speed:
                c = speed["compile"]
                for prec, gain in c["speedup_over_eager"].items():
                    print(f"  compiled {precision_label(prec)}: {gain:.2f}x eager {precision_label(prec)} "
                          f"(compile time {c['compile_time_s'][prec]:.1f} s, apart from step time)")
                print(f"  {c['why']}")
        for v in result.verdicts:
            print(f"  [{v.status}] {v.check}: {v.reason}")
    return 0 if result.status != "fail" else 1


if __name__ == "__main__":
    sys.exit(main())
