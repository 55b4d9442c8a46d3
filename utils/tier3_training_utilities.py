"""Tier 3: the fine-tuning loop. One code path for fp32 and mixed precision.

Per optimizer step:
  for each micro-batch of the accumulation window: forward + loss under autocast, scaled backward
  unscale_ -> clip -> scaler.step -> scaler.update
  a drop of the loss scale means the step was skipped (non-finite gradients); the LR schedule
  only advances on steps that really happened.
With precision '32' autocast and the GradScaler are disabled no-ops, so the fp32 and AMP runs differ
in precision alone and can be compared like with like.
"""

import math
import time
from dataclasses import dataclass, field

import pandas as pd
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from utils.models import compute_loss, load_model, load_task_data
from utils.training.amp_utils import PrecisionPlan, amp_summary, resolve_device, resolve_precision, synchronize


@dataclass
class FineTuneResult:
    """What a fine-tuning run did, step by step, and where it ended."""

    history: pd.DataFrame       # one row per optimizer step
    eval_history: pd.DataFrame  # one row per evaluation (step 0 is before training)
    plan: PrecisionPlan
    model: nn.Module = field(repr=False)
    config: dict = field(default_factory=dict)

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
                **amp_summary(self.history)}


def _param_groups(model: nn.Module, weight_decay: float):
    """AdamW groups: decay matrices (weights, embeddings), not biases or norm gains (1-D tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.1):
    """LR multiplier: linear warm-up to 1, then cosine decay to min_ratio at total_steps."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def _training_step(model: nn.Module, batch, plan: PrecisionPlan, scaler: torch.amp.GradScaler, window: int) -> float:
    """Forward and loss under autocast, then the scaled backward. The loss is divided by the
    accumulation window so the summed gradients are a mean. Returns the unscaled, undivided loss."""
    x, y = batch
    with plan.autocast():
        loss = compute_loss(model, x, y)
    scaler.scale(loss / window).backward()
    return loss.detach()


@torch.no_grad()
def evaluate(model: nn.Module, data, plan: PrecisionPlan, device, batch_size: int, seq_len: int, n_batches: int) -> float:
    """Mean loss over fixed validation batches, in the run's precision."""
    was_training = model.training
    model.eval()
    losses = []
    for x, y in data.eval_batches(n_batches, batch_size, seq_len):
        with plan.autocast():
            losses.append(compute_loss(model, x.to(device), y.to(device)).item())
    model.train(was_training)
    return sum(losses) / len(losses)


