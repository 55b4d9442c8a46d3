"""Mixed precision: one resolver for what precision a run gets and why, and the torch.amp pieces.

The rules (a person reads the reason; nothing falls back silently):
  CUDA sm_80+ (A100, H100, L4, RTX 30xx+)  bf16 autocast, no GradScaler (bf16 has fp32's range)
  CUDA before sm_80 (T4, V100)             fp16 autocast + GradScaler. A T4 reports bf16 as
                                            "supported" but only emulates it, slower than fp32.
  CPU with native bf16 (AVX512-BF16/AMX)   bf16 autocast
  anything else                            fp32

Only torch.amp APIs are used (torch.autocast, torch.amp.GradScaler); torch.cuda.amp is deprecated.
"""

import functools
import os
import platform
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from utils.models import UnsupportedModel, compute_loss

# fp8: torchao float8 training (Linear matmuls in float8 with dynamic scales) inside bf16 autocast, on GPUs
# with float8 tensor cores (sm_89+). fp8-emulated: the same conversion and loop with torchao's emulated
# float8 matmuls, on any device: it tests the path (slowly), it says nothing about speed.
FP8_PRECISIONS = ("fp8", "fp8-emulated")
PRECISIONS = ("32", "16-mixed", "bf16-mixed", *FP8_PRECISIONS)
PRECISION_CHOICES = ("auto", *PRECISIONS)
_ALIASES = {
    "auto": "auto",
    "32": "32", "32-true": "32", "fp32": "32", "float32": "32",
    "16": "16-mixed", "16-mixed": "16-mixed", "fp16": "16-mixed", "float16": "16-mixed",
    "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed", "bfloat16": "bf16-mixed",
    "fp8": "fp8", "float8": "fp8", "fp8-emulated": "fp8-emulated",
}
_DTYPES = {"32": None, "16-mixed": torch.float16, "bf16-mixed": torch.bfloat16, "fp8": torch.bfloat16,
           "fp8-emulated": torch.bfloat16}
FP8_MIN_CAPABILITY = (8, 9)  # L4, H100, H200: float8 tensor cores


def precision_label(precision: str) -> str:
    """A precision as people say it: fp32 for '32', the others as they are."""
    return "fp32" if precision == "32" else precision


class UnsupportedPrecision(UnsupportedModel):
    """A precision this device, this install or this model cannot run, refused with the reason."""


def resolve_device(device=None) -> torch.device:
    """None or 'auto' -> CUDA when available, else CPU; anything else as torch.device understands it."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def synchronize(device: torch.device):
    """Wait for queued kernels, so a timer measures work done rather than work launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# oneDNN (which runs CPU matmuls) uses bf16 instructions only at these ISA levels or above;
# ONEDNN_MAX_CPU_ISA set to a lower one makes it emulate bf16, as on a CPU without them.
_ONEDNN_BELOW_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (x86 avx512_bf16 or amx_bf16 flags, read from
    /proc/cpuinfo) and ONEDNN_MAX_CPU_ISA does not cap oneDNN below them. Elsewhere bf16 autocast is
    emulated and usually slower than fp32."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _ONEDNN_BELOW_BF16:
        return False
    flags = _cpuinfo()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _cpuinfo() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.read_text(errors="ignore") if cpuinfo.exists() else ""


