"""Experiments (issue 6, v6 and v8): the backward's dK/dV kernel (v6) and its dQ kernel (v8) in Gluon with
FlashAttention-3's schedule, beside attn_bwd's Triton kernels. This script checks them and times them against
flashgen's backward and its peers, as benchmarks/gluon_forward.py (since removed) did for the forward before it
became attn_fwd_sm90.

    TRITON_INTERPRET=0 python benchmarks/gluon_backward.py --compile-only --dq-tiles 64-3   # no GPU: compile for
                                                                   # sm_90, print registers and spills
    python benchmarks/gluon_backward.py --out DIR --dq-tiles 64-3  # Hopper: check, then time the grid of issue 6
    python benchmarks/gluon_backward.py --breakdown --dq-tiles 64-3  # Hopper: each backward kernel's time alone

What they found (docs/hopper-notes.md): the dK/dV kernel (v6) was correct, but 0.98-1.08x of attn_bwd's dK/dV
kernel at D=128 and 0.83-0.99x at D=64, so it was not made a template. The dQ kernel (v8) with 64-key blocks and
a 3-deep ring was 16-23% faster than attn_bwd's at D=128, and became the template attn_bwd_sm90: --dq-tiles now
runs that template's kernel. The v6 kernel then grew into a fused backward of five products a step (v12), which
became the template attn_bwd_fused_sm90 (v13): `flashgen bench --direction bwd --config
attn_bwd_fused_sm90:m64-n128-w4-s3-defer_dq=1` times it, `benchmarks/sass_report.py attn_bwd_fused_sm90 64
m64-n128-w4-s3-defer_dq=1` says what it compiles to. (Its experiment's third mode, a dQ product per group, lost
and was not kept: commit 13ba289 has it.)

The dK/dV kernel. A program owns 2 * KEYS keys of one K/V head. One producer warp loads the program's K and V once,
then Q and dO through a ring of NUM_STAGES buffers, block of BLOCK_M query rows by block. Two consumer warp
groups own KEYS keys each and share the ring: per block they issue S^T = K Q^T and dP^T = V dO^T, then
P^T = exp2(S^T * scale * log2(e) - lse2), dS^T = P^T (dP^T - delta), dV += P^T dO and dK += dS^T Q, with P^T and
dS^T as register operands of the last two products. The two groups' softmax work overlaps the other's matrix
products. dQ is left to a dQ kernel of its own: attn_bwd's, or with --dq-tiles attn_bwd_sm90's Gluon one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from flashgen.device import import_triton  # noqa: E402

triton = import_triton()

from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import (  # noqa: E402
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

CONSUMER_REGS = gl.constexpr(240)  # setmaxnreg: 2 groups x 128 threads x 240 + 32 x 24 <= 65536
PRODUCER_REGS = gl.constexpr(24)


@gluon.jit
def _producer(q_desc, do_desc, k_desc, v_desc, q_tiles, do_tiles, k_tiles, v_tiles, kv_ready, qdo_ready, qdo_free,
              b, hk, start_n, m_begin, n_steps, GROUP_SIZE,
              BLOCK_M: gl.constexpr, KEYS: gl.constexpr, NUM_STAGES: gl.constexpr):
    mbarrier.expect(kv_ready, 2 * (k_desc.block_type.nbytes + v_desc.block_type.nbytes))
    for c in gl.static_range(2):
        tma.async_copy_global_to_shared(k_desc, [b, hk, start_n + c * KEYS, 0], kv_ready, k_tiles.index(c))
        tma.async_copy_global_to_shared(v_desc, [b, hk, start_n + c * KEYS, 0], kv_ready, v_tiles.index(c))
    t = 0
    for g in range(GROUP_SIZE):
        h = hk * GROUP_SIZE + g
        for i in range(n_steps):
            stage = t % NUM_STAGES
            # Step t reuses the buffers of step t - NUM_STAGES: wait until both consumers freed them.
            mbarrier.wait(qdo_free.index(stage), ((t // NUM_STAGES) & 1) ^ 1, pred=t >= NUM_STAGES)
            mbarrier.expect(qdo_ready.index(stage), q_desc.block_type.nbytes + do_desc.block_type.nbytes)
            m = m_begin + i * BLOCK_M
            tma.async_copy_global_to_shared(q_desc, [b, h, m, 0], qdo_ready.index(stage), q_tiles.index(stage))
            tma.async_copy_global_to_shared(do_desc, [b, h, m, 0], qdo_ready.index(stage), do_tiles.index(stage))
            t += 1


@gluon.jit
def _consumer(C: gl.constexpr, dk_desc, dv_desc, Lse2, Delta, q_tiles, do_tiles, k_tiles, v_tiles, kv_ready, qdo_ready,
              qdo_free, b, hk, start_n, m_begin, n_steps, n_masked, qk_scale, sm_scale, H_Q, GROUP_SIZE, N_Q,
              causal_offset, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, KEYS: gl.constexpr,
              NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr):
    dtype: gl.constexpr = dk_desc.dtype
    # Keys along rows: S^T, dP^T are (KEYS, BLOCK_M); dK, dV are (KEYS, HEAD_DIM).
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_M, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, HEAD_DIM, 16])
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    cols_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
    keys_layout: gl.constexpr = gl.SliceLayout(1, s_layout)

    k = k_tiles.index(C).reshape([KEYS, HEAD_DIM])
    v = v_tiles.index(C).reshape([KEYS, HEAD_DIM])
    dk = gl.zeros([KEYS, HEAD_DIM], gl.float32, acc_layout)
    dv = gl.zeros([KEYS, HEAD_DIM], gl.float32, acc_layout)
    s = gl.zeros([KEYS, BLOCK_M], gl.float32, s_layout)
    dp = gl.zeros([KEYS, BLOCK_M], gl.float32, s_layout)
    keys = start_n + C * KEYS + gl.arange(0, KEYS, layout=keys_layout)
    mbarrier.wait(kv_ready, 0)
    t = 0
    for g in range(GROUP_SIZE):
        row_base = (b * H_Q + hk * GROUP_SIZE + g).to(gl.int64) * N_Q
        for i in range(n_steps):
            stage = t % NUM_STAGES
            cols = m_begin + i * BLOCK_M + gl.arange(0, BLOCK_M, layout=cols_layout)
            lse2 = gl.load(Lse2 + row_base + cols, mask=cols < N_Q, other=0.0)
            delta = gl.load(Delta + row_base + cols, mask=cols < N_Q, other=0.0)
            mbarrier.wait(qdo_ready.index(stage), (t // NUM_STAGES) & 1)
            q = q_tiles.index(stage).reshape([BLOCK_M, HEAD_DIM])
            do = do_tiles.index(stage).reshape([BLOCK_M, HEAD_DIM])
            s_token = warpgroup_mma(k, q.permute((1, 0)), s, use_acc=False, is_async=True)
            dp_token = warpgroup_mma(v, do.permute((1, 0)), dp, use_acc=False, is_async=True)
            # The exponentials of S^T run while dP^T is still on the tensor cores.
            s = warpgroup_mma_wait(1, deps=[s_token])
            p = gl.exp2(s * qk_scale - gl.expand_dims(lse2, 0))
            if CAUSAL:
                if i < n_masked:  # query i sees key j when i + causal_offset >= j
                    visible = gl.expand_dims(cols, 0) + causal_offset >= gl.expand_dims(keys, 1)
                    p = gl.where(visible, p, 0.0)
            dp = warpgroup_mma_wait(0, deps=[dp_token])
            ds = p * (dp - gl.expand_dims(delta, 0))
            dv_token = warpgroup_mma(gl.convert_layout(p.to(dtype), op_layout), do, dv, is_async=True)
            dk_token = warpgroup_mma(gl.convert_layout(ds.to(dtype), op_layout), q, dk, is_async=True)
            dv, dk = warpgroup_mma_wait(0, deps=[dv_token, dk_token])
            mbarrier.arrive(qdo_free.index(stage), count=1)
            t += 1
    # K and V are no longer read: stage dK and dV in their buffers for the TMA stores (rows past N_K clipped).
    k.store((dk * sm_scale).to(dtype))
    v.store(dv.to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(dk_desc, [b, hk, start_n + C * KEYS, 0], k_tiles.index(C))
    tma.async_copy_shared_to_global(dv_desc, [b, hk, start_n + C * KEYS, 0], v_tiles.index(C))
    tma.store_wait(0)


@gluon.jit
def _query_steps(start_n, N_Q, causal_offset, BLOCK_M: gl.constexpr, KEYS: gl.constexpr, CAUSAL: gl.constexpr):
    """The query blocks a program of 2 * KEYS keys from start_n visits: the first one's row, how many of them
    (from the first) need the causal mask, and how many there are."""
    if CAUSAL:
        # Query blocks before the first row that sees key start_n are skipped; blocks from the first row that
        # sees the program's last key on run without a mask. (max(.., 0) before dividing: integer division
        # truncates toward zero.)
        m_begin = gl.maximum(start_n - causal_offset, 0) // BLOCK_M * BLOCK_M
        unmasked = (gl.maximum(start_n + 2 * KEYS - 1 - causal_offset, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        n_masked = (gl.maximum(unmasked, m_begin) - m_begin) // BLOCK_M
    else:
        m_begin = 0
        n_masked = 0
    n_steps = (gl.maximum(N_Q - m_begin, 0) + BLOCK_M - 1) // BLOCK_M
    return m_begin, n_masked, n_steps


@gluon.jit
def attn_bwd_dkdv(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, Lse2, Delta, qk_scale, sm_scale, H_Q, GROUP_SIZE,
                  N_Q, N_K, causal_offset, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, KEYS: gl.constexpr,
                  NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr):
    """dK, dV for 2 * KEYS keys of one K/V head: grid (cdiv(N_K, 2 * KEYS), H_KV, B), 4 warps (+ 4 more for the
    second consumer group and 1 producer warp, from warp_specialize). Descriptors over (B, H, N, HEAD_DIM): q, dO
    with boxes of BLOCK_M rows; k, v, dk, dv of KEYS rows. Lse2, Delta: float32 (B, H_Q, N_Q) from attn_bwd's
    preprocess (lse in log2 units, +inf for rows that saw no key; rowsum(dO * O))."""
    start_n = gl.program_id(0) * (2 * KEYS)
    hk = gl.program_id(1)
    b = gl.program_id(2)
    m_begin, n_masked, n_steps = _query_steps(start_n, N_Q, causal_offset, BLOCK_M, KEYS, CAUSAL)
    dtype: gl.constexpr = q_desc.dtype

    q_tiles = gl.allocate_shared_memory(dtype, [NUM_STAGES, 1, 1, BLOCK_M, HEAD_DIM], q_desc.layout)
    do_tiles = gl.allocate_shared_memory(dtype, [NUM_STAGES, 1, 1, BLOCK_M, HEAD_DIM], do_desc.layout)
    k_tiles = gl.allocate_shared_memory(dtype, [2, 1, 1, KEYS, HEAD_DIM], k_desc.layout)
    v_tiles = gl.allocate_shared_memory(dtype, [2, 1, 1, KEYS, HEAD_DIM], v_desc.layout)
    kv_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    qdo_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    qdo_free = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_ready, count=1)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(qdo_ready.index(i), count=1)
        mbarrier.init(qdo_free.index(i), count=2)
    fence_async_shared()

    gl.warp_specialize([
        (_consumer, (0, dk_desc, dv_desc, Lse2, Delta, q_tiles, do_tiles, k_tiles, v_tiles, kv_ready, qdo_ready,
                     qdo_free, b, hk, start_n, m_begin, n_steps, n_masked, qk_scale, sm_scale, H_Q, GROUP_SIZE, N_Q,
                     causal_offset, HEAD_DIM, BLOCK_M, KEYS, NUM_STAGES, CAUSAL)),
        (_consumer, (1, dk_desc, dv_desc, Lse2, Delta, q_tiles, do_tiles, k_tiles, v_tiles, kv_ready, qdo_ready,
                     qdo_free, b, hk, start_n, m_begin, n_steps, n_masked, qk_scale, sm_scale, H_Q, GROUP_SIZE, N_Q,
                     causal_offset, HEAD_DIM, BLOCK_M, KEYS, NUM_STAGES, CAUSAL)),
        (_producer, (q_desc, do_desc, k_desc, v_desc, q_tiles, do_tiles, k_tiles, v_tiles, kv_ready, qdo_ready,
                     qdo_free, b, hk, start_n, m_begin, n_steps, GROUP_SIZE, BLOCK_M, KEYS, NUM_STAGES)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


KEYS = 64  # keys per consumer group (wgmma's M)


def descriptors(tensors_and_rows, dtype):
    """Gluon tensor descriptors over 4-D (B, H, N, D) tensors with boxes (1, 1, rows, D)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    element = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}[dtype]
    out = []
    for t, rows in tensors_and_rows:
        box = [1, 1, rows, t.shape[-1]]
        out.append(TensorDescriptor(t, list(t.shape), list(t.stride()), box,
                                    gl.NVMMASharedLayout.get_default_for(box, element)))
    return out


