"""The public attention op: validate a call once per signature, pick its configs, launch the generated kernels.

After the first call of a signature (shapes, dtypes, devices, options), a call is a dictionary lookup, two
output allocations and a kernel launch: no database access, no host-device synchronisation, so it can be
captured in a CUDA graph (without dropout, whose seed is drawn on the host).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Real

import torch

from flashgen import dispatch
from flashgen.codegen import FORWARD
from flashgen.device import DeviceInfo, device_info, interpreter_active
from flashgen.dispatch import Choice, backward_choice, choose, env_flag, forward_choice, warn_once
from flashgen.launch import BackwardLaunch, ForwardLaunch, Sm90ForwardLaunch, backward_launch, forward_launch
from flashgen.shapes import ShapeBucket
from flashgen.spec import (
    BACKWARD,
    CAUSAL_ALIGNMENTS,
    DTYPE_NAMES,
    FORWARD_SM90,
    HEAD_DIM_MAX,
    HEAD_DIM_MIN,
    TileConfig,
    Variant,
    backward_template_of,
    causal_offset,
    forward_template_of,
    knob_table,
)


def _check_inputs(q: object, k: object, v: object) -> None:
    """Errors for calls no attention implementation could run (what SDPA would refuse too)."""
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions (batch, heads, seq_len, head_dim), got shape {tuple(tensor.shape)}")
        if not tensor.dtype.is_floating_point:
            raise TypeError(f"{name}.dtype must be a floating-point type (float16, bfloat16, float32), got {tensor.dtype}")
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
    for name, tensor in (("k", k), ("v", v)):
        if tensor.dtype != q.dtype:
            raise TypeError(f"{name}.dtype must match q.dtype ({q.dtype}), got {tensor.dtype}")
        if tensor.device != q.device:
            raise ValueError(f"{name} must be on q's device ({q.device}), got {tensor.device}")
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
    if k.shape[2] == 0 and q.shape[2] > 0:
        raise ValueError("k and v must hold at least one key (seq_len k.shape[2] is 0)")


def _unsupported(q: torch.Tensor, attn_mask: object) -> str | None:
    """Why flashgen's kernels cannot run a valid call (it then goes to SDPA), or None."""
    if attn_mask is not None:
        return "an attn_mask tensor (flashgen supports causal masks through causal=True)"
    if q.dtype not in DTYPE_NAMES:
        return f"dtype {q.dtype} (flashgen runs float16, bfloat16 and float32)"
    if not HEAD_DIM_MIN <= q.shape[3] <= HEAD_DIM_MAX:
        return f"head_dim {q.shape[3]} (flashgen runs {HEAD_DIM_MIN}..{HEAD_DIM_MAX})"
    if max(q.shape[0], q.shape[1]) > 65535:
        return f"batch or heads over 65535 (a CUDA grid limit), got {tuple(q.shape[:2])}"
    if q.device.type == "cpu":
        if not interpreter_active():
            return "CPU tensors without Triton's interpreter (set TRITON_INTERPRET=1 before triton is imported)"
        if q.dtype == torch.bfloat16:
            return "bfloat16 on the CPU (Triton's interpreter computes bf16 dot products wrongly)"
    elif q.device.type != "cuda":
        return f"device {q.device} (flashgen runs on CUDA devices, and on the CPU through Triton's interpreter)"
    return None


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


class UnsupportedError(ValueError):
    """flashgen has no kernel for this call, and it cannot go to SDPA: strict mode (``strict=True`` or
    ``FLASHGEN_STRICT=1``), or something SDPA cannot give either (the lse, a forced tile config)."""


