"""What each layer computes under a precision: every leaf module's output, and the layer to blame when a
run overflows (the first non-finite output, else the largest)."""

import math

import torch
import torch.nn as nn

from utils.models import get_logits
from utils.precision import PrecisionPlan


def layer_outputs(model: nn.Module, x: torch.Tensor, plan: PrecisionPlan) -> dict:
    """Each leaf module's first floating output under `plan`, in execution order, as fp32 copies."""
    outputs, handles = {}, []
    for name, m in model.named_modules():
        if name and not list(m.children()):
            def hook(module, args, output, name=name):
                t = output if isinstance(output, torch.Tensor) else next(
                    (o for o in (output if isinstance(output, (tuple, list)) else ()) if isinstance(o, torch.Tensor)), None)
                if t is not None and t.is_floating_point() and name not in outputs:
                    outputs[name] = t.detach().float()
            handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad(), plan.autocast():
            outputs["<output>"] = get_logits(model(x)).detach().float()
    finally:
        for h in handles:
            h.remove()
    return outputs


def largest_activation(model: nn.Module, x: torch.Tensor, plan: PrecisionPlan) -> dict:
    """The layer whose output is the first non-finite one, else the largest in magnitude, under `plan`:
    where to look when a run overflows."""
    outputs = layer_outputs(model, x, plan)
    peaks = {name: float(t.abs().max()) if t.numel() else 0.0 for name, t in outputs.items()}
    name = next((n for n, v in peaks.items() if not math.isfinite(v)), None) or max(peaks, key=peaks.get)
    return {"layer": name, "max_abs": peaks[name]}
