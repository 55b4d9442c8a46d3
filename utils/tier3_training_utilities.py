"""Tier 3: fine-tune in fp32 and with AMP. Is AMP safe for this model, and is it worth it here? run_tier3(run) is the tier.

Speed: same weights, data order, seed and schedule for both; interleaved trials (machine drift hits both alike), warm-up
dropped, steps timed on the device's clock with no read-back; the speedup is a ratio of medians with a bootstrap interval.
Memory: CUDA peak per trial, activation bytes saved for backward. Parity: AMP's loss curve against fp32's (utils.parity).
Context: tokens/s, MFU against matmul peaks measured here, Amdahl's bound (only matmuls get faster).
"""

import copy
import statistics
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from utils.diagnosis import candidates, cause, drifting_layers, probe_rerun, remedy_row, try_remedies
from utils.loop.config import TrainConfig
from utils.loop.steps import adamw
from utils.loop.stops import INTERRUPTED, OVERFLOW_STORM, status
from utils.loop.trainer import FineTuneResult, Trainer, check_batch_fits
from utils.measure import (ACTIVATION_BYTES_METHOD, MIN_TRIALS_FOR_INTERVAL, matmul_time_fraction, measure_matmul_peak,
                           measured_flops_per_token, op_time_shares, peak_activation_bytes, PEAK_ACTIVATION_METHOD,
                           ratio_of_medians, saved_activation_bytes, training_flops_per_token)
from utils.models import UnsupportedModel, check_fp32_master_weights, checkpoint_blocks, compute_loss, count_parameters
from utils.params import TIER3_LOOP, output_folder, spec
from utils import device as dev
from utils.precision import (FP32, AUTO, PrecisionPlan, baseline_name, convert_for, emulated_here, fp32_plan, instead_here, label,
                             resolve, tf32_matmuls)
from utils.parity import SMOOTHING, calibration_text, compare, figures as parity_figures, problems as parity_problems, runaway
from utils.prepare import Prepared
from utils.verdicts import CheckResult, TierResult, Verdict


def test_fine_tuning(model, *, data=None, precision=AUTO, use_amp=None, plan: PrecisionPlan = None, device=None,
                     callbacks=(), progress: bool = True, **settings) -> FineTuneResult:
    """The seed's entry point to the loop (Trainer): fine-tune `model` (an nn.Module or a load_model spec), recording every
    optimizer step. precision: any spelling; use_amp: the seed's flag; plan: a ready PrecisionPlan, overriding both.
    callbacks: see Trainer. settings: TrainConfig's, checked by name before any work; their defaults are tier 3's."""
    config = TrainConfig.from_params(settings, "test_fine_tuning")
    device = dev.resolve_device(None if device is None else spec(3)["device"].check(str(device)))  # tier 3's device rule
    plan = plan or resolve(precision, device, use_amp)
    return Trainer(model, config, plan, device, data, callbacks, progress).run()


test_fine_tuning.__test__ = False  # a library function, not a pytest test


def minimal_loop_step_times(model: nn.Module, plan: PrecisionPlan, data, config: TrainConfig, steps: int, device) -> list:
    """The plainest correct AMP loop (_minimal_step), timed per step: the yardstick for the engine's own overhead."""
    model, generator = convert_for(plan, model), torch.Generator().manual_seed(config.seed)
    optimizer, scaler, times = adamw(model.parameters(), config.lr, device), plan.grad_scaler(), []
    for _ in range(steps):
        dev.synchronize(device)
        t0 = time.perf_counter()
        x, y = data.get_batch("train", config.batch_size, config.seq_len, generator)
        _minimal_step(model, plan, optimizer, scaler, x.to(device), y.to(device))
        dev.synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def _minimal_step(model: nn.Module, plan: PrecisionPlan, optimizer, scaler, x, y, zero_grad: bool = True):
    with plan.autocast():
        loss = compute_loss(model, x, y)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    if zero_grad:  # kept for _memory_parts, which counts them
        optimizer.zero_grad(set_to_none=True)


def _bare_step(run: Prepared, plan: PrecisionPlan, batch, warm: bool = False):
    """_minimal_step on a fresh copy of the model under `plan`, as a function; warm: called once first (first calls cost more)."""
    model = plan.prepare(run.model)
    optimizer = adamw(model.parameters(), run.params["lr"], run.device)
    step = partial(_minimal_step, model, plan, optimizer, plan.grad_scaler(), *batch)
    if warm:
        step()
    return step


BUSY_STEPS = 3  # training steps profiled for the GPU's kernel time, apart from the timed trials