@dataclass(frozen=True)
class Plan:
    """What a call of one signature (shapes, dtypes, devices, options) runs: worked out once, then reused.

    route: "kernel" (flashgen's generated kernels) or "sdpa" (the fallback, ``reason`` says why).
    """

    route: str
    reason: str | None = None
    variant: Variant | None = None
    bucket: ShapeBucket | None = None
    device: DeviceInfo | None = None
    forward: Choice | None = None
    offset: int = 0
    default_scale: float = 1.0
    launch: ForwardLaunch | Sm90ForwardLaunch | None = None
    q_shape: tuple = ()
    k_shape: tuple = ()
    # The backward's launch, made on the first backward call (the signature fixes all it depends on but
    # ``deterministic``, the key).
    backward: dict[bool, BackwardLaunch] = field(default_factory=dict, compare=False)

    def backward_launch(self, backward_config: TileConfig | None, deterministic: bool) -> BackwardLaunch:
        launch = self.backward.get(deterministic)
        if launch is None:
            choice = backward_choice(self.bucket, self.device, backward_config, deterministic=deterministic)
            launch = backward_launch(self.variant, choice.config, self.q_shape, self.k_shape, self.offset)
            self.backward[deterministic] = launch
        return launch


_plans: dict[tuple, Plan] = {}
_MAX_PLANS = 4096  # distinct call signatures remembered; past that the memo starts over


def reload() -> None:
    """Forget the tuned entries, the decisions and the plans made from them: the next call reads the caches and
    the database again (after a ``flashgen tune`` in the same process, say)."""
    dispatch.reload()
    _plans.clear()


def _plan(q, k, v, attn_mask, causal, causal_alignment, dropout_p, scale, config, backward_config, deterministic) -> Plan:
    """Validate a call and decide how it runs (the slow path, once per signature)."""
    _check_inputs(q, k, v)
    _check_options(causal, causal_alignment, dropout_p, scale, config, backward_config, deterministic)
    if config is not None:
        forward_template_of(config)
    if backward_config is not None:
        backward_template_of(backward_config)
    _check_deterministic(backward_config, deterministic)
    reason = _unsupported(q, attn_mask)
    if reason is not None:
        if config is not None or backward_config is not None:
            raise UnsupportedError(f"config was given, but flashgen cannot run {reason}")
        return Plan("sdpa", reason=reason)
    batch, heads_q, n_q, head_dim = q.shape
    heads_kv, n_k = k.shape[1], k.shape[2]
    variant = Variant(head_dim=head_dim, dtype=DTYPE_NAMES[q.dtype], causal=causal, dropout=dropout_p > 0.0)
    bucket = ShapeBucket.of(variant, batch=batch, heads_q=heads_q, heads_kv=heads_kv, n_q=n_q, n_k=n_k)
    device = device_info(q.device)
    forward = forward_choice(bucket, device, config)
    offset = causal_offset(causal_alignment, n_q, n_k) if causal else 0
    # attn_fwd_sm90 loads through TMA only: calls whose tensors TMA cannot address run attn_fwd's choice.
    fallback = choose(FORWARD, bucket, device).config if forward.template == FORWARD_SM90 else None
    launch = forward_launch(forward.template, variant, forward.config, q.shape, k.shape, offset, fallback)
    return Plan("kernel", variant=variant, bucket=bucket, device=device, forward=forward, offset=offset,
                default_scale=1.0 / math.sqrt(head_dim), launch=launch, q_shape=tuple(q.shape),
                k_shape=tuple(k.shape))  # fmt: skip


def _signature(q, k, v, attn_mask, causal, causal_alignment, dropout_p, config, backward_config) -> tuple:
    """Everything a plan depends on (get_device: an int, cheaper than building a torch.device). A value that
    cannot be compared raises here, one that cannot be hashed in the lookup: the caller then takes the slow
    path, which names it (and only validated, hashable signatures are stored)."""
    return (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.is_cuda, q.get_device(), k.get_device(),
            v.get_device(), attn_mask is None, causal, causal_alignment, dropout_p > 0.0, config, backward_config)  # fmt: skip


def plan_call(q, k, v, attn_mask, causal, causal_alignment, dropout_p, scale, config, backward_config, deterministic) -> Plan:
    """The call's plan: a dictionary lookup after the first call of its signature."""
    try:
        key = _signature(q, k, v, attn_mask, causal, causal_alignment, dropout_p, config, backward_config)
        plan = _plans.get(key)
    except Exception:
        key = plan = None
    if plan is None:
        plan = _plan(q, k, v, attn_mask, causal, causal_alignment, dropout_p, scale, config, backward_config, deterministic)
        if key is not None:
            if len(_plans) >= _MAX_PLANS:
                _plans.clear()
            _plans[key] = plan
    elif dropout_p or scale is not None or deterministic:  # per-call values the plan does not cover
        _check_options(causal, causal_alignment, dropout_p, scale, config, backward_config, deterministic)
        _check_deterministic(backward_config, deterministic)
    return plan


