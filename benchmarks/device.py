"""The device a benchmark runs on: its name, its datasheet peak, a measured matrix-product peak.

Peaks are dense (no sparsity) tensor-core rates from NVIDIA's datasheets, in TFLOP/s, for
the GPUs these benchmarks are likely to meet; "float32" is the plain (non-TF32) rate, the
one a float32 model gets unless TF32 is switched on. A device missing here gets no
datasheet fraction, only the measured one.
"""

from __future__ import annotations

import os
import platform
import time

import torch

# name fragment (first match wins, most specific first) -> {dtype: dense TFLOP/s}
PEAK_TFLOPS = (
    ("H100 PCIe", {"bfloat16": 756.0, "float16": 756.0, "float32": 51.2}),
    ("H100 NVL", {"bfloat16": 835.0, "float16": 835.0, "float32": 60.0}),
    ("H100", {"bfloat16": 989.4, "float16": 989.4, "float32": 66.9}),  # SXM
    ("H200", {"bfloat16": 989.4, "float16": 989.4, "float32": 66.9}),
    ("A100", {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5}),
    ("L40S", {"bfloat16": 362.1, "float16": 362.1, "float32": 91.6}),
)


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def datasheet_peak(dtype: str) -> float | None:
    """FLOP/s, or None (a CPU, or a GPU not in the table)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    for fragment, peaks in PEAK_TFLOPS:
        if fragment in name:
            value = peaks.get(dtype)
            return value * 1e12 if value else None
    return None


def measured_peak(dtype: str = "float32", size: int | None = None, repeats: int = 10, clock: str = "wall") -> float:
    """FLOP/s of a large square matrix product in ``dtype`` on this device (CPU: on the threads torch
    uses, timed by ``clock``, "cpu" = process CPU time); random data, warm-up first, median of repeats."""
    cuda = torch.cuda.is_available()
    dt = getattr(torch, dtype)
    size = size or (8192 if cuda else 512)
    device = "cuda" if cuda else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=gen).to(dt)
    b = torch.randn(size, size, device=device, generator=gen).to(dt)
    times = []
    for i in range(repeats + 2):
        if cuda:
            torch.cuda.synchronize()
        started = time.process_time() if clock == "cpu" and not cuda else time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize()
        elapsed = (time.process_time() if clock == "cpu" and not cuda else time.perf_counter()) - started
        if i >= 2:
            times.append(elapsed)
    times.sort()
    return 2 * size ** 3 / max(times[len(times) // 2], 1e-9)


def peak_report(dtype: str, clock: str = "wall") -> dict:
    sheet = datasheet_peak(dtype)
    return {"device": device_name(), "dtype": dtype, "datasheet_flops": sheet,
            "measured_matmul_flops": measured_peak(dtype, clock=clock)}


def fraction(flops_per_s: float | None, peak: float | None) -> float | None:
    return None if not flops_per_s or not peak else flops_per_s / peak
