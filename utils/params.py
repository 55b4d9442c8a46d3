"""Each tier's parameters: the one place a name, type, default and help text is written. The notebooks' parameters cells, the
batch runner's checks, the benchmark's command line and the README's table are generated from TIER_PARAMS (a test fails when
one drifts). Parameters are data (JSON values), never code: a value of another type is refused before any work starts."""

import ast
import contextlib
import math
import os
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from utils.models import REGISTRY, TASKS, check_config, check_spec
from utils import device as dev
from utils.precision import AUTO, PRECISION_CHOICES, canonical, check_fp32_modules

PARALLEL_CHOICES = ("ddp", "fsdp2")  # utils.train under torchrun: each rank a replica, or parameters sharded
LOG_EVERY_ACCELERATOR = 10  # optimizer steps between reads of the loop's records on a GPU (utils.loop.steps)


class ParamError(ValueError):
    """A parameter name or value that no tier accepts."""


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
               dict: "a mapping of names to JSON values"}
_ITEM_NAMES = {int: "integers", float: "numbers", str: "strings"}
SHOWN_CHARS = 80  # the most of a value an error message quotes: a 10 MB value must not become a 10 MB line


def shown(value) -> str:
    """A value as every usage error quotes it: its repr, cut to SHOWN_CHARS characters with its length said."""
    try:
        text = repr(value)
    except ValueError:  # an integer of more digits than Python prints, alone or inside a list or mapping
        what = "an integer" if isinstance(value, int) else f"a {type(value).__name__} holding an integer"
        return f"{what} of more than {sys.get_int_max_str_digits():,} digits"
    length = len(value) if isinstance(value, str) else len(text)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({length:,} characters)"


def _printable(number: int) -> bool:
    """Whether repr and JSON can write it (not past sys.get_int_max_str_digits()): a run's record holds its parameters."""
    try:
        repr(number)
    except ValueError:
        return False
    return True


