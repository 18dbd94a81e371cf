"""The compute precision of a run, chosen from the device (`--mixed-precision`): float32 or a
Keras mixed policy (16-bit compute, float32 variables), and the reason, recorded in the run.

`auto` never picks a precision the device only emulates in software: bfloat16 on GPUs of
compute capability 8.0 or newer, float16 (loss-scaled) on older GPUs, float32 on CPUs. CPUs
with bfloat16 in hardware (AVX512-BF16, AMX) get it only when asked (`on`): with the mixed
policy alone the training step measured no faster on such a CPU (26,589 against 27,778
positions/s on a 4K-item catalog), its cost being in the float32 softmax and in small ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
BF16_GPU_CAPABILITY = (8, 0)
POLICIES = {"off": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


@dataclass(frozen=True)
class Precision:
    policy: str  # a Keras policy name: float32 | mixed_bfloat16 | mixed_float16
    reason: str


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The first CPU's feature flags (empty where /proc/cpuinfo is not there)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def gpu_capabilities() -> list[tuple[int, int]]:
    """Compute capability of each visible GPU ((0, 0) where TensorFlow does not say)."""
    found = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        found.append(tuple(details.get("compute_capability", (0, 0))))
    return found


def choose_precision(setting: str, gpus: list[tuple[int, int]],
                     flags: set[str]) -> Precision:
    """The policy for `setting` (auto | on | off | bfloat16 | float16) on a device
    with these GPU capabilities and CPU flags. `on` refuses (ValueError) a device without
    16-bit arithmetic in hardware; `bfloat16` / `float16` force a policy (emulated where the
    device lacks it: for tests and experiments)."""
    if setting in POLICIES:
        return Precision(POLICIES[setting], f"--mixed-precision {setting}")
    if gpus:
        if all(capability >= BF16_GPU_CAPABILITY for capability in gpus):
            return Precision("mixed_bfloat16", "GPUs of compute capability >= 8.0: bfloat16 "
                             "in hardware, no loss scaling needed")
        return Precision("mixed_float16", "GPUs older than compute capability 8.0: float16 "
                         "in hardware (loss-scaled)")
    hardware = sorted(flags & set(CPU_BF16_FLAGS))
    if setting == "on":
        if not hardware:
            raise ValueError("--mixed-precision on: this device has no 16-bit arithmetic in "
                             "hardware (no GPU, and the CPU flags lack "
                             f"{' and '.join(CPU_BF16_FLAGS)}); use auto or off")
        return Precision("mixed_bfloat16", f"--mixed-precision on: CPU with {', '.join(hardware)}")
    if setting != "auto":
        raise ValueError(f"--mixed-precision {setting!r}: expected one of auto, on, off, "
                         f"{', '.join(p for p in POLICIES if p != 'off')}")
    if hardware:
        return Precision("float32", f"CPU with {', '.join(hardware)}: bfloat16 measured no "
                         "faster for this model's training step; --mixed-precision on uses it")
    return Precision("float32", "CPU without bfloat16 in hardware")


def device_precision(setting: str) -> Precision:
    """choose_precision for this machine."""
    return choose_precision(setting, gpu_capabilities(), cpu_flags())
