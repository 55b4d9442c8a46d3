"""How a fine-tuning run ends early, and what it says: Ctrl-C or SIGTERM (interrupted, resumable), a NaN/Inf loss, or an
overflow storm (skipped steps in a row), each with the step, the loss-scale trajectory and the layer to look at. One form
for all: a stop dict {reason, step, message, ...} on the run's result."""

import math
import signal
import threading
import time
from contextlib import contextmanager

import torch
import torch.nn as nn

from utils.measure import largest_activation
from utils.precision import PrecisionPlan, instead_here, label

INTERRUPTED, NONFINITE_LOSS, OVERFLOW_STORM = "interrupted", "nonfinite_loss", "overflow_storm"
STOP_WINDOW_S = 0.5  # stop signals closer together than this are one stop (see StopSignals)
FIRST, SAME, AGAIN = "first", "same", "again"


class StopSignals:
    """A process's stop signals, told apart by when they come: schedulers send one stop more than once (GNU timeout to the
    command then its group, Slurm and systemd to every process), a key pressed twice repeats itself. Within STOP_WINDOW_S
    of the first it is that same stop; only a later, separate one asks to stop at once."""

    def __init__(self):
        self.at = None

    def take(self) -> str:
        """FIRST for the first signal, SAME for one within the window of it, AGAIN for a later one."""
        now = time.monotonic()
        if self.at is None:
            self.at = now
            return FIRST
        return SAME if now - self.at <= STOP_WINDOW_S else AGAIN


_SIGNALS = StopSignals()  # this process's: the kernel's SIGTERM handler and the training loop's see the same stop


@contextmanager
def stop_requests():
    """Ctrl-C or SIGTERM during training asks the loop to stop after the current step, checkpoint and return, instead of
    dying mid-step; a later, separate Ctrl-C interrupts at once (StopSignals), a later SIGTERM never (the same stop relayed
    by a runner, on Ray seconds later; SIGKILL stops at once). Yields whether a stop was asked. Handlers only in the main
    thread (Python's rule); elsewhere signals keep their usual effect."""
    global _SIGNALS
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    _SIGNALS = signals = StopSignals()  # a stop before this run (a cell stopped earlier) is not this run's

    def handler(signum, frame):
        if signals.take() == AGAIN and signum == signal.SIGINT:
            raise KeyboardInterrupt

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: signals.at is not None
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def sigterm_as_ctrl_c():
    """In a notebook kernel SIGTERM acts as Ctrl-C does at that moment: in training the loop checkpoints and returns, another
    cell raises KeyboardInterrupt, an idle kernel ignores it. A SIGTERM after the first is that stop again (the scheduler's
    and the runner's copies): it never interrupts the cells that record and show the stopped run."""
    def handler(signum, frame):
        if _SIGNALS.take() != FIRST:
            return
        ctrl_c = signal.getsignal(signal.SIGINT)  # the kernel's own: default_int_handler in a cell, ignored when idle
        if callable(ctrl_c):
            ctrl_c(signal.SIGINT, frame)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def status(stop) -> str:
    """A run's verdict from how it ended: interrupted warns (it resumes), any other stop fails, none passes."""
    return "pass" if not stop else "warn" if stop["reason"] == INTERRUPTED else "fail"


def interrupted(step: int, total_steps: int, checkpoint_dir) -> dict:
    return {"reason": INTERRUPTED, "step": step,
            "message": f"interrupted at step {step} of {total_steps}"
            + (f"; resume=True continues from the checkpoint in {checkpoint_dir}" if checkpoint_dir
               else " (no checkpoint_dir, so nothing was saved to resume from)")}


def diagnosis(reason: str, step: int, at: int, count: int, records: list, net: nn.Module, x: torch.Tensor,
              plan: PrecisionPlan) -> dict:
    """Why the run stopped at `step` (seen at a log point): where it broke (`at`: the NaN loss, or the last of `count` skipped
    steps in a row), the loss scale trajectory and the layer with the largest activation."""
    scales = [rec["loss_scale"] for rec in records[-30:]]
    act = largest_activation(net, x, plan)
    where = (f"the first non-finite output is {act['layer']!r}" if not math.isfinite(act["max_abs"])
             else f"the largest activation is {act['layer']!r} at {act['max_abs']:.3g}")
    seen = "" if at == step else f" (seen at the log point of step {step})"
    if reason == OVERFLOW_STORM:
        instead, largest = instead_here(plan.precision, x.device), plan.spec.largest
        outgrow = f"outgrow {plan.spec.short}'s {largest:g}" if largest else "overflow"
        message = (f"overflow storm: {count} optimizer steps in a row skipped for non-finite gradients (to step {at})"
                   f"{seen}; loss scale {scales[0]:g} -> {scales[-1]:g}; {where} under {plan.precision}. "
                   + (f"Use {instead} (this device runs it natively), or find" if instead else "Find")
                   + f" the layer whose activations {outgrow} (Tier 2 AMP readiness).")
    else:
        message = (f"the training loss went NaN/Inf at step {at}{seen} in {label(plan.precision)}; {where}. "
                   "Lower lr, check Tier 1 numerics.")
    return {"reason": reason, "step": step, "message": message, "loss_scales": scales, "largest_activation": act}
