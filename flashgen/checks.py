"""`flashgen check`: run generated kernels on this machine's device against the float64 reference.

Each case draws fresh random inputs, poisons the outputs (NaN) so an unwritten element cannot pass, and
compares with :func:`flashgen.reference.reference_attention` under the dtype's tolerance rule.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch

from flashgen.device import DeviceInfo, device_info
from flashgen.defaults import default_for
from flashgen.launch import attention_backward, attention_forward, dropout_keep_mask
from flashgen.ops import draw_dropout_seed
from flashgen.reference import reference_attention, reference_gradients, relative_error, tolerance
from flashgen.spec import (
    BACKWARD,
    BACKWARD_FUSED_SM90,
    BACKWARD_FUSED_TMA_SM90,
    BACKWARD_SM90,
    FORWARD,
    FORWARD_SM90,
    TORCH_DTYPES,
    TileConfig,
    Variant,
    causal_offset,
    knob_table,
)


@dataclass(frozen=True)
class Case:
    """One correctness check: shapes (B, Hq, Hkv, Nq, Nk, D), dtype and options."""

    batch: int
    heads_q: int
    heads_kv: int
    n_q: int
    n_k: int
    head_dim: int
    dtype: str
    causal: str | None = None  # None, "top_left" or "bottom_right"
    dropout_p: float = 0.0
    transposed: bool = False  # q, k, v as (B, N, H, D) tensors viewed as (B, H, N, D): non-contiguous
    template: str = FORWARD  # the forward template that runs it
    backward: str | None = None  # the backward template checked with ``gradients``; None: the forward's counterpart

    @property
    def variant(self) -> Variant:
        return Variant(self.head_dim, self.dtype, causal=self.causal is not None, dropout=self.dropout_p > 0)

    @property
    def label(self) -> str:
        shape = f"B{self.batch} H{self.heads_q}/{self.heads_kv} N{self.n_q}x{self.n_k}"
        opts = [self.causal or "", f"p={self.dropout_p}" if self.dropout_p else "",
                "strided" if self.transposed else "", self.template if self.template != FORWARD else "",
                self.backward or ""]  # fmt: skip
        return " ".join([self.variant.key, shape, *filter(None, opts)])


@dataclass(frozen=True)
class Result:
    case: Case
    config: TileConfig
    error: float
    torch_error: float
    tolerance: float
    lse_error: float
    seconds: float
    # The backward, when checked: the worst of dq, dk, dv by error over its tolerance.
    grad_error: float | None = None
    grad_tolerance: float | None = None

    @property
    def ok(self) -> bool:
        grads_ok = self.grad_error is None or self.grad_error <= self.grad_tolerance
        return self.error <= self.tolerance and self.lse_error <= 1e-3 and grads_ok


def random_inputs(case: Case, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh normal q, k, v for ``case`` (never zeros); (B, N, H, D) storage viewed as (B, H, N, D) if transposed."""
    dtype = TORCH_DTYPES[case.dtype]

    def make(heads: int, n: int) -> torch.Tensor:
        if case.transposed:
            return torch.randn(case.batch, n, heads, case.head_dim, dtype=dtype, device=device).transpose(1, 2)
        return torch.randn(case.batch, heads, n, case.head_dim, dtype=dtype, device=device)

    return make(case.heads_q, case.n_q), make(case.heads_kv, case.n_k), make(case.heads_kv, case.n_k)


