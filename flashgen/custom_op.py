"""flashgen's kernels as torch.library custom ops, so ``torch.compile(model, fullgraph=True)`` traces
``flashgen.attention`` without a graph break.

``flashgen.attention`` calls these only while torch.compile traces (eager calls launch directly: a custom op
costs microseconds of dispatch per call). The ops are opaque to the compiler: inside, each call is planned
and dispatched exactly as an eager call is (tuned config for the shape it actually gets, memoised), so
dynamic shapes get their own buckets. Fake implementations give the output shapes; the backward op is
registered as the forward op's autograd formula.

While tracing, only the checks that decide the graph run: input validation and the SDPA fallback for what
flashgen has no kernel for. Dropout under torch.compile goes to SDPA too, for now: flashgen draws its dropout
seed on the host, which a compiled graph would bake in.
"""

from __future__ import annotations

import json

import torch

from flashgen.spec import TileConfig


def _config(text: str | None) -> TileConfig | None:
    """A config passed as JSON (validated against its template by ``plan_call``)."""
    return None if text is None else TileConfig.from_dict(json.loads(text))


def _plan(q, k, v, causal, causal_alignment, scale, config, backward_config, deterministic):
    from flashgen.ops import plan_call

    return plan_call(q, k, v, None, causal, causal_alignment, 0.0, scale, _config(config), _config(backward_config),
                     deterministic)  # fmt: skip


@torch.library.custom_op("flashgen::attention_forward", mutates_args=())
def attention_forward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, causal_alignment: str, scale: float | None,
    config: str | None, backward_config: str | None, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """out (B, Hq, Nq, D) and lse (B, Hq, Nq) float32. config / backward_config: a forced tile config as
    JSON, or None for dispatch's choice; scale None: 1/sqrt(D)."""
    plan = _plan(q, k, v, causal, causal_alignment, None, config, backward_config, deterministic)
    return plan.launch(q, k, v, plan.default_scale if scale is None else scale)


@attention_forward_op.register_fake
def _(q, k, v, causal, causal_alignment, scale, config, backward_config, deterministic):
    batch, heads_q, n_q, head_dim = q.shape
    return q.new_empty((batch, heads_q, n_q, head_dim)), q.new_empty((batch, heads_q, n_q), dtype=torch.float32)


@torch.library.custom_op("flashgen::attention_backward", mutates_args=())
def attention_backward_op(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    causal: bool, causal_alignment: str, scale: float | None, config: str | None, backward_config: str | None,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """dq, dk, dv for :func:`attention_forward_op`'s arguments."""
    plan = _plan(q, k, v, causal, causal_alignment, None, config, backward_config, deterministic)
    launch = plan.backward_launch(_config(backward_config), deterministic)
    return launch(grad_out, q, k, v, out, lse, plan.default_scale if scale is None else scale)


@attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, causal, causal_alignment, scale, config, backward_config, deterministic):
    kv_shape = (k.shape[0], k.shape[1], k.shape[2], q.shape[3])
    return q.new_empty(q.shape), k.new_empty(kv_shape), k.new_empty(kv_shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, *options = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.options = options


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_backward_op(grad_out, q, k, v, out, lse, *ctx.options)
    return dq, dk, dv, None, None, None, None, None, None


attention_forward_op.register_autograd(_backward, setup_context=_setup_context)


def compiled_attention(q, k, v, attn_mask, causal, causal_alignment, dropout_p, scale, return_lse, config,
                       backward_config, deterministic, strict):  # fmt: skip
    """``flashgen.attention`` while torch.compile traces: validation and fallback in the graph, the kernels
    behind the custom ops."""
    from flashgen.ops import _check_inputs, _check_options, _unsupported, sdpa_fallback

    _check_inputs(q, k, v)
    _check_options(causal, causal_alignment, dropout_p, scale, config, backward_config, deterministic)
    reason = _unsupported(q, attn_mask)
    if reason is None and dropout_p > 0.0:
        reason = "dropout under torch.compile (flashgen's host-drawn seed would be baked into the graph)"
    if reason is not None:
        return sdpa_fallback(reason, q, k, v, attn_mask, causal, causal_alignment, dropout_p, scale, return_lse, strict)
    out, lse = attention_forward_op(
        q, k, v, causal, causal_alignment, None if scale is None else float(scale),
        None if config is None else json.dumps(config.to_dict()),
        None if backward_config is None else json.dumps(backward_config.to_dict()), deterministic,
    )  # fmt: skip
    return (out, lse) if return_lse else out