@dataclass(frozen=True)
class PrecisionPlan:
    """What a run will do: effective precision, autocast dtype, whether a GradScaler runs, and why."""

    requested: str
    precision: str  # one of PRECISIONS
    device_type: str
    reason: str

    @property
    def autocast_dtype(self):
        return _DTYPES[self.precision]

    @property
    def enabled(self) -> bool:
        return self.precision != "32"

    @property
    def use_scaler(self) -> bool:
        # fp16's narrow range (max 65504, min normal 6e-5) underflows small gradients: scale the loss.
        return self.precision == "16-mixed"

    def autocast(self):
        """The autocast context for this plan; a no-op when the plan is fp32."""
        dtype = self.autocast_dtype or torch.get_autocast_dtype(self.device_type)
        return torch.autocast(device_type=self.device_type, dtype=dtype, enabled=self.enabled)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A GradScaler that is live for fp16 and a pass-through otherwise, so one loop serves all."""
        return torch.amp.GradScaler(self.device_type, enabled=self.use_scaler)

    def to_dict(self) -> dict:
        return {"requested": self.requested, "precision": self.precision, "device_type": self.device_type,
                "autocast_dtype": str(self.autocast_dtype).replace("torch.", "") if self.enabled else "float32",
                "grad_scaler": self.use_scaler, "reason": self.reason}


def _normalize(requested) -> str:
    key = str(requested).strip().lower()
    if key not in _ALIASES:
        raise ValueError(f"unknown precision {requested!r}; expected one of {', '.join(map(repr, PRECISION_CHOICES))} "
                         f"(aliases: {', '.join(sorted(_ALIASES))})")
    return _ALIASES[key]


def _best_mixed(device: torch.device):
    """The mixed precision this device runs fastest, or None, and why."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        name = torch.cuda.get_device_name(device)
        if major >= 8:
            return "bf16-mixed", f"{name} (sm_{major}{minor}) has native bf16: bf16 autocast, no GradScaler needed"
        return "16-mixed", (f"{name} (sm_{major}{minor}) predates sm_80: fp16 autocast with GradScaler "
                            "(bf16 is only emulated there, slower than fp32)")
    if device.type == "cpu":
        if cpu_has_native_bf16():
            return "bf16-mixed", "CPU has native bf16 (AVX512-BF16/AMX): bf16 autocast"
        return None, "CPU lacks native bf16 (no avx512_bf16/amx_bf16): autocast would be emulated and slower, so fp32"
    return None, f"no mixed-precision rule for device type {device.type!r}, so fp32"


def resolve_precision(requested="auto", device=None, use_amp=None) -> PrecisionPlan:
    """Turn a request plus a device into a PrecisionPlan with a human reason.

    requested: 'auto' (the best for the device), '32', '16-mixed' or 'bf16-mixed' (honoured as
    asked, with a warning in the reason where the device only emulates it).
    use_amp: the seed's flag. False forces fp32; True means 'auto' but never plain fp32 by request.
    """
    device = resolve_device(device)
    want = _normalize(requested)
    if use_amp is False:
        return PrecisionPlan(str(requested), "32", device.type, "use_amp=False: fp32")
    if use_amp is True and want == "32":
        want = "auto"
    if want == "32":
        return PrecisionPlan(str(requested), "32", device.type, "fp32 requested")
    if want in FP8_PRECISIONS:
        return PrecisionPlan(str(requested), want, device.type, _fp8_reason(want, device))
    best, why = _best_mixed(device)
    if want == "auto":
        return PrecisionPlan(str(requested), best or "32", device.type, ("use_amp=True: " if use_amp else "auto: ") + why)
    if want == best:
        return PrecisionPlan(str(requested), want, device.type, f"{want} requested; {why}")
    if device.type == "cpu" and want == "16-mixed":
        reason = "16-mixed forced on CPU: fp16 autocast + GradScaler('cpu') runs slowly but exercises the fp16 path a T4 takes"
    else:
        reason = f"{want} requested and honoured, but {why}"
    return PrecisionPlan(str(requested), want, device.type, reason)


