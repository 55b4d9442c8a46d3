"""Reference transformer models in named sizes (gpt-*: GPT-2-style causal LMs; encoder-*: BERT-style classifiers), `load_model`
for those, Hugging Face and user models, and `get_logits(output)`, which finds the logits in whatever a model returns."""

import functools
import importlib
import importlib.util
import inspect
import math
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed._composable import checkpoint as composable_checkpoint

from utils.data import BYTE_MASK_ID, MaskedLMData, load_classification_set, load_corpus
from utils.errors import ModelLoadError, UnsupportedModel


TASKS = ("causal-lm", "classification", "masked-lm")
SUPPORTED = ("causal LMs, classifiers and masked LMs whose forward takes input_ids (batch, seq) and returns logits "
             "per position (batch, seq, vocab) or per sequence (batch, classes)")
# Hugging Face architecture names end in one of these; the task follows from it.
_HF_TASK_SUFFIXES = {"ForCausalLM": "causal-lm", "LMHeadModel": "causal-lm", "ForSequenceClassification": "classification",
                     "ForMaskedLM": "masked-lm"}


def _transformers():
    try:
        import transformers  # optional dependency: only for hf: models and tokenizers
    except ImportError:
        raise ModelLoadError("hf: models and tokenizers need the optional package transformers; "
                             "pip install transformers") from None
    transformers.utils.logging.disable_progress_bar()  # per-file bars would print timings into notebooks
    return transformers


HUB_TIMEOUT_S = 5  # how long a hub that does not answer may hold a run before hf: is refused


@functools.lru_cache(maxsize=None)
def _hub_access(name: str, kind: str = "model") -> tuple:
    """from_pretrained's extra keywords for `name` (`kind`: model or tokenizer): none for a folder or when the hub answers;
    local files only when it is silent for HUB_TIMEOUT_S and they are cached; else a ModelLoadError, not the hub's retries."""
    from huggingface_hub import constants  # installed with transformers (optional)
    if Path(name).is_dir() or constants.HF_HUB_OFFLINE:
        return ()
    reason = _hub_silence(f"{constants.ENDPOINT}/api/models/{name}")
    if reason is None:
        return ()  # the hub answered: a missing or gated model is from_pretrained's to explain
    try:
        _transformers().AutoConfig.from_pretrained(name, local_files_only=True)
    except Exception:
        asked, local = (f"hf:{name}", "hf:path/to/model") if kind == "model" else \
            (f"tokenizer {name!r}", "tokenizer=path/to/folder, saved with save_pretrained")
        raise ModelLoadError(f"cannot download {asked}: {constants.ENDPOINT} did not answer within {HUB_TIMEOUT_S} s "
                             f"({reason}) and the {kind} is not in the local cache; connect to the network, or give a "
                             f"local folder ({local})") from None
    return (("local_files_only", True),)


def _hub_silence(url: str):
    """None when `url` answers anything within HUB_TIMEOUT_S (asked through huggingface_hub's own HTTP session:
    its proxies and certificates), else why not. A thread bounds the name lookup too, which no socket timeout does."""
    from huggingface_hub.utils import get_session  # optional, as above
    outcome = []

    def ask():
        try:
            get_session().head(url, timeout=HUB_TIMEOUT_S)
            outcome.append(None)
        except Exception as e:
            outcome.append(f"{type(e).__name__}: {e}".rstrip(": "))

    asking = threading.Thread(target=ask, daemon=True)
    asking.start()
    asking.join(HUB_TIMEOUT_S + 1)
    return outcome[0] if outcome else "no answer, not even a name lookup"


