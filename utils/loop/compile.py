"""torch.compile for the loop: compiled before the first step, so compile time is measured apart from step
time; a model that fails to compile trains eager, with the reason recorded, never a crash."""

import time

import torch
import torch.nn as nn
from torch._dynamo.utils import counters as dynamo_counters

from utils.loop.distributed import Ranks, rows
from utils.models import compute_loss
from utils import device as dev
from utils.precision import PrecisionPlan


def compile_model(net: nn.Module, data, plan: PrecisionPlan, device, global_batch: int, seq_len: int, r: Ranks, seed: int):
    """torch.compile(net), compiled right away on one batch (forward and backward under the run's autocast).
    RNG states and gradients are put back: the run sees the same numbers. Returns (model, what happened)."""
    rng, cuda_rng = torch.get_rng_state(), dev.rng_state(device)
    batch = data.get_batch("train", global_batch, seq_len, torch.Generator().manual_seed(seed + 1))
    x, y = (rows(t, r).to(device) for t in batch)
    fast = torch.compile(net)
    breaks_before = sum(dynamo_counters["graph_break"].values())
    t0 = time.perf_counter()
    try:
        with plan.autocast():
            loss = compute_loss(fast, x, y)
        loss.backward()
        dev.synchronize(device)
        info = {"compiled": True, "compile_time_s": time.perf_counter() - t0, "fallback": None,
                "graph_breaks": sum(dynamo_counters["graph_break"].values()) - breaks_before}
    except Exception as e:  # no C++ compiler, an op the backend cannot lower, ...: train eager instead
        fast = net
        info = {"compiled": False, "compile_time_s": time.perf_counter() - t0, "graph_breaks": None,
                "fallback": f"torch.compile failed, so this run is eager: {type(e).__name__}: {str(e).strip()[:300]}"}
    net.zero_grad(set_to_none=True)
    torch.set_rng_state(rng)
    dev.set_rng_state(cuda_rng, device)
    return fast, info