def _memory_parts(run: Prepared, plan: PrecisionPlan, batch) -> dict:
    """Weights, gradients and AdamW state after one step under `plan`, the bytes of their tensors; on a GPU the peak over
    that step above what was allocated before (beyond the parts' sum: temporaries and autocast's weight copies)."""
    before = dev.start_peak(run.device)
    model = plan.prepare(run.model)
    optimizer = adamw(model.parameters(), run.params["lr"], run.device)
    _minimal_step(model, plan, optimizer, plan.grad_scaler(), *batch, zero_grad=False)
    peak = dev.peak_bytes(run.device)
    return {"weights": sum(p.nbytes for p in model.parameters()),
            "gradients": sum(p.grad.nbytes for p in model.parameters() if p.grad is not None),
            "optimizer_state": sum(t.nbytes for state in optimizer.state.values() for t in state.values()
                                   if isinstance(t, torch.Tensor)),
            "cuda_peak": None if peak is None else peak - before}


def _checkpointing_peaks(run: Prepared, plans, batch) -> dict:
    """Per precision, the peak activation bytes of one step with and without activation checkpointing; the checkpointed
    AMP step is also the check that checkpointing runs under autocast (a failure is a refusal, before any trial)."""
    peaks = {}
    for plan in plans:
        plain = plan.prepare(run.model)
        try:
            checkpointed = peak_activation_bytes(checkpoint_blocks(copy.deepcopy(plain)), plan, batch)
        except RuntimeError as e:
            raise UnsupportedModel(f"activation checkpointing fails for this model under {label(plan.precision)}: "
                                   f"{type(e).__name__}: {e}") from None
        peaks[plan.precision] = {"plain": peak_activation_bytes(plain, plan, batch), "checkpointed": checkpointed}
    return peaks


def where_time_goes(speed: dict) -> str:
    """Why AMP gains what it does (amp_worth_it's reason): the share autocast cannot speed up, casts, optimizer, sweep."""
    shares, amp = speed["time_shares"], speed["amp_precision"]
    g = shares[FP32]["matmul_attention"]
    bound = amdahl(g, speed["matmul_ratio"])  # from the same measurement as the share
    text = (f"what limits it: {1 - g:.0%} of an fp32 step's op time (aten ops timed on the host) is outside matmuls and "
            f"attention, which autocast does not speed up (so at most {bound:.2f}x with {speed['matmul_ratio']:.1f}x faster "
            f"matmuls); under {label(amp)}, casts take {shares[amp]['casts']:.0%} and the optimizer "
            f"{shares[amp]['optimizer']:.0%}")
    wins = [row["batch_size"] for row in speed["sweep"] if row["ci_low"] and row["ci_low"] > 1]
    if speed["sweep"]:
        text += f"; AMP starts to win at batch {wins[0]} (the sweep)" if wins else "; no batch of the sweep wins"
    return text


def amdahl(share: float, ratio: float) -> float:
    """Amdahl's bound on a step's speedup when only `share` of it (the matmuls) runs `ratio` times faster."""
    return 1 / ((1 - share) + share / ratio)


class Stopped(Exception):
    """A run of tier 3 was interrupted (Ctrl-C, SIGTERM), its stop the argument: run_tier3 catches it and records it."""


def _finished(result: FineTuneResult, what: str) -> FineTuneResult:
    """The run's result; an interrupted run stops the tier (Stopped), its message naming the run."""
    if result.interrupted:
        raise Stopped({**result.stop, "message": f"{what} was {result.stop['message']}"})
    return result


def _speed_trials(run: Prepared, plans, config: TrainConfig, trials: int, warmup: int, timed: int, loops: tuple):
    """Interleaved timing: each trial runs every (loop, precision) once from the same weights, fp32 then AMP; the loops
    swap order every trial so none always runs first. One row per run: its median timed step (and compile time)."""
    rows, device = [], run.device
    for trial in range(trials):
        for loop in loops if trial % 2 == 0 else loops[::-1]:
            for plan in plans:
                model = copy.deepcopy(run.model)
                dev.start_peak(device)
                compiled = {}
                if loop == "minimal":
                    times = minimal_loop_step_times(model, plan, run.data, config, warmup + timed, device)
                else:
                    result = _finished(Trainer(model, replace(config, steps=warmup + timed, compile=loop == "compiled"),
                                               plan, device, run.data, progress=False).run(),
                                       f"a {label(plan.precision)} speed trial")
                    times, compiled = list(result.history["step_time_s"]), result.config.get("compile", {})
                step_time = statistics.median(times[warmup:])
                rows.append({"trial": trial, "loop": loop, "precision": plan.precision, "step_time_s": step_time,
                             "tokens_per_s": config.batch_size * config.seq_len / step_time,
                             "cuda_peak_bytes": dev.peak_bytes(device),
                             "compile_time_s": compiled.get("compile_time_s"), "compile_fallback": compiled.get("fallback"),
                             "graph_breaks": compiled.get("graph_breaks")})
    return pd.DataFrame(rows)


