"""Tier 3: the fine-tuning loop. One code path for fp32 and mixed precision.

Per optimizer step (train_step):
  for each micro-batch of the accumulation window: forward + loss under autocast, scaled backward
  unscale_ -> clip -> scaler.step -> scaler.update
  a drop of the loss scale (fp16), or non-finite gradients (fp32/bf16), means the step was skipped;
  the LR schedule only advances on steps that really happened.
The step reads nothing back to the host (utils.training.steps): its record stays on the device and the
loop reads the records in one transfer at log points (every log_every steps, evaluations, checkpoints,
the end), where progress, callbacks and the stop checks run.
With precision '32' autocast and the GradScaler are disabled no-ops, so the fp32 and AMP runs differ
in precision alone and can be compared like with like.
"""

import itertools
import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import pandas as pd
import torch
import torch.nn as nn
from torch._dynamo.utils import counters as dynamo_counters
from tqdm.auto import tqdm

from utils.models import compute_loss, load_model, load_task_data
from utils.tier2_advanced_analysis import layer_outputs
from utils.training.amp_utils import (PrecisionPlan, amp_summary, convert_for, precision_label, resolve_device,
                                      resolve_precision, synchronize)
from utils.training.checkpoint import clear_checkpoints, load_latest, save_checkpoint, structure_digest
from utils.training.distributed import (PARALLEL_CHOICES, Ranks, full_tensor, gather, grad_scaler, gradient_sync,
                                        load_training_state, mean_over_ranks, ranks, rows, training_state, wrap)
from utils.training.steps import (RECORD, LRSchedule, StepTimer, log_interval, loss_scale, optimizer_step, to_device,
                                  warmup_cosine)


@dataclass
class FineTuneResult:
    """What a fine-tuning run did, step by step, and where it ended."""

    history: pd.DataFrame       # one row per optimizer step
    eval_history: pd.DataFrame  # one row per evaluation (step 0 is before training)
    plan: PrecisionPlan
    model: nn.Module = field(repr=False)
    config: dict = field(default_factory=dict)
    stop: dict = None  # why the run ended early (interrupted, overflow_storm, nonfinite_loss), else None
    checkpoints: dict = field(default_factory=dict)  # folder, files written, where it resumed from, notes
    loop_seconds: float = 0.0  # wall time of the training loop: its steps, log points, evaluations, checkpoints

    @property
    def interrupted(self) -> bool:
        return bool(self.stop) and self.stop["reason"] == "interrupted"

    def _eval(self, column: str, row: int) -> float:
        return float(self.eval_history[column].iloc[row]) if len(self.eval_history) else float("nan")  # NaN: no evaluation ran

    @property
    def initial_eval_loss(self) -> float:
        return self._eval("eval_loss", 0)

    @property
    def final_eval_loss(self) -> float:
        return self._eval("eval_loss", -1)

    @property
    def final_perplexity(self) -> float:
        return self._eval("perplexity", -1)

    @property
    def effective_precision(self) -> str:
        return self.plan.precision

    @property
    def precision_reason(self) -> str:
        return self.plan.reason

    def summary(self) -> dict:
        """JSON-ready figures for reports and the batch runner."""
        timed = self.history.iloc[min(2, len(self.history) - 1):]  # the first steps warm up
        return {"precision": self.plan.to_dict(), **self.config,
                "initial_eval_loss": self.initial_eval_loss, "final_eval_loss": self.final_eval_loss,
                "final_perplexity": self.final_perplexity,
                "median_step_time_s": float(timed["step_time_s"].median()),
                "median_tokens_per_s": float(timed["tokens_per_s"].median()),
                "stop": self.stop, "checkpoints": self.checkpoints, **amp_summary(self.history)}


