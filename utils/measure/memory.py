"""Memory a run needs, measured on any device: activations autograd saves for backward, and the parameter
and optimizer state that mixed precision leaves in fp32."""

import torch
import torch.nn as nn

from utils.models import compute_loss
from utils.precision import PrecisionPlan


def saved_activation_bytes(model: nn.Module, plan: PrecisionPlan, batch) -> int:
    """Bytes of tensors autograd saves for backward in one forward + loss (counted once per storage;
    parameters excluded, they are memory either way). Meaningful on a CPU, where no allocator peak exists."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    x, y = batch
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), plan.autocast():
        loss = compute_loss(model, x, y)
    del loss
    return sum(seen.values())


def state_bytes(model: nn.Module) -> dict:
    """Parameter and AdamW state bytes. Autocast keeps fp32 master weights, so these are the same
    for fp32 and AMP: AMP saves activation memory, not weight memory."""
    param = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"parameter_bytes": param, "optimizer_state_bytes": 2 * sum(p.numel() * 4 for p in model.parameters())}