def _check_deterministic(backward_config: TileConfig | None, deterministic: bool) -> None:
    if not deterministic or backward_config is None:
        return
    template = backward_template_of(backward_config)
    if backward_config.to_dict().get("atomic_dq") or not knob_table(template).supports.deterministic:
        what = "atomic_dq=True" if template == BACKWARD else f"a config of {template}, which sums dQ atomically"
        raise ValueError(
            f"backward_config has {what}, which is not bit-reproducible, but deterministic gradients "
            "were asked for (deterministic=True or torch.use_deterministic_algorithms(True))"
        )


class _Attention(torch.autograd.Function):
    """Forward and backward through the generated kernels; the logsumexp is saved, no N x N matrix."""

    @staticmethod
    def forward(ctx, q, k, v, plan, backward_config, deterministic, scale, dropout_p, seed):
        out, lse = plan.launch(q, k, v, scale, dropout_p, seed)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.params = (plan, backward_config, deterministic, scale, dropout_p, seed)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        plan, backward_config, deterministic, scale, dropout_p, seed = ctx.params
        dq, dk, dv = plan.backward_launch(backward_config, deterministic)(grad_out, q, k, v, out, lse, scale, dropout_p,
                                                                          seed)  # fmt: skip
        return dq, dk, dv, None, None, None, None, None, None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    causal: bool = False,
    causal_alignment: str = "top_left",
    dropout_p: float = 0.0,
    scale: float | None = None,
    return_lse: bool = False,
    config: TileConfig | None = None,
    backward_config: TileConfig | None = None,
    deterministic: bool | None = None,
    strict: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention through a generated FlashAttention kernel, tuned for this GPU and shape.

    q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D) with Hq a multiple of Hkv (grouped-query attention, K/V read in
    place); SDPA's layout, any strides. dtype fp16, bf16 or fp32 (not bf16 on the CPU); D in 16..256.
    causal: mask keys after each query; ``causal_alignment`` "top_left" (SDPA's) or "bottom_right"
    (FlashAttention's, for KV-cache decoding).
    dropout_p: dropout on the attention weights, seeded from torch's default generator.
    scale: the softmax scale, default 1/sqrt(D).
    Returns out (B, Hq, Nq, D), contiguous, in q's dtype; with ``return_lse`` also lse (B, Hq, Nq) float32,
    the natural-log logsumexp of each row's scaled scores (-inf for a row that sees no key).

    The kernel's tile config comes from :mod:`flashgen.dispatch`: the tuned entry for this GPU and shape
    bucket, else the nearest tuned bucket, else a default (``flashgen.explain`` says which and why).
    config / backward_config: force a tile config of a forward template (``flashgen.knob_table("attn_fwd")``
    or, on Hopper, ``"attn_fwd_sm90"``; ``.config(...)``) / of a backward template (``"attn_bwd"``, or on
    Hopper ``"attn_bwd_sm90"``, at D=64 ``"attn_bwd_fused_sm90"``, and at D=64 and 128
    ``"attn_bwd_fused_tma_sm90"``).
    Differentiable in q, k and v (not through lse).
    deterministic: bit-reproducible gradients (no atomic dQ accumulation, whatever the tuned backward config
    says); default ``torch.are_deterministic_algorithms_enabled()``.

    What flashgen has no kernel for (an ``attn_mask`` tensor, float64, head dims outside 16..256, other
    devices) runs through ``torch.nn.functional.scaled_dot_product_attention`` with a one-time warning, or
    raises :class:`UnsupportedError` when ``strict`` (default: ``FLASHGEN_STRICT=1``).
    """
    if torch.compiler.is_compiling():
        from flashgen.custom_op import compiled_attention

        if deterministic is None:
            deterministic = torch.are_deterministic_algorithms_enabled()
        return compiled_attention(q, k, v, attn_mask, causal, causal_alignment, dropout_p, scale, return_lse, config,
                                  backward_config, deterministic, strict)  # fmt: skip
    plan = plan_call(q, k, v, attn_mask, causal, causal_alignment, dropout_p, scale, config, backward_config, deterministic)
    if plan.route != "kernel":
        return sdpa_fallback(plan.reason, q, k, v, attn_mask, causal, causal_alignment, dropout_p, scale, return_lse, strict)
    scale = plan.default_scale if scale is None else float(scale)
    seed = 0
    if dropout_p > 0.0:
        if q.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "dropout_p > 0 under CUDA graph capture: the dropout seed is drawn on the host, so every replay "
                "would repeat one mask; capture with dropout_p=0 or run this call eagerly"
            )
        seed = draw_dropout_seed()
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        if deterministic is None:
            deterministic = torch.are_deterministic_algorithms_enabled()
            _check_deterministic(backward_config, deterministic)
        out, lse = _Attention.apply(q, k, v, plan, backward_config, deterministic, scale, float(dropout_p), seed)
    else:
        out, lse = plan.launch(q, k, v, scale, float(dropout_p), seed)
    return (out, lse) if return_lse else out


def sdpa_fallback(reason, q, k, v, attn_mask, causal, causal_alignment, dropout_p, scale, return_lse, strict):
    """Run a call flashgen has no kernel for through torch's SDPA (warning once per reason), or raise."""
    if strict if strict is not None else env_flag("FLASHGEN_STRICT"):
        raise UnsupportedError(f"flashgen has no kernel for {reason} (strict mode; without it this call runs on SDPA)")
    if return_lse:
        raise UnsupportedError(f"return_lse=True: flashgen has no kernel for {reason}, and SDPA does not return the lse")
    warn_once(f"flashgen has no kernel for {reason}: running torch's scaled_dot_product_attention instead")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    enable_gqa = q.shape[1] != k.shape[1]
    if causal and causal_alignment == "bottom_right" and q.shape[2] != k.shape[2]:
        keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - q.shape[2])
        attn_mask = keep if attn_mask is None else _combine_masks(attn_mask, keep, q.dtype)
        causal = False
    elif causal and attn_mask is not None:
        keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        attn_mask, causal = _combine_masks(attn_mask, keep, q.dtype), False
    return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=causal, scale=scale, enable_gqa=enable_gqa)


