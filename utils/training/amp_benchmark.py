"""fp32 vs AMP, measured: is AMP safe for this model, and is it worth it here?

Speed: both precisions start from the same weights, data order, seed and schedule; trials are
interleaved (fp32, AMP, fp32, AMP, ...) so drift in the machine hits both alike; warm-up steps are
dropped; the device is synchronized around every timed step; the speedup is a ratio of medians with
a bootstrap interval. Memory: CUDA peak per trial, and on any device the bytes of activations saved
for backward. Parity: both precisions train the same steps; the AMP loss curve is compared with
fp32's. Context: tokens/s and model-FLOPs utilization against matmul peaks measured here, and an
Amdahl bound on the speedup (only matmuls get faster).

Run it: python -m utils.training.amp_benchmark --json
"""

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from utils.data import load_corpus
from utils.models import compute_loss, load_model
from utils.tier3_training_utilities import test_fine_tuning
from utils.training.amp_utils import PrecisionPlan, resolve_device, resolve_precision, saved_activation_bytes, synchronize
from utils.results import json_safe, read_json, write_json_atomic
from utils.verdicts import Verdict, verdict_table

GEMM_OPS = ("mm", "addmm", "bmm", "baddbmm", "addbmm")


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """FLOP/s of a large square matmul in `dtype` on `device`: the practical ceiling for this run."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(2):
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


def training_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """6 N per token (forward 2N, backward 4N) plus attention's 12 * layers * seq_len * d_model
    (PaLM, appendix B). The attention term needs n_layer and d_model on model.config."""
    cfg = getattr(model, "config", None)
    attention = 12 * cfg.n_layer * seq_len * cfg.d_model if hasattr(cfg, "n_layer") and hasattr(cfg, "d_model") else 0
    return 6 * matmul_params(model) + attention


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
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
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


def _records(df: pd.DataFrame) -> list:
    return json_safe(df.astype(object).to_dict("records"))


@dataclass
class AmpBenchmarkResult:
    trials: pd.DataFrame   # one row per timed trial: trial, loop, precision, step times, tokens/s, CUDA peak
    parity: pd.DataFrame   # per step: fp32 and AMP loss, smoothed relative gap, AMP loss scale and skips
    summary: dict          # the figures, JSON-ready
    verdicts: list         # Verdicts: amp_safe, amp_worth_it
    sweep: pd.DataFrame = field(default_factory=pd.DataFrame)  # batch-size sweep: speedup per batch size

    def verdict_table(self) -> pd.DataFrame:
        return verdict_table(self.verdicts)

    def to_dict(self) -> dict:
        return {"summary": json_safe(self.summary), "verdicts": self.verdict_table().to_dict("records"),
                "trials": _records(self.trials), "parity": _records(self.parity), "sweep": _records(self.sweep)}

    def save(self, path) -> Path:
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path) -> "AmpBenchmarkResult":
        d = read_json(path)
        return cls(pd.DataFrame(d["trials"]), pd.DataFrame(d["parity"]), d["summary"],
                   [Verdict(**v) for v in d["verdicts"]], pd.DataFrame(d["sweep"]))


def _speed_trials(model0, plans, data, device, batch_size, seq_len, trials, warmup_steps, timed_steps, lr, seed,
                  minimal_loop):
    """Interleaved timing: in each trial every (loop, precision) runs once from the same initial
    weights, precisions alternating fp32, AMP. The two loops swap places every trial so neither
    always runs first. Returns one row per run with the median of its timed steps."""
    rows = []
    for trial in range(trials):
        loops = ("ours", "minimal") if minimal_loop else ("ours",)
        for loop in loops if trial % 2 == 0 else loops[::-1]:
            for plan in plans:
                model = copy.deepcopy(model0)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                if loop == "ours":
                    result = test_fine_tuning(model, data=data, plan=plan, steps=warmup_steps + timed_steps,
                                              batch_size=batch_size, seq_len=seq_len, lr=lr, seed=seed, device=device,
                                              eval_batches=0, progress=False)
                    times = list(result.history["step_time_s"])
                else:
                    times = minimal_loop_step_times(model, plan, data, warmup_steps + timed_steps, batch_size, seq_len,
                                                    lr, seed, device)
                step_time = statistics.median(times[warmup_steps:])
                rows.append({"trial": trial, "loop": loop, "precision": plan.precision, "step_time_s": step_time,
                             "tokens_per_s": batch_size * seq_len / step_time,
                             "cuda_peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None})
    return pd.DataFrame(rows)


def _median_tokens_per_s(trials: pd.DataFrame, loop: str = "ours") -> dict:
    """Median tokens/s of one loop's trials, per precision."""
    rows = trials[trials["loop"] == loop]
    return {p: float(g.median()) for p, g in rows.groupby("precision", sort=False)["tokens_per_s"]}


