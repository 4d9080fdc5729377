"""The public attention op: validate the inputs, pick a config, launch the generated kernel."""

from __future__ import annotations

import math
from numbers import Real

import torch

from flashgen.codegen import BACKWARD, FORWARD
from flashgen.device import device_info, interpreter_active
from flashgen.dispatch import backward_config as pick_backward_config
from flashgen.dispatch import forward_config as pick_forward_config
from flashgen.launch import attention_backward, attention_forward
from flashgen.spec import (
    CAUSAL_ALIGNMENTS,
    DTYPE_NAMES,
    HEAD_DIM_MAX,
    HEAD_DIM_MIN,
    TileConfig,
    Variant,
    causal_offset,
    knob_table,
)


def _check_inputs(q: object, k: object, v: object) -> None:
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions (batch, heads, seq_len, head_dim), got shape {tuple(tensor.shape)}")
        if tensor.dtype not in DTYPE_NAMES:
            raise TypeError(
                f"{name}.dtype must be torch.float16, torch.bfloat16 or torch.float32, got {tensor.dtype}"
            )
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
    for name, tensor in (("k", k), ("v", v)):
        if tensor.dtype != q.dtype:
            raise TypeError(f"{name}.dtype must match q.dtype ({q.dtype}), got {tensor.dtype}")
        if tensor.device != q.device:
            raise ValueError(f"{name} must be on q's device ({q.device}), got {tensor.device}")
    if q.device.type not in ("cuda", "cpu"):
        raise ValueError(f"q must be on a CUDA device or, through Triton's interpreter, the CPU; got {q.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k's batch size must match q's ({q.shape[0]}), got {k.shape[0]}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"k's head_dim must match q's ({q.shape[3]}), got {k.shape[3]}")
    heads_q, heads_kv = q.shape[1], k.shape[1]
    if heads_kv == 0 or heads_q % heads_kv:
        raise ValueError(
            f"q's heads ({heads_q}) must be a multiple of k's and v's heads ({heads_kv}) (grouped-query attention)"
        )
    if not HEAD_DIM_MIN <= q.shape[3] <= HEAD_DIM_MAX:
        raise ValueError(f"head_dim (q.shape[3]) must be in [{HEAD_DIM_MIN}, {HEAD_DIM_MAX}], got {q.shape[3]}")
    if k.shape[2] == 0 and q.shape[2] > 0:
        raise ValueError("k and v must hold at least one key (seq_len k.shape[2] is 0)")
    if max(q.shape[0], heads_q) > 65535:
        raise ValueError(f"batch and heads must each be at most 65535 (a CUDA grid limit), got {tuple(q.shape[:2])}")
    if q.device.type == "cpu":
        if not interpreter_active():
            raise RuntimeError(
                "q is on the CPU but Triton was imported without its interpreter: set TRITON_INTERPRET=1 "
                "before anything imports triton, or move the tensors to a CUDA device"
            )
        if q.dtype == torch.bfloat16:
            raise TypeError(
                "bf16 is not supported on the CPU: Triton's interpreter computes bf16 dot products wrongly; "
                "use fp16 or fp32 there, or a CUDA device"
            )


def _check_options(
    causal: object, causal_alignment: object, dropout_p: object, scale: object, config: object, backward_config: object,
    deterministic: object,
) -> None:  # fmt: skip
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if deterministic is not None and not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be None or a bool, got {deterministic!r}")
    if causal_alignment not in CAUSAL_ALIGNMENTS:
        raise ValueError(f"causal_alignment must be one of {CAUSAL_ALIGNMENTS}, got {causal_alignment!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, Real):
        raise TypeError(f"dropout_p must be a float, got {dropout_p!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, Real) or not math.isfinite(scale)):
        raise TypeError(f"scale must be None or a finite float, got {scale!r}")
    for name, value in (("config", config), ("backward_config", backward_config)):
        if value is not None and not isinstance(value, TileConfig):
            raise TypeError(f"{name} must be None or a flashgen.TileConfig, got {type(value).__name__}")


def draw_dropout_seed() -> int:
    """A Philox seed from torch's default CPU generator, so ``torch.manual_seed`` makes dropout repeat
    (drawn on the CPU: no device synchronisation)."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


class _Attention(torch.autograd.Function):
    """Forward and backward through the generated kernels; the logsumexp is saved, no N x N matrix."""

    @staticmethod
    def forward(ctx, q, k, v, variant, config, backward_config, deterministic, scale, offset, dropout_p, seed):
        out, lse = attention_forward(
            q, k, v, variant=variant, config=config, scale=scale, causal_offset=offset, dropout_p=dropout_p, seed=seed
        )
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.params = (variant, backward_config, deterministic, scale, offset, dropout_p, seed)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        variant, backward_config, deterministic, scale, offset, dropout_p, seed = ctx.params
        backward_config = pick_backward_config(variant, device_info(q.device), backward_config, deterministic=deterministic)
        dq, dk, dv = attention_backward(
            grad_out, q, k, v, out, lse, variant=variant, config=backward_config, scale=scale,
            causal_offset=offset, dropout_p=dropout_p, seed=seed,
        )  # fmt: skip
        return dq, dk, dv, None, None, None, None, None, None, None, None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    causal_alignment: str = "top_left",
    dropout_p: float = 0.0,
    scale: float | None = None,
    return_lse: bool = False,
    config: TileConfig | None = None,
    backward_config: TileConfig | None = None,
    deterministic: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention through a generated FlashAttention kernel.

    q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D) with Hq a multiple of Hkv (grouped-query attention, K/V read in
    place); SDPA's layout, any strides. dtype fp16, bf16 or fp32 (not bf16 on the CPU); D in 16..256.
    causal: mask keys after each query; ``causal_alignment`` "top_left" (SDPA's) or "bottom_right"
    (FlashAttention's, for KV-cache decoding).
    dropout_p: dropout on the attention weights, seeded from torch's default generator.
    scale: the softmax scale, default 1/sqrt(D).
    Returns out (B, Hq, Nq, D), contiguous, in q's dtype; with ``return_lse`` also lse (B, Hq, Nq) float32,
    the natural-log logsumexp of each row's scaled scores (-inf for a row that sees no key).
    config: a tile config of the forward template (``flashgen.knob_table("attn_fwd").config(...)``);
    default: the heuristic's pick for this device. backward_config: likewise for the backward template
    ("attn_bwd"). Differentiable in q, k and v (not through lse).
    deterministic: bit-reproducible gradients (no atomic dQ accumulation, whatever the tuned backward config
    says); default ``torch.are_deterministic_algorithms_enabled()``.
    """
    _check_inputs(q, k, v)
    _check_options(causal, causal_alignment, dropout_p, scale, config, backward_config, deterministic)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    variant = Variant(head_dim=q.shape[3], dtype=DTYPE_NAMES[q.dtype], causal=causal, dropout=dropout_p > 0.0)
    if config is not None:
        knob_table(FORWARD).validate(config)
    if backward_config is not None:
        knob_table(BACKWARD).validate(backward_config)
        if deterministic and backward_config["atomic_dq"]:
            raise ValueError(
                "backward_config has atomic_dq=True, which is not bit-reproducible, but deterministic gradients "
                "were asked for (deterministic=True or torch.use_deterministic_algorithms(True))"
            )
    config = pick_forward_config(variant, device_info(q.device), config)
    out, lse = _Attention.apply(
        q, k, v, variant, config, backward_config, deterministic,
        1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale),
        causal_offset(causal_alignment, q.shape[2], k.shape[2]) if causal else 0,
        float(dropout_p),
        draw_dropout_seed() if dropout_p > 0.0 else 0,
    )  # fmt: skip
    return (out, lse) if return_lse else out
