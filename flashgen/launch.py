"""Launch generated kernels: allocate outputs, compute the grid, pass strides. No validation here: the
public API (``flashgen.ops``) checks its inputs, and the tuner passes what it generated itself."""

from __future__ import annotations

import functools
import math

import torch

from flashgen.codegen import BACKWARD, FORWARD, kernel_module
from flashgen.compiled_launch import CompiledLaunch, current_stream_handle
from flashgen.device import import_triton, tensor_descriptor_type
from flashgen.spec import (
    BACKWARD_FUSED_SM90,
    BACKWARD_FUSED_TMA_SM90,
    BACKWARD_SM90,
    FORWARD_SM90,
    TORCH_DTYPES,
    TileConfig,
    Variant,
    backward_template_of,
    knob_table,
)
from flashgen.sram import sm90_forward_programs_per_sm

LOG2E = 1.4426950408889634
GROUP_ROWS = 64  # query rows of one consumer warp group in the Gluon templates (wgmma's M; their ROWS)


def uses_tma(config: TileConfig) -> bool:
    """Whether ``config`` asks for tensor-descriptor (TMA) loads (a knob some templates declare)."""
    return any(name == "tma" and value for name, value in config.extra)


def tma_ready(*tensors: torch.Tensor) -> bool:
    """Whether the copy engine can address every tensor: not empty, unit last stride, 16-byte aligned base
    and strides."""
    for t in tensors:
        size = t.element_size()
        if not t.numel() or t.stride(-1) != 1 or t.data_ptr() % 16 or any(s * size % 16 for s in t.stride()[:-1]):
            return False
    return True


def _descriptor(t: torch.Tensor, rows: int, head_dim_padded: int):
    """A 4-D tensor descriptor over ``t`` (B, H, N, D) whose box is (1, 1, rows, head_dim_padded) (``t`` checked by
    :func:`tma_ready`)."""
    return _unchecked(tensor_descriptor_type(), t, list(t.shape), list(t.stride()), [1, 1, rows, head_dim_padded])


def _unchecked(descriptor_type: type, base: torch.Tensor, shape: list, strides: list, block_shape: list, layout=None):
    """A tensor descriptor (Triton's, or Gluon's with ``layout``) made without its constructor's checks, which cost
    microseconds a call: every caller has checked ``base`` with :func:`tma_ready` or allocated it, and the boxes
    are powers of two from validated tile configs."""
    descriptor = object.__new__(descriptor_type)
    descriptor.base, descriptor.shape, descriptor.strides, descriptor.block_shape = base, shape, strides, block_shape
    descriptor.padding = "zero"
    if layout is not None:
        descriptor.layout = layout
    return descriptor


def without_tma(config: TileConfig) -> TileConfig:
    """``config`` with its ``tma`` knob off: the same tiles through plain loads."""
    return TileConfig.from_dict({**config.to_dict(), "tma": False})