def gluon_dkdv(q, k, v, do, lse2, delta, scale, causal_offset, *, block_m=64, stages=2, dk=None, dv=None):
    """dK, dV (B, H_KV, N_K, D) from the Gluon kernel; lse2, delta as attn_bwd's preprocess makes them."""
    batch, heads_q, n_q, head_dim = q.shape
    heads_kv, n_k = k.shape[1], k.shape[2]
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    descs = descriptors([(q, block_m), (k, KEYS), (v, KEYS), (do, block_m), (dk, KEYS), (dv, KEYS)], q.dtype)
    grid = (math.ceil(n_k / (2 * KEYS)), heads_kv, batch)
    causal = causal_offset is not None
    attn_bwd_dkdv[grid](*descs, lse2, delta, scale * 1.4426950408889634, scale, heads_q, heads_q // heads_kv, n_q, n_k,
                        causal_offset or 0, HEAD_DIM=head_dim, BLOCK_M=block_m, KEYS=KEYS, NUM_STAGES=stages,
                        CAUSAL=causal, num_warps=4)
    return dk, dv


def gluon_dq(q, k, v, do, out, lse, lse2, delta, scale, causal_offset, *, block_n=64, stages=2, dq=None):
    """dQ (B, H_Q, N_Q, D) from attn_bwd_sm90's Gluon dQ kernel, which also fills lse2 and delta (float32
    (B, H_Q, N_Q))."""
    from flashgen.launch import sm90_dq
    from flashgen.spec import BACKWARD_SM90, DTYPE_NAMES, Variant, knob_table

    dq = torch.empty_like(q) if dq is None else dq
    variant = Variant(q.shape[-1], DTYPE_NAMES[q.dtype], causal=causal_offset is not None)
    config = knob_table(BACKWARD_SM90).config(dq_block_n=block_n, dq_stages=stages)
    sm90_dq(do, q, k, v, out, lse, dq, lse2, delta, variant, config, scale, causal_offset or 0)
    return dq