def is_data(value) -> bool:
    """JSON values only: None, bool, int (one Python can print), finite float, str, and lists and str-keyed dicts
    of them. Anything else (a tuple, set, bytes, an object) could reach a notebook as code."""
    if isinstance(value, int):
        return _printable(value)
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(is_data(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_data(v) for k, v in value.items())
    return value is None or isinstance(value, str)


@dataclass(frozen=True)
class Param:
    name: str
    type: type         # int, float, str, bool, list or dict
    default: object
    help: str
    item: type = None  # a list's element type
    low: float = None  # smallest allowed number (for a list: of each element)
    high: float = None  # largest allowed number
    choices: tuple = ()
    optional: bool = False  # None is accepted too (its meaning is in the help)
    canonical: object = None  # maps every accepted spelling to the one name stored (precision aliases)
    min_items: int = 0  # a list's shortest length
    validate: object = None  # value -> None, or a ValueError saying what is wrong (what this machine has, say)
    added: bool = False  # added after runs were recorded: left out of a run's identity while at its default (utils.run)
    formerly: str = None  # its name before a rename: still accepted, and the name a run's identity keeps (utils.run)

    def expected(self) -> str:
        least = f"at least {self.min_items} " if self.min_items else ""
        what = f"a list of {least}{_ITEM_NAMES[self.item]}" if self.type is list else _TYPE_NAMES[self.type]
        if self.choices:
            what += " in " + ", ".join(map(repr, self.choices)) + (" (or an alias)" if self.canonical else "")
        if self.low is not None and self.high is not None:
            what += f" from {_number(self.low)} to {_number(self.high)}"
        elif self.low is not None:
            what += f" >= {_number(self.low)}"
        return what + (", or None" if self.optional else "")

    def _number_ok(self, value, kind) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
            return False
        return ((isinstance(value, int) or math.isfinite(value)) and (self.low is None or value >= self.low)
                and (self.high is None or value <= self.high))

    def check(self, value):
        """The value if it fits this parameter (an int as a float, an alias as its canonical name), else a ParamError."""
        if value is None and self.optional:
            return None
        if self.canonical and isinstance(value, str):
            with contextlib.suppress(ValueError):  # refused below, naming the choices
                value = self.canonical(value)
        if self.type in (int, float):
            ok = self._number_ok(value, self.type)
        elif self.type is list:
            ok = isinstance(value, list) and len(value) >= self.min_items and all(
                self._number_ok(v, self.item) if self.item in (int, float) else isinstance(v, self.item) for v in value)
        else:
            ok = isinstance(value, self.type) and is_data(value) and (not self.choices or value in self.choices)
        if not ok:
            raise ParamError(f"parameter {self.name!r} expects {self.expected()}; got {shown(value)} ({type(value).__name__})")
        if self.validate is not None:
            try:
                self.validate(value)
            except ValueError as e:  # a validator quotes the value whole: shortened here, once for all of them
                raise ParamError(f"parameter {self.name!r}: {str(e).replace(repr(value), shown(value))}") from None
        return float(value) if self.type is float else value

    def parse(self, value):
        """A command-line text or a grid file's value as this parameter reads it: a string parameter takes the text
        as it is (precision=32 is '32', and so is a grid's integer 32), any other parses a text as data (coerce)."""
        if self.type is not str:
            return coerce(value)
        if type(value) is int and _printable(value):
            return str(value)
        return value.strip() if isinstance(value, str) else value


def _number(x) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _a_folder(path: str):
    """A folder this process can write, or can create: checked before any work, so a run never trains first and fails
    when it saves. Nothing is created: a temporary file in the folder, or in its nearest existing parent, tells."""
    if not path:
        return
    folder = existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        blocked = "" if existing == folder else f"{folder!r} cannot be created: "
        raise ValueError(f"{blocked}{existing!r} is a file; expected a folder (created when missing)")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        where = "written" if existing == folder else f"created in {existing!r}"
        raise ValueError(f"{folder!r} cannot be {where} ({e.strerror or e}); expected a folder this process can write "
                         "(created when missing)") from None


def _common(model: str):
    return (Param("model", str, model, "registry name, 'hf:NAME_OR_PATH', 'package.module:factory' or "
                  "'path/to/file.py:factory'", validate=check_spec),
            Param("model_kwargs", dict, {}, "keyword arguments for the model factory (registry: config overrides; hf: "
                  "from_pretrained arguments such as num_labels)"),
            Param("task", str, "auto", "'auto' (an hf: model's architectures, else the logits' shape), 'causal-lm', "
                  "'classification' or 'masked-lm'", choices=("auto", *TASKS)),
            Param("tokenizer", str, "", "a Hugging Face tokenizer name or folder (empty: an hf: model's own, else bytes)"),
            Param("device", str, "auto", f"{dev.DEVICE_FORMS} ('auto': CUDA if available); checked against this machine",
                  validate=dev.check_device))


SEED = Param("seed", int, 0, "seeds weights, data order and probes", low=0, high=2**32 - 1)

# A built-in model's config fields that model_kwargs may set (utils.models.ModelConfig), checked as parameters are.
MODEL_CONFIG = {field: Param(f"model_kwargs[{field!r}]", kind, None, "", low=low, high=high) for field, kind, low, high in (
    ("n_layer", int, 1, None), ("n_head", int, 1, None), ("d_model", int, 1, None), ("max_len", int, 1, None),
    ("vocab_size", int, 1, None), ("num_classes", int, 2, None), ("dropout", float, 0, 1))}
_TAIL = (SEED, Param("output_dir", str, "", "where results.json and charts go (empty: runs/interactive/tier<N>)",
                     validate=_a_folder))
PRECISION = Param("precision", str, AUTO, "the AMP precision compared with fp32 ('auto': the best for the device)",
                  choices=PRECISION_CHOICES, canonical=canonical)

# The fine-tuning loop's settings (utils.loop.config.TrainConfig): the one set of defaults that tier 3,
# utils.train and test_fine_tuning all take.
FINE_TUNING = (
    Param("steps", int, 60, "optimizer steps of each fine-tuning run (fp32 and AMP)", low=1),
    Param("epochs", float, None, "passes over the training tokens; overrides steps (None: steps decides)", low=1e-12, optional=True),
    Param("batch_size", int, 16, "sequences per step", low=1),
    Param("seq_len", int, 128, "tokens per sequence (capped at the model's maximum)", low=1),
    Param("lr", float, 1e-3, "peak learning rate (warm-up, then cosine decay)", low=1e-12, high=10),
    Param("weight_decay", float, 0.01, "AdamW weight decay of matrices (not biases or norm gains)", low=0),
    Param("warmup_steps", int, None, "learning-rate warm-up steps (None: 10% of the steps)", low=0, optional=True),
    Param("grad_accum_steps", int, 1, "micro-batches per optimizer step (gradients are all-reduced once per step)", low=1),
    Param("max_grad_norm", float, 1.0, "gradient norm clipped to", low=1e-12),
    SEED,
    Param("eval_interval", int, 20, "optimizer steps between evaluations", low=1),
    Param("eval_batches", int, 8, "validation batches per evaluation (0: no evaluation)", low=0),
    Param("max_skipped_in_a_row", int, 20, "skipped steps in a row that stop a fine-tuning run as an overflow storm "
          "(a fail verdict with a diagnosis)", low=1, optional=True),
    Param("checkpoint_every", int, 0, "checkpoint each fine-tuning run every N steps and at its end (0: only when "
          "Ctrl-C or SIGTERM stops it)", low=0),
    Param("checkpoint_dir", str, "", "where checkpoints go (empty: <output_dir>/checkpoints; the batch runner keeps "
          "them in runs/<name>/checkpoints/<run>)", optional=True, validate=_a_folder),
    Param("keep_checkpoints", int, 3, "newest checkpoints kept", low=1),
    Param("resume", bool, False, "continue each fine-tuning run from its newest valid checkpoint in checkpoint_dir"),
    Param("parallel", str, "ddp", "'ddp' (each rank a full replica) or 'fsdp2' (parameters, gradients and optimizer "
          "state sharded: for models that do not fit one device)", choices=PARALLEL_CHOICES),
    Param("compile", bool, False, "torch.compile: time compiled training beside eager (compile time apart) and "
          "fine-tune compiled; a model that fails to compile runs eager, the reason recorded"),
    Param("activation_checkpointing", bool, False, "recompute each block's activations in backward instead of keeping "
          "them (non-reentrant, per block: the model's nn.ModuleList elements): less memory, about a third more "
          "compute; tier 3 measures both beside each other", added=True),
    Param("make_up_skipped", bool, False, "count steps as updates: each step the GradScaler skips (fp16) is made up "
          "by one more, at most `steps` more in all, so an AMP run makes as many updates as fp32 on the same batches "
          "(tier 3's parity runs do): a skipped step's batch is drawn again for the step that makes it up, so each "
          "step's record is read before the next draw", added=True),
    Param("log_every", int, 0, "optimizer steps between reads of the per-step records from the device, where "
          f"progress, callbacks and stop checks run (0: every step on a CPU, every {LOG_EVERY_ACCELERATOR} on a GPU)", low=0),
)
LOOP_SPEC = _LOOP = {p.name: p for p in FINE_TUNING}


def _loop(*names):
    return tuple(_LOOP[name] for name in names)


TIER_PARAMS = {
    1: (*_common("gpt-tiny"),
        Param("seq_len", int, 32, "tokens per sequence for the checks (capped at the model's maximum)", low=1),
        Param("batch_sizes", list, [1, 2, 4, 8, 16], "batch sizes the memory check tries, smallest first", item=int, low=1,
              min_items=1),
        Param("latency_iters", int, 30, "timed forwards for the latency percentiles", low=1),
        *_TAIL),
    2: (*_common("gpt-tiny"),
        replace(PRECISION, help="the mixed precision whose per-layer errors AMP readiness tabulates ('auto': the best "
                "for the device)"),
        Param("batch_size", int, 4, "sequences analyzed", low=1),
        Param("seq_len", int, 32, "tokens per sequence (capped at the model's maximum)", low=1),
        Param("strengths", list, [0.01, 0.05, 0.1, 0.2], "perturbation strengths for the robustness curves",
              item=float, low=0, high=1, min_items=1),
        Param("amp_tolerance", float, 0.05, "relative error beyond which a layer counts as drifting under autocast",
              low=1e-6, high=1),
        *_TAIL),
    3: (*_common("gpt-small"),
        PRECISION,
        *_loop("steps", "batch_size", "seq_len", "lr"),
        Param("trials", int, 3, "interleaved speed trials per precision", low=1),
        Param("timing_warmup_steps", int, 3, "steps per trial excluded from timing (its former name, warmup_steps, is "
              "still accepted)", low=0, formerly="warmup_steps"),
        Param("timed_steps", int, 5, "timed steps per trial", low=1),
        Param("parity_tolerance", float, 0.05, "largest relative loss gap for 'AMP is safe'", low=1e-6, high=1),
        Param("max_skipped_fraction", float, 0.05, "largest share of steps the GradScaler may skip for 'AMP is safe'",
              low=0, high=1),
        Param("sweep_batch_sizes", list, [], "batch sizes for the speedup sweep, e.g. [4, 8, 32] (empty: no sweep)",
              item=int, low=1),
        Param("minimal_loop", bool, False, "also time a bare hand-written loop, to measure the engine's overhead"),
        _LOOP["compile"],
        Param("tf32", bool, False, "let the fp32 baseline's CUDA matmuls run as TF32 (faster, 10-bit mantissa); off, "
              "AMP is measured against true fp32. The record says which"),
        replace(_LOOP["max_skipped_in_a_row"], optional=False),
        Param("remedy_runs", int, 2, "when amp_safe fails: parity runs the diagnosis may spend trying remedies (keep "
              "the blamed layers in fp32, bf16 instead of fp16, a gentler loss scale); 0 turns them off", low=0, added=True),
        Param("fp32_modules", list, [], "modules (model.named_modules() names) the AMP run keeps in fp32, autocast off "
              "around them: a remedy the diagnosis may name", item=str, added=True, validate=check_fp32_modules),
        _LOOP["activation_checkpointing"],
        Param("emulated_amp", str, "short", "where the device only emulates the AMP precision (bf16 on a CPU without "
              "AVX512-BF16/AMX or a GPU before sm_80, fp16 on a CPU without AMX-FP16): 'short' runs the parity runs at "
              "batch 1 and no speed trials (emulated speed says nothing about AMP), to fit in about a minute; 'full' runs "
              "the whole comparison, slowly", choices=("short", "full"), added=True),
        _LOOP["checkpoint_every"], replace(_LOOP["checkpoint_dir"], optional=False), _LOOP["resume"],
        *_TAIL),
}
# Tier 3's fine-tuning runs: the loop's settings it takes from its parameters (the rest are the loop's defaults).
TIER3_LOOP = tuple(p.name for p in TIER_PARAMS[3] if p.name in _LOOP)

# utils.train (torchrun): the loop's settings and tier 3's model and precision, plus what a multi-process run adds.
TRAIN_PARAMS = (
    *_common("gpt-small"),
    replace(PRECISION, help="the precision to train in ('auto': the best for the device, fp32 where AMP would not pay)"),
    *_loop("steps", "seq_len", "lr", "seed", "checkpoint_every", "resume", "compile"),
    replace(_LOOP["max_skipped_in_a_row"], optional=False), replace(_LOOP["checkpoint_dir"], optional=False),
    replace(_LOOP["batch_size"], help="sequences per step on each rank (the global batch is batch_size x ranks)"),
    *_loop("grad_accum_steps", "eval_interval", "parallel", "log_every"),
    Param("reference", str, "", "results.json of a one-process run: the scaling efficiency is measured against it"),
    Param("output_dir", str, "runs/train", "where rank 0 writes results.json, loss.png and (by default) checkpoints",
          validate=_a_folder),
)

# Parameters that say where and how a run keeps its files, not what it computes: a resumed or
# checkpointed run gives the same results, so these are not part of a run's identity (utils.run).
RUN_CONTROL = ("output_dir", "checkpoint_dir", "checkpoint_every", "resume")
ROOT = Path(__file__).resolve().parents[1]
# Set by the batch runner for a kernel that may share its machine with other runs (--jobs N, a Ray node): its
# timing verdicts say so (utils.tiers), since other runs' load is in their times.
SHARED_MACHINE_ENV = "SUITE_SHARED_MACHINE"


def spec(tier: int) -> dict:
    if tier not in TIER_PARAMS:
        raise ParamError(f"unknown tier {tier!r}; expected one of {sorted(TIER_PARAMS)}")
    return {p.name: p for p in TIER_PARAMS[tier]}


def output_folder(tier: int, output_dir: str) -> Path:
    return Path(output_dir or ROOT / "runs" / "interactive" / f"tier{tier}")


def current_names(params: dict, known) -> dict:
    """`params` with a parameter's former name (Param.formerly, of the Params `known`) as its name; both is an error."""
    for p in known:
        if p.formerly in params and p.name in params:
            raise ParamError(f"parameter {p.name!r} is given twice, also by its former name {p.formerly!r}; expected it once")
        if p.formerly in params:
            params = {p.name if name == p.formerly else name: value for name, value in params.items()}
    return params


def check_values(params: dict, known: dict, where: str) -> dict:
    """known's defaults ({name: Param}) updated with `params`, every name and value checked."""
    params = current_names(params, known.values())
    for name in params:
        if name not in known:
            raise ParamError(f"unknown parameter {shown(name)} for {where}; known parameters: {sorted(known)}")
    checked = {**{name: p.default for name, p in known.items()}, **{name: known[name].check(value) for name, value in params.items()}}
    if checked.get("model") in REGISTRY:
        _check_model_config(checked["model"], checked["model_kwargs"], checked["device"])
    return checked


def _check_model_config(name: str, kwargs: dict, device: str):
    """A built-in model's model_kwargs by field, type and range, and its size against the device's memory: a
    model that cannot be built is refused before anything is allocated."""
    for field, value in kwargs.items():
        if field not in MODEL_CONFIG:
            raise ParamError(f"parameter 'model_kwargs': unknown field {shown(field)} of {name!r}; expected some of "
                             f"{sorted(MODEL_CONFIG)}")
        MODEL_CONFIG[field].check(value)
    try:
        check_config(name, kwargs, dev.memory_bytes(dev.resolve_device(device)))
    except ValueError as e:  # it quotes model_kwargs whole
        raise ParamError(f"parameter 'model_kwargs': {str(e).replace(repr(kwargs), shown(kwargs))}") from None
    except OverflowError:  # its parameter count, past what a float holds, cannot be said in GiB
        raise ParamError(f"parameter 'model_kwargs': {name!r} with {shown(kwargs)} has more parameters than a float "
                         "counts; expected a config that fits the device's memory") from None


def check_params(tier: int, params: dict) -> dict:
    """The tier's defaults updated with `params`, every name and value checked."""
    return check_values(params, spec(tier), f"tier {tier}")


def add_arguments(parser, params):
    """One --option per parameter (underscores as dashes; a former name too), each value read as its parameter's type
    says (Param.parse). A true/false option given alone means true: --compile is --compile True."""
    for p in params:
        flag = {"nargs": "?", "const": True} if p.type is bool else {}
        names = ["--" + name.replace("_", "-") for name in (p.name, p.formerly) if name]
        parser.add_argument(*names, dest=p.name, type=p.parse, default=p.default, **flag,
                            help=f"{p.help} (default: {p.default!r})")


def coerce(text):
    """A command-line value as data: a Python/JSON literal where the text is one (3, 1e-3, [1, 2], {'a': 1}, True,
    None), else the text itself. Tuples, sets and bytes are not data here: the checks refuse them by type."""
    if not isinstance(text, str):
        return text
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text.strip()


def markdown_table() -> str:
    """The README's parameter table: one row per parameter, the tiers that take it and their defaults."""
    rows, seen = ["| parameter | tiers | default | meaning |", "| --- | --- | --- | --- |"], {}
    for tier, params in TIER_PARAMS.items():
        for p in params:
            seen.setdefault(p.name, []).append((tier, p))
    for name, uses in seen.items():
        by_default = {}
        for tier, p in uses:
            by_default.setdefault(repr(p.default), []).append(str(tier))
        default = "; ".join(f"`{d}`" + (f" (tier {', '.join(t)})" if len(by_default) > 1 else "") for d, t in by_default.items())
        rows.append(f"| `{name}` | {', '.join(str(t) for t, _ in uses)} | {default} | {uses[-1][1].help}; "
                    f"{uses[-1][1].expected()} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m utils.params: the README's parameter table
    print(markdown_table())