def _param_groups(model: nn.Module, weight_decay: float):
    """AdamW groups: decay matrices (weights, embeddings), not biases or norm gains (1-D tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # where torch (>= 2.4) has a fused AdamW kernel


def adamw(param_groups, lr: float, device: torch.device, sharded: bool = False) -> torch.optim.AdamW:
    """AdamW fused into one kernel per step where the device has one: the optimizer step is time AMP cannot
    shorten. Measured on gpt-small (3.3M parameters) on a 2-core CPU, interleaved: the optimizer step alone
    4.4x faster than the foreach default (2.0 vs 9.0 ms); the whole step at batch 16 x 128 unchanged within
    noise (fp32 1.01x, bf16 1.00x), since the step is 80-240 ms there. FSDP2's sharded parameters keep foreach."""
    fused = device.type in FUSED_ADAMW_DEVICES and not sharded
    return torch.optim.AdamW(param_groups, lr=lr, betas=(0.9, 0.95), fused=fused or None)


def _training_step(model: nn.Module, batch, plan: PrecisionPlan, scaler: torch.amp.GradScaler, window: int) -> float:
    """Forward and loss under autocast, then the scaled backward. The loss is divided by the
    accumulation window so the summed gradients are a mean. Returns the unscaled, undivided loss."""
    x, y = batch
    with plan.autocast():
        loss = compute_loss(model, x, y)
    scaler.scale(loss / window).backward()
    return loss.detach()


def train_step(net: nn.Module, train_net: nn.Module, batches: list, plan: PrecisionPlan, scaler: torch.amp.GradScaler,
               optimizer: torch.optim.Optimizer, schedule: LRSchedule, max_grad_norm: float, parallel: str,
               device: torch.device) -> torch.Tensor:
    """One optimizer step over the micro-batches of an accumulation window, reading nothing back to the
    host (where AdamW is fused). Returns the step's record (RECORD) as one device tensor."""
    loss_sum = 0.0
    for i, batch in enumerate(batches):
        with gradient_sync(net, parallel, sync=i == len(batches) - 1):  # all-reduce once per window
            loss_sum = loss_sum + _training_step(train_net, batch, plan, scaler, len(batches))
    scaler.unscale_(optimizer)  # clip true gradients, not scaled ones
    grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(net.parameters(), max_grad_norm))
    nonfinite = ~torch.isfinite(grad_norm)
    lr_used, scale_before = schedule.lr.clone(), loss_scale(scaler, device)
    optimizer_step(optimizer, scaler, nonfinite)
    scaler.update()
    # fp16: a lower scale after update() means the GradScaler skipped the step. fp32/bf16 have no
    # scaler, so non-finite gradients skip it above rather than corrupt the weights.
    skipped = loss_scale(scaler, device) < scale_before if plan.use_scaler else nonfinite
    schedule.step(skipped)
    optimizer.zero_grad(set_to_none=True)
    values = {"loss": loss_sum.double() / len(batches),  # as float(loss_sum) / window would be
              "grad_norm": grad_norm, "loss_scale": scale_before, "skipped": skipped, "nonfinite_grads": nonfinite,
              "lr": lr_used}
    return torch.stack([values[name].double() for name in RECORD])


@torch.no_grad()
def evaluate(model: nn.Module, data, plan: PrecisionPlan, device, batch_size: int, seq_len: int, n_batches: int,
             r: Ranks = Ranks()) -> float:
    """Mean loss over fixed validation batches, in the run's precision. Under torchrun each rank takes
    its rows of the same global batches, and the mean is over all of them."""
    was_training = model.training
    model.eval()
    losses = []
    for x, y in data.eval_batches(n_batches, batch_size * r.world, seq_len):
        with plan.autocast():
            losses.append(compute_loss(model, rows(x, r).to(device), rows(y, r).to(device)).item())
    model.train(was_training)
    return mean_over_ranks(sum(losses) / len(losses), r)


