"""Measurement, below the tiers and the loop: training FLOPs counted on the actual model, a matmul peak measured on this
machine, the GEMM share of a step (what autocast can speed up, by Amdahl's law), per-step timers that never make the device
wait, memory (activations saved for backward, parameter and optimizer state), statistics of repeated trials (a ratio of
medians with its bootstrap interval), and every layer's output under a precision."""

import math
import time

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from utils.models import compute_loss, get_logits
from utils import device as dev
from utils.precision import PrecisionPlan, fp32_plan, spec


def matmul_params(model: nn.Module) -> int:
    """Parameters that take part in matmuls (2-D weights not only used as embedding lookups); a weight tied between an
    embedding and the output layer counts once, as a matmul."""
    counted = {id(p): p.numel() for module in model.modules() if not isinstance(module, nn.Embedding)
               for p in module.parameters(recurse=False) if p.dim() >= 2}
    return sum(counted.values()) or sum(p.numel() for p in model.parameters())


def training_flops_per_token(model: nn.Module, seq_len: int):
    """The analytic count for this project's GPT layout: 6 N per token (forward 2N, backward 4N) plus attention's 12 * layers
    * seq_len * d_model (PaLM, appendix B); a cross-check of measured_flops_per_token. None without n_layer and d_model on
    the model's config: the formula would be a guess there."""
    cfg = getattr(model, "config", None)
    if not (hasattr(cfg, "n_layer") and hasattr(cfg, "d_model")):
        return None
    return 6 * matmul_params(model) + 12 * cfg.n_layer * seq_len * cfg.d_model


def _attention_flops(query, key, value, backward: bool = False) -> int:
    """FLOPs of softmax(q k^T) v over shapes (batch, heads, seq, dim), or of its backward (the scores again, then the
    gradients of the scores, v, q and k: torch's own count). Keys and values may have fewer heads than queries (grouped-query
    attention: Llama, Mistral, Qwen), each serving a group of query heads, so the work is the query heads'."""
    b, h, s_q, d = query
    s_k, d_v = key[-2], value[-1]
    return 2 * b * h * s_q * s_k * ((3 * d + 2 * d_v) if backward else (d + d_v))


def _sdpa_forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return _attention_flops(query, key, value)


def _sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return _attention_flops(query, key, value, backward=True)


# FlopCounterMode knows the CUDA attention kernels but not the CPU one, and its formula refuses grouped-query attention in
# versions users run (2.11): every SDPA kernel of this torch gets the formula above.
_SDPA_KERNELS = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
_ATTENTION_FLOPS = {**{getattr(torch.ops.aten, k): _sdpa_forward for k in _SDPA_KERNELS if hasattr(torch.ops.aten, k)},
                    **{getattr(torch.ops.aten, k + "_backward"): _sdpa_backward for k in _SDPA_KERNELS
                       if hasattr(torch.ops.aten, k + "_backward")}}


