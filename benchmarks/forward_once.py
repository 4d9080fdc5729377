"""Run one forced forward config twice on a GPU (a warm-up, then the launch a profiler looks at), for ncu:

    ncu --clock-control none --section SpeedOfLight --section WarpStateStats -k regex:attn_fwd \\
        --launch-skip 1 --launch-count 1 python benchmarks/forward_once.py attn_fwd_sm90:m128-n128-w4-s4-persistent=1

bf16, batch * seqlen = 16384 tokens of 32 heads (the bench grid's hidden 2048 at D=64), fresh random inputs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from flashgen.launch import attention_forward  # noqa: E402
from flashgen.spec import FORWARD, Variant, knob_table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="TEMPLATE:KEY or KEY (attn_fwd), e.g. attn_fwd_sm90:m128-n128-w4-s4")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--causal", action="store_true")
    args = parser.parse_args()
    template, _, key = args.config.rpartition(":")
    template = template or FORWARD
    config = knob_table(template).parse_key(key)
    variant = Variant(args.head_dim, "bf16", causal=args.causal)
    heads = 2048 // args.head_dim
    batch = max(1, 16384 // args.seqlen)
    q, k, v = (torch.randn(batch, heads, args.seqlen, args.head_dim, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))  # fmt: skip
    for _ in range(2):
        attention_forward(q, k, v, variant=variant, config=config, scale=args.head_dim ** -0.5, template=template)
    torch.cuda.synchronize()
    print(f"{template}:{config.key} D={args.head_dim} N={args.seqlen} causal={args.causal}: ran twice")


if __name__ == "__main__":
    main()
