"""`flashgen bench`: flashgen against the attention kernels a user could pick instead, same process, same inputs.

Peers: SDPA with each backend (cuDNN, flash, efficient) and compiled FlexAttention. Every peer's output is
checked against a float64 reference on the first query rows before it is timed; a peer that fails or is
not supported for a point is reported as such, not dropped. Then a point's peers are timed in turn, in rounds,
and each reports the median of its rounds (_measure_peers says why).

Backward (``direction="bwd"``): each peer's forward runs once, then only its backward is timed
(``retain_graph``), FLOPs 2.5x the forward's. dQ is checked against PyTorch's float32 math attention where
that fits (seqlen <= BWD_CHECK_MAX); longer points are timed unchecked (the GPU tests cover correctness).
"""

from __future__ import annotations

import contextlib
import functools
import math
import statistics
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch

from flashgen.device import device_info
from flashgen.defaults import default_backward_config, default_config
from flashgen.ops import attention, explain
from flashgen.reference import reference_attention, relative_error
from flashgen.spec import (
    BACKWARD,
    BACKWARD_TEMPLATES,
    FORWARD,
    FORWARD_TEMPLATES,
    TORCH_DTYPES,
    TileConfig,
    Variant,
    knob_table,
)
from flashgen.timing import attention_flops, median_ms, tflops

PEERS = ("flashgen", "default", "cudnn", "flash", "efficient", "flex")  # flashgen: as dispatched; default: its default configs
CONFIG_PEER = "config:"  # a peer "config:<key>" is flashgen forced to run the tile config <key> (see config_peer)
ROUNDS = 5  # each peer is timed this many times, in turn with the others (bench_point)
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
    round_ms: list[float] = field(default_factory=list)  # each round's median; ms is their median


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


def _defaults(point: Point, device) -> tuple[TileConfig, TileConfig]:
    variant = Variant(point.head_dim, point.dtype, causal=point.causal)
    info = device_info(device)
    return default_config(variant, info), default_backward_config(variant, info)


def config_peer(key: str, *, backward: bool) -> str:
    """The peer name that runs flashgen with the tile config ``key``: ``[template:]config key``, of attn_fwd
    when no forward template is named (of the backward template when ``backward``: the forward is then
    dispatched as usual). ValueError if the key is not a valid config."""
    _parse_config_key(key, backward=backward)
    return CONFIG_PEER + key


def _parse_config_key(text: str, *, backward: bool) -> TileConfig:
    template, sep, key = text.rpartition(":")
    if not sep:
        template = BACKWARD if backward else FORWARD
    allowed = BACKWARD_TEMPLATES if backward else FORWARD_TEMPLATES
    if template not in allowed:
        raise ValueError(f"config {text!r}: the template must be one of {list(allowed)}, got {template!r}")
    return knob_table(template).parse_key(key)


def _peer_call(peer: str, point: Point, q, k, v) -> tuple[Callable[[], torch.Tensor], Callable[[], contextlib.AbstractContextManager]]:
    """The call that runs ``peer`` on q, k, v, and what makes the context it runs in (a fresh one each time)."""
    if peer == "flashgen":
        return (lambda: attention(q, k, v, causal=point.causal)), contextlib.nullcontext
    if peer == "default":
        forward, backward = _defaults(point, q.device)
        return (lambda: attention(q, k, v, causal=point.causal, config=forward, backward_config=backward)), contextlib.nullcontext
    if peer.startswith(CONFIG_PEER):
        config = _parse_config_key(peer[len(CONFIG_PEER):], backward=point.backward)
        forced = {"backward_config" if point.backward else "config": config}
        return (lambda: attention(q, k, v, causal=point.causal, **forced)), contextlib.nullcontext
    if peer in ("cudnn", "flash", "efficient"):
        sdpa = torch.nn.functional.scaled_dot_product_attention
        return (lambda: sdpa(q, k, v, is_causal=point.causal)), functools.partial(_sdpa_backend, peer)
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
        return (lambda: flex(q, k, v, block_mask=block_mask)), contextlib.nullcontext
    raise ValueError(f"unknown peer {peer!r}; expected one of {PEERS}")


