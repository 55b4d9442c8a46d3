"""The optimizer step's bookkeeping, kept on the device so that a step never waits for the host.

On a GPU, reading a number back (float(loss), bool(finite), scaler.get_scale()) makes Python wait until
every queued kernel has run, and the device then idles while Python prepares the next step: on a small
model that is most of the time. So a step's record (loss, gradient norm, loss scale, skipped) stays on
the device and the loop reads the records in one transfer at its log points; the LR schedule is a table
on the device, indexed by a device count of the steps that really happened; a step with non-finite
gradients is skipped inside the fused AdamW kernel (its found_inf argument), as the GradScaler already
does for fp16; and steps are timed with CUDA events. A CPU runs the same code: there every op has
finished when it returns, so the wall clock times a step and a read costs nothing.

One exception: an AdamW that is not fused (FSDP2's sharded parameters, devices without the kernel)
cannot skip a step by itself, so there the skip is decided on the host, one read per step.
"""

import math
import time

import torch

# The record of one optimizer step, as one row of a device tensor: read back in this order.
RECORD = ("loss", "lr", "grad_norm", "loss_scale", "skipped", "nonfinite_grads")
LOG_EVERY_ACCELERATOR = 10  # steps between reads where a read stalls the device


def log_interval(log_every: int, device: torch.device) -> int:
    """Steps between reads of the records: log_every, or (0) every step on a CPU, where a read costs
    nothing, and every LOG_EVERY_ACCELERATOR steps on a GPU, where each read makes the host wait."""
    return log_every or (1 if device.type == "cpu" else LOG_EVERY_ACCELERATOR)


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.1):
    """LR multiplier: linear warm-up to 1, then cosine decay to min_ratio at total_steps."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


class LRSchedule:
    """lr x factor(n), n the optimizer steps that really happened (a skipped step does not advance it),
    as a table on the device indexed there. A fused AdamW reads the LR tensor itself; another optimizer
    is given it as a number (a host read, on the path that reads each step anyway)."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, factor, total_steps: int, device: torch.device):
        # CUDA's fused kernel reads a float32 LR; the CPU's reads a double, as it would a Python float.
        dtype = torch.float32 if device.type == "cuda" else torch.float64
        self.table = torch.tensor([lr * factor(n) for n in range(total_steps + 1)], dtype=dtype, device=device)
        self.applied = torch.zeros((), dtype=torch.long, device=device)
        self.lr = self.table[0].clone()
        self.optimizer, self.on_device = optimizer, bool(optimizer.defaults.get("fused"))
        self._hand_over()

    def _hand_over(self):
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr if self.on_device else float(self.lr)

    def step(self, skipped: torch.Tensor):
        self.applied += (~skipped).long()
        self.lr.copy_(torch.take(self.table, self.applied))
        if not self.on_device:
            self._hand_over()

    def state_dict(self) -> dict:
        return {"applied": int(self.applied)}

    def load_state_dict(self, state: dict):
        """After the optimizer's own load_state_dict, which replaces the LR in its groups."""
        self.applied.fill_(state["applied"])
        self.lr.copy_(self.table[state["applied"]])
        self._hand_over()


def loss_scale(scaler: torch.amp.GradScaler, device: torch.device) -> torch.Tensor:
    """The GradScaler's current scale as a device tensor, without the host read get_scale() makes
    (1 when the scaler is off, as get_scale() says). Read after the step's first scaler.scale()."""
    if scaler.is_enabled():
        return scaler._scale.clone()  # the scale tensor itself: GradScaler keeps it on the device
    return torch.ones((), device=device)


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, nonfinite: torch.Tensor):
    """scaler.step, where a step with non-finite gradients is skipped without a host read when AdamW is
    fused: the GradScaler hands its found_inf to the kernel for fp16, and for fp32/bf16 (no scaler) the
    flag is handed over here the same way. An unfused AdamW reads the flag on the host."""
    if scaler.is_enabled():
        scaler.step(optimizer)
    elif optimizer.defaults.get("fused"):
        optimizer.found_inf = nonfinite.float()  # 1: the kernel leaves weights and moments untouched
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not bool(nonfinite):
        optimizer.step()


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch onto the device without making the host wait (pinned memory, asynchronous copy)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


class StepTimer:
    """Per-step times, read at log points: CUDA events on a GPU (the device's own clock; recording one
    does not wait), the wall clock elsewhere."""

    def __init__(self, device: torch.device):
        self.device, self.spans = device, []

    def _mark(self):
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def start(self):
        self._begun = self._mark()

    def stop(self):
        self.spans.append((self._begun, self._mark()))

    def read(self) -> list:
        """Seconds of each step since the last read (on a GPU, waits for the last one to finish)."""
        if self.device.type == "cuda":
            self.spans[-1][1].synchronize()
            times = [begun.elapsed_time(end) / 1000 for begun, end in self.spans]
        else:
            times = [end - begun for begun, end in self.spans]
        self.spans = []
        return times