def _load_hf(name: str, task: str, kwargs: dict) -> nn.Module:
    """A Hugging Face model by hub name or local path, with the Auto class of its task."""
    for refused in ("torch_dtype", "dtype"):
        if refused in kwargs:
            raise ModelLoadError(f"model_kwargs {refused}={kwargs[refused]!r} refused for hf:{name}: training keeps fp32 "
                                 "master weights and autocast casts per op; drop it and choose precision instead")
    transformers, hub = _transformers(), dict(_hub_access(name))
    try:
        config = transformers.AutoConfig.from_pretrained(name, **hub)
    except Exception as e:
        raise ModelLoadError(f"cannot load the config of hf:{name}: {type(e).__name__}: {e}") from e
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModel(f"hf:{name} is an encoder-decoder ({config.model_type}): unsupported. The suite supports {SUPPORTED}")
    if getattr(config, "vocab_size", None) is None:
        raise UnsupportedModel(f"hf:{name} ({config.model_type}) has no token vocabulary, so it does not take token ids "
                               f"(a vision or audio model): unsupported. The suite supports {SUPPORTED}")
    if task in (None, "auto"):
        found = [t for arch in config.architectures or [] for suffix, t in _HF_TASK_SUFFIXES.items() if arch.endswith(suffix)]
        if not found:
            raise UnsupportedModel(f"cannot tell the task of hf:{name} from its architectures {config.architectures}; "
                                   f"pass task= one of {TASKS}. The suite supports {SUPPORTED}")
        task = found[0]
    auto = {"causal-lm": transformers.AutoModelForCausalLM, "classification": transformers.AutoModelForSequenceClassification,
            "masked-lm": transformers.AutoModelForMaskedLM}[task]
    # fp32 master weights, whatever the checkpoint was saved in (transformers 5 loads a bf16 checkpoint as bf16 by
    # default); the keyword's name changed in 4.56.
    version = tuple(int(v) for v in transformers.__version__.split(".")[:2])
    fp32 = {"dtype" if version >= (4, 56) else "torch_dtype": torch.float32}
    try:
        model = auto.from_pretrained(name, **{**hub, **fp32, **kwargs})
    except Exception as e:
        raise ModelLoadError(f"cannot load hf:{name} as a {task} model: {type(e).__name__}: {e}") from e
    model.task = task
    return model


def load_tokenizer(spec: str):
    """A Hugging Face tokenizer by name or path ('hf:' prefix optional)."""
    name = spec.removeprefix("hf:")
    transformers, hub = _transformers(), dict(_hub_access(name, "tokenizer"))
    try:
        return transformers.AutoTokenizer.from_pretrained(name, **hub)
    except Exception as e:
        raise ModelLoadError(f"cannot load tokenizer {spec!r}: {type(e).__name__}: {e}; expected a Hugging Face "
                             "tokenizer name or a folder saved with save_pretrained") from e


@dataclass(frozen=True)
class ModelConfig:
    n_layer: int = 2
    n_head: int = 2
    d_model: int = 64
    max_len: int = 64
    vocab_size: int = 256  # byte-level tokens: see utils.data
    num_classes: int = 4   # encoder only
    dropout: float = 0.0   # 0 keeps CPU runs bit-for-bit deterministic for a seed


class SelfAttention(nn.Module):
    """Multi-head self-attention: fused SDPA, or (`record_attention`) the explicit softmax, its weights in `last_attention`."""

    def __init__(self, cfg: ModelConfig, causal: bool):
        super().__init__()
        if cfg.d_model % cfg.n_head:
            raise ValueError(f"d_model={cfg.d_model} must be divisible by n_head={cfg.n_head}")
        self.n_head, self.causal, self.dropout = cfg.n_head, causal, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.record_attention, self.last_attention = False, None

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
    """Embeddings and pre-norm blocks, shared by both families; each family sets `causal` and adds its head (_add_head)."""

    causal: bool

    def __init__(self, cfg: ModelConfig = ModelConfig()):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, self.causal) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self._add_head(cfg)
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

    task, causal = "causal-lm", True

    def _add_head(self, cfg: ModelConfig):
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying, as in GPT-2

    def forward(self, input_ids, attention_mask=None):
        return self.lm_head(self.encode(input_ids, attention_mask))


class EncoderClassifier(_Transformer):
    """Bidirectional encoder with a classification head: input_ids (B, T) -> logits (B, num_classes)."""

    task, causal = "classification", False

    def _add_head(self, cfg: ModelConfig):
        self.head = nn.Linear(cfg.d_model, cfg.num_classes)

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.encode(input_ids, attention_mask)[:, 0])


