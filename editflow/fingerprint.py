"""The platform fingerprint: what, besides a stage's key, decides the bytes it computes.

Two machines that agree on every fact here compute the same bytes for the same key; two that
differ in any may round differently (oneDNN and MKL pick their kernels and blocking from the
CPU's instruction sets, vendor and cache sizes; torch's own kernels from its CPU capability;
reductions split by thread count). So a lock compares output digests exactly only where the
fingerprint is the lock's, and images within a tolerance elsewhere. What differs is named
("CPU features differ: amx_tile here, not in the lock"), never called non-determinism.

The facts are read from the CPU itself (``/proc/cpuinfo``, ``/sys`` cache sizes), from
torch's build (its oneDNN and MKL versions) and from the environment variables that steer
kernel dispatch. Over-specific is safe (an exact check becomes a tolerant one); missing a
fact is not (a check would expect bytes it cannot get), hence the generous list.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# The instruction sets kernels dispatch on (x86-64 flags as /proc/cpuinfo spells them, then
# arm64 features); whatever a CPU has beyond these does not change float results.
DISPATCH_FEATURES = (
    "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512cd", "avx512dq",
    "avx512vl", "avx512ifma", "avx512vbmi", "avx512_vbmi2", "avx512_vnni", "avx512_bf16",
    "avx512_fp16", "avx512_bitalg", "avx512_vpopcntdq", "amx_tile", "amx_bf16", "amx_int8",
    "amx_fp16",
    "asimd", "asimdhp", "fphp", "asimddp", "sve", "sve2", "bf16", "i8mm", "sme",
)  # fmt: skip
# Environment variables that change which kernels run or how they round.
DISPATCH_ENVIRONMENT = (
    "ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA", "DNNL_DEFAULT_FPMATH_MODE",
    "ONEDNN_DEFAULT_FPMATH_MODE", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE",
)  # fmt: skip
_CPUINFO = Path("/proc/cpuinfo")
_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")


@functools.cache
def cpu_facts() -> dict[str, Any]:
    """The CPU's vendor, model, dispatch-relevant features and cache sizes (read once)."""
    fields: dict[str, str] = {}
    try:
        for line in _CPUINFO.read_text(encoding="utf-8", errors="replace").splitlines():
            name, separator, value = line.partition(":")
            if not separator:
                if fields:
                    break  # the first processor's block describes them all
                continue
            fields.setdefault(name.strip().lower(), value.strip())
    except OSError:
        pass
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    return {
        "cpu": fields.get("model name") or fields.get("cpu part") or platform.processor(),
        "cpu_vendor": fields.get("vendor_id") or fields.get("cpu implementer") or "",
        "cpu_features": sorted(flags.intersection(DISPATCH_FEATURES)),
        "cpu_caches": _cache_sizes(),
    }


def _cache_sizes() -> list[str]:
    sizes = []
    for index in sorted(_CACHES.glob("index*")):
        try:
            parts = [(index / name).read_text().strip() for name in ("level", "type", "size")]
        except OSError:
            continue
        sizes.append("L{} {} {}".format(*parts))
    return sizes


@functools.cache
def _torch_build() -> dict[str, str]:
    """torch's version and the oneDNN and MKL builds it carries."""
    import torch

    config = torch.__config__.show()
    onednn = re.search(r"(?:MKL-DNN|oneDNN) (v[\d.]+)", config)
    mkl = re.search(r"Math Kernel Library Version ([\w.-]+)", config)
    return {
        "torch": torch.__version__,
        "onednn": onednn.group(1) if onednn else "none",
        "mkl": mkl.group(1) if mkl else "none",
    }


def fingerprint(device: Any = None) -> dict[str, Any]:
    """The platform facts of this process, computing on ``device`` (default: the CPU).

    Reads torch's thread count and capability at call time: a run that changes its thread
    count gets another fingerprint.
    """
    import torch

    facts: dict[str, Any] = {
        "machine": platform.machine(),
        **cpu_facts(),
        **_torch_build(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "environment": {
            name: os.environ[name] for name in DISPATCH_ENVIRONMENT if os.environ.get(name)
        },
        "device": getattr(device, "type", None) or "cpu",
    }
    if facts["device"] == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
        facts["cuda"] = torch.version.cuda
        facts["cudnn"] = torch.backends.cudnn.version()
    return facts


def digest(facts: Mapping[str, Any]) -> str:
    """A short name for a fingerprint: 16 hex digits of sha256 over its canonical JSON."""
    text = json.dumps(facts, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def differences(locked: Mapping[str, Any], here: Mapping[str, Any]) -> list[str]:
    """What differs between the lock's platform and this one, one phrase per fact."""
    phrases = []
    for name in sorted(set(locked) | set(here)):
        old, new = locked.get(name), here.get(name)
        if old == new:
            continue
        if isinstance(old, list) and isinstance(new, list):
            only_here = [item for item in new if item not in old]
            only_lock = [item for item in old if item not in new]
            parts = []
            if only_here:
                parts.append(f"{', '.join(map(str, only_here))} here, not in the lock")
            if only_lock:
                parts.append(f"{', '.join(map(str, only_lock))} in the lock, not here")
            phrases.append(f"{_title(name)} differ: {'; '.join(parts)}")
        else:
            phrases.append(f"{_title(name)} {_shown(old)} in the lock, {_shown(new)} here")
    return phrases


def _title(name: str) -> str:
    return name.replace("_", " ").replace("cpu ", "CPU ")


def _shown(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True) if value else "{}"
    return str(value)