def _per_precision(trials: pd.DataFrame, column: str, loop: str = "ours") -> dict:
    """One loop's trials' `column`, per precision, in the order the trials ran."""
    return dict(list(trials[trials["loop"] == loop].groupby("precision", sort=False)[column]))


def _median_tokens_per_s(trials: pd.DataFrame, loop: str = "ours") -> dict:
    return {p: float(g.median()) for p, g in _per_precision(trials, "tokens_per_s", loop).items()}


def _speedup(trials: pd.DataFrame, amp_precision: str, loop: str = "ours") -> dict:
    """Median speedup of AMP over fp32 and its 95% bootstrap interval."""
    step_time = _per_precision(trials, "step_time_s", loop)
    return ratio_of_medians(step_time[FP32], step_time[amp_precision])


def _compile_figures(trials: pd.DataFrame, amp_precision: str, gemm_fraction: dict) -> dict:
    """Compiled against eager, per precision, from the same interleaved trials; compile time apart (the first compile:
    later copies reuse the code); and why: GEMMs run the same kernels compiled or not, so the gain is at most 1/g."""
    eager, compiled = _median_tokens_per_s(trials), _median_tokens_per_s(trials, "compiled")
    rows = trials[trials["loop"] == "compiled"]
    fallback = next(iter(rows["compile_fallback"].dropna()), None)
    gain = {p: compiled[p] / eager[p] for p in compiled}
    ceiling = {p: 1 / g for p, g in gemm_fraction.items()}
    counted = rows["graph_breaks"].dropna()  # None where compiling failed and the run fell back to eager
    breaks = int(counted.max()) if len(counted) else None
    why = fallback or (
        f"compiled runs {', '.join(f'{gain[p]:.2f}x eager in {label(p)}' for p in gain)} with {breaks} graph "
        f"break(s). GEMMs take {', '.join(f'{gemm_fraction[p]:.0%} ({label(p)})' for p in gemm_fraction)} of an "
        "eager step and run the same kernels compiled or not, so fusing all the rest away would give at most "
        f"{', '.join(f'{ceiling[p]:.2f}x ({label(p)})' for p in ceiling)}; the AdamW step is one fused kernel "
        "either way.")
    return {"tokens_per_s": compiled, "speedup_over_eager": gain,
            "amp_speedup": _speedup(trials, amp_precision, "compiled")["median"],
            "compile_time_s": {p: float(g.max()) for p, g in _per_precision(trials, "compile_time_s", "compiled").items()},
            "gemm_time_fraction": gemm_fraction, "gain_ceiling": ceiling, "graph_breaks": breaks,
            "fallback": fallback, "why": why}


DIVERGED = 1.25  # an fp32 eval loss that ends 25% above where it started diverged (short noisy runs wobble ~5%)
# An fp32 eval loss moving less than this share of its start did not train: healthy tiny models move 7x more at least (gpt-tiny
# 0.74% after 1 step of batch 1 x 16 tokens, 40% in tier 3's 60), up or down (the built-in classifier's rises 2.5-17% first).
STILL = 1e-3


def _baseline_verdict(ref: FineTuneResult) -> Verdict:
    """Is the fp32 run itself sound? If not, a gap to it says nothing about AMP."""
    start, end = ref.initial_eval_loss, ref.final_eval_loss
    if ref.stop:
        return Verdict("fp32_baseline", status(ref.stop), f"the fp32 run itself stopped: {ref.stop['message']} The model or the "
                       "learning rate is at fault, not AMP.")
    bad = ref.history["step"][~np.isfinite(ref.history["loss"])]
    if len(bad) or not np.isfinite(end):
        at = f" at step {int(bad.min())}" if len(bad) else ""
        return Verdict("fp32_baseline", "fail", f"the fp32 run itself went NaN/Inf{at}: the model or the learning rate is at "
                       "fault, not AMP. Lower lr, check Tier 1 numerics.")
    steps, norms = len(ref.history), ref.history["grad_norm"]
    if (norms == 0).all():
        return Verdict("fp32_baseline", "fail", f"every gradient was zero in all {steps} fp32 steps (gradient norm 0 "
                       f"throughout), so nothing trained: eval loss {start:.3f} -> {end:.3f}. The loss reaches the weights "
                       "only through terms whose gradient is zero (multiplied by 0, or cut off by .detach()); tier 1's "
                       "gradient_flow lists them as vanishing. AMP is not judged against a model that cannot learn.")
    if end > DIVERGED * start:
        return Verdict("fp32_baseline", "fail", f"the fp32 run itself diverged: eval loss {start:.3f} -> {end:.3f}. "
                       "The learning rate is likely too high; AMP is not judged against a diverging baseline.")
    if abs(end - start) < STILL * start:
        return Verdict("fp32_baseline", "fail", f"the fp32 run did not learn: eval loss {start:.4f} -> {end:.4f} moved "
                       f"less than {STILL:.1%} in {steps} steps, though gradients flowed (norms up to {norms.max():.2g}). "
                       f"Check that the logits depend on the weights being trained, and that lr ({ref.config['lr']:g}) is "
                       "not too small; AMP is not judged against a baseline that does not learn.")
    return Verdict("fp32_baseline", "pass", f"fp32 trains: eval loss {start:.3f} -> {end:.3f}.")