@contextmanager
def stop_requests():
    """Ctrl-C or SIGTERM (a Colab or scheduler stop) during training asks the loop to stop after the
    current step, checkpoint and return, instead of dying mid-step; a second Ctrl-C interrupts at once.
    Yields a function that says whether a stop was asked. Python allows handlers only in the main
    thread; elsewhere signals keep their usual effect."""
    asked = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def handler(signum, frame):
        if asked and signum == signal.SIGINT:
            raise KeyboardInterrupt
        asked.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(asked)
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def largest_activation(model: nn.Module, x: torch.Tensor, plan: PrecisionPlan) -> dict:
    """The layer whose output is the first non-finite one, else the largest in magnitude, under `plan`:
    where to look when a run overflows."""
    outputs = layer_outputs(model, x, plan)
    peaks = {name: float(t.abs().max()) if t.numel() else 0.0 for name, t in outputs.items()}
    name = next((n for n, v in peaks.items() if not math.isfinite(v)), None) or max(peaks, key=peaks.get)
    return {"layer": name, "max_abs": peaks[name]}


def _stop_diagnosis(reason: str, step: int, at: int, count: int, records: list, net: nn.Module, x: torch.Tensor,
                    plan: PrecisionPlan) -> dict:
    """Why the run stopped at `step`: where it broke (`at`: the NaN loss, or the last of `count` skipped
    steps in a row), the loss scale trajectory and the layer with the largest activation. The loop sees
    records at log points, so `at` may come a few steps before the step the run stopped at."""
    scales = [rec["loss_scale"] for rec in records[-30:]]
    act = largest_activation(net, x, plan)
    where = (f"the first non-finite output is {act['layer']!r}" if not math.isfinite(act["max_abs"])
             else f"the largest activation is {act['layer']!r} at {act['max_abs']:.3g}")
    seen = "" if at == step else f" (seen at the log point of step {step})"
    if reason == "overflow_storm":
        message = (f"overflow storm: {count} optimizer steps in a row skipped for non-finite gradients (to step {at})"
                   f"{seen}; loss scale {scales[0]:g} -> {scales[-1]:g}; {where} under {plan.precision}. Use bf16-mixed, "
                   "or find the layer whose activations outgrow fp16's 65504 (Tier 2 AMP readiness).")
    else:
        message = (f"the training loss went NaN/Inf at step {at}{seen} in {precision_label(plan.precision)}; {where}. "
                   "Lower lr, check Tier 1 numerics.")
    return {"reason": reason, "step": step, "message": message, "loss_scales": scales, "largest_activation": act}