def _speedup(trials: pd.DataFrame, amp_precision: str, loop: str = "ours"):
    ours = trials[trials["loop"] == loop]
    fp32 = ours[ours["precision"] == "32"]["step_time_s"]
    amp = ours[ours["precision"] == amp_precision]["step_time_s"]
    return float(fp32.median() / amp.median()), bootstrap_ratio(fp32, amp)


def _verdicts(summary: dict) -> list:
    p = summary["parity"]
    tol, skip_frac = p["tolerance"], p["skipped_fraction"]
    problems = []
    if not p["finite"]:
        problems.append("the AMP loss became NaN/Inf")
    elif p["max_relative_gap"] > tol:
        problems.append(f"the AMP loss (rolling median of 10 steps) strays {p['max_relative_gap']:.1%} from fp32 "
                        f"(tolerance {tol:.0%}) at step {p['max_gap_step']}")
    if p["finite"] and p["final_eval_relative_gap"] > tol:
        problems.append(f"final eval loss differs by {p['final_eval_relative_gap']:.1%} (tolerance {tol:.0%})")
    if skip_frac > p["max_skipped_fraction"]:
        problems.append(f"{p['skipped_steps']} of {p['steps']} steps were skipped for overflow "
                        f"({skip_frac:.0%} > {p['max_skipped_fraction']:.0%}): look for activations beyond fp16's range "
                        "(Tier 2 AMP readiness) or use bf16")
    precision = summary["amp_precision"]
    if problems:
        safe = Verdict("amp_safe", "fail", f"{precision} is not safe for this model: " + "; ".join(problems) + ".")
    else:
        safe = Verdict("amp_safe", "pass", f"{precision} tracks fp32 within {tol:.0%} (max gap of 10-step rolling medians "
                       f"{p['max_relative_gap']:.2%}, final eval gap {p['final_eval_relative_gap']:.2%}), "
                       f"{p['skipped_steps']} skipped step(s).")
    s = summary["speedup"]
    act = summary["memory"]["activation_saving"]
    memory = f"activations saved for backward shrink by {act:.0%}" if act > 0 else "no activation memory saved"
    if s["ci_low"] > 1:
        worth = Verdict("amp_worth_it", "pass", f"{s['median']:.2f}x faster (95% CI {s['ci_low']:.2f}-{s['ci_high']:.2f}) "
                        f"at batch {summary['batch_size']} x {summary['seq_len']} tokens; {memory}.")
    elif s["ci_high"] < 1:
        worth = Verdict("amp_worth_it", "fail", f"{s['median']:.2f}x: slower than fp32 at batch {summary['batch_size']} "
                        f"(95% CI {s['ci_low']:.2f}-{s['ci_high']:.2f}); {memory}. Small batches leave the matmuls too "
                        "small to gain: try a larger batch (see the batch-size sweep).")
    else:
        worth = Verdict("amp_worth_it", "warn", f"no clear speedup: {s['median']:.2f}x (95% CI {s['ci_low']:.2f}-"
                        f"{s['ci_high']:.2f}); {memory}. Worth it only for the memory, or with a larger batch.")
    return [safe, worth]