def _safe_verdict(p: dict, precision: str, baseline: Verdict, device: torch.device) -> Verdict:
    tol, problems = p["tolerance"], parity_problems(p, instead_here(p["amp_precision"], device))
    if baseline.status == "fail":
        return Verdict("amp_safe", "warn", f"not judged: the fp32 baseline failed (see fp32_baseline), so a gap between "
                       f"{precision} and fp32 says nothing about AMP. Fix the baseline first.")
    if problems:
        return Verdict("amp_safe", "fail", f"{precision} is not safe for this model: " + "; ".join(problems)
                       + f" ({calibration_text(p)}).")
    return Verdict("amp_safe", "pass", f"{precision} tracks fp32 within {tol:.0%} update for update (max gap of "
                   f"{SMOOTHING}-update rolling medians {p['max_relative_gap']:.2%}, final eval gap "
                   f"{p['final_eval_relative_gap']:.2%} after {p['updates']['amp']} updates); {calibration_text(p)}.")


HOST_BOUND = 0.5  # below this share of an AMP step's wall time computing, the GPU mostly waits for the host


def host_bound(speed: dict):
    """Why a speed verdict measures the loop rather than the precision, where the GPU mostly waits for Python to
    launch its kernels (speed['gpu_busy']); None where it computes most of the step, or on a CPU."""
    busy, amp = speed.get("gpu_busy") or {}, speed["amp_precision"]
    if busy.get(amp) is None or busy[amp] >= HOST_BOUND:
        return None
    return (f"host-bound: the GPU computes {busy[amp]:.0%} of a {label(amp)} step and {busy[FP32]:.0%} of an fp32 step "
            "(kernel time over wall time) and waits for Python's kernel launches the rest, so this times the loop's "
            "launch path, not the precision. What would show AMP's effect: a larger batch or seq_len, compile=True, or "
            "CUDA graphs (torch.compile's mode='reduce-overhead')")


def _worth_verdict(speed: dict, plan: PrecisionPlan) -> Verdict:
    s, act, host = speed["speedup"], speed["memory"]["activation_saving"], host_bound(speed)
    context = f"activations saved for backward shrink by {act:.0%}" if act > 0 else "no activation memory saved"
    busy = speed.get("gpu_busy") or {}
    if busy.get(speed["amp_precision"]) is not None and not host:  # on a GPU, the busy share is always quoted
        context += (f"; the GPU computes {busy[speed['amp_precision']]:.0%} of a {label(speed['amp_precision'])} step "
                   f"and {busy[FP32]:.0%} of an fp32 step (kernel time over wall time)")
    if plan.emulated:
        return Verdict("amp_worth_it", "warn", timing=True, reason=f"not judged: {plan.precision} runs torchao's emulated "
                       f"float8 matmuls ({s['median']:.2f}x here), which says nothing about fp8 hardware; {context}.")
    if s["ci_low"] is None:
        return Verdict("amp_worth_it", "warn", timing=True, reason=f"{s['median']:.2f}x from {speed['trials']} trial(s): "
                       f"no interval with fewer than {MIN_TRIALS_FOR_INTERVAL} trials, so no verdict on speed; {context}.")
    interval = f"95% CI {s['ci_low']:.2f}-{s['ci_high']:.2f}"
    if s["ci_low"] > 1:
        return Verdict("amp_worth_it", "pass", timing=True, reason=f"{s['median']:.2f}x faster than {speed['baseline']} "
                       f"({interval}) at batch {speed['batch_size']} x {speed['seq_len']} tokens; {context}"
                       + (f"; {host}, so AMP may gain more." if host else "."))
    if host:  # slower or no clearer: the host's launches are timed, so neither is AMP's fault
        return Verdict("amp_worth_it", "warn", timing=True, reason=f"not judged: {s['median']:.2f}x ({interval}) at batch "
                       f"{speed['batch_size']} x {speed['seq_len']}, but {host}; {context}.")
    if s["ci_high"] < 1:
        return Verdict("amp_worth_it", "fail", timing=True, reason=f"{s['median']:.2f}x: slower than {speed['baseline']} "
                       f"at batch {speed['batch_size']} ({interval}); {context}; {where_time_goes(speed)}. Small batches "
                       "leave the matmuls too small to gain: try a larger batch (see the batch-size sweep).")
    return Verdict("amp_worth_it", "warn", timing=True, reason=f"no clear speedup over {speed['baseline']}: "
                   f"{s['median']:.2f}x ({interval}); {context}; {where_time_goes(speed)}. Worth it only for the "
                   "memory, or with a larger batch.")


