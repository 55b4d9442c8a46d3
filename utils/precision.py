"""The registry of precisions (what each is and does), the plan that says how a run computes and why, and the model
copy a plan trains: plan = resolve("auto", device). resolve's rules are the README's; its reason says which applied,
and nothing falls back silently. No other module branches on a precision's identity: what one does is a field of its
Precision, and adding one is one register() call. Only torch.amp APIs are used; torch.cuda.amp is deprecated.
"""

import copy
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

from utils import device as dev
from utils.errors import UnsupportedPrecision

# The canonical names (Lightning's), the only spellings stored in results.
AUTO, FP32, FP16, BF16, FP8, FP8_EMULATED = "auto", "32", "16-mixed", "bf16-mixed", "fp8", "fp8-emulated"
GPU_CHECKED = (FP16, BF16, FP8)  # what python -m utils.gpu_check benchmarks against fp32
_TRUE_HALF = ("16-true", "16_true")  # Lightning's pure fp16, no precision here, whose runs scale the loss as well
FP8_MIN_CAPABILITY = (8, 9)  # L4, H100, H200: float8 tensor cores
REMEDIES = ("fp32_modules", "init_scale", "growth_interval")  # what a remedy changes in a plan (utils.diagnosis)


@dataclass(frozen=True)
class Precision:
    """What one precision is and does; every rule that depends on a precision reads a field here."""

    name: str                   # canonical, stored in results
    short: str                  # the dtype people say: fp32, fp16, bf16, fp8
    dtype: torch.dtype = None   # autocast's dtype; None: no autocast (fp32)
    aliases: tuple = ()         # other accepted spellings: the seed's "16", Lightning's "32-true", dtype names
    color: str = None           # every chart's colour for it (None: the chart's default)
    scaler: bool = False        # a GradScaler scales the loss (a narrow range underflows small gradients)
    largest: float = None       # its largest finite value: an fp32 activation beyond it overflows
    compared: bool = False      # tier 2 compares it with fp32 on every device (the autocast precisions)
    fp8: bool = False           # float8 Linear matmuls (torchao) inside autocast
    emulated: bool = False      # asked for as emulation: the path is tested, its speed means nothing
    emulation: Callable = None  # device -> why the device only emulates it (its speed says nothing), or None
    instead: str = None         # what the diagnosis tries in its place, where the device runs that natively
    key: str = None             # its name in tier 2's '<key>_safe' fields (default: short)


_REGISTRY = {}


def register(precision: Precision):
    """Add a precision: the runner, the tiers and the charts accept and handle it from here on."""
    _REGISTRY[precision.name] = precision


for _p in (Precision(FP32, "fp32", aliases=("32-true", "fp32", "float32"), color="tab:blue"),
           Precision(FP16, "fp16", torch.float16, ("16", "fp16", "float16"), "tab:red", scaler=True, compared=True,
                     largest=torch.finfo(torch.float16).max, emulation=lambda d: dev.fp16_emulated(d), instead=BF16),
           Precision(BF16, "bf16", torch.bfloat16, ("bf16", "bfloat16"), "tab:orange", compared=True,
                     emulation=lambda d: dev.bf16_emulated(d)),  # through the seam, where tests pretend a GPU
           Precision(FP8, "fp8", torch.bfloat16, ("float8",), fp8=True),
           Precision(FP8_EMULATED, "fp8 (emulated)", torch.bfloat16, fp8=True, emulated=True, key="fp8")):
    register(_p)


class _Choices:
    """The accepted names, read from the registry when asked: a registration counts at once (parameters use it)."""

    def __iter__(self):
        return iter((AUTO, *_REGISTRY))

    def __contains__(self, name):
        return name == AUTO or name in _REGISTRY


PRECISION_CHOICES = _Choices()


def spec(precision: str) -> Precision:
    return _REGISTRY[precision]


def compared() -> list:
    """The autocast precisions tier 2 compares with fp32 on every device."""
    return [p.name for p in _REGISTRY.values() if p.compared]