def measured_flops_per_token(model: nn.Module, batch) -> float:
    """Training FLOPs per token of the actual model, counted by torch's FlopCounterMode over one forward and backward of
    `batch`: right for any architecture, where a formula assumes one layout."""
    x, y = batch
    counter = FlopCounterMode(display=False, custom_mapping=_ATTENTION_FLOPS)
    with counter:
        compute_loss(model, x, y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / x.numel()


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """FLOP/s of a large square matmul in `dtype` on `device`: the practical ceiling for this run. A dtype the device only
    emulates (fp16 on most CPUs: ~2 GFLOP/s) gets a smaller problem, so this takes about `seconds`, not minutes."""
    def matmul_time(n):
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        a @ b  # warm-up
        dev.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        dev.synchronize(device)
        return time.perf_counter() - t0

    # The probe must be large enough that a GPU's launch overhead (~20 us) does not dominate it: a 512 probe on an
    # H200 extrapolated launch time and shrank fp16 and fp32 to 512, so their "peaks" were launch rates.
    n, probe = (8192, 2048) if device.type == "cuda" else (2048, 512)
    if matmul_time(probe) * (n / probe) ** 3 > seconds / 4:
        n = probe
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    dev.synchronize(device)
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
        if count % 4 == 0:
            dev.synchronize(device)
    dev.synchronize(device)
    return 2 * n ** 3 * count / (time.perf_counter() - t0)


# Where a training step's time goes, by aten op: what autocast speeds up (GEMMs and attention kernels), what it adds
# (dtype casts), the optimizer with the GradScaler's checks, and the rest (elementwise, norms, loss). On a GPU every op
# is synchronized to be timed, which inflates small ones: the shares are a profile, not a trace.
OP_KINDS = ("matmul_attention", "casts", "optimizer", "other")
GEMM_OPS = ("mm", "addmm", "bmm", "baddbmm", "addbmm")


def op_kind(name: str) -> str:
    if name in GEMM_OPS or "scaled_dot_product" in name or name.startswith("_flash_attention"):
        return "matmul_attention"
    if name in ("_to_copy", "copy_"):
        return "casts"
    if name.startswith(("_fused_adam", "_foreach_", "_amp_")):
        return "optimizer"
    return "other"


class _OpTimer(TorchDispatchMode):
    """Times every aten op run under it (synchronized on CUDA), by kind (OP_KINDS); unlike torch.profiler, prints nothing."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device, self.kinds = device, dict.fromkeys(OP_KINDS, 0.0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        dev.synchronize(self.device)
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        dev.synchronize(self.device)
        self.kinds[op_kind(func.overloadpacket.__name__)] += time.perf_counter() - t0
        return out


def op_time_shares(step, device: torch.device, repeats: int = 2) -> dict:
    """Each op kind's share of the aten op time of `repeats` calls of step() (a whole training step, warmed up by the
    caller): where the time goes, and so what autocast can gain (matmul_attention) and what it costs (casts)."""
    with _OpTimer(device) as timer:
        for _ in range(repeats):
            step()
    total = sum(timer.kinds.values())
    return {kind: t / total if total else float("nan") for kind, t in timer.kinds.items()}


def matmul_time_fraction(model: nn.Module, plan: PrecisionPlan, batch, repeats: int = 3) -> float:
    """Share of forward+backward op time spent in GEMMs and attention, over `repeats` passes: by Amdahl's law only this
    share speeds up under autocast."""
    x, y = batch
    compute_loss(model, x, y).backward()  # warm-up, untimed

    def step():
        with plan.autocast():
            loss = compute_loss(model, x, y)
        loss.backward()

    share = op_time_shares(step, x.device, repeats)["matmul_attention"]
    model.zero_grad(set_to_none=True)
    return share


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


# How saved_activation_bytes counts, as results record it.
ACTIVATION_BYTES_METHOD = ("saved-tensor hooks over one forward and loss: each storage once, parameters excluded; a "
                           "tensor subclass (torchao's Float8Tensor, a DTensor) counted by the plain tensors it holds")


def _storages(t: torch.Tensor) -> list:
    """(address, bytes) of each plain storage behind `t`. A tensor subclass keeps its data in inner tensors that
    __tensor_flatten__ names; its own storage may have no data pointer (torchao 0.10's Float8Tensor raises)."""
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return [s for name in names for s in _storages(getattr(t, name))]
    storage = t.untyped_storage()
    return [(storage.data_ptr(), storage.nbytes())]


def saved_activation_bytes(model: nn.Module, plan: PrecisionPlan, batch) -> int:
    """Bytes of tensors autograd saves for backward in one forward + loss (ACTIVATION_BYTES_METHOD). Meaningful
    on a CPU, where no allocator peak exists."""
    params = {ptr for p in model.parameters() for ptr, _ in _storages(p)}
    seen = {}

    def pack(t):
        seen.update((ptr, n) for ptr, n in _storages(t) if ptr not in params)
        return t

    x, y = batch
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), plan.autocast():
        loss = compute_loss(model, x, y)
    del loss
    return sum(seen.values())


# How peak_activation_bytes counts, as results record it.
PEAK_ACTIVATION_METHOD = ("the peak of tensor bytes alive at once during one forward and backward: every storage an aten "
                          "op creates, from its creation until it is freed (a dispatch mode, so it also sees what "
                          "activation checkpointing recomputes inside its blocks, which saved-tensor hooks cannot): "
                          "activations and a step's temporaries (autocast's weight copies, each weight's gradient "
                          "before it is added into its buffer); the weights, their views, the gradient buffers "
                          "(preallocated, accumulated in place) and the batch are not counted")


class _LiveBytes(TorchDispatchMode):
    """Bytes of the storages aten ops create, alive at once, and their peak: an allocator's peak, on any device."""

    def __init__(self, existing):
        super().__init__()
        self.alive, self.live, self.peak = {}, 0, 0
        self.existing = {t.untyped_storage().data_ptr() for t in existing}  # weights, their views, gradient buffers

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.alive.items() if ref.expired()]:
            self.live -= self.alive.pop(key)[1]
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or type(t) is not torch.Tensor:
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key not in self.alive and key not in self.existing:  # a new storage (a view of one is not)
                self.alive[key] = (StorageWeakRef(storage), storage.nbytes())
                self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        return out


