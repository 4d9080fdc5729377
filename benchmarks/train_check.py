"""Train a small transformer with flashgen attention and with SDPA from the same initial weights on the same
random data, and compare the loss curves.

    python benchmarks/train_check.py --steps 300 --json out.json                 # GPU, bf16
    TRITON_INTERPRET=1 python benchmarks/train_check.py --steps 3 --tiny         # CPU, fp32, interpreter

Prints both curves' last losses and the largest gap between them relative to the SDPA loss. On a GPU in
bf16 the two runs differ by rounding only, so the gap should stay at bf16 noise (a few 1e-3 relative); a
wrong gradient shows as curves that drift apart or a flashgen curve that does not fall.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flashgen  # noqa: E402


class Block(torch.nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.q = torch.nn.Linear(dim, dim, bias=False)
        self.kv = torch.nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.out = torch.nn.Linear(dim, dim, bias=False)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, attend) -> torch.Tensor:
        batch, n, dim = x.shape
        h = self.norm1(x)
        q = self.q(h).view(batch, n, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(h).view(batch, n, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        x = x + self.out(attend(q, k, v).transpose(1, 2).reshape(batch, n, dim))
        return x + self.mlp(self.norm2(x))


class TinyLM(torch.nn.Module):
    def __init__(self, vocab: int, dim: int, heads: int, kv_heads: int, layers: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.blocks = torch.nn.ModuleList(Block(dim, heads, kv_heads) for _ in range(layers))
        self.head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor, attend) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, attend)
        return self.head(x)


def flashgen_attend(q, k, v):
    return flashgen.attention(q, k, v, causal=True)


def sdpa_attend(q, k, v):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def train(model, attend, data, steps: int, lr: float) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        tokens = data[step % len(data)]
        logits = model(tokens[:, :-1], attend)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--tiny", action="store_true", help="a model and data small enough for the interpreter")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write both curves here")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.tiny:
        vocab, dim, heads, kv_heads, layers, batch, seqlen = 64, 64, 4, 2, 2, 2, 32
    else:
        vocab, dim, heads, kv_heads, layers, batch, seqlen = 4096, 512, 8, 2, 4, 8, 512
    torch.manual_seed(args.seed)
    base = TinyLM(vocab, dim, heads, kv_heads, layers).to(device=device, dtype=dtype)
    # Random data with structure to learn: each sequence repeats a short random pattern.
    pattern = torch.randint(0, vocab, (64, batch, 16), device=device)
    data = [p.repeat(1, seqlen // 16 + 1)[:, : seqlen + 1] for p in pattern]
    curves = {}
    for name, attend in (("sdpa", sdpa_attend), ("flashgen", flashgen_attend)):
        model = copy.deepcopy(base)
        curves[name] = train(model, attend, data, args.steps, lr=1e-3)
    gaps = [abs(a - b) / max(abs(b), 1e-6) for a, b in zip(curves["flashgen"], curves["sdpa"])]
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
        "dtype": str(dtype), "steps": args.steps, "curves": curves,
        "max_relative_gap": max(gaps), "final": {k: v[-1] for k, v in curves.items()},
    }  # fmt: skip
    finite = all(math.isfinite(x) for curve in curves.values() for x in curve)
    print(f"{result['device']}, {dtype}, {args.steps} steps: final loss sdpa {curves['sdpa'][-1]:.4f}, "
          f"flashgen {curves['flashgen'][-1]:.4f}; largest relative gap {max(gaps):.2e}; finite: {finite}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
