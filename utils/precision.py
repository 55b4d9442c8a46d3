"""Precision: every precision name, the device a run takes, and the plan that says how a run computes and why.

    plan = resolve("auto", device)   # a PrecisionPlan: precision, reason, autocast, loss scaler, label, colour

The rules (a person reads the reason; nothing falls back silently):
  CUDA sm_80+ (A100, H100, L4, RTX 30xx+)  bf16 autocast, no GradScaler (bf16 has fp32's range)
  CUDA before sm_80 (T4, V100)             fp16 autocast + GradScaler. A T4 reports bf16 as
                                            "supported" but only emulates it, slower than fp32.
  CPU with native bf16 (AVX512-BF16/AMX)   bf16 autocast
  anything else                            fp32
fp8 (torchao float8 Linear matmuls inside bf16 autocast) runs on sm_89+; fp8-emulated runs the same path on
any device, slowly: it tests the path and says nothing about speed.

No other module writes a precision name in code. Tests pretend a GPU at the device seam (cuda_available,
device_capability, device_name). Only torch.amp APIs are used; torch.cuda.amp is deprecated.
"""

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

from utils.models import UnsupportedModel

# The canonical names (Lightning's), the only spellings stored in results and compared anywhere.
AUTO, FP32, FP16, BF16, FP8, FP8_EMULATED = "auto", "32", "16-mixed", "bf16-mixed", "fp8", "fp8-emulated"
FP8_PRECISIONS = (FP8, FP8_EMULATED)
MIXED = (FP16, BF16)  # the autocast precisions every device can run (tier 2 compares both)
GPU_CHECKED = (FP16, BF16, FP8)  # what python -m utils.gpu_check benchmarks against fp32
PRECISIONS = (FP32, FP16, BF16, *FP8_PRECISIONS)
PRECISION_CHOICES = (AUTO, *PRECISIONS)
# Every accepted spelling: the seed's "16", Lightning's "32-true", dtype names. The runner and the Python
# API both go through canonical(), so they accept the same ones.
_ALIASES = {
    AUTO: AUTO,
    FP32: FP32, "32-true": FP32, "fp32": FP32, "float32": FP32,
    "16": FP16, FP16: FP16, "fp16": FP16, "float16": FP16,
    "bf16": BF16, BF16: BF16, "bfloat16": BF16,
    FP8: FP8, "float8": FP8, FP8_EMULATED: FP8_EMULATED,
}
# fp16 spellings whose runs carry a loss scale, Lightning's true-half ones included (AmpWandbCallback).
_FP16_SPELLINGS = {"16", FP16, "16_true", "16-true"}
_DTYPES = {FP32: None, FP16: torch.float16, BF16: torch.bfloat16, FP8: torch.bfloat16, FP8_EMULATED: torch.bfloat16}
_SHORT = {FP32: "fp32", FP16: "fp16", BF16: "bf16", FP8: "fp8", FP8_EMULATED: "fp8 (emulated)"}
_COLORS = {FP32: "tab:blue", FP16: "tab:red", BF16: "tab:orange"}
FP16_MAX = 65504.0  # fp16's largest finite value: an activation or scaled gradient beyond it overflows
FP8_MIN_CAPABILITY = (8, 9)  # L4, H100, H200: float8 tensor cores
BF16_MIN_CAPABILITY = (8, 0)  # A100 and later: bf16 tensor cores (a T4 or V100 only emulates bf16)


class UnsupportedPrecision(UnsupportedModel):
    """A precision this device, this install or this model cannot run, refused with the reason."""


def canonical(requested) -> str:
    """The canonical name of any accepted spelling, or a ValueError listing what is accepted."""
    key = str(requested).strip().lower()
    if key not in _ALIASES:
        raise ValueError(f"unknown precision {requested!r}; expected one of {', '.join(map(repr, PRECISION_CHOICES))} "
                         f"(aliases: {', '.join(sorted(_ALIASES))})")
    return _ALIASES[key]


def label(precision: str) -> str:
    """A precision as people say it: fp32 for '32', the others as they are."""
    return _SHORT[FP32] if precision == FP32 else precision


def short_label(precision: str) -> str:
    """The dtype a precision computes in: fp32, fp16, bf16, fp8."""
    return _SHORT[precision]


def color(precision: str, default: str = "gray") -> str:
    """The colour every chart gives a precision."""
    return _COLORS.get(precision, default)


def is_fp16(spelling: str) -> bool:
    """An fp16 precision as Lightning and the seed spell it (mixed or true half): its runs carry a loss scale."""
    return spelling in _FP16_SPELLINGS


# --- The device seam: the only place this project asks torch which accelerator it has -------------------

