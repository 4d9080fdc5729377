"""Timing on the GPU and the FLOP counts speeds are quoted in."""

from __future__ import annotations

from collections.abc import Callable

from flashgen.device import import_triton


def attention_flops(batch: int, heads: int, n_q: int, n_k: int, head_dim: int, *, causal: bool, backward: bool = False) -> float:
    """4·B·H·Nq·Nk·D for the forward (two matrix products), halved when causal; the backward is 2.5×."""
    flops = 4.0 * batch * heads * n_q * n_k * head_dim
    if causal:
        flops /= 2
    return flops * 2.5 if backward else flops


def median_ms(fn: Callable[[], object], *, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median time of ``fn`` in milliseconds, CUDA events after warm-up (``triton.testing.do_bench``)."""
    triton = import_triton()
    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12