def canonical(requested) -> str:
    """The canonical name of any accepted spelling, or a ValueError listing what is accepted."""
    spellings = {AUTO: AUTO, **{a: p.name for p in _REGISTRY.values() for a in (p.name, *p.aliases)}}
    key = str(requested).strip().lower()
    if key in spellings:
        return spellings[key]
    raise ValueError(f"unknown precision {requested!r}; expected one of {', '.join(map(repr, PRECISION_CHOICES))} "
                     f"(aliases: {', '.join(sorted(spellings))})")


def label(precision: str) -> str:
    """A precision as people say it: fp32 for '32', the others as they are."""
    return _REGISTRY[FP32].short if precision == FP32 else precision


def short_label(precision: str) -> str:
    """The dtype a precision computes in: fp32, fp16, bf16, fp8."""
    return _REGISTRY[precision].short


def color(precision: str, default: str = "gray") -> str:
    """The colour every chart gives a precision."""
    return getattr(_REGISTRY.get(precision), "color", None) or default


def carries_loss_scale(spelling: str) -> bool:
    """Runs in this precision, as Lightning or the seed spell it (true half included), carry a loss scale."""
    if spelling in _TRUE_HALF:
        return True
    try:
        return getattr(_REGISTRY.get(canonical(spelling)), "scaler", False)
    except ValueError:  # a spelling this suite does not know: no scale to log
        return False


def instead_here(precision: str, device: torch.device):
    """The precision to try in this one's place where this device runs it natively (bf16 for fp16's range), or None."""
    instead = _REGISTRY[precision].instead
    return instead if instead and not _REGISTRY[instead].emulation(device) else None


def safe_fields(safe: dict) -> dict:
    """Tier 2's verdict per precision, {'fp16_safe': True, 'bf16_safe': False, 'fp8_safe': None (not compared)}."""
    out = {}
    for p in _REGISTRY.values():
        field = f"{p.key or p.short}_safe"
        if p.dtype is not None and out.get(field) is None:
            out[field] = safe.get(p.name)
    return out


# --- The plan ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PrecisionPlan:
    """What a run will do: effective precision, autocast dtype, whether a GradScaler runs, and why."""

    requested: str
    precision: str  # a registered name
    device_type: str
    reason: str
    fp32_modules: tuple = ()  # modules run with autocast off and fp32 inputs (keep_in_fp32): a layer AMP overflows
    init_scale: float = None  # the GradScaler's first scale (None: torch's, 2**16)
    growth_interval: int = None  # steps without overflow before the scale doubles (None: torch's, 2000)

    @property
    def spec(self) -> Precision:
        return _REGISTRY[self.precision]

    # What the plan's precision does, read from its Precision.
    autocast_dtype = property(lambda self: self.spec.dtype)
    enabled = property(lambda self: self.spec.dtype is not None)
    use_scaler = property(lambda self: self.spec.scaler)
    fp8 = property(lambda self: self.spec.fp8)
    emulated = property(lambda self: self.spec.emulated)

    def prepare(self, model: nn.Module) -> nn.Module:
        """A copy of `model` as this plan trains it (convert_for): the model itself stays as it was."""
        return convert_for(self, copy.deepcopy(model))

    @property
    def converts(self) -> bool:
        """Training under this plan changes the model (float8 layers, modules kept in fp32), so prepare() copies it."""
        return self.fp8 or bool(self.fp32_modules)

    def alternative(self, device: torch.device):
        """(what, plan): the precision to try instead (instead_here), keeping this plan's fp32 modules; or None."""
        instead = instead_here(self.precision, device)
        if not instead:
            return None
        return (f"{short_label(instead)} instead of {self.spec.short}",
                replace(resolve(instead, device), fp32_modules=self.fp32_modules))

    def out_of_range(self) -> str:
        """What an output past this precision's largest value is, for a diagnosis's text ('' without a limit)."""
        largest = self.spec.largest
        return f" (a value in it passed {self.spec.short}'s largest, {largest:g})" if largest else ""

    def autocast(self):
        """The autocast context for this plan; a no-op when the plan is fp32."""
        dtype = self.autocast_dtype or torch.get_autocast_dtype(self.device_type)
        return torch.autocast(device_type=self.device_type, dtype=dtype, enabled=self.enabled)

    def grad_scaler(self, sharded: bool = False) -> torch.amp.GradScaler:
        """Live for fp16, a pass-through otherwise, so one loop serves all; sharded (FSDP2): the ranks agree on skips."""
        tuned = {k: v for k, v in self.remedies().items() if k != "fp32_modules"}
        if sharded and self.use_scaler:
            return ShardedGradScaler(device=self.device_type, **tuned)
        return torch.amp.GradScaler(self.device_type, enabled=self.use_scaler, **tuned)

    def loss_scaler(self, sharded: bool = False) -> "LossScaler":
        return LossScaler(self, self.grad_scaler(sharded))

    def remedies(self) -> dict:
        """The remedies this plan carries, only those set: a record or checkpoint without any stays as it was."""
        return {k: list(v) if isinstance(v, tuple) else v for k in REMEDIES if (v := getattr(self, k))}

    def to_dict(self) -> dict:
        return {"requested": self.requested, "precision": self.precision, "device_type": self.device_type,
                "autocast_dtype": str(self.autocast_dtype).replace("torch.", "") if self.enabled else "float32",
                "grad_scaler": self.use_scaler, "reason": self.reason, **self.remedies()}