class Backward:
    """flashgen's backward with one attn_bwd config; its dQ kernel (``dq_tiles``: BLOCK_N, NUM_STAGES) and its
    dK/dV kernel (``gluon_tiles``: BLOCK_M, NUM_STAGES) either attn_bwd's Triton ones or this script's Gluon ones."""

    def __init__(self, variant, config, causal_offset, gluon_tiles=None, dq_tiles=None):
        from flashgen.codegen import BACKWARD, kernel_module

        self.module = kernel_module(BACKWARD, variant, config)
        self.variant, self.config, self.causal_offset, self.gluon_tiles = variant, config, causal_offset, gluon_tiles
        self.dq_tiles = dq_tiles

    def __call__(self, q, k, v, out, lse, do, scale):
        from flashgen import launch

        if self.gluon_tiles is None and self.dq_tiles is None:
            return launch.attention_backward(do, q, k, v, out, lse, variant=self.variant, config=self.config,
                                             scale=scale, causal_offset=self.causal_offset or 0)
        config, module = self.config, self.module
        batch, heads_q, n_q, head_dim = q.shape
        heads_kv, n_k = k.shape[1], k.shape[2]
        opts = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        delta = torch.empty((batch, heads_q, n_q), dtype=torch.float32, device=q.device)
        lse2 = torch.empty_like(delta)
        common = launch._backward_scalars(self.variant, heads_q, heads_kv, n_q, n_k, scale, self.causal_offset or 0,
                                          0.0, 0, 0)
        strides = [*q.stride(), *k.stride(), *v.stride(), *do.stride()]
        tma = launch.uses_tma(config)
        # The dQ kernel first: it writes delta and lse2 for the dK/dV kernel.
        if self.dq_tiles is None:
            dq = torch.empty_like(q)
            inputs = launch._backward_inputs(tma, (q, k, v, do), config.block_n, config.block_m, head_dim)
            module.attn_bwd_dq[(math.ceil(n_q / config.block_n), heads_q, batch)](
                *inputs, dq, out, lse, lse2, delta, *strides, *dq.stride(), *out.stride(), *common, **opts)
        else:
            block_n, stages = self.dq_tiles
            dq = gluon_dq(q, k, v, do, out, lse, lse2, delta, scale, self.causal_offset, block_n=block_n,
                          stages=stages)
        if self.gluon_tiles is None:
            dk, dv = torch.empty_like(k), torch.empty_like(v)
            inputs = launch._backward_inputs(tma, (q, k, v, do), config.block_m, config.block_n, head_dim)
            module.attn_bwd_dkdv[(math.ceil(n_k / config.block_n), heads_kv, batch)](
                *inputs, dk, dv, lse2, delta, *strides, *dk.stride(), *common, **opts)
        else:
            block_m, stages = self.gluon_tiles
            dk, dv = gluon_dkdv(q, k, v, do, lse2, delta, scale, self.causal_offset, block_m=block_m, stages=stages)
        return dq, dk, dv


