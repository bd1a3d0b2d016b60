"""FLOP counting and the machine's matmul rate, for ``benchmarks/speed.py``.

* ``count_flops(fn)``: FLOPs of one call, counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls,
  convolutions and attention; elementwise ops are not counted, as usual for MFU).
* ``matmul_gflops(n, ...)``: measured dense matmul rate of this machine, ``2 n^3`` FLOPs per ``n x n`` product.
* ``stream_gbps(...)``: measured rate at which batch-1 matrix-vector products read weights (the bound of a flow step).
* ``nominal_peak_tflops(device_name)``: vendor dense bf16 peak of common NVIDIA GPUs (for MFU on a GPU).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

#: Dense (no sparsity) bf16 tensor-core peak in TFLOP/s, from the vendors' data sheets (SXM parts).
NOMINAL_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "GH200": 989.4, "B200": 2250.0, "A100": 312.0,
                       "L40S": 362.1, "L4": 121.0, "A10G": 70.0, "A10": 125.0, "V100": 125.0}


def count_flops(fn, *args, **kwargs) -> tuple[int, object]:
    """``(flops, fn(*args, **kwargs))`` with the FLOPs of that one call."""
    with FlopCounterMode(display=False) as counter:
        out = fn(*args, **kwargs)
    return int(counter.get_total_flops()), out


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def matmul_gflops(n: int, reps: int = 10, warmup: int = 3, dtype=torch.float32, device="cpu") -> dict:
    """Median GFLOP/s (and IQR) of ``n x n @ n x n`` in ``dtype`` on ``device``."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(warmup):
        a @ b
    _sync(device)
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    q1, med, q3 = np.percentile(rates, [25, 50, 75])
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "median_gflops": float(med), "iqr_gflops": float(q3 - q1),
            "reps": reps}


def stream_gbps(megabytes: int = 32, rows: int = 1024, reps: int = 10, warmup: int = 2,
                dtype: torch.dtype = torch.float32) -> dict:
    """Median GB/s (and IQR) at which batch-1 matrix-vector products read ``dtype`` (float32 by default) weights on a
    CPU: one ``1 x rows`` vector times each of a list of ``rows x 512`` matrices, ``megabytes`` of them in all (more
    than the caches hold, as the action head's weights are at each flow step). This bounds any batch-1 flow step: it
    reads every weight once. ``median_gweights_per_s``: the same rate in weights (of any dtype) per second."""
    size = torch.empty((), dtype=dtype).element_size()
    n = max(1, megabytes * 2**20 // (rows * 512 * size))
    weights = [torch.randn(rows, 512).to(dtype) for _ in range(n)]
    x, bias = torch.randn(1, rows).to(dtype), torch.randn(512).to(dtype)

    def sweep():
        for w in weights:
            torch.addmm(bias, x, w)

    for _ in range(warmup):
        sweep()
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sweep()
        rates.append(n * rows * 512 * size / (time.perf_counter() - t0) / 1e9)
    q1, med, q3 = np.percentile(rates, [25, 50, 75])
    return {"megabytes": n * rows * 512 * size / 2**20, "dtype": str(dtype).removeprefix("torch."),
            "median_gbps": float(med), "iqr_gbps": float(q3 - q1), "median_gweights_per_s": float(med) / size,
            "reps": reps}


def nominal_peak_tflops(device_name: str) -> float | None:
    """The data-sheet dense bf16 peak for a device name such as ``"NVIDIA H200"``, or None if unknown."""
    for key in sorted(NOMINAL_BF16_TFLOPS, key=len, reverse=True):
        if key in device_name:
            return NOMINAL_BF16_TFLOPS[key]
    return None


__all__ = ["NOMINAL_BF16_TFLOPS", "count_flops", "matmul_gflops", "nominal_peak_tflops", "stream_gbps"]
