"""Check and time the Gluon forward experiment (benchmarks/gluon_forward.py) on a Hopper GPU.

1. Correctness: fp16 and bf16, D 64 and 128, causal or not, ragged lengths, SDPA's and a transposed (B, N, H, D)
   memory layout, against a float64 reference; outputs are poisoned with NaN first. Output: relative Frobenius
   error; lse: largest absolute error.
2. Speed: the grid of issue 6 (16k tokens, hidden 2048, bf16) in one process on the same inputs: each Gluon
   config and the peers of ``flashgen bench`` (flashgen as dispatched from the shipped or FLASHGEN_DB cache,
   SDPA cuDNN, SDPA flash = FA2, compiled FlexAttention), called as ``flashgen bench`` calls them.
   TFLOP/s from ``triton.testing.do_bench`` medians; 4·B·H·N²·D forward FLOPs, halved when causal.

    python benchmarks/gluon_forward_check.py --out results/   # writes correctness.json and bench.json there
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gluon_forward  # noqa: E402

from flashgen.bench import _peer_call, points  # noqa: E402

PEERS = ("flashgen", "cudnn", "flash", "flex")  # flashgen as dispatched; SDPA's backends; compiled FlexAttention

CHECK_SHAPES = [(2, 3, 1024, 64), (1, 2, 1000, 64), (2, 2, 777, 128), (1, 1, 64, 128)]
CHECK_CONFIGS = [{"block_n": 128, "stages": 3}, {"block_n": 128, "stages": 3, "pingpong": True},
                 {"block_n": 64, "stages": 4}]
BENCH_CONFIGS = {64: [{"block_n": 128, "stages": 3}, {"block_n": 128, "stages": 4}],
                 128: [{"block_n": 128, "stages": 3, "pingpong": True}, {"block_n": 128, "stages": 3}]}
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


def config_label(config: dict) -> str:
    return f"n{config['block_n']}-s{config['stages']}" + ("-pp" if config.get("pingpong") else "")


def reference(q, k, v, causal: bool, scale: float):
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v.double(), torch.logsumexp(s, -1)


def check() -> list[dict]:
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        for batch, heads, n, head_dim in CHECK_SHAPES:
            for causal in (False, True):
                for layout in ("bhnd", "bnhd"):
                    def tensor():
                        if layout == "bhnd":
                            return torch.randn(batch, heads, n, head_dim, device="cuda", dtype=dtype)
                        return torch.randn(batch, n, heads, head_dim, device="cuda", dtype=dtype).transpose(1, 2)

                    q, k, v = tensor(), tensor(), tensor()
                    expected, expected_lse = reference(q, k, v, causal, 1 / math.sqrt(head_dim))
                    for config in CHECK_CONFIGS:
                        tiles = gluon_forward.shared_memory_bytes(head_dim, config["block_n"], config["stages"])
                        if tiles > 227 * 1024:
                            continue
                        out, lse = gluon_forward.attention(q, k, v, causal=causal, poison=True, **config)
                        error = ((out.double() - expected).norm() / expected.norm()).item()
                        lse_error = (lse.double() - expected_lse).abs().max().item()
                        ok = error < TOLERANCE[dtype] and lse_error < 1e-2 and not out.isnan().any().item()
                        rows.append({"dtype": str(dtype).removeprefix("torch."), "shape": [batch, heads, n, head_dim],
                                     "causal": causal, "layout": layout, "config": config_label(config),
                                     "rel_error": error, "lse_error": lse_error, "ok": bool(ok)})
                        if not ok:
                            print("FAILED", rows[-1], flush=True)
    return rows


def bench() -> list[dict]:
    table = []
    for point in points((64, 128), (1024, 4096, 16384), (False, True), "bf16"):
        q, k, v = (torch.randn(point.batch, point.heads, point.seqlen, point.head_dim, device="cuda",
                               dtype=torch.bfloat16) for _ in range(3))
        calls = {f"gluon {config_label(c)}": (lambda c=c: gluon_forward.attention(q, k, v, causal=point.causal, **c),
                                              contextlib.nullcontext())
                 for c in BENCH_CONFIGS[point.head_dim]}
        for peer in PEERS:
            calls[peer] = _peer_call(peer, point, q, k, v)
        row = {"head_dim": point.head_dim, "causal": point.causal, "seqlen": point.seqlen, "tflops": {}}
        for name, (fn, context) in calls.items():
            with context:
                row["tflops"][name] = point.flops / triton.testing.do_bench(fn, warmup=25, rep=100) / 1e9
        table.append(row)
        print(json.dumps(row), flush=True)
    return table


def print_table(table: list[dict]) -> None:
    for head_dim in (64, 128):
        rows = [r for r in table if r["head_dim"] == head_dim]
        names = list(rows[0]["tflops"])
        print(f"\nD={head_dim}  causal seqlen " + " ".join(f"{n:>16}" for n in names)
              + "  best gluon vs: cudnn   fa2  flex flashgen")
        for r in rows:
            t = r["tflops"]
            best = max(v for n, v in t.items() if n.startswith("gluon"))
            ratios = " ".join(f"{best / t[peer]:5.2f}" for peer in ("cudnn", "flash", "flex", "flashgen"))
            print(f"      {r['causal']!s:<6} {r['seqlen']:<6} " + " ".join(f"{t[n]:16.1f}" for n in names)
                  + f"  {'':12}{ratios}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for correctness.json and bench.json")
    parser.add_argument("--no-bench", action="store_true", help="check correctness only")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    rows = check()
    (args.out / "correctness.json").write_text(json.dumps(rows, indent=1))
    failed = [r for r in rows if not r["ok"]]
    print(f"correctness: {len(rows) - len(failed)}/{len(rows)} passed; largest relative error "
          f"{max(r['rel_error'] for r in rows):.2e}", flush=True)
    if failed:
        sys.exit(1)
    if not args.no_bench:
        table = bench()
        (args.out / "bench.json").write_text(json.dumps(table, indent=1))
        print_table(table)


if __name__ == "__main__":
    main()
