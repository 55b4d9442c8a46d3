"""User-style models for tests: Hugging Face style outputs, tuples, and planted faults.
Each wraps the tiny GPT with seeded weights and changes one thing about it."""

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from utils.models import build_model


@dataclass
class CausalLMOutput:
    """The shape of a Hugging Face ModelOutput: an object with .logits (and .loss)."""

    logits: torch.Tensor
    loss: torch.Tensor = None


class TinyGPTWrapper(nn.Module):
    """A user's model around the tiny GPT (seed 0): subclasses change the forward or the weights."""

    task = "causal-lm"

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner = build_model("gpt-tiny")

    def forward(self, input_ids):
        return self.inner(input_ids)


class HFStyleLM(TinyGPTWrapper):
    """Returns an object with .logits, as Hugging Face models do; takes an attention mask like them."""

    task = None  # found from the output's shape, as for any user model

    def forward(self, input_ids, attention_mask=None):
        return CausalLMOutput(logits=self.inner(input_ids, attention_mask))


class TupleLM(TinyGPTWrapper):
    """Returns (logits, loss) like many research codebases."""

    task = None

    def forward(self, input_ids):
        logits = self.inner(input_ids)
        return logits, logits.float().logsumexp(-1).mean()


def make_hf_style():
    return HFStyleLM()


def make_tuple_lm():
    return TupleLM()


def make_not_a_module():
    return "not a model"


def make_failing():
    raise RuntimeError("weights file missing")


# --- planted faults: each must make the check it targets fail -------------------------------------

class DetachedLayer(TinyGPTWrapper):
    """An extra projection that the forward never uses: its parameters get no gradient."""

    def __init__(self):
        super().__init__()
        self.unused_head = nn.Linear(64, 256)


class EmitsNaN(TinyGPTWrapper):
    """log of a negative number in the forward: every logit is NaN."""

    def forward(self, input_ids):
        return self.inner(input_ids) + torch.log(torch.tensor(-1.0))


def zero_initialized():
    model = TinyGPTWrapper().inner
    nn.init.zeros_(model.blocks[0].mlp[0].weight)
    return model


class IgnoresSequenceLength(TinyGPTWrapper):
    """Always returns 8 positions, whatever the input length (a hard-coded reshape)."""

    def forward(self, input_ids):
        return self.inner(input_ids)[:, -1:, :].repeat(1, 8, 1)


class OverflowsFp16(TinyGPTWrapper):
    """Activations of blocks.1.mlp.0 scaled by 1e6: fine in fp32 and bf16, inf in fp16 (max 65504)."""

    def __init__(self):
        super().__init__()
        self.inner.blocks[1].mlp[0].register_forward_hook(lambda m, i, o: o * 1e6)


class FaultOnce(TinyGPTWrapper):
    """Plants one fault on its Nth training forward (counted over all copies of the model in a process):
    SUITE_TEST_FAULT='interrupt:N' presses Ctrl-C (SIGINT to its own process), as a user stopping a run
    would; 'overflow:N' scales that forward's activations beyond fp16's range; 'pause:N' creates the file
    SUITE_TEST_MARK and waits 5 s there, for a test to stop the runner from outside at a known step.
    'interrupt:N:R' and 'overflow:N:R' do it on torchrun rank R only. The environment reaches a runner's
    notebook kernels and torchrun's ranks alike; unset, the model is the tiny GPT."""

    forwards = 0

    def forward(self, input_ids):
        kind, n, rank = (os.environ.get("SUITE_TEST_FAULT", "none:0") + ":").split(":")[:3]
        here = not rank or rank == os.environ.get("RANK", "0")
        if self.training and torch.is_grad_enabled() and here:
            FaultOnce.forwards += 1
            if FaultOnce.forwards == int(n) and kind == "interrupt":
                os.kill(os.getpid(), signal.SIGINT)
            if FaultOnce.forwards == int(n) and kind == "pause":
                Path(os.environ["SUITE_TEST_MARK"]).touch()
                time.sleep(5)  # a signal's handler runs and the sleep goes on: the stop is seen after this step
            if FaultOnce.forwards == int(n) and kind == "overflow":
                return self.inner(input_ids) * 1e6
        return self.inner(input_ids)


class Exits(TinyGPTWrapper):
    """A forward that ends its process: the kernel dies inside a cell, as a segfaulting extension would."""

    def forward(self, input_ids):
        os._exit(3)


class Hangs(TinyGPTWrapper):
    """A forward that never returns: what a runner's timeout is for."""

    def forward(self, input_ids):
        time.sleep(3600)
        return self.inner(input_ids)


class NoParameters(nn.Module):
    """One-hot 'logits' and no weights at all: nothing to validate or train."""

    def forward(self, input_ids):
        return torch.nn.functional.one_hot(input_ids, 256).float()


