"""Reference transformer models, a loader for user models, and one adapter for their outputs.

Two built-in families, each in named sizes:
  gpt-*      decoder-only causal LM (GPT-2 style: pre-norm, causal self-attention, tied embeddings)
  encoder-*  bidirectional encoder (BERT style) with a classification head on the first token

`load_model(spec)` turns a registry name, "package.module:factory" or "path/to/file.py:factory"
into an nn.Module. `get_logits(output)` finds the logits in whatever a model returns.
"""

import importlib
import importlib.util
import inspect
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.data import load_classification_set, load_corpus


class ModelLoadError(ValueError):
    """A model spec that does not resolve, or a factory that fails."""


@dataclass(frozen=True)
class ModelConfig:
    n_layer: int = 2
    n_head: int = 2
    d_model: int = 64
    max_len: int = 64
    vocab_size: int = 256  # byte-level tokens: see utils.data
    num_classes: int = 4   # encoder only
    dropout: float = 0.0   # 0 keeps CPU runs bit-for-bit deterministic for a seed


GPT_SIZES = {
    "gpt-tiny": ModelConfig(n_layer=2, n_head=2, d_model=64, max_len=64),        # trains in seconds on a CPU
    "gpt-small": ModelConfig(n_layer=4, n_head=4, d_model=256, max_len=128),     # matmul-bound: the benchmark default
    "gpt-medium": ModelConfig(n_layer=6, n_head=6, d_model=384, max_len=256),
    "gpt2-small": ModelConfig(n_layer=12, n_head=12, d_model=768, max_len=1024),  # GPT-2 small's shape (byte vocab)
}
ENCODER_SIZES = {
    "encoder-tiny": ModelConfig(n_layer=2, n_head=2, d_model=64, max_len=64),
    "encoder-small": ModelConfig(n_layer=4, n_head=4, d_model=256, max_len=128),
    "encoder-base": ModelConfig(n_layer=12, n_head=12, d_model=768, max_len=512),  # BERT-base's shape
}


class SelfAttention(nn.Module):
    """Multi-head self-attention. Fast SDPA path by default; `record_attention = True` switches to
    the explicit softmax so the weights can be kept in `last_attention` for Tier 2 analysis."""

    def __init__(self, cfg: ModelConfig, causal: bool):
        super().__init__()
        if cfg.d_model % cfg.n_head:
            raise ValueError(f"d_model={cfg.d_model} must be divisible by n_head={cfg.n_head}")
        self.n_head, self.causal, self.dropout = cfg.n_head, causal, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.record_attention = False
        self.last_attention = None

    def _mask(self, T: int, key_padding_mask, device):
        """Boolean (.., T, T) mask, True where a query may attend a key; None when all may."""
        mask = torch.ones(T, T, dtype=torch.bool, device=device).tril() if self.causal else None
        if key_padding_mask is not None:  # (B, T), true for real tokens
            pad = key_padding_mask.bool()[:, None, None, :]
            mask = pad if mask is None else mask & pad
        return mask

    def forward(self, x, key_padding_mask=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # The fused CPU kernel's bf16 backward is ~3x slower than explicit matmul + softmax
        # (torch 2.13, 16x4x128x64: 16 ms vs 6 ms), so bf16 on CPU takes the explicit path too.
        explicit = self.record_attention or (x.device.type == "cpu" and q.dtype == torch.bfloat16)
        is_causal = self.causal and key_padding_mask is None
        mask = self._mask(T, key_padding_mask, x.device) if explicit or not is_causal else None
        if explicit:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
            if mask is not None:
                att = att.masked_fill(~mask, float("-inf"))
            att = att.softmax(dim=-1)
            if self.record_attention:
                self.last_attention = att.detach()
            y = F.dropout(att, self.dropout, self.training) @ v
        else:
            # is_causal (rather than an explicit mask) lets the fused kernel skip masked blocks.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if is_causal else mask, is_causal=is_causal,
                                               dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, causal: bool):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg, causal)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(), nn.Linear(4 * cfg.d_model, cfg.d_model))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, key_padding_mask=None):
        x = x + self.drop(self.attn(self.ln1(x), key_padding_mask))
        return x + self.drop(self.mlp(self.ln2(x)))


