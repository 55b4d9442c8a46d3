"""Timers: a matmul peak measured on this machine, the GEMM share of a step's op time (what autocast can
speed up, by Amdahl's law), and per-step times that never make the device wait."""

import time

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from utils.models import compute_loss
from utils.precision import PrecisionPlan, synchronize

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
