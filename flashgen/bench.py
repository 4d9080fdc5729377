"""`flashgen bench`: flashgen against the attention kernels a user could pick instead, same process, same inputs.

Peers: SDPA with each backend (cuDNN, flash, efficient) and compiled FlexAttention. Every peer's output is
checked against a float64 reference on the first query rows before it is timed; a peer that fails or is
not supported for a point is reported as such, not dropped.

Backward (``direction="bwd"``): each peer's forward runs once, then only its backward is timed
(``retain_graph``), FLOPs 2.5x the forward's. dQ is checked against PyTorch's float32 math attention where
that fits (seqlen <= BWD_CHECK_MAX); longer points are timed unchecked (the GPU tests cover correctness).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch

from flashgen.device import device_info
from flashgen.defaults import default_config
from flashgen.ops import attention
from flashgen.reference import reference_attention, relative_error
from flashgen.spec import TORCH_DTYPES, TileConfig, Variant
from flashgen.timing import attention_flops, median_ms, tflops

PEERS = ("flashgen", "cudnn", "flash", "efficient", "flex")
CHECK_ROWS = 256  # query rows compared against the float64 reference (the full matrix does not fit at 16k)
BWD_CHECK_MAX = 4096


@dataclass(frozen=True)
class Point:
    """One benchmark shape: batch·seqlen = ``tokens``, heads·head_dim = ``hidden``, self-attention."""

    head_dim: int
    causal: bool
    seqlen: int
    dtype: str
    tokens: int = 16384
    hidden: int = 2048
    backward: bool = False

    @property
    def batch(self) -> int:
        return max(1, self.tokens // self.seqlen)

    @property
    def heads(self) -> int:
        return max(1, self.hidden // self.head_dim)

    @property
    def flops(self) -> float:
        return attention_flops(self.batch, self.heads, self.seqlen, self.seqlen, self.head_dim, causal=self.causal,
                               backward=self.backward)  # fmt: skip

    @property
    def label(self) -> str:
        return f"{'bwd ' if self.backward else ''}d{self.head_dim}{' causal' if self.causal else ''} N={self.seqlen}"


@dataclass
class Measurement:
    peer: str
    ms: float | None = None
    tflops: float | None = None
    error: float | None = None
    failure: str | None = None
    config: str | None = None


@dataclass
class PointResult:
    point: Point
    measurements: dict[str, Measurement] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"point": asdict(self.point), "measurements": {k: asdict(m) for k, m in self.measurements.items()}}


def points(head_dims, seqlens, causal, dtype: str, *, tokens: int = 16384, hidden: int = 2048, backward: bool = False) -> list[Point]:
    """The benchmark grid, head dim outermost, then causal, then seqlen."""
    return [Point(d, c, n, dtype, tokens, hidden, backward) for d in head_dims for c in causal for n in seqlens]


@contextlib.contextmanager
def _sdpa_backend(name: str) -> Iterator[None]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}[name]  # fmt: skip
    with sdpa_kernel(backend):
        yield


_flex_compiled: Callable | None = None


def _peer_call(peer: str, point: Point, q, k, v, config: TileConfig | None) -> tuple[Callable[[], torch.Tensor], contextlib.AbstractContextManager]:
    if peer == "flashgen":
        return (lambda: attention(q, k, v, causal=point.causal, config=config)), contextlib.nullcontext()
    if peer in ("cudnn", "flash", "efficient"):
        sdpa = torch.nn.functional.scaled_dot_product_attention
        return (lambda: sdpa(q, k, v, is_causal=point.causal)), _sdpa_backend(peer)
    if peer == "flex":
        global _flex_compiled
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        if _flex_compiled is None:
            # One static compile per shape; the grid has more shapes than dynamo's default recompile limit
            # (8), past which flex_attention silently runs unfused and its numbers mean nothing.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
            _flex_compiled = torch.compile(flex_attention, dynamic=False)
        block_mask = None
        if point.causal:
            block_mask = create_block_mask(
                lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, point.seqlen, point.seqlen, device=q.device
            )
        flex = _flex_compiled
        return (lambda: flex(q, k, v, block_mask=block_mask)), contextlib.nullcontext()
    raise ValueError(f"unknown peer {peer!r}; expected one of {PEERS}")


def bench_point(point: Point, peers: tuple[str, ...], *, config: TileConfig | None = None, rep_ms: float = 100) -> PointResult:
    """Check, then time, each peer on one set of fresh random inputs."""
    if point.backward:
        return _bench_backward(point, peers, rep_ms=rep_ms)
    dtype = TORCH_DTYPES[point.dtype]
    shape = (point.batch, point.heads, point.seqlen, point.head_dim)
    q, k, v = (torch.randn(shape, dtype=dtype, device="cuda") for _ in range(3))
    rows = min(CHECK_ROWS, point.seqlen)
    ref, _ = reference_attention(q[:, :, :rows], k, v, causal_offset=0 if point.causal else None)
    variant = Variant(point.head_dim, point.dtype, causal=point.causal)
    used_config = config or default_config(variant, device_info(q.device))

    def run(peer: str, m: Measurement) -> None:
        m.config = used_config.key if peer == "flashgen" else None
        fn, ctx = _peer_call(peer, point, q, k, v, used_config)
        with ctx:
            out = fn()
            torch.cuda.synchronize()
            m.error = relative_error(out[:, :, :rows], ref)
            if not m.error <= 2e-2:  # also catches NaN
                raise RuntimeError(f"wrong result: relative error {m.error:.3g}")
            m.ms = median_ms(fn, rep_ms=rep_ms)

    return _measure_peers(point, peers, run)


def _bench_backward(point: Point, peers: tuple[str, ...], *, rep_ms: float) -> PointResult:
    dtype = TORCH_DTYPES[point.dtype]
    shape = (point.batch, point.heads, point.seqlen, point.head_dim)
    inputs = [torch.randn(shape, dtype=dtype, device="cuda") for _ in range(3)]
    grad = torch.randn(shape, dtype=dtype, device="cuda")
    reference = None
    if point.seqlen <= BWD_CHECK_MAX:
        leaves = [t.float().requires_grad_() for t in inputs]
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=point.causal).backward(grad.float())
        reference = leaves[0].grad
        del leaves

    def run(peer: str, m: Measurement) -> None:
        q, k, v = (t.detach().requires_grad_() for t in inputs)
        fn, ctx = _peer_call(peer, point, q, k, v, None)
        with ctx:
            out = fn()
            out.backward(grad, retain_graph=True)
            torch.cuda.synchronize()
            if reference is not None:
                m.error = relative_error(q.grad, reference)
                if not m.error <= 2e-2:
                    raise RuntimeError(f"wrong dq: relative error {m.error:.3g}")

            def step() -> None:
                q.grad = k.grad = v.grad = None
                out.backward(grad, retain_graph=True)

            m.ms = median_ms(step, rep_ms=rep_ms)

    return _measure_peers(point, peers, run)


def _measure_peers(point: Point, peers: tuple[str, ...], run: Callable[[str, Measurement], None]) -> PointResult:
    """``run`` each peer into its Measurement; a peer that cannot run this point is reported, not fatal."""
    result = PointResult(point)
    for peer in peers:
        m = Measurement(peer)
        try:
            run(peer, m)
            m.tflops = tflops(point.flops, m.ms)
        except Exception as exc:
            m.failure = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
        result.measurements[peer] = m
        torch.cuda.empty_cache()
    return result


def ratio(result: PointResult, peer: str) -> float | None:
    ours, theirs = result.measurements.get("flashgen"), result.measurements.get(peer)
    if not ours or not theirs or ours.tflops is None or theirs.tflops is None:
        return None
    return ours.tflops / theirs.tflops


def geometric_mean(values: list[float]) -> float | None:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None
