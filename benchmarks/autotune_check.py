"""FLASHGEN_AUTOTUNE on a GPU: a shape no cache has an entry for is tuned on its first call, stored, and
dispatched from then on.

    FLASHGEN_AUTOTUNE=1 FLASHGEN_DB=sqlite:///auto.db python benchmarks/autotune_check.py
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flashgen  # noqa: E402


def main() -> None:
    if os.environ.get("FLASHGEN_AUTOTUNE") != "1" or not os.environ.get("FLASHGEN_DB"):
        raise SystemExit("set FLASHGEN_AUTOTUNE=1 and FLASHGEN_DB to a scratch database")
    q = torch.randn(2, 12, 3000, 96, device="cuda", dtype=torch.bfloat16)  # head dim 96: not in any shipped cache
    start = time.perf_counter()
    out = flashgen.attention(q, q, q, causal=True)
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    reference = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    error = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
    start = time.perf_counter()
    flashgen.attention(q, q, q, causal=True)
    torch.cuda.synchronize()
    second = time.perf_counter() - start
    print("dispatch:", flashgen.explain(q, q, q, causal=True).forward.describe())
    print(f"first call {first:.1f} s (tuning included), second call {second * 1e3:.2f} ms, error vs SDPA {error:.2e}")


if __name__ == "__main__":
    main()