class TransformerEncoderLM(nn.Module):
    """A causal LM made of PyTorch's own nn.TransformerEncoder with a causal mask, embeddings left at
    nn.Embedding's default init (N(0, 1)): a model nobody here wrote the layers of."""

    def __init__(self, vocab_size: int = 256, d_model: int = 64, max_len: int = 128):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab_size, d_model), nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, 4, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, input_ids):
        T = input_ids.size(1)
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=input_ids.device)
        h = self.tok(input_ids) + self.pos(torch.arange(T, device=input_ids.device))
        return self.head(self.encoder(h, mask=mask, is_causal=True))


class LastPositionGPT(TinyGPTWrapper):
    """The widely copied minimal GPT: without targets, forward returns only the last position's logits."""

    def forward(self, input_ids, targets=None):
        logits = self.inner(input_ids)
        return logits if targets is not None else logits[:, [-1], :]


class BidirectionalEncoderLM(TransformerEncoderLM):
    """The same LM without its causal mask: every position sees the future, which a causal LM must not."""

    def forward(self, input_ids):
        T = input_ids.size(1)
        return self.head(self.encoder(self.tok(input_ids) + self.pos(torch.arange(T, device=input_ids.device))))



class NarrowLogits(TinyGPTWrapper):
    """Takes byte ids (0..255) but scores only 10 tokens: its logits cannot cover the targets."""

    task = None

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(256, 10)

    def forward(self, input_ids):
        return self.head(self.inner(input_ids))


class NoisyLM(TinyGPTWrapper):
    """Fresh noise on every forward, even in eval mode: nondeterministic, yet it sees no future token."""

    def forward(self, input_ids):
        logits = self.inner(input_ids)
        return logits + torch.randn_like(logits)


def on_meta_device():
    with torch.device("meta"):
        return build_model("gpt-tiny")


class LoudInputLinear(nn.Linear):
    """The same function as a Linear in fp32 and bf16 (input scaled by 1e5, output scaled back), but under fp16
    autocast its input is cast beyond 65504: its own output is not finite."""

    def forward(self, x):
        return super().forward(x * 1e5) / 1e5


class OverflowsOneLayerFp16(TinyGPTWrapper):
    """inner.blocks.1.mlp.0 is a LoudInputLinear: fp16 fails there alone, and keeping that layer in fp32 fixes it."""

    def __init__(self):
        super().__init__()
        old = self.inner.blocks[1].mlp[0]
        self.inner.blocks[1].mlp[0] = LoudInputLinear(old.in_features, old.out_features)
        self.inner.blocks[1].mlp[0].load_state_dict(old.state_dict())


class _LoudGradient(torch.autograd.Function):
    """Identity forward; the gradient comes back 1e9 times larger."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * 1e9


class GradientOverflowsFp16(TinyGPTWrapper):
    """inner.blocks.1.mlp.0's output is unchanged, but its gradient is 1e9 times too large: in fp16 it overflows at
    any loss scale above ~0.06, so steps are skipped until the scale collapses; fp32 and bf16 hold it (AdamW
    normalizes each parameter's step)."""

    def __init__(self):
        super().__init__()
        self.inner.blocks[1].mlp[0].register_forward_hook(lambda module, args, output: _LoudGradient.apply(output))


def bf16_weights():
    """A model converted to bf16 before training: no fp32 master weights."""
    return TinyGPTWrapper().to(torch.bfloat16)


class _ScaledGradient(torch.autograd.Function):
    """Identity forward; the gradient comes back `factor` times larger."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class CalibratesFp16(TinyGPTWrapper):
    """A healthy model whose fp16 loss scale must calibrate: inner.blocks.1.mlp.0's gradient is 1e4 times larger (the
    same function in every precision; AdamW normalizes each parameter's step), so at the GradScaler's first scale,
    65536, its scaled gradients overflow fp16. The scale backs off a dozen times at the start, then holds: the
    GradScaler doing its job, as on a GPU whose gradients grow with the warm-up."""

    def __init__(self, factor: float = 1e4):
        super().__init__()
        self.inner.blocks[1].mlp[0].register_forward_hook(lambda module, args, output: _ScaledGradient.apply(output, factor))


class Detached(TinyGPTWrapper):
    """Logits cut off from the weights (.detach()), then a fresh leaf that asks for a gradient: training runs without an
    error, the logits' leaf gets the gradient and no parameter ever does, so the loss never moves."""

    def forward(self, input_ids):
        return self.inner(input_ids).detach().requires_grad_()


class DetachedNoGrad(TinyGPTWrapper):
    """Logits computed under torch.no_grad: the loss has no graph at all, so there is nothing to go back through."""

    def forward(self, input_ids):
        with torch.no_grad():
            return self.inner(input_ids)


class ZeroGradient(TinyGPTWrapper):
    """Logits cut off from the weights, which enter the loss only multiplied by 0: every parameter gets a gradient, and
    every gradient is zero."""

    def forward(self, input_ids):
        return self.inner(input_ids).detach() + 0 * sum(p.sum() for p in self.parameters())


def raises_keyboard_interrupt():
    """A factory that raises KeyboardInterrupt, as code that catches a stop and re-raises it would."""
    raise KeyboardInterrupt