def _fine_tune_both(run: Prepared, plans, progress: bool):
    """The parity runs by precision (same weights, data, seed, schedule), each checkpointing in its own folder to resume."""
    p = run.params
    folder = Path(p["checkpoint_dir"]) if p["checkpoint_dir"] else output_folder(3, p["output_dir"]) / "checkpoints"
    return {plan.precision: _finished(
        Trainer(copy.deepcopy(run.model), _parity_config(run, checkpoint_dir=str(folder / plan.precision)), plan, run.device,
                run.data, progress=progress).run(), f"the {label(plan.precision)} fine-tuning run") for plan in plans}


def _parity_config(run: Prepared, **changes) -> TrainConfig:
    """The loop's settings of a parity run: tier 3's, an evaluation at the start, after `steps` and at the end; skipped
    steps made up, so the AMP run ends after as many updates as fp32 (utils.parity)."""
    p = run.params
    return TrainConfig(**{**{name: p[name] for name in TIER3_LOOP}, "seq_len": run.seq_len, "eval_interval": p["steps"],
                          "eval_batches": 4, "make_up_skipped": True,
                          **({"batch_size": EMULATED_BATCH} if _short(run) else {}), **changes})


def _rerun(run: Prepared, plan: PrecisionPlan, model=None, callbacks=(), what="a diagnosis run", **changes) -> FineTuneResult:
    """A parity run again for the diagnosis, under `plan` or with a probed model; eager (compiling runs a step of its own,
    which a probe would count), no checkpoints."""
    config = _parity_config(run, checkpoint_every=0, checkpoint_dir=None, resume=False, compile=False, **changes)
    return _finished(Trainer(model or copy.deepcopy(run.model), config, plan, run.device, run.data, callbacks,
                             progress=False).run(), what)


def _judge(run: Prepared, ref: FineTuneResult, amp: FineTuneResult) -> tuple:
    """An AMP run's parity figures against fp32, and the problems amp_safe would name (none: it passes)."""
    parity = _parity(run.params, ref, amp, {FP32: ref, amp.plan.precision: amp})[1]
    return parity, parity_problems(parity, instead_here(amp.plan.precision, run.device))


def _diagnose(run: Prepared, ref: FineTuneResult, amp: FineTuneResult, parity: dict, safe: Verdict, x) -> tuple:
    """The diagnosis check (if amp_safe failed: the cause, from a probed re-run, and the remedies) and amp_safe's verdict."""
    p = run.params
    if safe.status != "fail":
        ok = safe.status == "pass"
        return CheckResult(Verdict("diagnosis", "pass" if ok else "warn", "nothing to diagnose: amp_safe passed." if ok
                                   else "not diagnosed: the fp32 baseline failed."), pd.DataFrame()), safe
    # The probe watches up to the stop, else the widest gap; where no update was compared (the AMP loss was never
    # finite, so the gap has no step), every step.
    until = (amp.stop or {}).get("step") or (parity["max_gap_step"] if parity["max_relative_gap"] > parity["tolerance"]
                                             else None) or p["steps"]
    activation, gradients = probe_rerun(run.model, amp.plan, until, lambda *a: _rerun(run, *a))  # _rerun raises a stop
    collapse = parity["collapse"]
    runs_away = (amp.stop or {}).get("reason") == OVERFLOW_STORM or runaway(parity)
    gradients = gradients if collapse or runs_away else None  # else: the GradScaler calibrating (utils.parity), not the cause
    drift = None if activation or gradients else drifting_layers(run.model, x, amp.plan)
    found = cause(amp.plan, activation, gradients, collapse, drift)
    fp32_step_s = float(ref.history["step_time_s"].median())
    rows = try_remedies(candidates(found, amp.plan, run.device), p["remedy_runs"], lambda *a: _rerun(run, *a),
                        lambda result: _judge(run, ref, result), fp32_step_s)
    passed = next((r["remedy"] for r in rows if r["passed"]), None)
    remedy = ("remedies are off (remedy_runs=0)" if not p["remedy_runs"] else f"the remedy that passes parity: {passed}"
              if passed else "no remedy passed parity" + (f" (tried: {'; '.join(r['remedy'] for r in rows)})" if rows else ""))
    text = f"cause: {found['text']}; {remedy}."
    before = remedy_row(f"none: {amp.plan.precision} as asked", amp, *_judge(run, ref, amp), fp32_step_s)
    return (CheckResult(Verdict("diagnosis", "warn" if passed else "fail", text), pd.DataFrame([before, *rows]),
                        {"cause": found, "remedy": passed, "tolerance": parity["tolerance"]}),
            replace(safe, reason=f"{safe.reason} Diagnosis: {text}"))


