"""Run one forward, a flashgen config or an SDPA backend, inside a profiler range, for ncu:

    ncu --clock-control none --profile-from-start off --section LaunchStats --section SpeedOfLight \\
        python benchmarks/forward_once.py attn_fwd_sm90:m128-n128-w4-s4-persistent=1
    ncu --clock-control none --profile-from-start off --section LaunchStats \\
        python benchmarks/forward_once.py sdpa:cudnn --causal

Two warm-up calls run first, outside the range (compiles, cuDNN's plan), then one call inside it
(torch.cuda.profiler.start / stop), so that only that call's kernels are profiled.
bf16, batch * seqlen = 16384 tokens of 2048 // D heads (the bench grid's hidden 2048), fresh random inputs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from flashgen.launch import attention_forward  # noqa: E402
from flashgen.spec import FORWARD, Variant, knob_table  # noqa: E402

SDPA_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "config",
        help="TEMPLATE:KEY or KEY (attn_fwd), e.g. attn_fwd_sm90:m128-n128-w4-s4; or sdpa:BACKEND, "
        f"BACKEND one of {', '.join(SDPA_BACKENDS)}",
    )
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--causal", action="store_true")
    args = parser.parse_args()
    template, _, key = args.config.rpartition(":")
    heads = 2048 // args.head_dim
    batch = max(1, 16384 // args.seqlen)
    q, k, v = (torch.randn(batch, heads, args.seqlen, args.head_dim, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))  # fmt: skip
    if template == "sdpa":
        if key not in SDPA_BACKENDS:
            parser.error(f"config: sdpa:BACKEND takes one of {', '.join(SDPA_BACKENDS)}, got {key!r}")

        def run() -> None:
            with sdpa_kernel(SDPA_BACKENDS[key]):
                F.scaled_dot_product_attention(q, k, v, is_causal=args.causal)
    else:
        template = template or FORWARD
        config = knob_table(template).parse_key(key)
        variant = Variant(args.head_dim, "bf16", causal=args.causal)

        def run() -> None:
            attention_forward(q, k, v, variant=variant, config=config, scale=args.head_dim**-0.5, template=template)

    for _ in range(2):
        run()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    run()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"{args.config} D={args.head_dim} N={args.seqlen} causal={args.causal}: ran (profiled once)")


if __name__ == "__main__":
    main()
