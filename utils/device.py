"""The device seam: the only place this project asks torch which accelerator it has, what it can do and how much
memory it holds (utils.measure times on it). Tests pretend a GPU here (cuda_available, device_capability,
device_name, cpuinfo, kernel_seconds); callers go through this module's names, so a patch here reaches them all."""

import os
import re
from pathlib import Path

import torch

BF16_MIN_CAPABILITY = (8, 0)  # A100 and later: bf16 tensor cores (a T4 or V100 only emulates bf16)
DEVICE_FORMS = "'auto', 'cpu', 'cuda' or 'cuda:N'"
# ONEDNN_MAX_CPU_ISA capped at one of these makes oneDNN (CPU matmuls) emulate bf16, as on a CPU without bf16 instructions.
_ONEDNN_BELOW_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def cuda_available() -> bool:
    return torch.cuda.is_available()


def device_capability(device: torch.device) -> tuple:
    return torch.cuda.get_device_capability(device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def cuda_device_count() -> int:
    return torch.cuda.device_count() if cuda_available() else 0


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


def resolve_device(device=None) -> torch.device:
    """None or 'auto' -> CUDA when available, else CPU; anything else as torch.device understands it."""
    if device is None or device == "auto":
        return torch.device("cuda" if cuda_available() else "cpu")
    return torch.device(device)


def local_gpu(device_request: str, local_rank: int):
    """The GPU a torchrun rank takes (its LOCAL_RANK), made current; None where the run is on the CPU."""
    if device_request == "cpu" or not cuda_available():
        return None
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def current_gpu() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def synchronize(device: torch.device):
    """Wait for queued kernels, so a timer measures work done rather than work launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- Memory ------------------------------------------------------------------------------------------------

def memory_bytes(device: torch.device):
    """The memory a model's weights must fit in: the GPU's, else the RAM (or a container's limit); None if the OS won't say."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if not hasattr(os, "sysconf"):
        return None
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = Path("/sys/fs/cgroup/memory.max")  # cgroup v2: 'max' or a number of bytes
    text = limit.read_text().strip() if limit.is_file() else ""
    return min(ram, int(text)) if text.isdigit() else ram


def start_peak(device: torch.device, release_cached: bool = False) -> int:
    """Begin watching the allocator's peak on a GPU; the bytes allocated now (0 off CUDA). release_cached: first hand
    cached blocks back (a memory probe that grows the batch), which a timed trial must not pay for."""
    if device.type != "cuda":
        return 0
    if release_cached:
        torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_bytes(device: torch.device):
    """The allocator's peak since start_peak(); None off CUDA, where no allocator keeps one."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def out_of_memory(error: Exception) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


# --- Random state --------------------------------------------------------------------------------------------

def rng_state(device: torch.device):
    """The GPU's random state (dropout on the device), or None off CUDA."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng_state(state, device: torch.device):
    if device.type == "cuda" and state is not None:
        torch.cuda.set_rng_state(state, device)


# --- What runs natively --------------------------------------------------------------------------------------

def cpuinfo() -> str:
    path = Path("/proc/cpuinfo")
    return path.read_text(errors="ignore") if path.exists() else ""


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (avx512_bf16 or amx_bf16 in /proc/cpuinfo) and ONEDNN_MAX_CPU_ISA
    does not cap oneDNN below them. Elsewhere bf16 autocast is emulated and usually slower than fp32."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _ONEDNN_BELOW_BF16:
        return False
    flags = cpuinfo()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_has_native_fp16() -> bool:
    """True where oneDNN can run fp16 matmuls in hardware: AMX-FP16 (Granite Rapids and later), not capped below it by
    ONEDNN_MAX_CPU_ISA. Every other CPU emulates fp16 autocast, far slower than fp32."""
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in (*_ONEDNN_BELOW_BF16, "AVX512_CORE_BF16", "AVX512_CORE_AMX")
    return not capped and "amx_fp16" in cpuinfo()


def bf16_emulated(device: torch.device):
    """Why this device only emulates bf16 (slower than fp32), or None where it is native: a CPU with bf16 instructions, sm_80+."""
    if device.type == "cpu":
        return None if cpu_has_native_bf16() else "this CPU has no AVX512-BF16/AMX instructions"
    if device.type == "cuda" and tuple(device_capability(device)) < BF16_MIN_CAPABILITY:
        return f"{device_name(device)} predates sm_80"
    return None if device.type == "cuda" else f"no bf16 rule for device type {device.type!r}"


def fp16_emulated(device: torch.device):
    """Why this device only emulates fp16 matmuls, or None: every GPU runs them; a CPU only with AMX-FP16."""
    return "this CPU has no fp16 matmul instructions, AMX-FP16" if device.type == "cpu" and not cpu_has_native_fp16() else None


def bf16_native(device: torch.device) -> bool:
    """bf16 runs natively here, so it is worth offering."""
    return bf16_emulated(device) is None


# --- Kernel time ---------------------------------------------------------------------------------------------

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