def runs_of(dq_tiles, dkdv_tiles) -> dict:
    """The backward combinations to check and time, by column name: Gluon dQ with Triton's dK/dV, and each
    Gluon dQ beside each Gluon dK/dV: (dK/dV tiles, dQ tiles)."""
    runs = {}
    for n, s in dq_tiles:
        runs[f"gdq n{n}-s{s}"] = (None, (n, s))
        for m, t in dkdv_tiles:
            runs[f"gdq n{n}-s{s} + gdkdv m{m}-s{t}"] = ((m, t), (n, s))
    for m, t in dkdv_tiles:
        runs.setdefault(f"gdkdv m{m}-s{t}", ((m, t), None))
    return runs


def reference_grads(q, k, v, do, scale, causal_offset):
    """float64 dQ, dK, dV of softmax(scale Q K^T + causal mask) V (GQA: K/V heads repeated)."""
    group = q.shape[1] // k.shape[1]
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    kk, vv = k64.repeat_interleave(group, 1), v64.repeat_interleave(group, 1)
    s = q64 @ kk.transpose(-1, -2) * scale
    if causal_offset is not None:
        n_q, n_k = q.shape[2], k.shape[2]
        rows, cols = torch.arange(n_q, device=q.device), torch.arange(n_k, device=q.device)
        visible = cols[None, :] <= rows[:, None] + causal_offset
        s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    (p @ vv).backward(do.double())
    return q64.grad, k64.grad, v64.grad


