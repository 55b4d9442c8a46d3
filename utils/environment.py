"""What a run ran on, recorded once with its results: device, capability, precision, the TF32 setting of
the fp32 baseline, threads and software versions."""

import platform

import torch

from utils.precision import PrecisionPlan, cpu_has_native_bf16, cpuinfo, device_capability, device_name


def run_record(device: torch.device, plan: PrecisionPlan) -> dict:
    """The environment of a run: device, capability, precision plan, TF32, threads, torch and Python."""
    if device.type == "cuda":
        major, minor = device_capability(device)
        name, capability = device_name(device), f"sm_{major}{minor}"
        tf32 = torch.get_float32_matmul_precision() != "highest"  # TF32 (or lower) for fp32 matmuls
    else:
        name = next((line.split(":", 1)[1].strip() for line in cpuinfo().splitlines() if line.startswith("model name")),
                    platform.processor() or platform.machine())
        capability = f"{torch.backends.cpu.get_cpu_capability()}, native bf16: {cpu_has_native_bf16()}"
        tf32 = None  # TF32 exists on CUDA only
    return {"device": str(device), "device_name": name, "capability": capability, **plan.to_dict(),
            "tf32": tf32, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}