def _torchao_float8():
    """torchao's float8 training API, or UnsupportedPrecision saying how to get it (an optional package)."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise UnsupportedPrecision("fp8 training needs torchao, which is not installed: pip install torchao") from None
    return Float8LinearConfig, convert_to_float8_training


def _fp8_reason(want: str, device: torch.device) -> str:
    """Why fp8 can run here, or UnsupportedPrecision saying why not (device, capability, torchao)."""
    if want == "fp8":
        if device.type != "cuda":
            raise UnsupportedPrecision(f"fp8 needs a CUDA GPU with float8 tensor cores (sm_89+: L4, H100, H200); this run "
                                       f"is on {device.type}. ('fp8-emulated' runs the same path slowly, to test it.)")
        capability = torch.cuda.get_device_capability(device)
        if capability < FP8_MIN_CAPABILITY:
            raise UnsupportedPrecision(f"fp8 needs float8 tensor cores (sm_89+: L4, H100, H200); "
                                       f"{torch.cuda.get_device_name(device)} is sm_{capability[0]}{capability[1]}")
    _torchao_float8()
    how = "torchao float8 Linear matmuls (dynamic tensorwise scales) inside bf16 autocast"
    if want == "fp8-emulated":
        return f"fp8-emulated requested: {how}, emulated (tests the path; slow, so no speed meaning)"
    return f"fp8 requested: {how}; compile=True fuses the float8 casts, as torchao recommends"


def convert_for(plan: PrecisionPlan, model: nn.Module) -> nn.Module:
    """The model as `plan` trains it: for fp8, every Linear whose in and out features are multiples of 16
    (what float8 matmuls need) swapped for torchao's Float8Linear, in place; otherwise the model as it is."""
    if plan.precision not in FP8_PRECISIONS or any(type(m).__name__ == "Float8Linear" for m in model.modules()):
        return model  # not fp8, or converted already
    config_cls, convert = _torchao_float8()
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    fits = [m for m in linears if m.in_features % 16 == 0 and m.out_features % 16 == 0]
    if not fits:
        raise UnsupportedPrecision(f"fp8: none of the model's {len(linears)} nn.Linear layers has in and out features "
                                   "divisible by 16, which float8 matmuls need, so nothing would run in fp8")
    return convert(model, config=config_cls(emulate=plan.precision == "fp8-emulated"),
                   module_filter_fn=lambda m, name: any(m is f for f in fits))


def comparison_plan(requested, device: torch.device) -> PrecisionPlan:
    """The mixed precision to compare with fp32: the resolved one, or where 'auto' resolves to fp32
    (a CPU without native bf16), the one this device type would use, with the reason saying so."""
    plan = resolve_precision(requested, device)
    if plan.enabled:
        return plan
    fallback = "bf16-mixed" if device.type == "cpu" else "16-mixed"
    return PrecisionPlan(plan.requested, fallback, device.type,
                         f"{plan.reason}; compared with {fallback} anyway, to show what AMP would do here")


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


def run_record(device: torch.device, plan: PrecisionPlan) -> dict:
    """What a run ran on, recorded once with its results: device, capability, precision, autocast
    dtype, GradScaler, the TF32 setting of the fp32 baseline, and the software versions."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        name, capability = torch.cuda.get_device_name(device), f"sm_{major}{minor}"
        tf32 = torch.get_float32_matmul_precision() != "highest"  # TF32 (or lower) for fp32 matmuls
    else:
        name = next((line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines() if line.startswith("model name")),
                    platform.processor() or platform.machine())
        capability = f"{torch.backends.cpu.get_cpu_capability()}, native bf16: {cpu_has_native_bf16()}"
        tf32 = None  # TF32 exists on CUDA only
    return {"device": str(device), "device_name": name, "capability": capability, **plan.to_dict(),
            "tf32": tf32, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def compute_effective_precision(requested_precision: str, use_amp, cuda_available: bool, use_gpu: bool) -> str:
    """The seed's API, a pure function of its arguments (it never looks at the device):
      use_amp=None   the requested precision, unchanged
      use_amp=False  '32'
      use_amp=True   '16' when CUDA is available and used, else '32' (AMP without CUDA meant fp32)
    To pick the best precision for a real device (bf16 on sm_80+ and on CPUs with native bf16, fp16
    with a GradScaler before sm_80), call resolve_precision instead: it inspects the device."""
    if use_amp is None:
        return requested_precision
    if use_amp and cuda_available and use_gpu:
        return "16"
    return "32"


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


def amp_summary(history) -> dict:
    """AMP statistics over a run's per-step history (a DataFrame with loss_scale and skipped)."""
    if len(history) == 0:
        return {"steps": 0, "skipped_steps": 0, "nonfinite_grad_steps": 0, "final_loss_scale": None, "min_loss_scale": None}
    return {"steps": int(len(history)), "skipped_steps": int(history["skipped"].sum()),
            "nonfinite_grad_steps": int(history["nonfinite_grads"].sum()),
            "final_loss_scale": float(history["loss_scale"].iloc[-1]), "min_loss_scale": float(history["loss_scale"].min())}