def check(cases, runs) -> list[dict]:
    from flashgen.launch import attention_forward
    from flashgen.reference import relative_error
    from flashgen.spec import Variant, knob_table

    results = []
    for dtype, head_dim, causal, (b, hq, hkv, n_q, n_k) in cases:
        torch.manual_seed(len(results))
        torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
        q = torch.randn(b, hq, n_q, head_dim, device="cuda", dtype=torch_dtype)
        k, v = (torch.randn(b, hkv, n_k, head_dim, device="cuda", dtype=torch_dtype) for _ in range(2))
        do = torch.randn_like(q)
        offset = None if causal is None else (0 if causal == "top_left" else n_k - n_q)
        variant = Variant(head_dim, dtype, causal=offset is not None)
        scale = head_dim ** -0.5
        fwd = knob_table("attn_fwd").config(block_m=64, block_n=64, num_warps=4, num_stages=2)
        out, lse = attention_forward(q, k, v, variant=variant, config=fwd, scale=scale, causal_offset=offset or 0)
        bwd = knob_table("attn_bwd").config(block_m=64, block_n=64, num_warps=4, num_stages=2, tma=True)
        ref = reference_grads(q, k, v, do, scale, offset)
        for name, (dkdv_tiles, dq_tiles) in runs.items():
            run = Backward(variant, bwd, offset, gluon_tiles=dkdv_tiles, dq_tiles=dq_tiles)
            grads = run(q, k, v, out, lse, do, scale)
            errors = [relative_error(got, want) for got, want in zip(grads, ref)]
            ok = all(e <= 2e-2 for e in errors)  # also false on NaN
            results.append({"dtype": dtype, "head_dim": head_dim, "causal": causal, "shape": [b, hq, hkv, n_q, n_k],
                            "run": name, "errors": errors, "ok": ok})
            print(f"check {dtype} d{head_dim} {causal or 'full'} {(b, hq, hkv, n_q, n_k)} {name}: "
                  f"dq {errors[0]:.1e} dk {errors[1]:.1e} dv {errors[2]:.1e} {'ok' if ok else 'FAIL'}", flush=True)
    return results