def peak_activation_bytes(model: nn.Module, plan: PrecisionPlan, batch) -> int:
    """PEAK_ACTIVATION_METHOD over one forward, loss and backward of `model` under `plan`."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # accumulated in place: the gradients are not activations
    x, y = batch
    with _LiveBytes([*model.parameters(), *(p.grad for p in model.parameters()), x, y]) as counter:
        with plan.autocast():
            loss = compute_loss(model, x, y)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.peak


MIN_TRIALS_FOR_INTERVAL = 3  # fewer trials give a bootstrap interval of (almost) zero width: no interval at all


def bootstrap_ratio(numerator, denominator, n_resamples: int = 2000, seed: int = 0):
    """95% bootstrap interval of median(numerator) / median(denominator), resampling trials."""
    rng = np.random.default_rng(seed)
    num, den = np.asarray(numerator, float), np.asarray(denominator, float)
    ratios = [np.median(rng.choice(num, len(num))) / np.median(rng.choice(den, len(den))) for _ in range(n_resamples)]
    return float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))


def ratio_of_medians(numerator, denominator) -> dict:
    """median(numerator) / median(denominator) and its 95% bootstrap interval (None below MIN_TRIALS_FOR_INTERVAL trials)."""
    num, den = pd.Series(numerator, dtype=float), pd.Series(denominator, dtype=float)
    low, high = bootstrap_ratio(num, den) if len(num) >= MIN_TRIALS_FOR_INTERVAL else (None, None)
    return {"median": float(num.median() / den.median()), "ci_low": low, "ci_high": high}


def first_floating(output):
    """A module's output tensor: the output itself, or the first tensor of a tuple or list; None if not floating."""
    t = output if isinstance(output, torch.Tensor) else next(
        (o for o in (output if isinstance(output, (tuple, list)) else ()) if isinstance(o, torch.Tensor)), None)
    return t if t is not None and t.is_floating_point() else None


def layer_outputs(model: nn.Module, x: torch.Tensor, plan: PrecisionPlan) -> dict:
    """Each leaf module's first floating output under `plan`, in execution order, as fp32 copies."""
    outputs, handles = {}, []
    for name, m in model.named_modules():
        if name and not list(m.children()):
            def hook(module, args, output, name=name):
                t = first_floating(output)
                if t is not None and name not in outputs:
                    outputs[name] = t.detach().float()
            handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad(), plan.autocast():
            outputs["<output>"] = get_logits(model(x)).detach().float()
    finally:
        for h in handles:
            h.remove()
    return outputs


def beyond_range(precision: str) -> str:
    """layer_errors' column that says a layer's fp32 peak passes the precision's largest value ('beyond_fp16_range')."""
    return f"beyond_{spec(precision).short}_range"


def layer_errors(ref: dict, runs: dict) -> pd.DataFrame:
    """One row per layer: its fp32 peak, and per precision its relative error, whether it went non-finite and, for a
    precision with a largest value, whether the fp32 peak passes it (beyond_range)."""
    rows = []
    for name, r in ref.items():
        row = {"layer": name, "fp32_max_abs": float(r.abs().max()) if r.numel() else 0.0}
        for p, outs in runs.items():
            o = outs.get(name)
            err = float("nan") if o is None or o.shape != r.shape else float((o - r).norm() / r.norm().clamp(min=1e-12))
            row[f"rel_error_{p}"] = err if math.isfinite(err) else float("inf")
            row[f"nonfinite_{p}"] = bool(o is not None and not torch.isfinite(o).all())
        rows.append(row)
    df = pd.DataFrame(rows)
    for p in runs:
        if spec(p).largest:
            df[beyond_range(p)] = df["fp32_max_abs"] > spec(p).largest
    return df


def layer_comparison(model: nn.Module, x: torch.Tensor, plans) -> tuple:
    """Each leaf layer's output on batch x in fp32 and under each plan (on the copy it prepares where it converts the
    model; else on the model, which then needs no second copy's memory), in eval mode, the model left as it was:
    (the fp32 outputs, layer_errors' table)."""
    was_training = model.training
    model.eval()
    try:
        ref = layer_outputs(model, x, fp32_plan(x.device))
        runs = {plan.precision: layer_outputs(plan.prepare(model) if plan.converts else model, x, plan) for plan in plans}
    finally:
        model.train(was_training)
    return ref, layer_errors(ref, runs)


def largest_activation(model: nn.Module, x: torch.Tensor, plan: PrecisionPlan) -> dict:
    """The layer whose output is the first non-finite one, else the largest in magnitude, under `plan`:
    where to look when a run overflows."""
    outputs = layer_outputs(model, x, plan)
    peaks = {name: float(t.abs().max()) if t.numel() else 0.0 for name, t in outputs.items()}
    name = next((n for n, v in peaks.items() if not math.isfinite(v)), None) or max(peaks, key=peaks.get)
    return {"layer": name, "max_abs": peaks[name]}