def _combine_masks(attn_mask: torch.Tensor, keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """SDPA takes one mask: the user's (bool keep-mask or additive float bias) and the causal keep-mask."""
    if attn_mask.dtype == torch.bool:
        return attn_mask & keep
    return attn_mask.masked_fill(~keep, float("-inf"))


def explain(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    causal: bool = False,
    causal_alignment: str = "top_left",
    dropout_p: float = 0.0,
    scale: float | None = None,
    config: TileConfig | None = None,
    backward_config: TileConfig | None = None,
    deterministic: bool | None = None,
) -> Explanation:
    """Which kernels ``flashgen.attention`` would run for these arguments, and why (nothing is launched)."""
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    plan = _plan(q, k, v, attn_mask, causal, causal_alignment, dropout_p, scale, config, backward_config, deterministic)
    if plan.route != "kernel":
        return Explanation(plan.route, plan.reason, None, None)
    backward = backward_choice(plan.bucket, plan.device, backward_config, deterministic=deterministic)
    return Explanation("kernel", None, plan.forward, backward)


@dataclass(frozen=True)
class Explanation:
    """route "kernel" with the forward and backward choices, or "sdpa" with the reason."""

    route: str
    reason: str | None
    forward: Choice | None
    backward: Choice | None

    def __str__(self) -> str:
        if self.route != "kernel":
            return f"fallback to torch's scaled_dot_product_attention: flashgen has no kernel for {self.reason}"
        return f"forward:  {self.forward.describe()}\nbackward: {self.backward.describe()}"
