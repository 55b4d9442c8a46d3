"""What a run ran on, recorded once with its results: device, capability, precision, TF32, threads and versions."""

import platform

import torch

from utils import device as dev
from utils.precision import PrecisionPlan


def run_record(device: torch.device, plan: PrecisionPlan, tf32: bool = None) -> dict:
    """tf32: the run's own setting for its fp32 matmuls (tier 3's parameter, which it runs under); None: torch's current one."""
    if device.type == "cuda":
        major, minor = dev.device_capability(device)
        name, capability = dev.device_name(device), f"sm_{major}{minor}"
        tf32 = torch.get_float32_matmul_precision() != "highest" if tf32 is None else tf32  # TF32 (or lower)
    else:
        name = next((line.split(":", 1)[1].strip() for line in dev.cpuinfo().splitlines() if line.startswith("model name")),
                    platform.processor() or platform.machine())
        capability = f"{torch.backends.cpu.get_cpu_capability()}, native bf16: {dev.cpu_has_native_bf16()}"
        tf32 = None  # TF32 exists on CUDA only
    return {"device": str(device), "device_name": name, "capability": capability, **plan.to_dict(),
            "tf32": tf32, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}