def _parity(p: dict, ref: FineTuneResult, amp: FineTuneResult, runs: dict):
    """The AMP loss curve against fp32's, update for update (utils.parity): the table behind amp_safe, and its figures."""
    table = compare(ref.history, amp.history)
    limits = {name: p[name] for name in ("steps", "max_skipped_fraction")} | {"tolerance": p["parity_tolerance"]}
    return table, {**parity_figures(table, ref, amp, limits),
                   "checkpoints": {prec: r.checkpoints for prec, r in runs.items()},
                   "compile": {prec: r.config.get("compile") for prec, r in runs.items()}}


def _throughput(run: Prepared, plans, trials: pd.DataFrame, batch, act: dict) -> dict:
    """Tokens/s, speedup and its context: model FLOPs against matmul peaks measured now, Amdahl's bound, memory."""
    fp32, amp = plans
    model0, device, p = run.model, run.device, run.params
    peaks = {plan.precision: measure_matmul_peak(device, plan.autocast_dtype or torch.float32) for plan in plans}
    step_time = _per_precision(trials, "step_time_s")
    matmul_ratio = peaks[amp.precision] / peaks[FP32]
    gemm_fraction = matmul_time_fraction(copy.deepcopy(model0), fp32, batch)
    bound = amdahl(gemm_fraction, matmul_ratio)
    flops_per_token = measured_flops_per_token(copy.deepcopy(model0), batch)
    tokens, speedup = _median_tokens_per_s(trials), _speedup(trials, amp.precision)
    return {"amp_precision": amp.precision, "batch_size": p["batch_size"], "seq_len": run.seq_len, "trials": p["trials"],
            "speedup": speedup, "baseline": baseline_name(device, p["tf32"]), "tokens_per_s": tokens,
            "matmul_peak_flops": peaks, "matmul_ratio": matmul_ratio,
            "gemm_time_fraction_fp32": gemm_fraction, "amdahl_speedup_bound": bound,
            "time_shares": {plan.precision: op_time_shares(_bare_step(run, plan, batch, warm=True), device) for plan in plans},
            "time_shares_method": "op time: aten ops timed one by one on the host (utils.measure.op_time_shares), "
                                  "2 steps after a warm-up",
            "gpu_busy": {plan.precision: dev.gpu_busy_share(_bare_step(run, plan, batch), BUSY_STEPS,  # warms up itself
                                                float(step_time[plan.precision].median()), device) for plan in plans},
            "gpu_busy_method": "wall time: the GPU's kernel time of a training step (profiler) over our loop's median step time",
            "speedup_of_amdahl_bound": speedup["median"] / bound,
            "flops_per_token": flops_per_token, "flops_counted_by": "torch.utils.flop_counter.FlopCounterMode",
            "flops_per_token_analytic": training_flops_per_token(model0, run.seq_len),
            "mfu": {prec: tokens[prec] * flops_per_token / peaks[prec] for prec in peaks},
            "memory": {"parts": {plan.precision: {**_memory_parts(run, plan, batch), "activations": act[plan.precision]}
                                 for plan in plans},
                       "activation_bytes": act, "activation_bytes_method": ACTIVATION_BYTES_METHOD,
                       "activation_saving": 1 - act[amp.precision] / act[FP32],
                       "cuda_peak_bytes": {prec: int(peak.max()) if device.type == "cuda" else None
                                           for prec, peak in _per_precision(trials, "cuda_peak_bytes").items()}}}