class LossScaler:
    """The plan's GradScaler and the optimizer step around it, reading nothing back to the host. fp16: a lower scale
    after update() means the GradScaler skipped the step. fp32/bf16 have no scaler, so non-finite gradients skip it here
    instead: a fused AdamW is handed the flag as its found_inf (no host read), an unfused one reads it on the host."""

    def __init__(self, plan: PrecisionPlan, scaler: torch.amp.GradScaler):
        self.plan, self.scaler = plan, scaler

    def backward(self, loss: torch.Tensor):
        self.scaler.scale(loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer):
        self.scaler.unscale_(optimizer)  # clip true gradients, not scaled ones

    def scale(self, device: torch.device) -> torch.Tensor:
        """The scale on the device, without get_scale()'s host read (1 with no scaler); read after a step's first backward."""
        if self.scaler.is_enabled():
            return self.scaler._scale.clone()  # the scale tensor itself: GradScaler keeps it on the device
        return torch.ones((), device=device)

    def step(self, optimizer: torch.optim.Optimizer, nonfinite: torch.Tensor, scale_before: torch.Tensor) -> torch.Tensor:
        """Step and update; True (a device tensor) where the step was skipped."""
        if self.scaler.is_enabled():
            self.scaler.step(optimizer)
        elif optimizer.defaults.get("fused"):
            optimizer.found_inf = nonfinite.float()  # 1: the kernel leaves weights and moments untouched
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf
        elif not bool(nonfinite):
            optimizer.step()
        self.scaler.update()
        return self.scale(scale_before.device) < scale_before if self.plan.use_scaler else nonfinite

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict):
        self.scaler.load_state_dict(state)


# --- Resolution ---------------------------------------------------------------------------------------------

def _best_mixed(device: torch.device):
    """The mixed precision this device runs fastest, or None, and why."""
    if device.type == "cuda":
        major, minor = dev.device_capability(device)
        name = dev.device_name(device)
        if dev.bf16_native(device):
            return BF16, f"{name} (sm_{major}{minor}) has native bf16: bf16 autocast, no GradScaler needed"
        return FP16, (f"{name} (sm_{major}{minor}) predates sm_80: fp16 autocast with GradScaler "
                      "(bf16 is only emulated there, slower than fp32)")
    if device.type == "cpu":
        if dev.bf16_native(device):
            return BF16, "CPU has native bf16 (AVX512-BF16/AMX): bf16 autocast"
        return None, "CPU lacks native bf16 (no avx512_bf16/amx_bf16): autocast would be emulated and slower, so fp32"
    return None, f"no mixed-precision rule for device type {device.type!r}, so fp32"