def bench(head_dims, seqlens, runs, peers) -> list[dict]:
    from flashgen.bench import Point, bench_point
    from flashgen.device import device_info
    from flashgen.dispatch import choose
    from flashgen.launch import attention_forward
    from flashgen.shapes import ShapeBucket
    from flashgen.spec import Variant, knob_table
    from flashgen.timing import median_ms, tflops

    rows = []
    for head_dim in head_dims:
        for causal in (False, True):
            for seqlen in seqlens:
                point = Point(head_dim, causal, seqlen, "bf16", backward=True)
                result = bench_point(point, peers)
                row = {"point": [head_dim, causal, seqlen]}
                row.update({p: m.tflops for p, m in result.measurements.items()})
                shape = (point.batch, point.heads, seqlen, head_dim)
                q, k, v, do = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(4))
                variant = Variant(head_dim, "bf16", causal=causal)
                bucket = ShapeBucket.of(variant, batch=point.batch, heads_q=point.heads, heads_kv=point.heads,
                                        n_q=seqlen, n_k=seqlen)
                config = choose("attn_bwd", bucket, device_info(q.device)).config  # the shipped cache's
                fwd = knob_table("attn_fwd").config(block_m=128, block_n=64, num_warps=8, num_stages=3)
                scale = head_dim ** -0.5
                out, lse = attention_forward(q, k, v, variant=variant, config=fwd, scale=scale)
                offset = 0 if causal else None
                row["v4 config"] = config.key
                for name, (dkdv_tiles, dq_tiles) in [("v4", (None, None)), *runs.items()]:
                    run = Backward(variant, config, offset, gluon_tiles=dkdv_tiles, dq_tiles=dq_tiles)
                    try:
                        ms = median_ms(lambda: run(q, k, v, out, lse, do, scale))
                        row[name] = tflops(point.flops, ms)
                    except Exception as exc:  # report, keep going
                        row[name] = None
                        row[name + " failure"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                rows.append(row)
                print("bench", json.dumps(row), flush=True)
    return rows


def breakdown(head_dims, seqlens, tiles, dq_tiles) -> list[dict]:
    """Milliseconds of each backward kernel alone, with the config dispatch picks, and of the Gluon dK/dV and dQ
    kernels beside attn_bwd's: where the backward's time goes."""
    from flashgen import launch
    from flashgen.bench import Point
    from flashgen.device import device_info
    from flashgen.dispatch import choose
    from flashgen.shapes import ShapeBucket
    from flashgen.spec import Variant
    from flashgen.timing import median_ms

    rows = []
    for head_dim in head_dims:
        for causal in (False, True):
            for seqlen in seqlens:
                point = Point(head_dim, causal, seqlen, "bf16", backward=True)
                shape = (point.batch, point.heads, seqlen, head_dim)
                q, k, v, do, out = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(5))
                lse = torch.randn(shape[:3], device="cuda", dtype=torch.float32) + 8.0
                variant = Variant(head_dim, "bf16", causal=causal)
                bucket = ShapeBucket.of(variant, batch=point.batch, heads_q=point.heads, heads_kv=point.heads,
                                        n_q=seqlen, n_k=seqlen)
                config = choose("attn_bwd", bucket, device_info(q.device)).config  # attn_bwd's, not Hopper's
                run = Backward(variant, config, 0 if causal else None)
                module, opts = run.module, {"num_warps": config.num_warps, "num_stages": config.num_stages}
                batch, heads, n, d = shape
                delta = torch.empty(shape[:3], dtype=torch.float32, device="cuda")
                lse2 = torch.empty_like(delta)
                common = launch._backward_scalars(variant, heads, heads, n, n, d ** -0.5, 0, 0.0, 0, 0)
                strides = [*q.stride(), *k.stride(), *v.stride(), *do.stride()]
                dk, dv, dq = torch.empty_like(k), torch.empty_like(v), torch.empty_like(q)
                tma = launch.uses_tma(config)
                kv_in = launch._backward_inputs(tma, (q, k, v, do), config.block_m, config.block_n, d)
                q_in = launch._backward_inputs(tma, (q, k, v, do), config.block_n, config.block_m, d)
                dkdv = lambda: module.attn_bwd_dkdv[(math.ceil(n / config.block_n), heads, batch)](  # noqa: E731
                    *kv_in, dk, dv, lse2, delta, *strides, *dk.stride(), *common, **opts)
                dqk = lambda: module.attn_bwd_dq[(math.ceil(n / config.block_n), heads, batch)](  # noqa: E731
                    *q_in, dq, out, lse, lse2, delta, *strides, *dq.stride(), *out.stride(), *common, **opts)
                # dQ (which writes delta and lse2) runs first, as in a backward call.
                row = {"point": [head_dim, causal, seqlen], "config": config.key, "dq": median_ms(dqk),
                       "dkdv": median_ms(dkdv), "total": median_ms(lambda: run(q, k, v, out, lse, do, d ** -0.5))}
                offset = 0 if causal else None
                for block_n, stages in dq_tiles:
                    row[f"gluon dq n{block_n}-s{stages}"] = median_ms(lambda: gluon_dq(
                        q, k, v, do, out, lse, lse2, delta, d ** -0.5, offset, block_n=block_n, stages=stages, dq=dq))
                for block_m, stages in tiles:
                    row[f"gluon dkdv m{block_m}-s{stages}"] = median_ms(lambda: gluon_dkdv(
                        q, k, v, do, lse2, delta, d ** -0.5, offset, block_m=block_m, stages=stages, dk=dk, dv=dv))
                rows.append(row)
                print("breakdown " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in row.items()), flush=True)
    return rows


