"""The attention every kernel is checked against, and the rule for how close is close enough."""

from __future__ import annotations

import math

import torch

# Added to twice plain torch's error so that tiny errors on easy inputs do not fail on rounding noise.
# Far below what a wrong kernel shows (a wrong mask or scale gives errors of 1e-1 and more).
ERROR_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 5e-4}


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal_offset: int | None = None,
    scale: float | None = None,
    dropout_keep: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention, computed in ``compute_dtype``; returns (out, lse) in that dtype.

    q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D), Hq a multiple of Hkv (expanded here, unlike in the kernel).
    causal_offset: None for no mask, else query i sees key j iff j <= i + causal_offset.
    dropout_keep: (B, Hq, Nq, Nk) bool, the kept elements; kept weights are scaled by 1 / (1 - dropout_p).
    Rows that see no key give output 0 and lse -inf (the kernels' convention; SDPA gives NaN there).
    """
    q, k, v = (t.to(compute_dtype) for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    if causal_offset is not None:
        rows = torch.arange(q.shape[2], device=q.device)[:, None]
        cols = torch.arange(k.shape[2], device=q.device)[None, :]
        scores = scores.masked_fill(cols > rows + causal_offset, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    if dropout_keep is not None:
        probs = probs * dropout_keep.to(compute_dtype) / (1.0 - dropout_p)
    return probs @ v, lse


def reference_gradients(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor, *, compute_dtype: torch.dtype = torch.float64,
    **options,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of :func:`reference_attention` (same ``options``) for the output gradient ``grad_out``, by
    autograd in ``compute_dtype``."""
    leaves = [t.detach().to(compute_dtype).requires_grad_() for t in (q, k, v)]
    out, _ = reference_attention(*leaves, compute_dtype=compute_dtype, **options)
    out.backward(grad_out.to(compute_dtype))
    return leaves[0].grad, leaves[1].grad, leaves[2].grad


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64 (the absolute error where ‖expected‖ is 0); NaN if any is."""
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    if torch.isnan(actual).any():
        return math.nan
    diff = torch.linalg.vector_norm(actual - expected).item()
    norm = torch.linalg.vector_norm(expected).item()
    return diff / norm if norm > 0 else diff


def tolerance(dtype: torch.dtype, torch_error: float) -> float:
    """How far a kernel may be from the float64 reference: twice what plain torch shows in the same
    dtype (the same reference computed in ``dtype``), plus a small floor."""
    return 2.0 * torch_error + ERROR_FLOOR[dtype]
