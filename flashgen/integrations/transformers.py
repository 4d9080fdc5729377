"""Hugging Face transformers: ``register()``, then load or build a model with ``attn_implementation="fgen"``.

    import flashgen.integrations.transformers as fg
    fg.register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation=fg.NAME)  # "fgen"

The name is "fgen", not "flashgen": transformers 5 takes every ``attn_implementation`` whose name contains
"flash" for a FlashAttention kernel to import or fetch from its hub, and refuses the model when there is none.

The attention function mirrors transformers' SDPA one: a causal self-attention call without a padding mask
runs flashgen's causal kernel (GQA read in place, no repeated K/V); a call with a mask (padding) runs
through SDPA with that mask (``flashgen.attention``'s fallback, which warns once). Masks are built by
transformers' SDPA mask function, which leaves the mask out exactly when causality alone describes it.
"""

from __future__ import annotations

import torch

from flashgen.ops import attention

NAME = "fgen"  # see the module docstring for why not "flashgen"


def flashgen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query (B, Hq, Nq, D), key/value (B, Hkv, Nk, D); returns
    the output as (B, Nq, Hq, D) and no attention weights."""
    n_q, n_k = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(is_causal) and attention_mask is None and n_q > 1
    if is_causal and n_k > n_q:
        # As transformers' SDPA path does: only a prefill into an empty static cache gets here, and the keys
        # past the queries are its empty slots.
        key, value = key[:, :, :n_q], value[:, :, :n_q]
    if attention_mask is not None and attention_mask.dtype != torch.bool and attention_mask.dim() == 4:
        attention_mask = attention_mask.to(query.dtype)
    out = attention(query, key, value, attn_mask=attention_mask, causal=is_causal, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``attn_implementation="fgen"`` (:data:`NAME`) available to every transformers model (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, flashgen_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