def summarize(rows, gluon_columns) -> None:
    """TFLOP/s per column, then the better Gluon column against each peer."""
    columns = ["flashgen", "v4", *gluon_columns, "cudnn", "flash", "flex"]
    print("D causal N | " + " | ".join(columns) + " | best gluon: x v4, x cudnn, x flash, x flex")
    for row in rows:
        values = [row.get(c) for c in columns]
        best = max((row.get(c) or 0.0) for c in gluon_columns)
        ratios = [best / row[c] if row.get(c) else float("nan") for c in ("v4", "cudnn", "flash", "flex")]
        print(" ".join(map(str, row["point"])) + " | " + " | ".join(f"{x:.0f}" if x else "-" for x in values)
              + " | " + " ".join(f"{r:.2f}" for r in ratios))


def compile_only(tiles, dq_tiles) -> None:
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sass_report import loop_opcodes, resource_usage

    for head_dim in (64, 128):
        for causal in (False, True):
            for block_m, stages in tiles:
                desc = {rows: f"tensordesc<bf16[1, 1, {rows}, {head_dim}],"
                        f"{gl.NVMMASharedLayout.get_default_for([1, 1, rows, head_dim], gl.bfloat16)!r}>"
                        for rows in {block_m, KEYS}}
                signature = {"q_desc": desc[block_m], "k_desc": desc[KEYS], "v_desc": desc[KEYS],
                             "do_desc": desc[block_m], "dk_desc": desc[KEYS], "dv_desc": desc[KEYS],
                             "Lse2": "*fp32", "Delta": "*fp32", "qk_scale": "fp32", "sm_scale": "fp32", "H_Q": "i32",
                             "GROUP_SIZE": "i32", "N_Q": "i32", "N_K": "i32", "causal_offset": "i32",
                             "HEAD_DIM": "constexpr", "BLOCK_M": "constexpr", "KEYS": "constexpr",
                             "NUM_STAGES": "constexpr", "CAUSAL": "constexpr"}
                names = list(signature)
                constexprs = {(names.index("HEAD_DIM"),): head_dim, (names.index("BLOCK_M"),): block_m,
                              (names.index("KEYS"),): KEYS, (names.index("NUM_STAGES"),): stages,
                              (names.index("CAUSAL"),): causal}
                attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ("Lse2", "Delta", "N_Q", "N_K")}
                source = GluonASTSource(attn_bwd_dkdv, signature, constexprs=constexprs, attrs=attrs)
                compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
                loops = loop_opcodes(compiled)
                sizes = ", ".join(str(sum(c.values())) for c in loops)
                print(f"d{head_dim} {'causal' if causal else 'full'} m{block_m}-s{stages}: {resource_usage(compiled)}; "
                      f"shared {compiled.metadata.shared} B; innermost loops: {sizes} instructions", flush=True)
            for block_n, stages in dq_tiles:
                from sass_report import compile_for_sm90
                from flashgen.spec import Variant, knob_table

                config = knob_table("attn_bwd_sm90").config(dq_block_n=block_n, dq_stages=stages)
                compiled = compile_for_sm90("attn_bwd_sm90", "attn_bwd_dq", Variant(head_dim, "bf16", causal=causal),
                                            config)  # fmt: skip
                sizes = ", ".join(str(sum(c.values())) for c in loop_opcodes(compiled))
                print(f"dq d{head_dim} {'causal' if causal else 'full'} n{block_n}-s{stages}: "
                      f"{resource_usage(compiled)}; shared {compiled.metadata.shared} B; innermost loops: {sizes} "
                      "instructions", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compile-only", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--tiles", nargs="*", default=["64-2", "64-3"],
                        help="BLOCK_M-NUM_STAGES of the Gluon dK/dV kernel")
    parser.add_argument("--dq-tiles", nargs="*", default=[], help="BLOCK_N-NUM_STAGES of the Gluon dQ kernel")
    parser.add_argument("--head-dim", type=int, nargs="*", default=[64, 128])
    parser.add_argument("--seqlen", type=int, nargs="*", default=[1024, 4096, 16384])
    parser.add_argument("--peer", nargs="*", default=["flashgen", "cudnn", "flash", "flex"])
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--breakdown", action="store_true", help="time each backward kernel alone instead")
    args = parser.parse_args(argv)
    tiles = [tuple(int(x) for x in t.split("-")) for t in args.tiles]
    dq_tiles = [tuple(int(x) for x in t.split("-")) for t in args.dq_tiles]
    runs = runs_of(dq_tiles, tiles)
    if args.compile_only:
        compile_only(tiles, dq_tiles)
        return 0
    if args.breakdown:
        rows = breakdown(args.head_dim, args.seqlen, tiles, dq_tiles)
        if args.out:
            (args.out / "gluon-bwd-breakdown.json").write_text(json.dumps(rows, indent=1))
        return 0
    results = {"gpu": torch.cuda.get_device_name()}
    if not args.skip_check:
        cases = [(dt, d, c, shape) for dt in ("fp16", "bf16") for d in (64, 128)
                 for c in (None, "top_left", "bottom_right")
                 for shape in ((2, 4, 2, 300, 200), (1, 2, 2, 256, 384))]
        results["check"] = check(cases, runs)
        if not all(r["ok"] for r in results["check"]):
            print("checks failed: not timing")
            if args.out:
                (args.out / "gluon-bwd.json").write_text(json.dumps(results, indent=1))
            return 1
    results["bench"] = bench(args.head_dim, args.seqlen, runs, tuple(args.peer))
    summarize(results["bench"], list(runs))
    if args.out:
        (args.out / "gluon-bwd.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