def resolve(requested=AUTO, device=None, use_amp=None) -> PrecisionPlan:
    """A request plus a device as a PrecisionPlan with a human reason. requested: 'auto' (the device's best) or any
    accepted spelling, honoured as asked (the reason warns where the device only emulates it). use_amp: the seed's
    flag; False forces fp32, True means 'auto' but never plain fp32 by request."""
    device = dev.resolve_device(device)
    want, asked = canonical(requested), str(requested)
    if use_amp is False:
        return PrecisionPlan(asked, FP32, device.type, "use_amp=False: fp32")
    if use_amp is True and want == FP32:
        want = AUTO
    if want == FP32:
        return PrecisionPlan(asked, FP32, device.type, "fp32 requested")
    if want != AUTO and _REGISTRY[want].fp8:
        return PrecisionPlan(asked, want, device.type, _fp8_reason(want, device))
    best, why = _best_mixed(device)
    if want == AUTO:
        return PrecisionPlan(asked, best or FP32, device.type, ("use_amp=True: " if use_amp else "auto: ") + why)
    if want == best:
        return PrecisionPlan(asked, want, device.type, f"{want} requested; {why}")
    if device.type == "cpu" and want == FP16:
        return PrecisionPlan(asked, want, device.type, "16-mixed forced on CPU: fp16 autocast + GradScaler('cpu') runs "
                             "slowly but exercises the fp16 path a T4 takes")
    return PrecisionPlan(asked, want, device.type, f"{want} requested and honoured, but {why}")


def fp32_plan(device: torch.device, reason: str = "fp32 requested") -> PrecisionPlan:
    """The fp32 baseline (or a tier that checks in fp32), with its reason."""
    return PrecisionPlan(FP32, FP32, device.type, reason)


def comparison_plan(requested, device: torch.device) -> PrecisionPlan:
    """The mixed precision to compare with fp32: the resolved one, or where 'auto' resolves to fp32
    (a CPU without native bf16), the one this device type would use, with the reason saying so."""
    plan = resolve(requested, device)
    if plan.enabled:
        return plan
    fallback = BF16 if device.type == "cpu" else FP16
    return PrecisionPlan(plan.requested, fallback, device.type,
                         f"{plan.reason}; compared with {fallback} anyway, to show what AMP would do here")


def _torchao_float8():
    """torchao's float8 training API, or UnsupportedPrecision saying how to get it (an optional package)."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise UnsupportedPrecision("fp8 training needs torchao, which is not installed: pip install torchao") from None
    return Float8LinearConfig, convert_to_float8_training


def _fp8_reason(want: str, device: torch.device) -> str:
    """Why fp8 can run here, or UnsupportedPrecision saying why not (device, capability, torchao)."""
    if not _REGISTRY[want].emulated:
        if device.type != "cuda":
            raise UnsupportedPrecision(f"fp8 needs a CUDA GPU with float8 tensor cores (sm_89+: L4, H100, H200); this run "
                                       f"is on {device.type}. ('fp8-emulated' runs the same path slowly, to test it.)")
        capability = dev.device_capability(device)
        if capability < FP8_MIN_CAPABILITY:
            raise UnsupportedPrecision(f"fp8 needs float8 tensor cores (sm_89+: L4, H100, H200); "
                                       f"{dev.device_name(device)} is sm_{capability[0]}{capability[1]}")
    _torchao_float8()
    how = "torchao float8 Linear matmuls (dynamic tensorwise scales) inside bf16 autocast"
    if _REGISTRY[want].emulated:
        return f"{want} requested: {how}, emulated (tests the path; slow, so no speed meaning)"
    return f"fp8 requested: {how}; compile=True fuses the float8 casts, as torchao recommends"


def convert_for(plan: PrecisionPlan, model: nn.Module) -> nn.Module:
    """The model as `plan` trains it, in place: its fp32_modules kept in fp32 (keep_in_fp32), and for fp8 every Linear
    whose in and out features are multiples of 16 (what float8 matmuls need) swapped for torchao's Float8Linear."""
    model = keep_in_fp32(model, plan.fp32_modules) if plan.fp32_modules else model
    if not plan.fp8 or any(type(m).__name__ == "Float8Linear" for m in model.modules()):
        return model  # not fp8, or converted already
    config_cls, convert = _torchao_float8()
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    fits = [m for m in linears if m.in_features % 16 == 0 and m.out_features % 16 == 0]
    if not fits:
        raise UnsupportedPrecision(f"fp8: none of the model's {len(linears)} nn.Linear layers has in and out features "
                                   "divisible by 16, which float8 matmuls need, so nothing would run in fp8")
    return convert(model, config=config_cls(emulate=plan.emulated), module_filter_fn=lambda m, name: any(m is f for f in fits))