class ForwardLaunch:
    """The forward kernel of ``variant`` and ``config`` bound to one call signature: q (B, Hq, Nq, D), k and v
    (B, Hkv, Nk, D). Made once per signature (kernel lookup, grid), then called per call: it allocates the
    outputs and launches, nothing more."""

    def __init__(self, variant: Variant, config: TileConfig, q_shape, k_shape, causal_offset: int = 0) -> None:
        batch, heads_q, n_q, _ = q_shape
        heads_kv, n_k = k_shape[1], k_shape[2]
        self.kernel = kernel_module(FORWARD, variant, config).attn_fwd
        self.grid = (math.ceil(n_q / config.block_m), heads_q, batch)
        self.options = {"num_warps": config.num_warps, "num_stages": config.num_stages}  # Triton's launch options
        self.launcher = CompiledLaunch(self.kernel, self.grid, **self.options)
        self.sizes = (heads_q, heads_q // heads_kv, n_q, n_k)
        self.lse_shape = (batch, heads_q, n_q)
        self.variant, self.causal_offset = variant, causal_offset
        self.fixed_scalars = None if variant.dropout else _variant_scalars(variant, causal_offset, 0.0, 0, 0)
        self.tma = uses_tma(config)
        self.block_m, self.block_n = config.block_m, config.block_n
        # Tensors the copy engine cannot address (odd strides, unaligned views) run the same tiles without it.
        self._plain = None
        self._plain_args = (variant, without_tma(config), q_shape, k_shape, causal_offset) if self.tma else None

    def __call__(self, q, k, v, scale: float, dropout_p: float = 0.0, seed: int = 0, rng_offset: int = 0,
                 out: torch.Tensor | None = None, lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        out, lse = _outputs(q, out, lse, self.lse_shape)
        if out.numel() == 0:
            return out, lse
        if scale < 0:
            # The kernel scales row maxima rather than scores, which needs scale >= 0; (-q)·k with -scale gives
            # the same scores.
            q, scale = -q, -scale
        if self.tma and not tma_ready(q, k, v, out):
            if self._plain is None:
                self._plain = ForwardLaunch(*self._plain_args)
            return self._plain(q, k, v, scale, dropout_p, seed, rng_offset, out=out, lse=lse)
        self.launcher(*self.arguments(q, k, v, out, lse, scale, dropout_p, seed, rng_offset))
        return out, lse

    def arguments(self, q, k, v, out, lse, scale, dropout_p, seed, rng_offset) -> list:
        """The kernel's arguments, in its order."""
        scalars = self.fixed_scalars
        if scalars is None:
            scalars = _variant_scalars(self.variant, self.causal_offset, dropout_p, seed, rng_offset)
        tensors = [q, k, v, out]
        if self.tma:
            rows, d = (self.block_m, self.block_n, self.block_n, self.block_m), self.variant.head_dim_padded
            tensors = [_descriptor(t, r, d) for t, r in zip(tensors, rows)]
        return [*tensors, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *self.sizes, scale * LOG2E,
                *scalars]


class Sm90ForwardLaunch:
    """Hopper's forward (template attn_fwd_sm90, Gluon) bound to one call signature, called like
    :class:`ForwardLaunch`. Its loads and stores all go through the copy engine, so tensors TMA cannot address
    (odd strides, unaligned views) run ``fallback_config`` of attn_fwd instead; without one they raise
    ValueError. Dropout is not compiled in (its table's supports say so): ``dropout_p`` must be 0."""

    def __init__(self, variant: Variant, config: TileConfig, q_shape, k_shape, causal_offset: int = 0,
                 fallback_config: TileConfig | None = None) -> None:  # fmt: skip
        import_triton()
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

        batch, heads_q, n_q, head_dim = q_shape
        heads_kv, n_k = k_shape[1], k_shape[2]
        self.kernel = kernel_module(FORWARD_SM90, variant, config).attn_fwd
        # The kernel runs every tile whatever the grid: one program per tile, or per SM when persistent (and a
        # CUDA device says how many SMs it has; compiling without one needs no real grid).
        tiles = math.ceil(n_q / config.block_m) * heads_q * batch
        persistent = config["persistent"] and torch.cuda.is_available()
        per_sm = sm90_forward_programs_per_sm(config)
        self.grid = (min(tiles, per_sm * _sm_count(torch.cuda.current_device())) if persistent else tiles,)
        self.options = {"num_warps": config.num_warps}  # the ring depth is rendered into the source
        if per_sm > 1:
            # Each program's 256 threads (a consumer group, the producer warp padded to a group) start with their
            # share of the SM's 65536 registers; setmaxnreg then moves the producer's to the consumer.
            self.options["maxnreg"] = 65536 // (per_sm * 256)
        self.launcher = CompiledLaunch(self.kernel, self.grid, **self.options)
        self.lse_shape = (batch, heads_q, n_q)
        self.scalars = [batch, heads_q, heads_q // heads_kv, n_q, n_k, *([causal_offset] if variant.causal else [])]
        element = {"fp16": gl.float16, "bf16": gl.bfloat16}[variant.dtype]
        # Q and the output move in boxes of one consumer warp group's rows; K and V in boxes of BLOCK_N rows.
        boxes = ([1, 1, GROUP_ROWS, head_dim], [1, 1, config.block_n, head_dim])
        self.descriptor_specs = [(box, gl.NVMMASharedLayout.get_default_for(box, element)) for box in boxes]
        self.descriptor_type = TensorDescriptor
        self._tickets: dict[tuple[int, int], torch.Tensor] = {}
        self._fallback = None
        self._fallback_args = (variant, fallback_config, q_shape, k_shape, causal_offset)

    def __call__(self, q, k, v, scale: float, dropout_p: float = 0.0, seed: int = 0, rng_offset: int = 0,
                 out: torch.Tensor | None = None, lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        if dropout_p:
            raise ValueError(f"dropout_p must be 0 for {FORWARD_SM90}, which has no dropout path; got {dropout_p}")
        out, lse = _outputs(q, out, lse, self.lse_shape)
        if out.numel() == 0:
            return out, lse
        if scale < 0:  # see ForwardLaunch
            q, scale = -q, -scale
        if not tma_ready(q, k, v, out):
            if self._fallback is None:
                if self._fallback_args[1] is None:
                    raise ValueError(f"{FORWARD_SM90} loads through TMA: q, k, v and out need a unit last stride "
                                     "and 16-byte aligned data and strides, and no attn_fwd config was given to "
                                     "run other tensors")  # fmt: skip
                self._fallback = ForwardLaunch(*self._fallback_args)
            return self._fallback(q, k, v, scale, out=out, lse=lse)
        self.launcher(*self.arguments(q, k, v, out, lse, scale))
        return out, lse

    def arguments(self, q, k, v, out, lse, scale, dropout_p=0.0, seed=0, rng_offset=0) -> list:
        """The kernel's arguments, in its order (as :meth:`ForwardLaunch.arguments`; no dropout stream)."""
        (q_box, q_layout), (kv_box, kv_layout) = self.descriptor_specs
        make = self.descriptor_type
        descriptors = [_unchecked(make, t, list(t.shape), list(t.stride()), box, layout)
                       for t, box, layout in ((q, q_box, q_layout), (k, kv_box, kv_layout), (v, kv_box, kv_layout),
                                              (out, q_box, q_layout))]  # fmt: skip
        return [*descriptors, lse, self.tickets(q.device), scale * LOG2E, *self.scalars]

    def tickets(self, device: torch.device) -> torch.Tensor:
        """The kernel's tile counter on ``device`` for the current stream: int32[2], zeroed once; each launch leaves
        it zero again. Launches on one stream run in turn, so they can share it; other streams get their own."""
        key = (device.index, current_stream_handle(device.index))
        tickets = self._tickets.get(key)
        if tickets is None:
            tickets = self._tickets[key] = torch.zeros(2, dtype=torch.int32, device=device)
        return tickets


@functools.cache
def _sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (persistent grids launch one program per SM)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _outputs(q, out, lse, lse_shape) -> tuple[torch.Tensor, torch.Tensor]:
    """The caller's out and lse, or new ones: out like q (contiguous), lse float32 of ``lse_shape``."""
    if out is None:  # (empty_like parses fewer arguments than empty: microseconds per call)
        out = torch.empty_like(q) if q.is_contiguous() else torch.empty_like(q, memory_format=torch.contiguous_format)
    if lse is None:
        lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    return out, lse


def forward_launch(template: str, variant: Variant, config: TileConfig, q_shape, k_shape, causal_offset: int = 0,
                   fallback_config: TileConfig | None = None) -> ForwardLaunch | Sm90ForwardLaunch:  # fmt: skip
    """The launch of forward ``template`` (attn_fwd or attn_fwd_sm90) for one call signature; for attn_fwd_sm90,
    ``fallback_config`` (of attn_fwd) runs the calls whose tensors TMA cannot address."""
    if template == FORWARD_SM90:
        return Sm90ForwardLaunch(variant, config, q_shape, k_shape, causal_offset, fallback_config)
    if template != FORWARD:
        raise ValueError(f"template must be one of {(FORWARD, FORWARD_SM90)}, got {template!r}")
    return ForwardLaunch(variant, config, q_shape, k_shape, causal_offset)


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    variant: Variant,
    config: TileConfig,
    scale: float,
    causal_offset: int = 0,
    dropout_p: float = 0.0,
    seed: int = 0,
    rng_offset: int = 0,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    template: str = FORWARD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel of ``variant`` with ``config`` of forward ``template``.

    q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D), Hq a multiple of Hkv; any strides (attn_fwd_sm90: addressable by
    TMA); dtype ``variant.dtype``. Returns out (B, Hq, Nq, D) in q's dtype and lse (B, Hq, Nq) float32,
    contiguous (natural log); pass ``out`` or ``lse`` to have them written there (any strides for out; lse
    must be contiguous).
    """
    launch = forward_launch(template, variant, config, q.shape, k.shape, causal_offset)
    return launch(q, k, v, scale, dropout_p, seed, rng_offset, out=out, lse=lse)


def _variant_scalars(variant: Variant, causal_offset: int, dropout_p: float, seed: int, rng_offset: int) -> list:
    """The trailing kernel arguments a variant's features add: the causal diagonal, the dropout stream."""
    scalars: list = [causal_offset] if variant.causal else []
    if variant.dropout:
        scalars += [dropout_p, seed, rng_offset]
    return scalars


def compile_forward(
    variant: Variant,
    config: TileConfig,
    *,
    shape: tuple[int, int, int, int, int] | None = None,
    device: torch.device | str = "cuda",
    template: str = FORWARD,
):
    """Compile (without launching) the forward kernel of ``template`` for ``variant`` and ``config`` on a CUDA
    device and return Triton's compiled kernel (``.metadata.shared``: its shared memory in bytes). Raises Triton's
    errors (OutOfResources, CompilationError) as they are.

    shape: (B, Hq, Hkv, Nq, Nk) of the launches to come. Triton specialises integer arguments (equal to 1,
    divisible by 16), so compiling with the real shape is what puts the kernel those launches need into
    Triton's on-disk cache; default: one block.
    """
    batch, heads_q, heads_kv, n_q, n_k = shape or (1, 1, 1, config.block_m, config.block_n)
    dtype = TORCH_DTYPES[variant.dtype]
    q = torch.empty((batch, heads_q, n_q, variant.head_dim), dtype=dtype, device=device)
    kv = torch.empty((batch, heads_kv, n_k, variant.head_dim), dtype=dtype, device=device)
    lse = torch.empty((batch, heads_q, n_q), dtype=torch.float32, device=device)
    launch = forward_launch(template, variant, config, q.shape, kv.shape)
    args = launch.arguments(q, kv, kv, q, lse, 1.0, 0.5, 0, 0)
    return launch.launcher.warmup(*args)


def dropout_keep_mask(
    shape: tuple[int, int, int, int],
    *,
    variant: Variant,
    config: TileConfig,
    dropout_p: float,
    seed: int,
    rng_offset: int = 0,
    device: torch.device | str,
) -> torch.Tensor:
    """The (B, Hq, Nq, Nk) bool mask of kept elements that ``attention_forward`` draws for the same
    seed, offset and probability (``variant.dropout`` must be set)."""
    if not variant.dropout:
        raise ValueError("dropout_keep_mask needs a variant with dropout=True")
    batch, heads_q, n_q, n_k = shape
    keep = torch.empty(shape, dtype=torch.int8, device=device)
    module = kernel_module(FORWARD, variant, config)
    grid = (math.ceil(n_q / config.block_m), heads_q, batch)
    module.dropout_keep_mask[grid](keep, heads_q, n_q, n_k, dropout_p, seed, rng_offset)
    return keep.bool()


def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    variant: Variant,
    config: TileConfig,
    scale: float,
    causal_offset: int = 0,
    dropout_p: float = 0.0,
    seed: int = 0,
    rng_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`attention_forward` (same variant, scale, offsets and seed) with a config of a
    backward template (attn_bwd, or on Hopper attn_bwd_sm90, attn_bwd_fused_sm90 or attn_bwd_fused_tma_sm90).
    grad_out and out: (B, Hq, Nq, D), any strides; lse: the forward's, contiguous. Returns dq (B, Hq, Nq, D), dk and
    dv (B, Hkv, Nk, D), contiguous, in q's dtype. Deterministic unless the config's ``atomic_dq`` knob is set or its
    template is a fused one (dQ is then summed in float32 in varying order). The Hopper templates load through TMA:
    calls whose tensors they cannot address run attn_bwd, with the same dK/dV tiles (attn_bwd_sm90) or
    :data:`FUSED_FALLBACK`."""
    launch = backward_launch(variant, config, tuple(q.shape), tuple(k.shape), causal_offset)
    return launch(grad_out, q, k, v, out, lse, scale, dropout_p, seed, rng_offset)


@functools.lru_cache(maxsize=256)  # the tuner and the checks call attention_backward once per timed run
def backward_launch(variant: Variant, config: TileConfig, q_shape: tuple, k_shape: tuple,
                    causal_offset: int = 0) -> BackwardLaunch:  # fmt: skip
    """The backward launch of ``config`` (a config of any backward template) for one call signature."""
    template = backward_template_of(config)
    if template == BACKWARD_SM90:
        return Sm90BackwardLaunch(variant, config, q_shape, k_shape, causal_offset)
    if template in FUSED_SM90:
        return FusedBackwardLaunch(variant, config, q_shape, k_shape, causal_offset)
    return BackwardLaunch(variant, config, q_shape, k_shape, causal_offset)


class BackwardLaunch:
    """attn_bwd's kernels for one config, bound to one call signature: q (B, Hq, Nq, D), k and v (B, Hkv, Nk, D).
    Made once per signature (kernel lookup, grids, scalars), then called per call with
    ``(grad_out, q, k, v, out, lse, scale, dropout_p, seed, rng_offset)``: it allocates the gradients and its row
    buffers, builds descriptors and launches (:class:`~flashgen.compiled_launch.CompiledLaunch`). Returns dq, dk,
    dv as :func:`attention_backward` does. The Hopper templates' launches (subclasses) run ``fallback_config`` of
    attn_bwd where TMA cannot address the tensors."""

    def __init__(self, variant: Variant, config: TileConfig, q_shape, k_shape, causal_offset: int = 0) -> None:
        batch, heads_q, n_q, head_dim = q_shape
        heads_kv, n_k = k_shape[1], k_shape[2]
        self.variant, self.config, self.causal_offset = variant, config, causal_offset
        self.q_shape, self.kv_shape = (batch, heads_q, n_q, head_dim), (batch, heads_kv, n_k, head_dim)
        self.rows_shape = (batch, heads_q, n_q)
        self.empty = not (batch * heads_q * n_q * head_dim and batch * heads_kv * n_k)
        self.sizes = (heads_q, heads_q // heads_kv, n_q, n_k)
        self.dims = (heads_q, heads_kv, n_q, n_k)  # as _backward_scalars takes them
        self._fallback: BackwardLaunch | None = None
        if backward_template_of(config) != BACKWARD:
            return
        self.tma, self.atomic = uses_tma(config), config["atomic_dq"]
        if self.tma:  # tensors the copy engine cannot address run the same tiles through plain loads
            self.fallback_config = without_tma(config)
        module = kernel_module(BACKWARD, variant, config)
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        block_m, block_n = config.block_m, config.block_n
        self.dkdv = CompiledLaunch(module.attn_bwd_dkdv, (math.ceil(n_k / block_n), heads_kv, batch), **options)
        self.key_rows, self.query_rows = (block_m, block_n), (block_n, block_m)  # (q and dO, k and v) box rows
        if self.atomic:  # a rows kernel (delta, lse2), then dK, dV and dQ's atomic float32 adds in one kernel
            rows_grid = (math.ceil(n_q / block_m), heads_q, batch)
            self.rows = CompiledLaunch(module.attn_bwd_preprocess, rows_grid, **options)
        else:  # the dQ kernel first: it writes delta and lse2, which the dK/dV kernel reads (its tiles are swapped)
            self.dq = CompiledLaunch(module.attn_bwd_dq, (math.ceil(n_q / block_n), heads_q, batch), **options)

    def __call__(self, grad_out, q, k, v, out, lse, scale: float, dropout_p: float = 0.0, seed: int = 0,
                 rng_offset: int = 0, *, compile_only: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """``compile_only``: compile every kernel the call would launch, launch none (the results are then
        uninitialised)."""
        if self.empty:
            dk = torch.zeros(self.kv_shape, dtype=k.dtype, device=q.device)
            return torch.zeros(self.q_shape, dtype=q.dtype, device=q.device), dk, torch.zeros_like(dk)
        if not self._addressable(grad_out, q, k, v, out, dropout_p):
            if self._fallback is None:
                self._fallback = BackwardLaunch(self.variant, self.fallback_config, self.q_shape, self.kv_shape,
                                                self.causal_offset)  # fmt: skip
            return self._fallback(grad_out, q, k, v, out, lse, scale, dropout_p, seed, rng_offset,
                                  compile_only=compile_only)  # fmt: skip
        dk = torch.empty(self.kv_shape, dtype=k.dtype, device=q.device)
        dv = torch.empty_like(dk)
        launch = _compile if compile_only else _run
        return self._launch(launch, grad_out, q, k, v, out, lse, dk, dv, scale, dropout_p, seed, rng_offset)

    def _addressable(self, grad_out, q, k, v, out, dropout_p) -> bool:
        """Whether this launch's kernels can run the call (else the fallback config's do)."""
        return not self.tma or tma_ready(q, k, v, grad_out)

    def _launch(self, launch, grad_out, q, k, v, out, lse, dk, dv, scale, dropout_p, seed, rng_offset) -> tuple:
        variant = self.variant
        delta = torch.empty(self.rows_shape, dtype=torch.float32, device=q.device)
        lse2 = torch.empty_like(delta)  # lse in log2 units
        common = _backward_scalars(variant, *self.dims, scale, self.causal_offset, dropout_p, seed, rng_offset)
        strides = [*q.stride(), *k.stride(), *v.stride(), *grad_out.stride()]
        inputs, d = (q, k, v, grad_out), variant.head_dim_padded
        key_block_inputs = _backward_inputs(self.tma, inputs, *self.key_rows, d)
        if self.atomic:
            launch(self.rows, out, grad_out, lse, delta, lse2, *out.stride(), *grad_out.stride(), self.sizes[0],
                   self.sizes[2])  # fmt: skip
            dq_acc = torch.zeros(self.q_shape, dtype=torch.float32, device=q.device)
            launch(self.dkdv, *key_block_inputs, dk, dv, lse2, delta, *strides, *dk.stride(), dq_acc, *dq_acc.stride(),
                   *common)  # fmt: skip
            return dq_acc.to(q.dtype), dk, dv
        dq = torch.empty(self.q_shape, dtype=q.dtype, device=q.device)
        query_block_inputs = _backward_inputs(self.tma, inputs, *self.query_rows, d)
        launch(self.dq, *query_block_inputs, dq, out, lse, lse2, delta, *strides, *dq.stride(), *out.stride(), *common)
        launch(self.dkdv, *key_block_inputs, dk, dv, lse2, delta, *strides, *dk.stride(), *common)
        return dq, dk, dv


def _run(launch: CompiledLaunch, *args) -> None:
    launch(*args)


def _compile(launch: CompiledLaunch, *args) -> None:
    launch.warmup(*args)


@functools.cache  # on every attn_bwd_sm90 backward call: the config's validation runs once
def dkdv_config_of(config: TileConfig) -> TileConfig:
    """The attn_bwd config whose dK/dV kernel an attn_bwd_sm90 ``config`` runs: its tiles, through TMA."""
    core = {name: config[name] for name in ("block_m", "block_n", "num_warps", "num_stages")}
    return knob_table(BACKWARD).config(**core, tma=True, atomic_dq=False)


class _HopperBackwardLaunch(BackwardLaunch):
    """A Hopper template's launch: its kernels load through TMA and have no dropout path."""

    def _addressable(self, grad_out, q, k, v, out, dropout_p) -> bool:
        return not dropout_p and out.stride(-1) == 1 and tma_ready(q, k, v, grad_out)


class Sm90BackwardLaunch(_HopperBackwardLaunch):
    """attn_bwd_sm90: its Gluon dQ kernel (which writes delta and lse2), then attn_bwd's dK/dV kernel through TMA;
    elsewhere the same dK/dV tiles and attn_bwd's dQ kernel."""

    def __init__(self, variant: Variant, config: TileConfig, q_shape, k_shape, causal_offset: int = 0) -> None:
        super().__init__(variant, config, q_shape, k_shape, causal_offset)
        batch, heads_kv, n_k = q_shape[0], k_shape[1], k_shape[2]
        dkdv = dkdv_config_of(config)
        self.fallback_config = without_tma(dkdv)
        self.dq = CompiledLaunch(kernel_module(BACKWARD_SM90, variant, config).attn_bwd_dq,
                                 (_sm90_dq_programs(q_shape),), num_warps=4)  # fmt: skip
        self.dkdv = CompiledLaunch(kernel_module(BACKWARD, variant, dkdv).attn_bwd_dkdv,
                                   (math.ceil(n_k / dkdv.block_n), heads_kv, batch), num_warps=dkdv.num_warps,
                                   num_stages=dkdv.num_stages)  # fmt: skip
        self.key_rows = (dkdv.block_m, dkdv.block_n)
        self.dq_rows = config["dq_block_n"]  # the dQ kernel's K and V boxes: one key block

    def _launch(self, launch, grad_out, q, k, v, out, lse, dk, dv, scale, dropout_p, seed, rng_offset) -> tuple:
        dq = torch.empty(self.q_shape, dtype=q.dtype, device=q.device)
        delta = torch.empty(self.rows_shape, dtype=torch.float32, device=q.device)
        lse2 = torch.empty_like(delta)
        self.launch_dq(launch, grad_out, q, k, v, out, lse, dq, lse2, delta, scale)
        common = _backward_scalars(self.variant, *self.dims, scale, self.causal_offset, 0.0, 0, 0)
        strides = [*q.stride(), *k.stride(), *v.stride(), *grad_out.stride()]
        inputs = _backward_inputs(True, (q, k, v, grad_out), *self.key_rows, self.variant.head_dim_padded)
        launch(self.dkdv, *inputs, dk, dv, lse2, delta, *strides, *dk.stride(), *common)
        return dq, dk, dv

    def launch_dq(self, launch, grad_out, q, k, v, out, lse, dq, lse2, delta, scale) -> None:
        """The dQ kernel alone: writes dq (contiguous) and each row's delta and lse2 (float32, contiguous)."""
        variant = self.variant
        q_desc, do_desc, dq_desc = (_gluon_descriptor(t, GROUP_ROWS, variant) for t in (q, grad_out, dq))
        k_desc, v_desc = (_gluon_descriptor(t, self.dq_rows, variant) for t in (k, v))
        launch(self.dq, q_desc, k_desc, v_desc, do_desc, dq_desc, out, lse, lse2, delta, *out.stride()[:3],
               scale * LOG2E, scale, *self.sizes, *([self.causal_offset] if variant.causal else []))  # fmt: skip


def sm90_dq(grad_out, q, k, v, out, lse, dq, lse2, delta, variant, config, scale, causal_offset) -> None:
    """attn_bwd_sm90's dQ kernel alone: writes dq (B, Hq, Nq, D, contiguous) and each row's delta and lse2
    (float32 (B, Hq, Nq), contiguous). The tensors must be addressable by TMA; out needs a unit last stride."""
    launch = backward_launch(variant, config, tuple(q.shape), tuple(k.shape), causal_offset)
    launch.launch_dq(_run, grad_out, q, k, v, out, lse, dq, lse2, delta, scale)


# The fused templates: one Gluon kernel after a rows kernel, dQ summed in float32 (attn_bwd_fused_sm90 with atomic
# adds from registers, attn_bwd_fused_tma_sm90 with the TMA engine's reduce-adds from shared memory).
FUSED_SM90 = (BACKWARD_FUSED_SM90, BACKWARD_FUSED_TMA_SM90)
# What their configs run where TMA cannot address the tensors: attn_bwd's default tiles, with dQ summed atomically
# as the fused kernels sum it (neither is bit-reproducible).
FUSED_FALLBACK = knob_table(BACKWARD).config(atomic_dq=True)


class FusedBackwardLaunch(_HopperBackwardLaunch):
    """A fused template's config: its rows kernel (delta, lse2, dQ zeroed), then its fused kernel, which adds dQ in
    float32; dQ is then cast to q's dtype. Elsewhere :data:`FUSED_FALLBACK`."""

    def __init__(self, variant: Variant, config: TileConfig, q_shape, k_shape, causal_offset: int = 0) -> None:
        super().__init__(variant, config, q_shape, k_shape, causal_offset)
        batch, heads_q, n_q, head_dim = q_shape
        heads_kv, n_k = k_shape[1], k_shape[2]
        template = backward_template_of(config)
        module = kernel_module(template, variant, config)
        self.fallback_config = FUSED_FALLBACK
        # lse2 and delta, (2, B * Hq * row_stride): rows padded to whole steps, so a step's rows load as one box
        self.row_stride = math.ceil(n_q / config.block_m) * config.block_m
        self.rows = CompiledLaunch(module.attn_bwd_rows, (self.row_stride // config.block_m, heads_q, batch),
                                   num_warps=config.num_warps)  # fmt: skip
        self.fused = CompiledLaunch(module.attn_bwd_fused, (math.ceil(n_k / config.block_n), heads_kv, batch),
                                    num_warps=config.num_warps)  # fmt: skip
        self.query_rows, self.keys = config.block_m, config.block_n // 2  # boxes: a step's rows, a consumer's keys
        self.row_layout = _row_layout()
        # attn_bwd_fused_tma_sm90 adds dQ through a descriptor, each consumer group half its columns
        tma_dq = template == BACKWARD_FUSED_TMA_SM90
        self.dq_box = _gluon_box("fp32", self.query_rows, head_dim // 2) if tma_dq else None

    def _launch(self, launch, grad_out, q, k, v, out, lse, dk, dv, scale, dropout_p, seed, rng_offset) -> tuple:
        heads_q, _, n_q, n_k = self.sizes
        dq = torch.empty(self.q_shape, dtype=torch.float32, device=q.device)
        rows = torch.empty((2, self.q_shape[0] * heads_q * self.row_stride), dtype=torch.float32, device=q.device)
        launch(self.rows, out, grad_out, lse, rows[0], rows[1], dq, *out.stride()[:3], *grad_out.stride()[:3], heads_q,
               n_q, self.row_stride)  # fmt: skip
        query_rows, keys, variant = self.query_rows, self.keys, self.variant
        boxes = ((q, query_rows), (k, keys), (v, keys), (grad_out, query_rows), (dk, keys), (dv, keys))
        descriptors = [_gluon_descriptor(t, r, variant) for t, r in boxes]
        descriptor_type, layout = self.row_layout
        shape = [rows.shape[1]]
        row_descriptors = [_unchecked(descriptor_type, r, shape, [1], [query_rows], layout) for r in (rows[0], rows[1])]
        dq_arg = dq
        if self.dq_box is not None:
            descriptor_type, box, layout = self.dq_box
            dq_arg = _unchecked(descriptor_type, dq, list(self.q_shape), list(dq.stride()), box, layout)
        launch(self.fused, *descriptors, *row_descriptors, dq_arg, scale * LOG2E, scale, *self.sizes, self.row_stride,
               *([self.causal_offset] if variant.causal else []))  # fmt: skip
        return dq.to(q.dtype), dk, dv


@functools.cache
def _row_layout() -> tuple:
    """Gluon's descriptor type and the shared layout of a 1-D float32 box (the fused templates' rows)."""
    import_triton()
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    return TensorDescriptor, gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1)


def _sm90_dq_programs(q_shape) -> int:
    """attn_bwd_sm90's dQ grid: one program per two consumer groups' rows of one (batch, head)."""
    batch, heads_q, n_q, _ = q_shape
    return math.ceil(n_q / (2 * GROUP_ROWS)) * heads_q * batch


def _gluon_descriptor(t: torch.Tensor, rows: int, variant: Variant):
    """A Gluon tensor descriptor over ``t`` (B, H, N, D) whose box is (1, 1, rows, D), in an NVMMA shared layout
    (``t`` checked by :func:`tma_ready`)."""
    descriptor_type, box, layout = _gluon_box(variant.dtype, rows, t.shape[-1])
    return _unchecked(descriptor_type, t, list(t.shape), list(t.stride()), box, layout)


@functools.cache
def _gluon_box(dtype: str, rows: int, columns: int) -> tuple:
    """Gluon's descriptor type, and the box (1, 1, rows, columns) of ``dtype`` elements with its NVMMA shared layout
    (9 us to make on a CPU: once per shape, not per call)."""
    import_triton()
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    box = [1, 1, rows, columns]
    element = {"fp16": gl.float16, "bf16": gl.bfloat16, "fp32": gl.float32}[dtype]
    return TensorDescriptor, box, gl.NVMMASharedLayout.get_default_for(box, element)


def _backward_inputs(tma: bool, inputs, query_rows: int, key_rows: int, head_dim_padded: int) -> list:
    """q, k, v and dO as a backward kernel takes them: the tensors, or with ``tma``, descriptors whose boxes
    are ``query_rows`` (q, dO) or ``key_rows`` (k, v) rows."""
    if not tma:
        return list(inputs)
    rows = (query_rows, key_rows, key_rows, query_rows)
    return [_descriptor(t, r, head_dim_padded) for t, r in zip(inputs, rows)]


def _backward_scalars(variant, heads_q, heads_kv, n_q, n_k, scale, causal_offset, dropout_p, seed, rng_offset) -> list:
    """The scalar arguments the dK/dV and dQ kernels take, in their order."""
    return [heads_q, heads_q // heads_kv, n_q, n_k, scale * LOG2E, scale,
            *_variant_scalars(variant, causal_offset, dropout_p, seed, rng_offset)]  # fmt: skip


def compile_backward(
    variant: Variant,
    config: TileConfig,
    *,
    shape: tuple[int, int, int, int, int] | None = None,
    device: torch.device | str = "cuda",
) -> None:
    """Compile (without launching) the config's backward kernels into Triton's on-disk cache for launches of
    ``shape`` (B, Hq, Hkv, Nq, Nk); see :func:`compile_forward` for why the shape matters."""
    batch, heads_q, heads_kv, n_q, n_k = shape or (1, 1, 1, config.block_m, config.block_n)
    dtype = TORCH_DTYPES[variant.dtype]
    q = torch.empty((batch, heads_q, n_q, variant.head_dim), dtype=dtype, device=device)
    kv = torch.empty((batch, heads_kv, n_k, variant.head_dim), dtype=dtype, device=device)
    lse = torch.empty((batch, heads_q, n_q), dtype=torch.float32, device=device)
    launch = backward_launch(variant, config, tuple(q.shape), tuple(kv.shape))
    launch(q, q, kv, kv, q, lse, 1.0, 0.5 if variant.dropout else 0.0, compile_only=True)