def cuda_available() -> bool:
    return torch.cuda.is_available()


def device_capability(device: torch.device) -> tuple:
    return torch.cuda.get_device_capability(device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def kernel_seconds(fn, device: torch.device, warmup=None):
    """Seconds the GPU spent running kernels while fn() ran (after warmup(), unprofiled), overlapping kernels counted
    once (the profiler's CUDA kernel intervals); None off CUDA, where no device runs apart from the host."""
    if device.type != "cuda":
        return None
    if warmup:
        warmup()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, end = 0.0, float("-inf")
    for start, stop in spans:
        if stop > end:
            busy, end = busy + stop - max(start, end), stop
    return busy / 1e6  # the profiler's times are microseconds


def gpu_busy_share(fn, steps: int, step_s: float, device: torch.device):
    """The share of a training step's wall time (step_s, timed apart) the GPU computes: kernel time of `steps` calls
    of fn, per step, over step_s. None where there is no GPU to wait (a CPU runs each op as the host calls it)."""
    seconds = kernel_seconds(lambda: [fn() for _ in range(steps)], device, warmup=fn)  # lazy init is not a step's
    return None if seconds is None else min(1.0, seconds / steps / step_s)


def cuda_device_count() -> int:
    return torch.cuda.device_count() if cuda_available() else 0


DEVICE_FORMS = "'auto', 'cpu', 'cuda' or 'cuda:N'"


def check_device(text: str):
    """A device this machine has, or a ValueError naming what it has: checked before any work starts, so a
    run never dies inside torch on a device that is not there (or on 'meta', which holds no data)."""
    match = re.fullmatch(r"(auto|cpu|cuda)(?::(\d+))?", text)
    if not match or (match[2] is not None and match[1] != "cuda"):
        raise ValueError(f"expects {DEVICE_FORMS}; got {text!r}")
    count = cuda_device_count()
    if match[1] == "cuda" and count == 0:
        raise ValueError(f"{text!r} asks for CUDA, but this machine has no CUDA device (torch {torch.__version__}, "
                         "torch.cuda.is_available() is False); expected 'auto' or 'cpu'")
    if match[2] is not None and int(match[2]) >= count:
        have = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        raise ValueError(f"{text!r} asks for CUDA device {match[2]}, but this machine has {count} ({have})")


def memory_bytes(device: torch.device):
    """The memory a model's weights must fit in: the GPU's, or this machine's RAM (a container's limit where one is
    set); None where the OS does not say."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if not hasattr(os, "sysconf"):
        return None
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = Path("/sys/fs/cgroup/memory.max")  # cgroup v2: 'max' or a number of bytes
    text = limit.read_text().strip() if limit.is_file() else ""
    return min(ram, int(text)) if text.isdigit() else ram


def resolve_device(device=None) -> torch.device:
    """None or 'auto' -> CUDA when available, else CPU; anything else as torch.device understands it."""
    if device is None or device == AUTO:
        return torch.device("cuda" if cuda_available() else "cpu")
    return torch.device(device)


def synchronize(device: torch.device):
    """Wait for queued kernels, so a timer measures work done rather than work launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# oneDNN (which runs CPU matmuls) uses bf16 instructions only at these ISA levels or above;
# ONEDNN_MAX_CPU_ISA set to a lower one makes it emulate bf16, as on a CPU without them.
_ONEDNN_BELOW_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def cpuinfo() -> str:
    path = Path("/proc/cpuinfo")
    return path.read_text(errors="ignore") if path.exists() else ""


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (x86 avx512_bf16 or amx_bf16 flags, read from
    /proc/cpuinfo) and ONEDNN_MAX_CPU_ISA does not cap oneDNN below them. Elsewhere bf16 autocast is
    emulated and usually slower than fp32."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _ONEDNN_BELOW_BF16:
        return False
    flags = cpuinfo()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_has_native_fp16() -> bool:
    """True where oneDNN can run fp16 matmuls in hardware: AMX-FP16 (Granite Rapids and later), not capped below it by
    ONEDNN_MAX_CPU_ISA. Every other CPU emulates fp16 autocast, far slower than fp32."""
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in (*_ONEDNN_BELOW_BF16, "AVX512_CORE_BF16", "AVX512_CORE_AMX")
    return not capped and "amx_fp16" in cpuinfo()


# --- The plan ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PrecisionPlan:
    """What a run will do: effective precision, autocast dtype, whether a GradScaler runs, and why."""

    requested: str
    precision: str  # one of PRECISIONS
    device_type: str
    reason: str
    fp32_modules: tuple = ()  # modules run with autocast off and fp32 inputs (keep_in_fp32): a layer AMP overflows
    init_scale: float = None  # the GradScaler's first scale (None: torch's, 2**16)
    growth_interval: int = None  # steps without overflow before the scale doubles (None: torch's, 2000)

    @property
    def autocast_dtype(self):
        return _DTYPES[self.precision]

    @property
    def enabled(self) -> bool:
        return self.precision != FP32

    @property
    def use_scaler(self) -> bool:
        # fp16's narrow range (max 65504, min normal 6e-5) underflows small gradients: scale the loss.
        return self.precision == FP16

    @property
    def fp8(self) -> bool:
        return self.precision in FP8_PRECISIONS

    @property
    def emulated(self) -> bool:
        """Emulated float8 matmuls: the path is tested, its speed means nothing."""
        return self.precision == FP8_EMULATED

    def autocast(self):
        """The autocast context for this plan; a no-op when the plan is fp32."""
        dtype = self.autocast_dtype or torch.get_autocast_dtype(self.device_type)
        return torch.autocast(device_type=self.device_type, dtype=dtype, enabled=self.enabled)

    def grad_scaler(self, sharded: bool = False) -> torch.amp.GradScaler:
        """A GradScaler that is live for fp16 and a pass-through otherwise, so one loop serves all. Under
        FSDP2 (sharded) the sharded one, whose skip decision is agreed across ranks."""
        tuned = {k: v for k, v in (("init_scale", self.init_scale), ("growth_interval", self.growth_interval)) if v}
        if sharded and self.use_scaler:
            return ShardedGradScaler(device=self.device_type, **tuned)
        return torch.amp.GradScaler(self.device_type, enabled=self.use_scaler, **tuned)

    def loss_scaler(self, sharded: bool = False) -> "LossScaler":
        return LossScaler(self, self.grad_scaler(sharded))

    def to_dict(self) -> dict:
        remedies = {k: v for k, v in (("fp32_modules", list(self.fp32_modules)), ("init_scale", self.init_scale),
                                      ("growth_interval", self.growth_interval)) if v}  # only where set: records stay as they were
        return {"requested": self.requested, "precision": self.precision, "device_type": self.device_type,
                "autocast_dtype": str(self.autocast_dtype).replace("torch.", "") if self.enabled else "float32",
                "grad_scaler": self.use_scaler, "reason": self.reason, **remedies}


class LossScaler:
    """The plan's GradScaler and the optimizer step around it, reading nothing back to the host.

    backward(loss) scales and backpropagates; unscale(optimizer) before clipping; step(optimizer, nonfinite)
    steps, updates the scale and returns whether the step was skipped, as a device tensor. fp16: a lower
    scale after update() means the GradScaler skipped the step. fp32/bf16 have no scaler, so non-finite
    gradients skip it here instead: a fused AdamW is handed the flag as its found_inf (no host read), an
    unfused one reads it on the host."""

    def __init__(self, plan: PrecisionPlan, scaler: torch.amp.GradScaler):
        self.plan, self.scaler = plan, scaler

    def backward(self, loss: torch.Tensor):
        self.scaler.scale(loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer):
        self.scaler.unscale_(optimizer)  # clip true gradients, not scaled ones

    def scale(self, device: torch.device) -> torch.Tensor:
        """The current scale as a device tensor, without the host read get_scale() makes (1 when the
        scaler is off, as get_scale() says). Read after the step's first backward."""
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
        major, minor = device_capability(device)
        name = device_name(device)
        if bf16_native(device):
            return BF16, f"{name} (sm_{major}{minor}) has native bf16: bf16 autocast, no GradScaler needed"
        return FP16, (f"{name} (sm_{major}{minor}) predates sm_80: fp16 autocast with GradScaler "
                      "(bf16 is only emulated there, slower than fp32)")
    if device.type == "cpu":
        if bf16_native(device):
            return BF16, "CPU has native bf16 (AVX512-BF16/AMX): bf16 autocast"
        return None, "CPU lacks native bf16 (no avx512_bf16/amx_bf16): autocast would be emulated and slower, so fp32"
    return None, f"no mixed-precision rule for device type {device.type!r}, so fp32"


def resolve(requested=AUTO, device=None, use_amp=None) -> PrecisionPlan:
    """Turn a request plus a device into a PrecisionPlan with a human reason.

    requested: 'auto' (the best for the device) or any accepted spelling of a precision (honoured as asked,
    with a warning in the reason where the device only emulates it).
    use_amp: the seed's flag. False forces fp32; True means 'auto' but never plain fp32 by request.
    """
    device = resolve_device(device)
    want, asked = canonical(requested), str(requested)
    if use_amp is False:
        return PrecisionPlan(asked, FP32, device.type, "use_amp=False: fp32")
    if use_amp is True and want == FP32:
        want = AUTO
    if want == FP32:
        return PrecisionPlan(asked, FP32, device.type, "fp32 requested")
    if want in FP8_PRECISIONS:
        return PrecisionPlan(asked, want, device.type, _fp8_reason(want, device))
    best, why = _best_mixed(device)
    if want == AUTO:
        return PrecisionPlan(asked, best or FP32, device.type, ("use_amp=True: " if use_amp else "auto: ") + why)
    if want == best:
        return PrecisionPlan(asked, want, device.type, f"{want} requested; {why}")
    if device.type == "cpu" and want == FP16:
        reason = "16-mixed forced on CPU: fp16 autocast + GradScaler('cpu') runs slowly but exercises the fp16 path a T4 takes"
    else:
        reason = f"{want} requested and honoured, but {why}"
    return PrecisionPlan(asked, want, device.type, reason)


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
    if want == FP8:
        if device.type != "cuda":
            raise UnsupportedPrecision(f"fp8 needs a CUDA GPU with float8 tensor cores (sm_89+: L4, H100, H200); this run "
                                       f"is on {device.type}. ('fp8-emulated' runs the same path slowly, to test it.)")
        capability = device_capability(device)
        if capability < FP8_MIN_CAPABILITY:
            raise UnsupportedPrecision(f"fp8 needs float8 tensor cores (sm_89+: L4, H100, H200); "
                                       f"{device_name(device)} is sm_{capability[0]}{capability[1]}")
    _torchao_float8()
    how = "torchao float8 Linear matmuls (dynamic tensorwise scales) inside bf16 autocast"
    if want == FP8_EMULATED:
        return f"fp8-emulated requested: {how}, emulated (tests the path; slow, so no speed meaning)"
    return f"fp8 requested: {how}; compile=True fuses the float8 casts, as torchao recommends"


def convert_for(plan: PrecisionPlan, model: nn.Module) -> nn.Module:
    """The model as `plan` trains it, in place: its fp32_modules kept in fp32 (keep_in_fp32), and for fp8 every
    Linear whose in and out features are multiples of 16 (what float8 matmuls need) swapped for torchao's
    Float8Linear; otherwise the model as it is."""
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


_AUTOCAST_DEVICES = ("cpu", "cuda")


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
    enabled = [d for d in _AUTOCAST_DEVICES if torch.is_autocast_enabled(d)]
    module._suite_autocast.append(enabled)  # a stack: the module may run inside itself
    for d in enabled:
        torch.set_autocast_enabled(d, False)
    return tuple(_as_fp32(a) for a in args), {k: _as_fp32(v) for k, v in kwargs.items()}


def _autocast_back(module, args, output):
    for d in module._suite_autocast.pop():
        torch.set_autocast_enabled(d, True)


def bf16_native(device: torch.device) -> bool:
    """bf16 runs natively here, so it is worth offering: a CPU with bf16 instructions (cpu_has_native_bf16), a GPU from
    sm_80. Elsewhere bf16 autocast runs, but emulated and slower than fp32."""
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return device.type == "cuda" and tuple(device_capability(device)) >= BF16_MIN_CAPABILITY


def emulated_here(plan: PrecisionPlan, device: torch.device):
    """Why this device only emulates the plan's mixed precision, so that its speed here says nothing about AMP's
    (None where it runs natively). fp8-emulated is asked for as emulation and has its own rule."""
    if plan.precision == BF16 and not bf16_native(device):
        return (f"{short_label(BF16)} is only emulated here ("
                + ("this CPU has no AVX512-BF16/AMX instructions" if device.type == "cpu" else
                   f"{device_name(device)} predates sm_80") + ")")
    if plan.precision == FP16 and device.type == "cpu" and not cpu_has_native_fp16():
        return "fp16 is only emulated here (this CPU has no fp16 matmul instructions, AMX-FP16)"
    return None


@contextmanager
def tf32_matmuls(enabled: bool, device: torch.device):
    """fp32 matmuls on CUDA as TF32 (enabled: faster, a 10-bit mantissa) or as true fp32, restored afterwards.
    A CPU has no TF32: there this changes nothing."""
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
    """The seed's API, a pure function of its arguments (it never looks at the device):
      use_amp=None   the requested precision, unchanged
      use_amp=False  '32'
      use_amp=True   '16' when CUDA is available and used, else '32' (AMP without CUDA meant fp32)
    To pick the best precision for a real device (bf16 on sm_80+ and on CPUs with native bf16, fp16
    with a GradScaler before sm_80), call resolve instead: it inspects the device."""
    if use_amp is None:
        return requested_precision
    if use_amp and cuda_available and use_gpu:
        return "16"
    return FP32