class _Transformer(nn.Module):
    """Embeddings and a stack of pre-norm blocks, shared by both families."""

    def __init__(self, cfg: ModelConfig, causal: bool):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, causal) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)

    def _init_weights(self):
        # GPT-2 init: N(0, 0.02), residual projections scaled down by depth so activations stay O(1).
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * self.config.n_layer) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def encode(self, input_ids, attention_mask=None):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len); got shape {tuple(input_ids.shape)}")
        T = input_ids.size(1)
        if T > self.config.max_len:
            raise ValueError(f"sequence length {T} exceeds the model's max_len={self.config.max_len}")
        pos = torch.arange(T, device=input_ids.device)
        x = self.tok_emb(input_ids) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x, attention_mask)
        return self.ln_f(x)


class GPT(_Transformer):
    """Decoder-only causal language model: input_ids (B, T) -> logits (B, T, vocab_size)."""

    task = "causal-lm"

    def __init__(self, cfg: ModelConfig = ModelConfig()):
        super().__init__(cfg, causal=True)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying, as in GPT-2
        self._init_weights()

    def forward(self, input_ids, attention_mask=None):
        return self.lm_head(self.encode(input_ids, attention_mask))


class EncoderClassifier(_Transformer):
    """Bidirectional encoder with a classification head: input_ids (B, T) -> logits (B, num_classes)."""

    task = "classification"

    def __init__(self, cfg: ModelConfig = ModelConfig()):
        super().__init__(cfg, causal=False)
        self.head = nn.Linear(cfg.d_model, cfg.num_classes)
        self._init_weights()

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.encode(input_ids, attention_mask)[:, 0])


REGISTRY = {**{n: (GPT, c) for n, c in GPT_SIZES.items()}, **{n: (EncoderClassifier, c) for n, c in ENCODER_SIZES.items()}}

SPEC_FORMS = "a registry name (" + ", ".join(REGISTRY) + "), 'package.module:factory', or 'path/to/file.py:factory'"


def build_model(name: str, **overrides) -> nn.Module:
    """A reference model by registry name; keyword arguments override fields of its ModelConfig."""
    if name not in REGISTRY:
        raise ModelLoadError(f"unknown model {name!r}; expected one of {sorted(REGISTRY)}")
    cls, cfg = REGISTRY[name]
    unknown = set(overrides) - set(ModelConfig.__dataclass_fields__)
    if unknown:
        raise ModelLoadError(f"unknown config field(s) {sorted(unknown)} for {name!r}; "
                             f"expected some of {sorted(ModelConfig.__dataclass_fields__)}")
    return cls(replace(cfg, **overrides))


def _resolve_factory(spec: str):
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ModelLoadError(f"cannot resolve model spec {spec!r}; expected {SPEC_FORMS}")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ModelLoadError(f"model file {str(path)!r} (from spec {spec!r}) does not exist")
        module_name = f"user_model_{abs(hash(str(path.resolve())))}"
        mod_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[module_name] = module  # lets dataclasses and pickling inside the file resolve it
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ModelLoadError(f"cannot import module {target!r} from spec {spec!r}: {e}") from e
    if not hasattr(module, attr):
        raise ModelLoadError(f"module {target!r} has no attribute {attr!r} (from spec {spec!r})")
    return getattr(module, attr)