REGISTRY = {  # name: (class, config)
    "gpt-tiny": (GPT, ModelConfig(n_layer=2, n_head=2, d_model=64, max_len=64)),  # trains in seconds on a CPU
    "gpt-small": (GPT, ModelConfig(n_layer=4, n_head=4, d_model=256, max_len=128)),  # matmul-bound: the benchmark default
    "gpt-medium": (GPT, ModelConfig(n_layer=6, n_head=6, d_model=384, max_len=256)),
    "gpt2-small": (GPT, ModelConfig(n_layer=12, n_head=12, d_model=768, max_len=1024)),  # GPT-2 small's shape (byte vocab)
    "encoder-tiny": (EncoderClassifier, ModelConfig(n_layer=2, n_head=2, d_model=64, max_len=64)),
    "encoder-small": (EncoderClassifier, ModelConfig(n_layer=4, n_head=4, d_model=256, max_len=128)),
    "encoder-base": (EncoderClassifier, ModelConfig(n_layer=12, n_head=12, d_model=768, max_len=512)),  # BERT-base's shape
}

SPEC_FORMS = ("a registry name (" + ", ".join(REGISTRY) + "), 'hf:NAME_OR_PATH' (Hugging Face), 'package.module:factory', "
              "or 'path/to/file.py:factory'")


# A guard against an obvious misuse, not a sandbox (a model spec is code by design: README, trust boundary): a spec naming
# os:system would run a command with model_kwargs as its arguments. Refused: Python's own library and the common deserializers,
# which build whatever a stream in model_kwargs describes, running code on the way (YAML's python/object tags, pickle's
# __reduce__); whole packages, or single callables of packages with other uses, by the name a spec gives and the __module__.
_STANDARD_LIBRARY = frozenset(sys.stdlib_module_names) | {"builtins"}
_DESERIALIZER_PACKAGES = frozenset({"yaml", "_yaml", "dill", "cloudpickle"})
_DESERIALIZERS = frozenset({"torch.load", "torch.serialization.load", "numpy.load", "numpy.lib.npyio.load",
                            "pandas.read_pickle", "pandas.io.pickle.read_pickle", "joblib.load", "joblib.numpy_pickle.load"})


def check_spec(spec: str):
    """The model parameter's form, before anything is imported or built: a ValueError says what is expected."""
    if spec in REGISTRY or (spec.startswith("hf:") and spec[3:].strip()):
        return
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr.isidentifier():
        raise ValueError(f"{spec!r} is not a model spec; expected {SPEC_FORMS}")
    if not target.endswith(".py"):
        _refuse_non_factory(target, attr, spec)


def _refuse_non_factory(module: str, name: str, spec: str):
    """Refuse a standard-library callable or a deserializer (by the spec's names, or the callable's own) before it is called."""
    guard = "(a guard against misuse, not a sandbox: a model spec is code, see the README's trust boundary)"
    package = module.split(".")[0]
    if package in _STANDARD_LIBRARY:
        raise ModelLoadError(f"model spec {spec!r} names {module!r}, part of Python's standard library, not a model factory; "
                             f"expected a factory that returns an nn.Module {guard}")
    if package in _DESERIALIZER_PACKAGES or f"{module}.{name}" in _DESERIALIZERS:
        raise ModelLoadError(f"model spec {spec!r} names {f'{module}.{name}'!r}, a deserializer (it builds whatever its "
                             "input describes, running code on the way), not a model factory; a model spec must name a "
                             f"callable that builds an nn.Module {guard}")


def check_config(name: str, overrides: dict, memory):
    """A built-in model's config with overrides (already checked by field, type and range): a ValueError when its
    heads do not divide its width, or its fp32 weights alone exceed `memory` bytes (None: not known, not checked)."""
    cls, cfg = REGISTRY[name]
    cfg = replace(cfg, **overrides)
    if cfg.d_model % cfg.n_head:
        raise ValueError(f"{name!r} with {overrides}: d_model={cfg.d_model} must be divisible by n_head={cfg.n_head}")
    d = cfg.d_model  # the parameter count from the config alone, before anything is allocated
    per_block = 12 * d * d + 13 * d  # two norms, qkv, proj, the 4x MLP
    head = 0 if cls is GPT else d * cfg.num_classes + cfg.num_classes  # the GPT's head is the tied embedding
    weights = 4 * ((cfg.vocab_size + cfg.max_len) * d + cfg.n_layer * per_block + 2 * d + head)
    if memory is not None and weights > memory:
        raise ValueError(f"{name!r} with {overrides} has {weights / 4:,.0f} parameters, {weights / 2**30:,.1f} GiB of "
                         f"fp32 weights alone, more than the device's {memory / 2**30:,.1f} GiB; expected a smaller config")


