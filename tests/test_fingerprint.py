"""The platform fingerprint: facts read from the CPU (x86-64 and arm64), torch's build and the
environment; differences named, never called non-determinism."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from editflow import fingerprint

X86 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse4_2 avx avx2 fma f16c avx512f avx512bw avx512vl avx512_vnni avx512_bf16 avx512_fp16 amx_tile amx_bf16 amx_int8 rdrand

processor\t: 1
vendor_id\t: GenuineIntel
flags\t\t: fpu sse4_2
"""
ARM = """processor\t: 0
BogoMIPS\t: 2000.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp sve sve2 bf16 i8mm
CPU implementer\t: 0x41
CPU part\t: 0xd4f
"""


@pytest.fixture()
def cpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    def read(text: str) -> dict:
        (tmp_path / "cpuinfo").write_text(text)
        monkeypatch.setattr(fingerprint, "_CPUINFO", tmp_path / "cpuinfo")
        monkeypatch.setattr(fingerprint, "_CACHES", tmp_path / "no-caches")
        fingerprint.cpu_facts.cache_clear()
        return fingerprint.cpu_facts()

    yield read
    fingerprint.cpu_facts.cache_clear()


def test_x86_features_are_the_dispatch_relevant_flags_of_the_first_processor(cpu) -> None:
    facts = cpu(X86)
    assert facts == {
        "cpu": "Intel(R) Xeon(R) Platinum 8480+",
        "cpu_vendor": "GenuineIntel",
        "cpu_features": ["amx_bf16", "amx_int8", "amx_tile", "avx", "avx2", "avx512_bf16",
                         "avx512_fp16", "avx512_vnni", "avx512bw", "avx512f", "avx512vl",
                         "f16c", "fma"],
        "cpu_caches": [],
    }  # fmt: skip


def test_arm64_features_are_read_from_the_features_line(cpu) -> None:
    facts = cpu(ARM)
    assert facts["cpu_features"] == [
        "asimd", "asimddp", "asimdhp", "bf16", "fphp", "i8mm", "sve", "sve2"
    ]  # fmt: skip
    assert facts["cpu"] == "0xd4f" and facts["cpu_vendor"] == "0x41"


def test_a_machine_without_cpuinfo_still_has_a_fingerprint(cpu, monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(fingerprint, "_CPUINFO", tmp_path / "absent")
    fingerprint.cpu_facts.cache_clear()
    assert fingerprint.cpu_facts()["cpu_features"] == []


def test_the_fingerprint_holds_torch_build_threads_device_and_dispatch_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    facts = fingerprint.fingerprint(torch.device("cpu"))
    assert facts["torch"] == torch.__version__
    assert facts["threads"] == torch.get_num_threads()
    assert facts["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert facts["onednn"].startswith("v") or facts["onednn"] == "none"
    assert facts["environment"] == {"DNNL_MAX_CPU_ISA": "AVX2"}
    assert facts["device"] == "cpu"
    torch.set_num_threads(2)
    try:
        assert fingerprint.digest(fingerprint.fingerprint()) != fingerprint.digest(facts)
    finally:
        torch.set_num_threads(1)


def test_differences_are_named_fact_by_fact() -> None:
    lock = {"cpu_features": ["avx2", "avx512f"], "threads": 1, "torch": "2.13.0", "gpu": None}
    here = {"cpu_features": ["amx_tile", "avx2", "avx512_fp16", "avx512f"], "threads": 2,
            "torch": "2.13.0", "gpu": "NVIDIA H200"}  # fmt: skip
    assert fingerprint.differences(lock, here) == [
        "CPU features differ: amx_tile, avx512_fp16 here, not in the lock",
        "gpu unset in the lock, NVIDIA H200 here",
        "threads 1 in the lock, 2 here",
    ]
    assert fingerprint.differences(here, lock)[0] == (
        "CPU features differ: amx_tile, avx512_fp16 in the lock, not here"
    )
    assert fingerprint.differences(lock, dict(lock)) == []
