"""What machine a figure was measured on, and how much memory a process peaked at.

Speed figures are only comparable on the same CPU with the same instruction sets (integer kernels differ
several-fold between AVX2, AVX-512 VNNI and AMX), so every benchmark records these beside its numbers.
"""

from __future__ import annotations

import os
import platform

import torch

# Instruction-set extensions that change which kernels run (reported when the CPU has them).
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_int8", "amx_bf16")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """Which of ``CPU_FLAGS`` this CPU has."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [fl for fl in CPU_FLAGS if fl in have]
    except OSError:
        pass
    return []


def machine_info() -> dict:
    """CPU model and flags, cores, threads, versions, load: the context of a measurement."""
    cuda = torch.cuda.is_available()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    info = {
        "platform": platform.platform(), "cpu": cpu_model(), "cpu_flags": cpu_flags(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu", "load_avg_at_start": load,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    flags = ", ".join(info["cpu_flags"]) or "no AVX2"
    info["summary"] = (f"{info['device'] if cuda else info['cpu']} ({os.cpu_count()} cpu: {flags}; "
                       f"{torch.get_num_threads()} torch threads), torch {torch.__version__}")
    return info


def peak_rss_mb() -> float | None:
    """This process's peak resident set size so far (``VmHWM``), in MiB; None where /proc is absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the peak-RSS high-water mark to the current RSS (Linux ``clear_refs``); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