def test_amp_speedup_benchmark(model="gpt-small", *, precision="auto", device=None, batch_size: int = 16,
                               seq_len: int = 128, trials: int = 5, warmup_steps: int = 3, timed_steps: int = 5,
                               parity_steps: int = 60, parity_tolerance: float = 0.05, max_skipped_fraction: float = 0.05,
                               lr: float = 1e-3, seed: int = 0, batch_sizes=(), minimal_loop: bool = False,
                               data=None, progress: bool = False) -> AmpBenchmarkResult:
    """Benchmark fp32 against the AMP precision `precision` resolves to, on `model` (module or spec).

    batch_sizes: if given, also measure the speedup at each (fewer trials) to show where AMP pays.
    minimal_loop: also time a bare hand-written loop, to measure the engine's overhead.
    """
    for name, value, least in (("batch_size", batch_size, 1), ("seq_len", seq_len, 1), ("trials", trials, 1),
                               ("warmup_steps", warmup_steps, 0), ("timed_steps", timed_steps, 1),
                               ("parity_steps", parity_steps, 1)):
        if not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}; got {value!r}")
    if not 0 < parity_tolerance < 1:
        raise ValueError(f"parity_tolerance must be a fraction between 0 and 1 (0.05 = 5%); got {parity_tolerance!r}")
    device = resolve_device(device)
    amp_plan = resolve_precision(precision, device)
    if not amp_plan.enabled:
        amp_plan = resolve_precision("bf16-mixed" if device.type == "cpu" else "16-mixed", device)
    fp32_plan = resolve_precision("32", device)
    plans = (fp32_plan, amp_plan)
    torch.manual_seed(seed)
    model0 = load_model(model).to(device)
    data = data if data is not None else load_corpus()

    trials_df = _speed_trials(model0, plans, data, device, batch_size, seq_len, trials, warmup_steps, timed_steps,
                              lr, seed, minimal_loop)
    speedup, (ci_low, ci_high) = _speedup(trials_df, amp_plan.precision)

    # Memory, on one fixed batch from the same initial weights.
    batch = tuple(t.to(device) for t in data.get_batch("train", batch_size, seq_len, torch.Generator().manual_seed(seed)))
    act = {plan.precision: saved_activation_bytes(copy.deepcopy(model0), plan, batch) for plan in plans}

    # Loss parity: same weights, data, seed and schedule; only precision differs.
    runs = {plan.precision: test_fine_tuning(copy.deepcopy(model0), data=data, plan=plan, steps=parity_steps,
                                             batch_size=batch_size, seq_len=seq_len, lr=lr, seed=seed, device=device,
                                             eval_interval=parity_steps, eval_batches=4, progress=progress)
            for plan in plans}
    ref, amp = runs["32"], runs[amp_plan.precision]
    gap = (_smooth(amp.history["loss"]) - _smooth(ref.history["loss"])).abs() / _smooth(ref.history["loss"])
    parity = pd.DataFrame({"step": ref.history["step"], "loss_fp32": ref.history["loss"], "loss_amp": amp.history["loss"],
                           "relative_gap": gap, "loss_scale": amp.history["loss_scale"], "skipped": amp.history["skipped"]})
    judged = gap.fillna(float("inf"))  # a NaN loss is an infinite gap

    # Throughput context: model FLOPs against matmul peaks measured now, and Amdahl's bound.
    peaks = {plan.precision: measure_matmul_peak(device, plan.autocast_dtype or torch.float32) for plan in plans}
    matmul_ratio = peaks[amp_plan.precision] / peaks["32"]
    gemm_fraction = matmul_time_fraction(copy.deepcopy(model0), fp32_plan, batch)
    amdahl = 1 / ((1 - gemm_fraction) + gemm_fraction / matmul_ratio)
    flops_per_token = training_flops_per_token(model0, seq_len)
    ours = trials_df[trials_df["loop"] == "ours"]
    tokens = _median_tokens_per_s(trials_df)

    summary = {
        "model": model if isinstance(model, str) else type(model).__name__,
        "device": str(device), "amp_precision": amp_plan.precision, "precision_reason": amp_plan.reason,
        "batch_size": batch_size, "seq_len": seq_len, "trials": trials, "warmup_steps": warmup_steps,
        "timed_steps": timed_steps, "parameters": sum(p.numel() for p in model0.parameters()),
        "speedup": {"median": speedup, "ci_low": ci_low, "ci_high": ci_high},
        "tokens_per_s": tokens,
        "matmul_peak_flops": peaks, "matmul_ratio": matmul_ratio,
        "gemm_time_fraction_fp32": gemm_fraction, "amdahl_speedup_bound": amdahl,
        "speedup_of_amdahl_bound": speedup / amdahl,
        "flops_per_token": flops_per_token,
        "mfu": {p: tokens[p] * flops_per_token / peaks[p] for p in peaks},
        "memory": {**state_bytes(model0), "activation_bytes": act,
                   "activation_saving": 1 - act[amp_plan.precision] / act["32"],
                   "cuda_peak_bytes": {p: (int(ours[ours["precision"] == p]["cuda_peak_bytes"].max())
                                           if device.type == "cuda" else None) for p in peaks}},
        "parity": {"steps": parity_steps, "tolerance": parity_tolerance, "max_skipped_fraction": max_skipped_fraction,
                   "max_relative_gap": float(judged.max()), "max_gap_step": int(parity["step"][judged.idxmax()]),
                   "final_relative_gap": float(gap.iloc[-1]),
                   "final_eval_loss": {p: r.final_eval_loss for p, r in runs.items()},
                   "final_eval_relative_gap": abs(amp.final_eval_loss - ref.final_eval_loss) / ref.final_eval_loss,
                   "finite": bool(np.isfinite(amp.history["loss"]).all()),
                   "skipped_steps": int(amp.history["skipped"].sum()),
                   "skipped_fraction": float(amp.history["skipped"].mean()),
                   "final_loss_scale": float(amp.history["loss_scale"].iloc[-1])},
    }
    if minimal_loop:
        summary["minimal_loop_tokens_per_s"] = _median_tokens_per_s(trials_df, "minimal")
        summary["loop_efficiency"] = {p: tokens[p] / summary["minimal_loop_tokens_per_s"][p] for p in peaks}

    sweep = []
    for bs in batch_sizes:
        t = _speed_trials(model0, plans, data, device, bs, seq_len, max(3, trials // 2), warmup_steps, timed_steps,
                          lr, seed, False)
        s, (lo, hi) = _speedup(t, amp_plan.precision)
        sweep.append({"batch_size": bs, "speedup": s, "ci_low": lo, "ci_high": hi,
                      **{f"tokens_per_s_{p}": v for p, v in _median_tokens_per_s(t).items()}})
    return AmpBenchmarkResult(trials_df, parity, summary, _verdicts(summary), pd.DataFrame(sweep))


test_amp_speedup_benchmark.__test__ = False  # a library function, not a pytest test


def main(argv=None):
    parser = argparse.ArgumentParser(description="fp32 vs AMP benchmark: speedup, memory, loss parity, MFU.")
    parser.add_argument("--model", default="gpt-small", help="registry name or factory spec (default gpt-small)")
    parser.add_argument("--precision", default="auto", help="AMP precision to compare with fp32 (default: auto)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA if available)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--parity-steps", type=int, default=60)
    parser.add_argument("--sweep", default="", help="comma-separated batch sizes for the speedup sweep, e.g. 4,8,16")
    parser.add_argument("--no-minimal-loop", action="store_true", help="skip timing the bare hand-written loop")
    parser.add_argument("--out", default=None, help="also write the full result (trials, parity, sweep) as JSON here")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON (default: a short text report)")
    args = parser.parse_args(argv)
    sweep = tuple(int(b) for b in args.sweep.split(",") if b.strip())
    t0 = time.perf_counter()
    result = test_amp_speedup_benchmark(args.model, precision=args.precision, device=args.device, batch_size=args.batch_size,
                                        seq_len=args.seq_len, trials=args.trials, parity_steps=args.parity_steps,
                                        batch_sizes=sweep, minimal_loop=not args.no_minimal_loop)
    result.summary["wall_time_s"] = time.perf_counter() - t0
    if args.out:
        result.save(args.out)
    if args.json:
        print(json.dumps({"summary": result.summary, "verdicts": result.verdict_table().to_dict("records"),
                          "sweep": result.sweep.to_dict("records")}, indent=2, default=float))
    else:
        s = result.summary
        print(f"{s['model']} on {s['device']}, batch {s['batch_size']} x {s['seq_len']}: {s['amp_precision']} vs fp32")
        print(f"  speedup {s['speedup']['median']:.2f}x (95% CI {s['speedup']['ci_low']:.2f}-{s['speedup']['ci_high']:.2f}); "
              f"matmul ratio {s['matmul_ratio']:.2f}x; Amdahl bound {s['amdahl_speedup_bound']:.2f}x "
              f"({s['speedup_of_amdahl_bound']:.0%} of it reached)")
        for v in result.verdicts:
            print(f"  [{v.status}] {v.check}: {v.reason}")
    return 0 if all(v.status != "fail" for v in result.verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