def build_model(name: str, **overrides) -> nn.Module:
    """A reference model by registry name; keyword arguments override fields of its ModelConfig."""
    if name not in REGISTRY:
        raise ModelLoadError(f"unknown model {name!r}; expected one of {sorted(REGISTRY)}")
    cls, cfg = REGISTRY[name]
    if unknown := set(overrides) - set(ModelConfig.__dataclass_fields__):
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
        try:
            mod_spec.loader.exec_module(module)
        except SyntaxError as e:
            raise ModelLoadError(f"model file {str(path)!r} (from spec {spec!r}) has a syntax error at line {e.lineno}: "
                                 f"{e.msg}") from None
    else:
        _refuse_non_factory(target, attr, spec)
        try:
            module = importlib.import_module(target)
        except (ImportError, SyntaxError) as e:
            raise ModelLoadError(f"cannot import module {target!r} from spec {spec!r}: {e}") from e
    if not hasattr(module, attr):
        raise ModelLoadError(f"module {target!r} has no attribute {attr!r} (from spec {spec!r})")
    inner = factory = getattr(module, attr)
    while isinstance(inner, functools.partial):  # a partial of a user's class is the class's
        inner = inner.func
    _refuse_non_factory(str(getattr(inner, "__module__", None) or ""), str(getattr(inner, "__name__", "")),
                        spec)  # re-exported: from os import system, from torch import load
    return factory


def load_model(spec, task=None, **kwargs) -> nn.Module:
    """An nn.Module from `spec`: a module (returned as is), a registry name, 'hf:NAME_OR_PATH', or a factory. kwargs go to the
    factory (for registry names: ModelConfig overrides such as vocab_size; for hf: models: from_pretrained arguments such as
    num_labels or attn_implementation). task picks the Auto class of an hf: model ('auto': from its config's architectures)."""
    if isinstance(spec, nn.Module):
        model = spec
    elif not isinstance(spec, str):
        raise ModelLoadError(f"model spec must be an nn.Module or a string; got {type(spec).__name__}. Expected {SPEC_FORMS}")
    elif spec in REGISTRY:
        model = build_model(spec, **kwargs)
    elif spec.startswith("hf:"):
        model = _load_hf(spec.removeprefix("hf:"), task, kwargs)
    else:
        factory = _resolve_factory(spec)
        try:
            model = factory(**kwargs)
        except Exception as e:
            raise ModelLoadError(f"factory {spec!r} raised {type(e).__name__}: {e}") from e
        if not isinstance(model, nn.Module):
            raise ModelLoadError(f"factory {spec!r} returned {type(model).__name__}; expected a torch.nn.Module")
    where = f"model {type(model).__name__} (from {spec if isinstance(spec, str) else 'the module given'})"
    if next(model.parameters(), None) is None:
        raise ModelLoadError(f"{where} has no parameters; expected a model with weights to validate and train")
    if any(p.is_meta for p in model.parameters()):
        raise ModelLoadError(f"{where} has its parameters on the meta device, which holds no values; expected a model "
                             "built on the CPU (or with its weights loaded: to_empty() then load_state_dict())")
    return model


def check_fp32_master_weights(model: nn.Module):
    """Training keeps fp32 master weights: a model whose parameters are already 16-bit is refused, with the reason."""
    low = [(n, p.dtype) for n, p in model.named_parameters() if p.is_floating_point() and p.element_size() < 4]
    if low:
        more = f" and {len(low) - 1} more" if len(low) > 1 else ""
        raise UnsupportedModel(
            f"{type(model).__name__} has {str(low[0][1]).replace('torch.', '')} parameters ({low[0][0]!r}{more}): training "
            "needs fp32 master weights. AMP keeps the weights, their gradients and AdamW's moments in fp32 and casts each op's inputs, "
            "because an update (lr x gradient) is often below a 16-bit weight's last digit and would be rounded away, "
            "and AdamW's second moment underflows in 16 bits. Load the model in fp32 (no .half(), .to(dtype) or "
            "dtype=) and choose the precision parameter instead")