def _config_label(peer: str, point: Point, q: torch.Tensor) -> str | None:
    """The configs flashgen runs for this point (and, as dispatched, whether they are tuned)."""
    if peer == "default":
        forward, backward = _defaults(point, q.device)
        return forward.key if not point.backward else backward.key
    if peer == "flashgen":
        why = explain(q, q, q, causal=point.causal)
        choice = why.backward if point.backward else why.forward
        named = choice.config.key
        if choice.template not in (FORWARD, BACKWARD):
            named = f"{choice.template}:{named}"
        return f"{named} ({choice.kind})"
    return None


def bench_point(point: Point, peers: tuple[str, ...], *, rounds: int = ROUNDS, rep_ms: float = 100) -> PointResult:
    """Check each peer on one set of fresh random inputs, then time them all, in turn, ``rounds`` times
    (``rep_ms`` each)."""
    if point.backward:
        return _bench_backward(point, peers, rounds=rounds, rep_ms=rep_ms)
    dtype = TORCH_DTYPES[point.dtype]
    shape = (point.batch, point.heads, point.seqlen, point.head_dim)
    q, k, v = (torch.randn(shape, dtype=dtype, device="cuda") for _ in range(3))
    rows = min(CHECK_ROWS, point.seqlen)
    ref, _ = reference_attention(q[:, :, :rows], k, v, causal_offset=0 if point.causal else None)

    def check(peer: str, m: Measurement) -> Callable[[], float]:
        m.config = _config_label(peer, point, q)
        fn, ctx = _peer_call(peer, point, q, k, v)
        with ctx():
            out = fn()
            torch.cuda.synchronize()
        m.error = relative_error(out[:, :, :rows], ref)
        if not m.error <= 2e-2:  # also catches NaN
            raise RuntimeError(f"wrong result: relative error {m.error:.3g}")
        return _timer(fn, ctx, rep_ms)

    return _measure_peers(point, peers, check, rounds)


def _timer(fn: Callable[[], object], ctx: Callable[[], contextlib.AbstractContextManager], rep_ms: float) -> Callable[[], float]:
    def time_once() -> float:
        with ctx():
            return median_ms(fn, rep_ms=rep_ms)

    return time_once


def _bench_backward(point: Point, peers: tuple[str, ...], *, rounds: int, rep_ms: float) -> PointResult:
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

    def check(peer: str, m: Measurement) -> Callable[[], float]:
        q, k, v = (t.detach().requires_grad_() for t in inputs)
        m.config = _config_label(peer, point, q)
        fn, ctx = _peer_call(peer, point, q, k, v)
        with ctx():
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

        return _timer(step, ctx, rep_ms)

    return _measure_peers(point, peers, check, rounds)


def _measure_peers(point: Point, peers: tuple[str, ...], check: Callable[[str, Measurement], Callable[[], float]],
                   rounds: int) -> PointResult:  # fmt: skip
    """``check`` each peer into its Measurement, which gives back a timer (one median in ms); then run every
    peer's timer, in turn, ``rounds`` times, each round starting one peer further along, and take the median of
    its rounds. Taking turns puts the GPU's changing clock on all peers alike: after a pause (a check, a compile)
    it runs a kernel near its power limit faster for a while, and timing each peer right after its own check
    flattered those (docs/hopper-notes.md, v23). A peer that cannot run this point, or fails a round, is
    reported, not fatal."""
    result = PointResult(point)
    timers: dict[str, Callable[[], float]] = {}

    def fail(m: Measurement, exc: Exception) -> None:
        m.failure = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
        timers.pop(m.peer, None)

    for peer in peers:
        m = result.measurements[peer] = Measurement(peer)
        try:
            timers[peer] = check(peer, m)
        except Exception as exc:
            fail(m, exc)
    for r in range(rounds):
        order = list(timers)
        shift = r % len(order) if order else 0
        for peer in order[shift:] + order[:shift]:
            try:
                result.measurements[peer].round_ms.append(timers[peer]())
            except Exception as exc:
                fail(result.measurements[peer], exc)
    for peer in timers:
        m = result.measurements[peer]
        m.ms = statistics.median(m.round_ms)
        m.tflops = tflops(point.flops, m.ms)
    torch.cuda.empty_cache()
    return result