def run_case(case: Case, device: torch.device | str, config: TileConfig | None = None, *, gradients: bool = False) -> Result:
    """Run the forward kernel of ``case`` (its template's default config unless ``config`` is given; with
    ``gradients`` also the backward kernels of ``case.backward``, with their default config: by default attn_bwd_sm90's
    for attn_fwd_sm90's cases, attn_bwd's for the others) on fresh inputs and compare with the float64 reference."""
    info: DeviceInfo = device_info(device)
    variant = case.variant
    config = config or default_for(case.template, variant, info)
    q, k, v = random_inputs(case, device)
    offset = causal_offset(case.causal, case.n_q, case.n_k) if case.causal else None
    seed = draw_dropout_seed() if case.dropout_p else 0
    out = torch.full((case.batch, case.heads_q, case.n_q, case.head_dim), math.nan, dtype=q.dtype, device=device)
    lse = torch.full((case.batch, case.heads_q, case.n_q), math.nan, dtype=torch.float32, device=device)
    start = time.perf_counter()
    attention_forward(
        q, k, v, variant=variant, config=config, scale=1.0 / math.sqrt(case.head_dim),
        causal_offset=offset or 0, dropout_p=case.dropout_p, seed=seed, out=out, lse=lse, template=case.template,
    )  # fmt: skip
    if q.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    keep = None
    if case.dropout_p:
        shape = (case.batch, case.heads_q, case.n_q, case.n_k)
        keep = dropout_keep_mask(shape, variant=variant, config=config, dropout_p=case.dropout_p, seed=seed, device=device)
    ref_out, ref_lse = reference_attention(q, k, v, causal_offset=offset, dropout_keep=keep, dropout_p=case.dropout_p)
    same_dtype, _ = reference_attention(
        q, k, v, causal_offset=offset, dropout_keep=keep, dropout_p=case.dropout_p, compute_dtype=q.dtype
    )
    torch_error = relative_error(same_dtype, ref_out)
    finite = torch.isfinite(ref_lse)
    lse_cpu = lse.cpu().double()
    lse_error = (lse_cpu[finite.cpu()] - ref_lse.cpu()[finite.cpu()]).abs().max().item() if finite.any() else 0.0
    if not torch.equal(torch.isinf(lse_cpu), ~finite.cpu()):
        lse_error = math.inf  # -inf exactly where the reference has it, nowhere else (NaN included)
    grad_error = grad_tolerance = None
    if gradients:
        grad_out = torch.randn_like(out)
        backward = case.backward or (BACKWARD_SM90 if case.template == FORWARD_SM90 else BACKWARD)
        ours = attention_backward(
            grad_out, q, k, v, out, lse, variant=variant, config=default_for(backward, variant, info),
            scale=1.0 / math.sqrt(case.head_dim), causal_offset=offset or 0, dropout_p=case.dropout_p, seed=seed,
        )  # fmt: skip
        options = {"causal_offset": offset, "dropout_keep": keep, "dropout_p": case.dropout_p}
        exact = reference_gradients(q, k, v, grad_out, **options)
        plain = reference_gradients(q, k, v, grad_out, compute_dtype=q.dtype, **options)
        pairs = [(relative_error(o, e), tolerance(q.dtype, relative_error(p, e))) for o, e, p in zip(ours, exact, plain)]
        grad_error, grad_tolerance = max(pairs, key=lambda pair: pair[0] / pair[1])
    return Result(
        case=case,
        config=config,
        error=relative_error(out, ref_out),
        torch_error=torch_error,
        tolerance=tolerance(q.dtype, torch_error),
        lse_error=lse_error,
        seconds=seconds,
        grad_error=grad_error,
        grad_tolerance=grad_tolerance,
    )


def default_cases(info: DeviceInfo) -> list[Case]:
    """Odd shapes that exercise every path: padded head dims, ragged lengths, Nq != Nk, GQA, strides,
    both causal alignments, dropout. Small in the interpreter; larger, and bf16 too, on a GPU."""
    if info.interpreter:
        dtypes, scale = ("fp16", "fp32"), 1
    else:
        dtypes, scale = ("fp16", "bf16", "fp32"), 8
    cases = []
    for dtype in dtypes:
        cases += [
            Case(3, 4, 1, 77 * scale, 133 * scale, 80, dtype),
            Case(1, 2, 2, 64 * scale, 64 * scale, 64, dtype, causal="top_left", transposed=True),
            Case(2, 2, 1, 77 * scale, 133 * scale, 40, dtype, causal="bottom_right"),
            Case(1, 4, 2, 133 * scale, 77 * scale, 128, dtype, causal="top_left"),
            Case(1, 2, 1, 133 * scale, 77 * scale, 96, dtype, causal="bottom_right"),
            Case(2, 2, 2, 1, 50 * scale, 64, dtype, causal="bottom_right"),
            Case(1, 2, 1, 70 * scale, 90 * scale, 64, dtype, dropout_p=0.25),
        ]
    if not info.interpreter:
        cases += [Case(2, 8, 2, 1000, 1000, 256, "bf16", causal="top_left"), Case(1, 4, 4, 512, 2048, 192, "fp16"),
                  Case(2, 4, 2, 700, 900, 64, "bf16")]  # fmt: skip
        # Hopper's own forward, on the cases it can run, with Hopper's backward; and its fused backwards.
        sm90 = knob_table(FORWARD_SM90)
        hopper = [replace(case, template=FORWARD_SM90) for case in cases if sm90.refusal(case.variant, info) is None]
        cases += hopper + [replace(case, backward=fused) for fused in (BACKWARD_FUSED_SM90, BACKWARD_FUSED_TMA_SM90)
                           for case in hopper if knob_table(fused).refusal(case.variant, info) is None]  # fmt: skip
    return cases
