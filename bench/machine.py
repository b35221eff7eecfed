"""Which machine a bench number came from, in one line.

The 2-core boxes we measure on share one model name ("AMD EPYC", or a virtual machine's bare
"Intel(R) Xeon(R) Processor") across CPU generations that differ up to 3x in speed (the same
`dvc repro` took 25 min on one and 8.4 min on another), so the line names the generation too:
the x86 family and model from /proc/cpuinfo, the AMD core generation or Intel microarchitecture
they mean where known (docs/references.md, "CPU generations"), and whether AVX-512 is there
(PyTorch's CPU kernels use it).
"""

from __future__ import annotations

import platform
from pathlib import Path

from pipeline.devices import usable_cores

# AMD family -> ((first model, generation), ...) by ascending first model; from AMD's
# processor programming references (family 17h: Zen / Zen+ / Zen 2, 19h: Zen 3 / Zen 4,
# 1Ah: Zen 5).
AMD_GENERATIONS = {
    0x17: ((0x00, "Zen 1"), (0x08, "Zen+"), (0x11, "Zen 1"), (0x18, "Zen+"), (0x30, "Zen 2")),
    0x19: ((0x00, "Zen 3"), (0x10, "Zen 4"), (0x20, "Zen 3"), (0x60, "Zen 4")),
    0x1A: ((0x00, "Zen 5"),),
}


# Intel family 6 model -> microarchitecture; exact models, no ranges (the Linux kernel's
# arch/x86/include/asm/intel-family.h). Server parts first, then the client ones seen in VMs.
INTEL_FAMILY6 = {
    0x3F: "Haswell",
    0x4F: "Broadwell",
    0x55: "Skylake / Cascade Lake",
    0x6A: "Ice Lake",
    0x6C: "Ice Lake",
    0x8F: "Sapphire Rapids",
    0xCF: "Emerald Rapids",
    0xAD: "Granite Rapids",
    0xAE: "Granite Rapids",
    0xAF: "Sierra Forest",
    0x5E: "Skylake",
    0x9E: "Kaby Lake / Coffee Lake",
    0xA7: "Rocket Lake",
    0x8C: "Tiger Lake",
    0x97: "Alder Lake",
    0x9A: "Alder Lake",
    0xB7: "Raptor Lake",
    0xBA: "Raptor Lake",
}


def cpuinfo_fields(text: str) -> dict[str, str]:
    """The first processor's `key: value` lines of /proc/cpuinfo."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def amd_generation(family: int, model: int) -> str | None:
    """The core generation (e.g. Zen 5) of an AMD family and model; None where not known."""
    found = None
    for first, name in AMD_GENERATIONS.get(family, ()):
        if model >= first:
            found = name
    return found


def generation(vendor: str, family: int, model: int) -> str | None:
    """The core generation of an x86 vendor id, family and model; None where not known."""
    if vendor == "AuthenticAMD":
        return amd_generation(family, model)
    if vendor == "GenuineIntel" and family == 6:
        return INTEL_FAMILY6.get(model)
    return None


def cpu_description(fields: dict[str, str]) -> str:
    """E.g. "AMD EPYC (family 26 model 2: Zen 5, AVX-512)" or "Intel(R) Xeon(R) Processor
    (family 6 model 167: Rocket Lake, AVX-512)" from cpuinfo_fields' result."""
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" not in fields or "model" not in fields:
        return name
    family, model = int(fields["cpu family"]), int(fields["model"])
    flags = fields.get("flags", "").split()
    notes = [
        generation(fields.get("vendor_id", ""), family, model),
        "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None,
    ]
    known = ", ".join(note for note in notes if note)
    return f"{name} (family {family} model {model}{': ' + known if known else ''})"


def machine() -> str:
    """The CPU (with its generation) and how many cores this process may use."""
    cpuinfo = Path("/proc/cpuinfo")
    fields = cpuinfo_fields(cpuinfo.read_text()) if cpuinfo.is_file() else {}
    return f"{cpu_description(fields)}, {usable_cores()} CPU cores"


if __name__ == "__main__":
    print(machine())