def compile_model(net: nn.Module, data, plan: PrecisionPlan, device, global_batch: int, seq_len: int, r: Ranks, seed: int):
    """torch.compile(net), compiled right away on one batch (forward and backward under the run's autocast)
    so that compile time is measured apart from step time. A model that fails to compile stays eager, with
    the reason recorded, never a crash. RNG states and gradients are put back: the run sees the same numbers."""
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    x, y = (rows(t, r).to(device) for t in data.get_batch("train", global_batch, seq_len, torch.Generator().manual_seed(seed + 1)))
    fast = torch.compile(net)
    breaks_before = sum(dynamo_counters["graph_break"].values())
    t0 = time.perf_counter()
    try:
        with plan.autocast():
            loss = compute_loss(fast, x, y)
        loss.backward()
        synchronize(device)
        info = {"compiled": True, "compile_time_s": time.perf_counter() - t0, "fallback": None,
                "graph_breaks": sum(dynamo_counters["graph_break"].values()) - breaks_before}
    except Exception as e:  # no C++ compiler, an op the backend cannot lower, ...: train eager instead
        fast = net
        info = {"compiled": False, "compile_time_s": time.perf_counter() - t0, "graph_breaks": None,
                "fallback": f"torch.compile failed, so this run is eager: {type(e).__name__}: {str(e).strip()[:300]}"}
    net.zero_grad(set_to_none=True)
    torch.set_rng_state(rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state(cuda_rng, device)
    return fast, info


def test_fine_tuning(model, *, data=None, precision="auto", use_amp=None, steps: int = 200, epochs=None,
                     batch_size: int = 16, seq_len: int = 64, lr: float = 3e-3, weight_decay: float = 0.01,
                     warmup_steps=None, grad_accum_steps: int = 1, max_grad_norm: float = 1.0, seed: int = 0,
                     device=None, callbacks=(), eval_interval: int = 50, eval_batches: int = 8,
                     progress: bool = True, plan: PrecisionPlan = None, checkpoint_dir=None, checkpoint_every: int = 0,
                     keep_checkpoints: int = 3, resume: bool = False, max_skipped_in_a_row=20,
                     parallel: str = "ddp", compile: bool = False, log_every: int = 0) -> FineTuneResult:
    """Fine-tune `model` (an nn.Module or a load_model spec) and record every optimizer step.

    precision: 'auto' | '32' | '16-mixed' | 'bf16-mixed'; use_amp: the seed's flag (see resolve_precision).
    steps: optimizer steps; epochs (if given) overrides it as passes over the training tokens.
    grad_accum_steps: micro-batches per optimizer step. callbacks: objects with an optional
    on_step_end(record) method. plan: a ready PrecisionPlan, which overrides precision and use_amp.
    checkpoint_dir: where checkpoints go (utils.training.checkpoint): on Ctrl-C/SIGTERM, and every
    `checkpoint_every` steps and at the end (0: only on a stop), keeping the newest `keep_checkpoints`. resume: continue
    from the newest valid checkpoint there (else a fresh run clears the folder). max_skipped_in_a_row:
    skipped steps in a row that stop the run as an overflow storm (None: never stop, as speed trials
    want). Under torchrun, batch_size is per rank and `parallel` is 'ddp' or 'fsdp2' (utils.train).
    compile: train the torch.compile'd model (compiled before the first step; see compile_model).
    log_every: optimizer steps between reads of the per-step records from the device (0: every step on a
    CPU, every LOG_EVERY_ACCELERATOR on a GPU; see utils.training.steps). Progress, callbacks (on_step_end,
    once per step, in order) and the stop checks run at these reads, at evaluations and checkpoints, and at
    the end; under torchrun a Ctrl-C is honoured at the next of them, in one process after the current step.
    """
    for name, value in (("steps", steps), ("batch_size", batch_size), ("seq_len", seq_len),
                        ("grad_accum_steps", grad_accum_steps), ("eval_interval", eval_interval),
                        ("keep_checkpoints", keep_checkpoints)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    for name, value, zero in (("eval_batches", eval_batches, "turns it off"), ("checkpoint_every", checkpoint_every,
                              "turns it off"), ("log_every", log_every, "the device's default")):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer (0: {zero}); got {value!r}")
    for name, value, zero_ok in (("lr", lr, False), ("weight_decay", weight_decay, True),
                                 ("max_grad_norm", max_grad_norm, False), ("epochs", 1 if epochs is None else epochs, False)):
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or value < 0 or (value == 0 and not zero_ok)):
            raise ValueError(f"{name} must be a finite number {'>= 0' if zero_ok else '> 0'}; got {value!r}")
    if warmup_steps is not None and (not isinstance(warmup_steps, int) or warmup_steps < 0):
        raise ValueError(f"warmup_steps must be a non-negative integer (or None: 10% of the steps); got {warmup_steps!r}")
    if max_skipped_in_a_row is not None and (not isinstance(max_skipped_in_a_row, int) or max_skipped_in_a_row < 1):
        raise ValueError(f"max_skipped_in_a_row must be a positive integer (or None: never stop); got {max_skipped_in_a_row!r}")
    if (resume or checkpoint_every) and not checkpoint_dir:
        raise ValueError("resume and checkpoint_every need a checkpoint_dir to read and write checkpoints")
    if parallel not in PARALLEL_CHOICES:
        raise ValueError(f"parallel must be one of {PARALLEL_CHOICES}; got {parallel!r}")
    r = ranks()
    parallel = parallel if r.world > 1 else "none"
    device = resolve_device(device)
    plan = plan or resolve_precision(precision, device, use_amp)
    torch.manual_seed(seed + r.rank)  # dropout masks, if the model has any (each rank its own)
    model = convert_for(plan, load_model(model).to(device)).train()  # fp8: float8 Linear layers
    data = load_task_data(model, data, seq_len)

    # Micro-batches to run, and optimizer steps as windows of grad_accum_steps (the last may be partial).
    # Under torchrun every rank draws the same global batch (batch_size x world) and keeps its rows.
    global_batch = batch_size * r.world
    if epochs is not None:
        micro_total = max(1, math.ceil(epochs * data.train_tokens / (global_batch * seq_len)))
    else:
        micro_total = steps * grad_accum_steps
    total_steps = math.ceil(micro_total / grad_accum_steps)
    warmup_steps = max(1, total_steps // 10) if warmup_steps is None else warmup_steps
    corpus = getattr(data, "source", "classification")
    config = {"steps": total_steps, "micro_batches": micro_total, "batch_size": batch_size, "seq_len": seq_len,
              "lr": lr, "grad_accum_steps": grad_accum_steps, "seed": seed, "device": str(device),
              "corpus": corpus, "corpus_fingerprint": getattr(data, "fingerprint", None), "world_size": r.world,
              "parallel": parallel}
    # What a checkpoint must match to be resumed here: the same model, precision, data and schedule.
    identity = {"model": structure_digest(model), "precision": plan.precision, "data": f"{corpus}:{config['corpus_fingerprint']}",
                **{k: config[k] for k in ("steps", "micro_batches", "batch_size", "seq_len", "grad_accum_steps", "seed",
                                          "world_size", "parallel")},
                "lr": lr, "weight_decay": weight_decay, "warmup_steps": warmup_steps, "max_grad_norm": max_grad_norm}

    net = wrap(model, parallel, plan, device) if r.world > 1 else model
    optimizer = adamw(_param_groups(net, weight_decay), lr, device, sharded=parallel == "fsdp2")
    config["optimizer"] = "AdamW (fused)" if optimizer.defaults["fused"] else "AdamW (foreach)"
    train_net = net  # what the training steps call: the compiled model when asked; evaluation stays eager
    if compile:
        train_net, config["compile"] = compile_model(net, data, plan, device, global_batch, seq_len, r, seed)
    schedule = LRSchedule(optimizer, lr, warmup_cosine(warmup_steps, total_steps), total_steps, device)
    scaler = grad_scaler(plan, parallel)
    generator = torch.Generator().manual_seed(seed)
    tokens_per_micro = global_batch * seq_len

    def run_eval(step):  # eval_batches=0 turns evaluation off (the benchmark times steps alone)
        if eval_batches == 0:
            return []
        loss = evaluate(net, data, plan, device, batch_size, seq_len, eval_batches, r)
        return [{"step": step, "eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}]

    def checkpoint(step):  # a collective under FSDP2: every rank gathers, rank 0 writes
        model_state, optimizer_state = training_state(net, optimizer)
        rng = {"torch": gather(torch.get_rng_state(), r), "data": generator.get_state(),
               "cuda": gather(torch.cuda.get_rng_state(device), r) if device.type == "cuda" else []}
        if r.main:
            saved.append(str(save_checkpoint(checkpoint_dir, {
                "identity": identity, "config": config, "step": step, "micro_done": micro_done, "model": model_state,
                "optimizer": optimizer_state, "scheduler": schedule.state_dict(), "scaler": scaler.state_dict(),
                "rng": rng, "history": records, "evals": evals}, keep_checkpoints)))

    records, evals, saved, notes, resumed_from, start, micro_done = [], None, [], [], None, 0, 0
    if checkpoint_dir and resume:
        state, path, notes = load_latest(checkpoint_dir, identity)
        for note in notes if r.main else ():
            print(note)
        if state is not None:
            load_training_state(net, optimizer, state["model"], state["optimizer"])
            schedule.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            generator.set_state(state["rng"]["data"])
            torch.set_rng_state(state["rng"]["torch"][r.rank])
            if device.type == "cuda" and state["rng"]["cuda"]:
                torch.cuda.set_rng_state(state["rng"]["cuda"][r.rank], device)
            start, micro_done, records, evals, resumed_from = (state["step"], state["micro_done"], state["history"],
                                                               state["evals"], str(path))
    elif checkpoint_dir and r.main:
        clear_checkpoints(checkpoint_dir)
    if evals is None:
        evals = run_eval(0)

    stop, log_every = None, log_interval(log_every, device)
    in_a_row = sum(1 for _ in itertools.takewhile(lambda rec: rec["skipped"], reversed(records)))
    pending, windows, timer = [], [], StepTimer(device)  # steps whose records are still on the device
    bar = tqdm(total=total_steps, initial=start, desc=f"fine-tune [{plan.precision}]", disable=not progress or not r.main,
               leave=False)
    loop_start = time.perf_counter()
    with stop_requests() as stop_asked:
        for step in range(start + 1, total_steps + 1):
            window = min(grad_accum_steps, micro_total - micro_done)
            timer.start()
            batches = [tuple(to_device(rows(t, r), device) for t in data.get_batch("train", global_batch, seq_len, generator))
                       for _ in range(window)]
            pending.append(train_step(net, train_net, batches, plan, scaler, optimizer, schedule, max_grad_norm, parallel,
                                      device))
            timer.stop()
            windows.append(window)
            micro_done += window
            evaluating = step % eval_interval == 0 or step == total_steps
            periodic = checkpoint_every and (step % checkpoint_every == 0 or step == total_steps)
            if not (step % log_every == 0 or evaluating or periodic or step == total_steps
                    or (r.world == 1 and stop_asked())):  # under torchrun, ranks agree on a stop at log points
                continue

            # A log point: the pending records in one transfer (the loss averaged over ranks), then what
            # needs them: records, callbacks, evaluation, progress, the stop checks, the checkpoint.
            values, loss = torch.stack(pending), RECORD.index("loss")
            values[:, loss] = mean_over_ranks(values[:, loss], r)
            first, broke_at, storm = step - len(pending) + 1, None, None
            for n, (row, window, dt) in enumerate(zip(values.tolist(), windows, timer.read())):
                record = {"step": first + n, **dict(zip(RECORD, row)), "micro_batches": window, "step_time_s": dt,
                          "tokens_per_s": window * tokens_per_micro / dt}
                record["skipped"], record["nonfinite_grads"] = bool(record["skipped"]), bool(record["nonfinite_grads"])
                records.append(record)
                for cb in callbacks if r.main else ():
                    if hasattr(cb, "on_step_end"):
                        cb.on_step_end(record)
                in_a_row = in_a_row + 1 if record["skipped"] else 0
                if max_skipped_in_a_row and in_a_row >= max_skipped_in_a_row:
                    storm = (in_a_row, record["step"])
                if broke_at is None and not math.isfinite(record["loss"]):
                    broke_at = record["step"]
            pending, windows = [], []
            if evaluating:
                evals += run_eval(step)
            bar.update(step - first + 1)
            bar.set_postfix(loss=f"{records[-1]['loss']:.3f}", refresh=False)

            # Stop early: asked to (any rank), or training broke (decided from values every rank shares).
            if mean_over_ranks(float(stop_asked()), r) > 0:
                stop = {"reason": "interrupted", "step": step,
                        "message": f"interrupted at step {step} of {total_steps}"
                        + (f"; resume=True continues from the checkpoint in {checkpoint_dir}" if checkpoint_dir
                           else " (no checkpoint_dir, so nothing was saved to resume from)")}
            elif max_skipped_in_a_row and broke_at is not None and not plan.use_scaler:
                stop = _stop_diagnosis("nonfinite_loss", step, broke_at, 1, records, net, batches[-1][0], plan)
            elif storm:
                stop = _stop_diagnosis("overflow_storm", step, storm[1], storm[0], records, net, batches[-1][0], plan)
            if checkpoint_dir and (periodic or (stop and stop["reason"] == "interrupted")):
                checkpoint(step)
            if stop:
                break
    bar.close()
    eval_history = pd.DataFrame(evals, columns=["step", "eval_loss", "perplexity"])
    checkpoints = {"dir": str(checkpoint_dir) if checkpoint_dir else None, "saved": saved, "resumed_from": resumed_from,
                   "notes": notes}
    return FineTuneResult(pd.DataFrame(records), eval_history, plan, model, config, stop, checkpoints,
                          time.perf_counter() - loop_start)


test_fine_tuning.__test__ = False  # a library function, not a pytest test