def blocks(model: nn.Module) -> list:
    """The model's repeated blocks: the elements of its outermost nn.ModuleLists (ours, and Hugging Face's h/layers)."""
    found, inside = [], set()
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and id(module) not in inside:
            found += list(module)
            inside.update(id(m) for block in module for m in block.modules())
    return found


def checkpoint_blocks(model: nn.Module) -> nn.Module:
    """Activation checkpointing per block, in place: each block's activations are recomputed in backward, not kept (torch's
    composable, non-reentrant checkpoint: hooks, so parameter names and checkpoints are unchanged; autocast and RNG restored)."""
    found = blocks(model)
    if not found:
        raise UnsupportedModel(f"activation checkpointing: {type(model).__name__} has no nn.ModuleList of blocks to "
                               "checkpoint; expected its repeated layers in an nn.ModuleList")
    for block in found:
        if not block.__dict__.get("_suite_checkpointed"):  # torch's checkpoint may be applied once per module
            composable_checkpoint(block)
            block.__dict__["_suite_checkpointed"] = True
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
    """The model's `task` attribute (set by probe_model, or a class's own), else a Hugging Face class's name (...ForMaskedLM,
    ...ForCausalLM, ...), else the logits' shape: (B, T, vocab) a causal LM, (B, classes) a classifier."""
    task = getattr(model, "task", None)
    if task in TASKS:
        return task
    found = [t for c in type(model).__mro__ if c.__module__.startswith("transformers.")
             for suffix, t in _HF_TASK_SUFFIXES.items() if c.__name__.endswith(suffix)]
    if found:  # a Hugging Face model's class says its task (RobertaForMaskedLM gives (B, T, vocab) like a causal LM)
        return found[0]
    if logits.dim() in (2, 3):
        return "causal-lm" if logits.dim() == 3 else "classification"
    raise UnsupportedModel(f"cannot tell the task from logits of shape {tuple(logits.shape)}; the suite supports {SUPPORTED}")


def probe_model(model: nn.Module, task: str = "auto") -> str:
    """The model's task, checked on one small forward before any check runs, and set as `model.task`. A model the suite cannot
    handle (another input than token ids, an encoder-decoder, logits for fewer positions than given) is refused with why."""
    name = type(model).__name__
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise UnsupportedModel(f"{name} is an encoder-decoder: unsupported. The suite supports {SUPPORTED}")
    if getattr(model, "main_input_name", "input_ids") != "input_ids":
        raise UnsupportedModel(f"{name} takes {model.main_input_name}, not token ids: unsupported. The suite supports {SUPPORTED}")
    vocab = min(model_vocab_size(model) or 256, 256)
    x = torch.randint(vocab, (2, 8), generator=torch.Generator().manual_seed(0)).to(model_device(model))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = forward(model, x)
    except Exception as e:
        raise UnsupportedModel(f"{name} fails on input_ids of shape (2, 8): {type(e).__name__}: {e}. "
                               f"The suite supports {SUPPORTED}") from e
    finally:
        model.train(was_training)
    task = model_task(model, logits) if task in (None, "auto") else task
    if task not in TASKS:
        raise UnsupportedModel(f"unknown task {task!r}; expected one of {TASKS}")
    want, shape = ((2,), "(batch, classes)") if task == "classification" else ((2, 8), "(batch, seq, vocab)")
    if tuple(logits.shape[:len(want)]) != want or logits.dim() != len(want) + 1:
        raise UnsupportedModel(f"{name} returns logits of shape {tuple(logits.shape)} for input_ids (2, 8); a {task} must "
                               f"return {shape} (a forward that keeps only the last position, as some minimal GPTs do "
                               f"without targets, cannot be trained or checked per position). The suite supports {SUPPORTED}")
    model.task = task
    if task == "classification":
        model.suite_num_classes = int(logits.shape[-1])
    else:
        model.suite_output_width = int(logits.shape[-1])  # must cover every token id of the data (load_task_data)
    return task