def test_fine_tuning(model, *, data=None, precision="auto", use_amp=None, steps: int = 200, epochs=None,
                     batch_size: int = 16, seq_len: int = 64, lr: float = 3e-3, weight_decay: float = 0.01,
                     warmup_steps=None, grad_accum_steps: int = 1, max_grad_norm: float = 1.0, seed: int = 0,
                     device=None, callbacks=(), eval_interval: int = 50, eval_batches: int = 8,
                     progress: bool = True, plan: PrecisionPlan = None) -> FineTuneResult:
    """Fine-tune `model` (an nn.Module or a load_model spec) and record every optimizer step.

    precision: 'auto' | '32' | '16-mixed' | 'bf16-mixed'; use_amp: the seed's flag (see resolve_precision).
    steps: optimizer steps; epochs (if given) overrides it as passes over the training tokens.
    grad_accum_steps: micro-batches per optimizer step. callbacks: objects with an optional
    on_step_end(record) method. plan: a ready PrecisionPlan, which overrides precision and use_amp.
    """
    for name, value in (("steps", steps), ("batch_size", batch_size), ("seq_len", seq_len),
                        ("grad_accum_steps", grad_accum_steps), ("eval_interval", eval_interval)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    if not isinstance(eval_batches, int) or eval_batches < 0:
        raise ValueError(f"eval_batches must be a non-negative integer (0 turns evaluation off); got {eval_batches!r}")
    for name, value, zero_ok in (("lr", lr, False), ("weight_decay", weight_decay, True),
                                 ("max_grad_norm", max_grad_norm, False), ("epochs", 1 if epochs is None else epochs, False)):
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or value < 0 or (value == 0 and not zero_ok)):
            raise ValueError(f"{name} must be a finite number {'>= 0' if zero_ok else '> 0'}; got {value!r}")
    if warmup_steps is not None and (not isinstance(warmup_steps, int) or warmup_steps < 0):
        raise ValueError(f"warmup_steps must be a non-negative integer (or None: 10% of the steps); got {warmup_steps!r}")
    device = resolve_device(device)
    plan = plan or resolve_precision(precision, device, use_amp)
    torch.manual_seed(seed)  # dropout masks, if the model has any
    model = load_model(model).to(device).train()
    data = load_task_data(model, data, seq_len)

    # Micro-batches to run, and optimizer steps as windows of grad_accum_steps (the last may be partial).
    if epochs is not None:
        micro_total = max(1, math.ceil(epochs * data.train_tokens / (batch_size * seq_len)))
    else:
        micro_total = steps * grad_accum_steps
    total_steps = math.ceil(micro_total / grad_accum_steps)
    warmup_steps = max(1, total_steps // 10) if warmup_steps is None else warmup_steps

    optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, total_steps))
    scaler = plan.grad_scaler()
    generator = torch.Generator().manual_seed(seed)
    tokens_per_micro = batch_size * seq_len

    def run_eval(step):  # eval_batches=0 turns evaluation off (the benchmark times steps alone)
        if eval_batches == 0:
            return []
        loss = evaluate(model, data, plan, device, batch_size, seq_len, eval_batches)
        return [{"step": step, "eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}]

    evals = run_eval(0)
    records = []
    micro_done = 0
    bar = tqdm(total=total_steps, desc=f"fine-tune [{plan.precision}]", disable=not progress, leave=False)
    for step in range(1, total_steps + 1):
        window = min(grad_accum_steps, micro_total - micro_done)
        synchronize(device)
        t0 = time.perf_counter()
        loss_sum = 0.0
        for _ in range(window):
            x, y = data.get_batch("train", batch_size, seq_len, generator)
            loss_sum = loss_sum + _training_step(model, (x.to(device), y.to(device)), plan, scaler, window)
        micro_done += window
        scaler.unscale_(optimizer)  # clip true gradients, not scaled ones
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        finite = bool(torch.isfinite(grad_norm))
        lr_used = optimizer.param_groups[0]["lr"]
        scale_before = scaler.get_scale()
        if plan.use_scaler or finite:
            scaler.step(optimizer)  # the scaler itself skips the step when it found inf/NaN
        scaler.update()
        # fp16: a lower scale after update() means the step was skipped. fp32/bf16 have no scaler,
        # so a non-finite gradient norm skips the step above rather than corrupt the weights.
        skipped = scaler.get_scale() < scale_before if plan.use_scaler else not finite
        if not skipped:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        dt = time.perf_counter() - t0
        record = {"step": step, "loss": float(loss_sum) / window, "lr": lr_used,
                  "grad_norm": float(grad_norm), "loss_scale": float(scale_before), "skipped": bool(skipped),
                  "nonfinite_grads": not finite, "micro_batches": window, "step_time_s": dt,
                  "tokens_per_s": window * tokens_per_micro / dt}
        records.append(record)
        for cb in callbacks:
            if hasattr(cb, "on_step_end"):
                cb.on_step_end(record)
        if step % eval_interval == 0 or step == total_steps:
            evals += run_eval(step)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
    bar.close()
    config = {"steps": total_steps, "micro_batches": micro_total, "batch_size": batch_size, "seq_len": seq_len,
              "lr": lr, "grad_accum_steps": grad_accum_steps, "seed": seed, "device": str(device),
              "corpus": getattr(data, "source", "classification"), "corpus_fingerprint": getattr(data, "fingerprint", None)}
    eval_history = pd.DataFrame(evals, columns=["step", "eval_loss", "perplexity"])
    return FineTuneResult(pd.DataFrame(records), eval_history, plan, model, config)


test_fine_tuning.__test__ = False  # a library function, not a pytest test