def _sweep(run: Prepared, plans, config: TrainConfig):
    """The speedup at each of sweep_batch_sizes, with fewer trials: where AMP starts to pay."""
    p, sweep = run.params, []
    for bs in p["sweep_batch_sizes"]:
        t = _speed_trials(run, plans, replace(config, batch_size=bs), max(MIN_TRIALS_FOR_INTERVAL, p["trials"] // 2),
                          p["timing_warmup_steps"], p["timed_steps"], ("ours",))
        s = _speedup(t, plans[1].precision)
        sweep.append({"batch_size": bs, "speedup": s["median"], "ci_low": s["ci_low"], "ci_high": s["ci_high"],
                      **{f"tokens_per_s_{prec}": v for prec, v in _median_tokens_per_s(t).items()}})
    return sweep


def run_tier3(run: Prepared, progress: bool = False) -> TierResult:
    """Tier 3 on a prepared run: fp32 against the AMP precision the run resolved, timed, compared and judged."""
    p = run.params
    check_fp32_master_weights(run.model)  # it trains: refused before any trial
    check_batch_fits(run.model, p["batch_size"], run.seq_len, run.device)  # the batches it draws, before any is drawn
    if p["sweep_batch_sizes"]:
        check_batch_fits(run.model, max(p["sweep_batch_sizes"]), run.seq_len, run.device, "sweep_batch_sizes")
    with tf32_matmuls(p["tf32"], run.device):
        try:
            return _benchmark(run, progress)
        except Stopped as stopped:  # Ctrl-C / SIGTERM: say so, keep the checkpoints, judge nothing
            stop = stopped.args[0]
            verdict = Verdict(INTERRUPTED, status(stop), f"{stop['message']}. Nothing was judged: run again with resume=True "
                              "(the batch runner: --resume) to continue from the checkpoints.")
            return TierResult(3, {INTERRUPTED: CheckResult(verdict, pd.DataFrame())}, p, run.record,
                              {"parameters": count_parameters(run.model), "stop": stop})


def _benchmark(run: Prepared, progress: bool) -> TierResult:
    p, device, amp_plan = run.params, run.device, run.plan
    plans = (fp32_plan(device), amp_plan)
    # Memory, on one fixed batch from the same initial weights; with checkpointing, first its one-step check.
    batch = tuple(t.to(device) for t in run.data.get_batch("train", p["batch_size"], run.seq_len,
                                                            torch.Generator().manual_seed(p["seed"])))
    short = _short(run)
    if not short:
        peaks = _checkpointing_peaks(run, plans, batch) if p["activation_checkpointing"] else None
        trials = _speed_trials(run, plans, _speed_config(run), p["trials"], p["timing_warmup_steps"], p["timed_steps"],
                               ("ours", *(("compiled",) if p["compile"] else ()), *(("minimal",) if p["minimal_loop"] else ())))
        act = {plan.precision: saved_activation_bytes(plan.prepare(run.model), plan, batch) for plan in plans}
    runs = _fine_tune_both(run, plans, progress)
    ref, amp = runs[FP32], runs[amp_plan.precision]
    parity_df, parity = _parity(p, ref, amp, runs)
    if short:
        worth = _not_measured(run, short)
    else:
        speed = _speed_figures(run, plans, trials, batch, act, peaks, amp)
        worth = CheckResult(_worth_verdict(speed, amp_plan), trials, speed)
    baseline = _baseline_verdict(ref)
    diagnosis, safe = _diagnose(run, ref, amp, parity, _safe_verdict(parity, amp_plan.precision, baseline, device), batch[0])
    checks = {"fp32_baseline": CheckResult(baseline, ref.history[["step", "loss", "grad_norm", "skipped"]],
                                           {"initial_eval_loss": ref.initial_eval_loss, "final_eval_loss": ref.final_eval_loss,
                                            "stop": ref.stop}),
              "amp_safe": _safe_check(run, safe, short, parity_df, parity, batch[0]),
              "amp_worth_it": worth, "diagnosis": diagnosis}
    return TierResult(3, checks, p, run.record, {**_figures(run, worth.extra, parity, ref, amp),
                                                 "diagnosis": (diagnosis.extra or {}).get("cause", {}).get("text"),
                                                 "remedy": (diagnosis.extra or {}).get("remedy")})


def _speed_config(run: Prepared) -> TrainConfig:
    """The loop's settings of a speed trial: no evaluation, no storm stop (a trial times steps, it judges nothing)."""
    p = run.params
    return TrainConfig(batch_size=p["batch_size"], seq_len=run.seq_len, lr=p["lr"], seed=p["seed"], eval_batches=0,
                       eval_interval=p["timing_warmup_steps"] + p["timed_steps"], max_skipped_in_a_row=None,
                       activation_checkpointing=p["activation_checkpointing"])


def _speed_figures(run: Prepared, plans, trials: pd.DataFrame, batch, act: dict, peaks, amp: FineTuneResult) -> dict:
    """amp_worth_it's figures: throughput in context, memory, and what was asked (checkpointing, compile, bare loop, sweep)."""
    p, amp_plan = run.params, plans[1]
    speed = _throughput(run, plans, trials, batch, act)
    if peaks:  # with activation checkpointing: the peaks measured before the trials; the AMP run's losses beside a plain one's
        plain = _rerun(run, amp.plan, activation_checkpointing=False, what="the plain run beside the checkpointed one")
        loss_diff = float((amp.history["loss"] - plain.history["loss"]).abs().max())
        speed["memory"]["checkpointing"] = {"peak_activation_bytes": peaks, "method": PEAK_ACTIVATION_METHOD,
                                            "amp_loss_max_abs_diff_vs_plain": loss_diff}
    if p["compile"]:
        gemm = {FP32: speed["gemm_time_fraction_fp32"],
                amp_plan.precision: matmul_time_fraction(amp_plan.prepare(run.model), amp_plan, batch)}
        speed["compile"] = _compile_figures(trials, amp_plan.precision, gemm)
    if p["minimal_loop"]:
        speed["minimal_loop_tokens_per_s"] = _median_tokens_per_s(trials, "minimal")
        speed["loop_efficiency"] = {prec: speed["tokens_per_s"][prec] / speed["minimal_loop_tokens_per_s"][prec]
                                    for prec in speed["tokens_per_s"]}
    speed["sweep"] = _sweep(run, plans, _speed_config(run))
    return speed


EMULATED_BATCH = 1  # the parity runs' batch where the AMP precision is only emulated (emulated_amp='short')


def _short(run: Prepared):
    """Why this run compares in short (the AMP precision is only emulated here, emulated_amp='short'), or None."""
    return emulated_here(run.plan, run.device) if run.params["emulated_amp"] == "short" else None


def _not_measured(run: Prepared, why: str) -> CheckResult:
    """amp_worth_it where the AMP precision is only emulated: its speed here says nothing about AMP's, so none is timed."""
    amp = run.plan.precision
    reason = (f"not measured: {why}, so its speed here says nothing about what {label(amp)} does where it is native; "
              f"no speed trials ran. emulated_amp='full' times it anyway (slowly).")
    return CheckResult(Verdict("amp_worth_it", "warn", reason, timing=True), pd.DataFrame(),
                       {"amp_precision": amp, "emulated": why, "parity_batch_size": EMULATED_BATCH, "seq_len": run.seq_len})


def _safe_check(run: Prepared, safe: Verdict, short, table: pd.DataFrame, parity: dict, x) -> CheckResult:
    """amp_safe's check; in a short comparison its reason says so and names the layers that drift most from fp32 on
    one sequence (utils.diagnosis.drifting_layers), the per-layer view that stands in for the longer runs."""
    if not short:
        return CheckResult(safe, table, parity)
    drift = drifting_layers(run.model, x[:EMULATED_BATCH], run.plan)
    worst = ", ".join(f"{d['layer']!r} {d['rel_error']:.1%}" for d in drift)
    reason = (f"{safe.reason} (A short comparison: batch {EMULATED_BATCH}, because {short}; emulated_amp='full' compares "
              f"at the batch_size asked for. Largest per-layer errors against fp32: {worst}.)")
    return CheckResult(replace(safe, reason=reason), table, {**parity, "short": short, "layer_drift": drift})


def _figures(run: Prepared, speed: dict, parity: dict, ref: FineTuneResult, amp: FineTuneResult) -> dict:
    """The run's headline figures (results.json, the batch summary); the speed ones are None where none was measured."""
    amp_precision, timed = parity["amp_precision"], "speedup" in speed
    s, tokens, mfu = (speed["speedup"], speed["tokens_per_s"], speed["mfu"]) if timed else ({}, {}, {})
    return {"parameters": count_parameters(run.model), "amp_precision": amp_precision, "speedup": s.get("median"),
            "speedup_ci_low": s.get("ci_low"), "speedup_ci_high": s.get("ci_high"),
            "tokens_per_s_fp32": tokens.get(FP32), "tokens_per_s_amp": tokens.get(amp_precision),
            "activation_saving": speed["memory"]["activation_saving"] if timed else None,
            "matmul_ratio": speed.get("matmul_ratio"), "amdahl_speedup_bound": speed.get("amdahl_speedup_bound"),
            "mfu_fp32": mfu.get(FP32), "mfu_amp": mfu.get(amp_precision), "final_eval_loss_fp32": ref.final_eval_loss,
            "final_eval_loss_amp": amp.final_eval_loss, "skipped_steps": parity["skipped_steps"],
            "parity_gap": parity["max_relative_gap"], "parity_tolerance": parity["tolerance"],
            "peak_bytes_fp32": _peak_bytes(speed, FP32), "peak_bytes_amp": _peak_bytes(speed, amp_precision)}


def _peak_bytes(speed: dict, precision: str):
    """A training step's peak memory: the CUDA allocator's where there is one, else its parts' sum (weights, gradients,
    optimizer state and the activations saved for backward); None where nothing was measured."""
    if "speedup" not in speed:
        return None
    memory = speed["memory"]
    parts = memory["parts"][precision]
    return memory["cuda_peak_bytes"][precision] or sum(parts[k] for k in ("weights", "gradients", "optimizer_state",
                                                                          "activations"))