def model_vocab_size(model: nn.Module):
    """The model's input vocabulary, read from its config or its first embedding; None if unknown."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int):
        return vocab
    return next((m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)), None)


_MAX_LEN_FIELDS = ("max_len", "max_position_embeddings", "n_positions", "max_seq_len", "block_size", "n_ctx")


def model_max_len(model: nn.Module, cap: int = 4096) -> int:
    """The longest input the model takes: a length field (_MAX_LEN_FIELDS) of its config or itself, or a position embedding's
    size, less positions up to its padding index (RoBERTa's); else the longest of 64, 128, ... `cap` tokens a forward accepts."""
    if isinstance(getattr(model, "suite_max_len", None), int):
        return model.suite_max_len
    cfg = getattr(model, "config", None)
    found = next((getattr(o, f) for f in _MAX_LEN_FIELDS for o in (cfg, model) if isinstance(getattr(o, f, None), int)), None)
    positions = next((m for n, m in model.named_modules()
                      if isinstance(m, nn.Embedding) and "pos" in n.rsplit(".", 1)[-1].lower()), None)
    if found is None and positions is not None:
        found = positions.num_embeddings
    if found is not None and positions is not None and positions.padding_idx is not None:
        found -= positions.padding_idx + 1  # positions are numbered from padding_idx + 1
    if found is None:
        found = _measure_max_len(model, cap)
    model.suite_max_len = found
    return found


def _measure_max_len(model: nn.Module, cap: int) -> int:
    device, longest, n = model_device(model), 0, 64
    was_training = model.training
    model.eval()
    with torch.no_grad():
        while n <= cap:
            try:
                forward(model, torch.zeros(1, n, dtype=torch.long, device=device))
            except Exception:
                break
            longest, n = n, 2 * n
    model.train(was_training)
    if not longest:
        raise UnsupportedModel(f"{type(model).__name__} fails on 64 tokens and states no maximum length; the suite supports {SUPPORTED}")
    return longest


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def compute_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for a causal LM (every position predicts the next token) or a classifier.
    The loss is taken in fp32 even under autocast: a bf16 log-softmax over the vocabulary loses digits."""
    logits = get_logits(model(x)).float()
    if model_task(model, logits) in ("causal-lm", "masked-lm"):  # masked LM: y is -100 where nothing is masked
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=-100)
    return F.cross_entropy(logits, y)


def load_task_data(model: nn.Module, data, seq_len: int, tokenizer=None):
    """The data for the model's task unless the caller brought some (a data object, or a text file's path): the built-in corpus,
    masked for a masked LM, or classification set with the model's number of classes; byte tokens, or `tokenizer`'s ids."""
    task = getattr(model, "task", None) if getattr(model, "task", None) in TASKS else probe_model(model)
    if data is None or isinstance(data, str) or hasattr(data, "__fspath__"):
        if task == "classification":
            if data is not None:
                raise ValueError(f"a text file ({data}) has no labels; a classifier uses the built-in classification set")
            try:
                data = load_classification_set(getattr(model, "suite_num_classes", 4), tokenizer=tokenizer)
            except ValueError as e:
                raise UnsupportedModel(str(e)) from None
        else:
            data = load_corpus(data, tokenizer=tokenizer)
            if task == "masked-lm":
                data = MaskedLMData(data, BYTE_MASK_ID if tokenizer is None else getattr(tokenizer, "mask_token_id", None))
                if data.mask_id is None:
                    raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no mask token; a masked LM needs one")
    data.check_fits(seq_len, model_vocab_size(model))
    width = getattr(model, "suite_output_width", None)
    if task != "classification" and width is not None and data.top_id >= width:
        raise UnsupportedModel(f"{type(model).__name__} returns {width} logits per position, but the data ({data.source}) has "
                               f"token ids up to {data.top_id}: a {task}'s logits must score every token id (expected a width "
                               f"of at least {data.top_id + 1}); check the model's output layer, or the tokenizer parameter")
    return data
