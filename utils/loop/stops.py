"""How a fine-tuning run ends early, and what it says: Ctrl-C or SIGTERM (interrupted, resumable), a NaN/Inf
loss, or an overflow storm (skipped steps in a row), each with the step, the loss-scale trajectory and the
layer to look at. One form for all: a stop dict {reason, step, message, ...} on the run's result."""

import math
import signal
import threading
from contextlib import contextmanager

import torch
import torch.nn as nn

from utils.measure import largest_activation
from utils.precision import BF16, PrecisionPlan, bf16_native, label

INTERRUPTED, NONFINITE_LOSS, OVERFLOW_STORM = "interrupted", "nonfinite_loss", "overflow_storm"


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


def interrupted(step: int, total_steps: int, checkpoint_dir) -> dict:
    return {"reason": INTERRUPTED, "step": step,
            "message": f"interrupted at step {step} of {total_steps}"
            + (f"; resume=True continues from the checkpoint in {checkpoint_dir}" if checkpoint_dir
               else " (no checkpoint_dir, so nothing was saved to resume from)")}


def diagnosis(reason: str, step: int, at: int, count: int, records: list, net: nn.Module, x: torch.Tensor,
              plan: PrecisionPlan) -> dict:
    """Why the run stopped at `step`: where it broke (`at`: the NaN loss, or the last of `count` skipped
    steps in a row), the loss scale trajectory and the layer with the largest activation. The loop sees
    records at log points, so `at` may come a few steps before the step the run stopped at."""
    scales = [rec["loss_scale"] for rec in records[-30:]]
    act = largest_activation(net, x, plan)
    where = (f"the first non-finite output is {act['layer']!r}" if not math.isfinite(act["max_abs"])
             else f"the largest activation is {act['layer']!r} at {act['max_abs']:.3g}")
    seen = "" if at == step else f" (seen at the log point of step {step})"
    if reason == OVERFLOW_STORM:
        message = (f"overflow storm: {count} optimizer steps in a row skipped for non-finite gradients (to step {at})"
                   f"{seen}; loss scale {scales[0]:g} -> {scales[-1]:g}; {where} under {plan.precision}. "
                   + (f"Use {BF16} (this device runs it natively), or find" if bf16_native(x.device) else "Find")
                   + " the layer whose activations outgrow fp16's 65504 (Tier 2 AMP readiness).")
    else:
        message = (f"the training loss went NaN/Inf at step {at}{seen} in {label(plan.precision)}; {where}. "
                   "Lower lr, check Tier 1 numerics.")
    return {"reason": reason, "step": step, "message": message, "loss_scales": scales, "largest_activation": act}
