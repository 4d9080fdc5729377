"""Runtime shapes -> shape buckets: what is tuned once and reused for every shape that falls in it.

The rule (the tuner times each bucket's representative shape, which is its upper corner):

- query and key lengths: the next power of two, at least 16 and at most 131072 (longer sequences share
  the top bucket);
- batch x query heads: the next power of two, at most 4096 (past that the GPU is full either way);
- the GQA group size (query heads per K/V head), head dim, dtype, causal and dropout: exactly (they are in
  the bucket's variant, or change the kernel's memory traffic).

A bucket's key reads ``d128-bf16-causal/q4096-k4096-bh64-g1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from flashgen.spec import Variant, check_type, next_power_of_two

SEQ_MIN, SEQ_MAX = 16, 131072
BATCH_HEADS_MAX = 4096


def _bucket_length(n: int) -> int:
    return min(max(next_power_of_two(max(n, 1)), SEQ_MIN), SEQ_MAX)


def _is_power_of_two(n: int) -> bool:
    return n > 0 and not n & (n - 1)


@dataclass(frozen=True)
class ShapeBucket:
    """A variant plus bucketed sizes. ``batch_heads`` counts query heads; ``group`` is Hq / Hkv."""

    variant: Variant
    n_q: int
    n_k: int
    batch_heads: int
    group: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.variant, Variant):
            raise TypeError(f"ShapeBucket.variant must be a Variant, got {type(self.variant).__name__}")
        for name in ("n_q", "n_k", "batch_heads", "group"):
            check_type("ShapeBucket", name, getattr(self, name), int)
        for name in ("n_q", "n_k"):
            value = getattr(self, name)
            if not (_is_power_of_two(value) and SEQ_MIN <= value <= SEQ_MAX):
                raise ValueError(f"ShapeBucket.{name} must be a power of two in [{SEQ_MIN}, {SEQ_MAX}], got {value}")
        if not (_is_power_of_two(self.batch_heads) and self.batch_heads <= BATCH_HEADS_MAX):
            raise ValueError(f"ShapeBucket.batch_heads must be a power of two <= {BATCH_HEADS_MAX}, got {self.batch_heads}")
        if not 1 <= self.group <= 256:
            raise ValueError(f"ShapeBucket.group must be in [1, 256], got {self.group}")

    @classmethod
    def of(cls, variant: Variant, *, batch: int, heads_q: int, heads_kv: int, n_q: int, n_k: int) -> ShapeBucket:
        """The bucket a runtime shape falls in."""
        return cls(
            variant=variant,
            n_q=_bucket_length(n_q),
            n_k=_bucket_length(n_k),
            batch_heads=min(next_power_of_two(max(batch * heads_q, 1)), BATCH_HEADS_MAX),
            group=heads_q // max(heads_kv, 1),
        )

    @property
    def key(self) -> str:
        return f"{self.variant.key}/q{self.n_q}-k{self.n_k}-bh{self.batch_heads}-g{self.group}"

    def representative(self) -> tuple[int, int, int, int, int]:
        """The shape timed for this bucket: (batch, heads_q, heads_kv, n_q, n_k). One batch holds all heads,
        rounded up to a whole number of K/V groups."""
        heads_q = max(self.batch_heads, self.group)
        heads_q -= heads_q % self.group
        return 1, heads_q, heads_q // self.group, self.n_q, self.n_k

    def to_dict(self) -> dict[str, Any]:
        return {"variant": self.variant.to_dict(), "n_q": self.n_q, "n_k": self.n_k,
                "batch_heads": self.batch_heads, "group": self.group}  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShapeBucket:
        if not isinstance(data, Mapping):
            raise TypeError(f"a shape bucket must be a mapping, got {type(data).__name__}")
        allowed = {"variant", "n_q", "n_k", "batch_heads", "group"}
        if set(data) != allowed:
            raise ValueError(f"a shape bucket has exactly the fields {sorted(allowed)}, got {sorted(data)}")
        return cls(variant=Variant.from_dict(data["variant"]), **{k: data[k] for k in allowed - {"variant"}})


def grid_buckets(
    *, head_dims: list[int], dtypes: list[str], causal: list[bool], seqlens: list[int],
    tokens: int = 16384, hidden: int = 2048, dropout: bool = False,
) -> list[ShapeBucket]:  # fmt: skip
    """Self-attention buckets for a training-style grid: batch·seqlen = ``tokens``, heads·head_dim = ``hidden``."""
    buckets = []
    for head_dim in head_dims:
        for dtype in dtypes:
            for is_causal in causal:
                variant = Variant(head_dim, dtype, causal=is_causal, dropout=dropout)
                for n in seqlens:
                    heads = max(1, hidden // head_dim)
                    batch = max(1, tokens // n)
                    buckets.append(ShapeBucket.of(variant, batch=batch, heads_q=heads, heads_kv=heads, n_q=n, n_k=n))
    return list(dict.fromkeys(buckets))


PRESETS = {
    # Head dims 64 and 128, causal on and off, fp16 and bf16, seqlens 512 to 16k: 48 buckets.
    "llm": dict(head_dims=[64, 128], dtypes=["fp16", "bf16"], causal=[False, True],
                seqlens=[512, 1024, 2048, 4096, 8192, 16384]),  # fmt: skip
    # What the interpreter can tune in a minute, for machines without a GPU.
    "tiny": dict(head_dims=[32], dtypes=["fp16"], causal=[False, True], seqlens=[64], tokens=64, hidden=64),
}


def preset_buckets(name: str) -> list[ShapeBucket]:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return grid_buckets(**PRESETS[name])


def bucket_distance(a: ShapeBucket, b: ShapeBucket) -> float:
    """How far apart two buckets of one variant are, in log2 steps: |dlog2 Nq| + |dlog2 Nk| + |dlog2 (B*H)| / 2,
    plus 1 if the GQA group differs. Dispatch borrows the nearest tuned bucket's config by it, and the tuner starts
    a bucket's search from its nearest buckets' winners."""
    return (abs(math.log2(a.n_q) - math.log2(b.n_q)) + abs(math.log2(a.n_k) - math.log2(b.n_k))
            + abs(math.log2(a.batch_heads) - math.log2(b.batch_heads)) / 2 + (a.group != b.group))  # fmt: skip
