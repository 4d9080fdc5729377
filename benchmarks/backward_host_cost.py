"""Experiment (issue 6, v8; v19 added attn_bwd_fused_tma_sm90): the D=128 backward templates at 1k tokens (B=16,
H=16, bf16), in one process. For each backward template: the median time per call (flashgen.timing.median_ms), the
host time per call (20 calls queued before synchronising), and the time and host time through flashgen.attention's
autograd, which is how `flashgen bench --direction bwd` calls it. A backward whose host time per call exceeds its
GPU time leaves the GPU idle between calls.

    python benchmarks/backward_host_cost.py      # on a Hopper GPU, from the repository root
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import flashgen  # noqa: E402
from flashgen.launch import attention_backward, attention_forward  # noqa: E402
from flashgen.spec import Variant, knob_table  # noqa: E402
from flashgen.timing import median_ms  # noqa: E402

BATCH, HEADS, SEQLEN, HEAD_DIM = 16, 16, 1024, 128
CONFIGS = {
    "attn_bwd": knob_table("attn_bwd").config(block_m=64, block_n=64, num_warps=4, num_stages=2, tma=True),
    "attn_bwd_sm90": knob_table("attn_bwd_sm90").config(dq_stages=3),
    "attn_bwd_fused_tma_sm90": knob_table("attn_bwd_fused_tma_sm90").default_config(),
}


def host_ms(call, calls: int = 20) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    torch.manual_seed(0)
    scale = HEAD_DIM**-0.5
    forward = knob_table("attn_fwd").config(block_m=128, block_n=64, num_warps=8, num_stages=3)
    for causal in (True, False):
        variant = Variant(HEAD_DIM, "bf16", causal=causal)
        shape = (BATCH, HEADS, SEQLEN, HEAD_DIM)
        q, k, v, grad = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        out, lse = attention_forward(q, k, v, variant=variant, config=forward, scale=scale)
        flops = 2.5 * 4 * BATCH * HEADS * SEQLEN**2 * HEAD_DIM / (2 if causal else 1)
        for name, config in CONFIGS.items():

            def direct(config=config):
                return attention_backward(grad, q, k, v, out, lse, variant=variant, config=config, scale=scale)

            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            result = flashgen.attention(*leaves, causal=causal, backward_config=config)

            def through_autograd():
                for leaf in leaves:
                    leaf.grad = None
                result.backward(grad, retain_graph=True)

            ms, autograd_ms = median_ms(direct), median_ms(through_autograd)
            print(f"causal={causal} {name}: {flops / ms / 1e9:.0f} TFLOP/s ({ms:.3f} ms), host "
                  f"{host_ms(direct):.3f} ms/call; through autograd {flops / autograd_ms / 1e9:.0f} TFLOP/s, host "
                  f"{host_ms(through_autograd):.3f} ms/call", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