FP16_PRECISIONS = ("16", "16-mixed", "16_true", "16-true")  # the fp16 spellings whose runs carry a loss scale


@functools.cache
def _lightning_callback_base():
    """Lightning's Callback class, or None where Lightning is not installed. Imported on first use,
    not at module import: Lightning is optional and takes seconds to import."""
    try:
        from lightning.pytorch import Callback  # optional dependency
    except ImportError:
        try:
            from pytorch_lightning import Callback  # optional dependency, the older package name
        except ImportError:
            return None
    return Callback


@functools.cache
def _with_base(cls, base):
    return type(cls.__name__, (cls, base), {"__module__": cls.__module__, "__doc__": cls.__doc__})


def _get_loss_scale(trainer):
    """The GradScaler's current scale in a Lightning trainer (trainer.strategy.precision_plugin.scaler),
    as a float, unrounded; None when any piece is missing (no strategy, no plugin, no scaler)."""
    scaler = getattr(getattr(getattr(trainer, "strategy", None), "precision_plugin", None), "scaler", None)
    get_scale = getattr(scaler, "get_scale", None)
    if get_scale is None:
        return None
    try:
        return float(get_scale())
    except Exception:
        return None


class AmpWandbCallback:
    """Logs AMP state to Weights & Biases: amp/enabled (0/1), amp/precision (as given) and, for fp16
    precisions, amp/loss_scale.

    AmpWandbCallback(enabled, precision) is a Lightning Callback where Lightning is installed (a plain
    class otherwise, so importing never needs Lightning): on_train_epoch_end(trainer, pl_module) logs
    with the epoch as the step, reading the scale through _get_loss_scale(trainer). The same object
    serves this project's loop (test_fine_tuning(callbacks=[...])): on_step_end(record) also logs
    amp/skipped_steps, with the optimizer step as the step. AmpWandbCallback.from_plan(plan) builds it
    from a PrecisionPlan.

    `log` is any callable(dict, step=int); by default wandb.log while a W&B run is active. Without a
    run nothing is logged, and a logging error is warned about, never raised into training."""

    def __new__(cls, *args, **kwargs):
        base = _lightning_callback_base()
        return super().__new__(_with_base(cls, base) if base is not None and not issubclass(cls, base) else cls)

    def __init__(self, enabled: bool, precision: str, log=None):
        self.enabled, self.precision = bool(enabled), str(precision)
        self.skipped_steps = 0
        self._log = log

    @classmethod
    def from_plan(cls, plan: PrecisionPlan, log=None) -> "AmpWandbCallback":
        return cls(plan.enabled, plan.precision, log)

    def _logger(self):
        if self._log is not None:
            return self._log
        try:
            import wandb  # optional dependency: only needed when a user tracks runs in W&B
        except ImportError:
            return None
        return wandb.log if wandb.run is not None else None

    def _emit(self, metrics: dict, loss_scale, step: int):
        log = self._logger()
        if log is None:
            return
        metrics = {"amp/enabled": int(self.enabled), "amp/precision": self.precision, **metrics}
        if self.precision in FP16_PRECISIONS and loss_scale is not None:
            metrics["amp/loss_scale"] = float(loss_scale)
        try:
            log(metrics, step=int(step))
        except Exception as e:  # a logging failure must never stop training
            warnings.warn(f"AmpWandbCallback could not log at step {step}: {type(e).__name__}: {e}", stacklevel=2)

    def on_train_epoch_end(self, trainer, pl_module):
        """Lightning's hook: once per training epoch."""
        self._emit({}, _get_loss_scale(trainer), getattr(trainer, "current_epoch", 0))

    def on_step_end(self, record: dict):
        """test_fine_tuning's hook: once per optimizer step, in order, at the loop's log points."""
        self.skipped_steps += int(record["skipped"])
        self._emit({"amp/skipped_steps": self.skipped_steps}, record["loss_scale"], record["step"])