def check_fp32_modules(names):
    """fp32_modules names submodules: '' is named_modules()'s name for the model itself, and the whole model kept in
    fp32 leaves nothing to AMP, which would then be judged safe and fast as fp32 against itself."""
    if "" in names:
        raise UnsupportedPrecision(f"fp32_modules {list(names)!r} names '', the root module (the whole model): nothing "
                                   "would be left to AMP, so fp32 would be compared with itself; expected submodule names "
                                   "from model.named_modules(), such as 'lm_head'")


def keep_in_fp32(model: nn.Module, names) -> nn.Module:
    """Run each named module (model.named_modules()'s names) with autocast off and its floating inputs cast to
    fp32: the remedy for a layer whose output leaves fp16's range, as T5's feed-forward does. Hooks, in place, so
    state_dict, deepcopy and checkpoints are unchanged; idempotent. The root ('') and an unknown name are refused."""
    check_fp32_modules(names)
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise UnsupportedPrecision(f"fp32_modules {unknown} name no module of {type(model).__name__}; expected names "
                                   f"from model.named_modules(), such as {[n for n in modules if n][:4]}")
    for name in names:
        module = modules[name]
        if not module.__dict__.get("_suite_fp32"):
            module.register_forward_pre_hook(_autocast_off, with_kwargs=True)
            module.register_forward_hook(_autocast_back, always_call=True)
            module.__dict__["_suite_fp32"], module.__dict__["_suite_autocast"] = True, []
    return model


def _as_fp32(value):
    return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _autocast_off(module, args, kwargs):
    enabled = [d for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
    module._suite_autocast.append(enabled)  # a stack: the module may run inside itself
    for d in enabled:
        torch.set_autocast_enabled(d, False)
    return tuple(_as_fp32(a) for a in args), {k: _as_fp32(v) for k, v in kwargs.items()}


def _autocast_back(module, args, output):
    for d in module._suite_autocast.pop():
        torch.set_autocast_enabled(d, True)


def emulated_here(plan: PrecisionPlan, device: torch.device):
    """Why this device only emulates the plan's precision, so that its speed here says nothing about AMP's (None where
    it runs natively). fp8-emulated is asked for as emulation and has its own rule."""
    why = plan.spec.emulation(device) if plan.spec.emulation else None
    return f"{plan.spec.short} is only emulated here ({why})" if why else None


@contextmanager
def tf32_matmuls(enabled: bool, device: torch.device):
    """fp32 matmuls on CUDA as TF32 (enabled: faster, a 10-bit mantissa) or true fp32, restored after; a CPU has no TF32."""
    if device.type != "cuda":
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def baseline_name(device: torch.device, tf32: bool) -> str:
    """What a speedup is measured against: on CUDA, fp32 with or without TF32 matmuls."""
    return "fp32" if device.type != "cuda" else "fp32 with TF32 matmuls" if tf32 else "fp32 (TF32 off)"


def compute_effective_precision(requested_precision: str, use_amp, cuda_available: bool, use_gpu: bool) -> str:
    """The seed's API, a pure function that never looks at the device: use_amp=None keeps the request, False gives
    '32', True '16' where CUDA is available and used, else '32'. resolve() picks the best precision for a real device."""
    if use_amp is None:
        return requested_precision
    return "16" if use_amp and cuda_available and use_gpu else FP32