def load_model(spec, **kwargs) -> nn.Module:
    """An nn.Module from `spec`: a module (returned as is), a registry name, or a factory reference.

    kwargs go to the factory (for registry names: ModelConfig overrides such as vocab_size)."""
    if isinstance(spec, nn.Module):
        model = spec
    elif not isinstance(spec, str):
        raise ModelLoadError(f"model spec must be an nn.Module or a string; got {type(spec).__name__}. Expected {SPEC_FORMS}")
    elif spec in REGISTRY:
        model = build_model(spec, **kwargs)
    else:
        factory = _resolve_factory(spec)
        try:
            model = factory(**kwargs)
        except Exception as e:
            raise ModelLoadError(f"factory {spec!r} raised {type(e).__name__}: {e}") from e
        if not isinstance(model, nn.Module):
            raise ModelLoadError(f"factory {spec!r} returned {type(model).__name__}; expected a torch.nn.Module")
    if next(model.parameters(), None) is None:
        raise ModelLoadError(f"model {type(model).__name__} (from {spec if isinstance(spec, str) else 'the module given'}) "
                             "has no parameters; expected a model with weights to validate and train")
    return model


def get_logits(output) -> torch.Tensor:
    """The logits in a model's output: a tensor; a tuple or list (the first tensor of 2+ dims, so
    both (logits, loss) and (loss, logits) work); a dict with 'logits'; or an object with .logits."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(getattr(output, "logits", None), torch.Tensor):
        return output.logits
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor) and item.dim() >= 2:
                return item
    raise TypeError(f"cannot find logits in model output of type {type(output).__name__}; expected a tensor, "
                    "a tuple/list holding a (batch, ...) tensor, a dict with 'logits', or an object with .logits")


def forward(model: nn.Module, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """The model's logits; the padding mask is passed only to models whose forward takes one."""
    if attention_mask is not None and "attention_mask" in inspect.signature(model.forward).parameters:
        return get_logits(model(input_ids, attention_mask=attention_mask))
    return get_logits(model(input_ids))


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def model_task(model: nn.Module, logits: torch.Tensor) -> str:
    """'causal-lm' for (B, T, vocab) logits, 'classification' for (B, classes); a model's own
    `task` attribute wins."""
    task = getattr(model, "task", None)
    if task in ("causal-lm", "classification"):
        return task
    if logits.dim() == 3:
        return "causal-lm"
    if logits.dim() == 2:
        return "classification"
    raise ValueError(f"cannot tell the task from logits of shape {tuple(logits.shape)}; "
                     "expected (batch, seq, vocab) for a causal LM or (batch, classes) for a classifier")


def model_vocab_size(model: nn.Module):
    """The model's input vocabulary, read from its config or its first embedding; None if unknown."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int):
        return vocab
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            return module.num_embeddings
    return None


def model_max_len(model: nn.Module, default: int = 64) -> int:
    """The longest input the model takes: from its config (our max_len, Hugging Face's
    max_position_embeddings / n_positions), else a position embedding's size, else `default`."""
    cfg = getattr(model, "config", None)
    for attr in ("max_len", "max_position_embeddings", "n_positions"):
        if isinstance(getattr(cfg, attr, None), int):
            return getattr(cfg, attr)
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and "pos" in name.rsplit(".", 1)[-1].lower():
            return module.num_embeddings
    return default


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def compute_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for a causal LM (every position predicts the next token) or a classifier.
    The loss is taken in fp32 even under autocast: a bf16 log-softmax over the vocabulary loses digits."""
    logits = get_logits(model(x)).float()
    if model_task(model, logits) == "causal-lm":
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
    return F.cross_entropy(logits, y)


def load_task_data(model: nn.Module, data, seq_len: int):
    """The built-in data for the model's task, unless the caller brought some (a corpus or a path)."""
    if data is None:
        task = getattr(model, "task", None)
        if task is None:  # a user model: one tiny forward tells an LM from a classifier by its logits' shape
            with torch.no_grad():
                task = model_task(model, get_logits(model(torch.zeros(1, 2, dtype=torch.long, device=model_device(model)))))
        data = load_corpus() if task == "causal-lm" else load_classification_set()
    elif isinstance(data, str) or hasattr(data, "__fspath__"):
        data = load_corpus(data)
    data.check_fits(seq_len, model_vocab_size(model))
    return data