def ratio(result: PointResult, peer: str, ours: str = "flashgen") -> float | None:
    ours, theirs = result.measurements.get(ours), result.measurements.get(peer)
    if not ours or not theirs or ours.tflops is None or theirs.tflops is None:
        return None
    return ours.tflops / theirs.tflops


def geometric_mean(values: list[float]) -> float | None:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


@dataclass(frozen=True)
class OverheadPoint:
    """A tiny shape, where a call's cost is host work and launch, not arithmetic."""

    batch: int = 1
    heads: int = 8
    seqlen: int = 128
    head_dim: int = 64
    causal: bool = False
    dtype: str = "bf16"

    @property
    def label(self) -> str:
        return f"B{self.batch} H{self.heads} N{self.seqlen} d{self.head_dim}{' causal' if self.causal else ''} {self.dtype}"


def _direct_launch(q, k, v, causal: bool) -> Callable[[], torch.Tensor]:
    """What a hand-written wrapper around flashgen's generated kernel does per call: allocate the outputs, pass
    strides (or tensor descriptors), launch through Triton's JIT, ``kernel[grid](...)`` (the kernel, its config and
    grid resolved once, beforehand)."""
    from flashgen.launch import forward_launch

    why = explain(q, k, v, causal=causal)
    launch = forward_launch(why.forward.template, why.forward.bucket.variant, why.forward.config, q.shape, k.shape)
    scale = 1.0 / math.sqrt(q.shape[3])

    def call() -> torch.Tensor:
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        launch.kernel[launch.grid](*launch.arguments(q, k, v, out, lse, scale, 0.0, 0, 0), **launch.options)
        return out

    return call


def _per_call_us(fns: dict[str, tuple[Callable[[], object], Callable[[], contextlib.AbstractContextManager]]],
                 calls: int, repeats: int = 9) -> dict[str, float]:  # fmt: skip
    """Per-call wall time of each (function, context factory), in microseconds: the median over ``repeats``
    rounds of ``calls`` back-to-back calls inside the context. The rounds interleave the functions, so drift
    in the host's speed hits all of them alike."""
    import time

    samples: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, (fn, context) in fns.items():
            with context():
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                torch.cuda.synchronize()
            if round_:  # round 0 warms up
                samples[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: sorted(times)[len(times) // 2] for name, times in samples.items()}


def _graph_replay_matches(fn: Callable[[], torch.Tensor]) -> bool:
    """Capture ``fn`` in a CUDA graph, replay it, and compare with an eager call."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm up off the default stream, as capture requires
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn()
    graph.replay()
    torch.cuda.synchronize()
    return bool(torch.equal(captured, fn()))


def measure_overhead(points: list[OverheadPoint], *, calls: int = 2000) -> list[dict]:
    """Per-call time of flashgen.attention (as dispatched) against a direct launch of the same generated
    kernel and against SDPA's backends, on tiny shapes; and whether the call replays in a CUDA graph."""
    rows = []
    for point in points:
        shape = (point.batch, point.heads, point.seqlen, point.head_dim)
        q, k, v = (torch.randn(shape, dtype=TORCH_DTYPES[point.dtype], device="cuda") for _ in range(3))
        flashgen_call = lambda: attention(q, k, v, causal=point.causal)  # noqa: E731
        row = {"point": point.label, "config": explain(q, k, v, causal=point.causal).forward.describe()}
        fns = {"direct": (_direct_launch(q, k, v, point.causal), contextlib.nullcontext),
               "flashgen": (flashgen_call, contextlib.nullcontext)}  # fmt: skip
        for peer in ("cudnn", "flash", "efficient"):
            fn, ctx = _peer_call(peer, Point(point.head_dim, point.causal, point.seqlen, point.dtype), q, k, v)
            try:
                with ctx():
                    fn()
                fns[peer] = (fn, ctx)
            except Exception as exc:
                row[f"{peer}_failure"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
        times = _per_call_us(fns, calls)
        for name in ("direct", "flashgen", "cudnn", "flash", "efficient"):
            row[f"{name}_us"] = times.get(name)
        row["overhead_vs_direct"] = row["flashgen_us"] / row["direct_us"]
        row["cuda_graph_replay_matches"] = _graph_replay_matches(flashgen_call)
        rows.append(row)
    return rows
