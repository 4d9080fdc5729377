"""Experiment (v5 candidate, not dispatched): a Hopper attention forward in Gluon with FA3's schedule.

Why it exists: Triton 3.6 waits for every wgmma right after issuing it (docs/hopper-notes.md, v4), so a
plain Triton kernel cannot run a block's softmax while its tensor cores work. Gluon (triton.experimental.gluon)
exposes async wgmma, its waits, TMA, mbarriers and warp specialisation, which is what this kernel uses:

- one producer warp issues every TMA load (Q once, then K and V through a ring of ``stages`` buffers);
- two consumer warp groups of 64 query rows each share the ring; each issues S_j = Q K_j^T and
  O += P_{j-1} V_{j-1} back to back, waits for S_j only, and computes the softmax of S_j while P·V runs;
- a consumer frees a K buffer once its S_j is done and a V buffer once its P·V is done (count-2 barriers);
- ``pingpong``: the two consumers take turns issuing their matmuls, so one group's softmax runs under the
  other group's matmuls (FA3's inter-warpgroup schedule).

Contract: q (B, H, Nq, D), k and v (B, H, Nk, D), fp16 or bf16, D 64 or 128, any strides with a unit last
stride and 16-byte aligned others (TMA); causal is top-left aligned. Returns out (B, H, Nq, D) and lse
(B, H, Nq) float32, the natural-log logsumexp of each row's scaled scores. Needs an sm_90 GPU. No GQA,
dropout or masks: those are why it is an experiment and not yet a template (docs/hopper-notes.md, v5).

    python benchmarks/gluon_forward.py 128 --block-n 128 --stages 3 --pingpong   # compile for sm_90, no GPU
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

LOG2E = 1.4426950408889634
CONSUMERS = 2  # warp groups of ROWS query rows each, as the kernel is written; three (BLOCK_M 192) spilled at D=64
ROWS = 64
CONSUMER_REGISTERS = 232
PRODUCER_REGISTERS = 24


@gluon.jit
def _softmax_step(s, m_i, qk_scale, start_n, row0, N_K, MASKED: gl.constexpr, CAUSAL: gl.constexpr,
                  s_layout: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """Online softmax of one score block in log2 units: the new row maxima, P = exp2(scaled s - m) and the
    factor alpha that rescales what was accumulated against the old maxima."""
    if MASKED:
        # Scale before masking (a zero scale would turn -inf into NaN), and shift fully masked rows by 0.
        cols = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        visible = gl.expand_dims(cols < N_K, 0)
        if CAUSAL:
            rows = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
            visible = visible & (gl.expand_dims(cols, 0) <= gl.expand_dims(rows, 1))
        s = gl.where(visible, s * qk_scale, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1))
        m_shift = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(s - gl.expand_dims(m_shift, 1))
        alpha = gl.exp2(m_i - m_shift)
    else:
        # The maximum of raw scores times a scale >= 0 is the maximum of the scaled scores: one FFMA per score.
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
        alpha = gl.exp2(m_i - m_new)
    return p, m_new, alpha


@gluon.jit
def _softmax(s, m_i, qk_scale, j, n_free, row0, N_K, CAUSAL: gl.constexpr, s_layout: gl.constexpr,
             BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """Blocks below ``n_free`` are seen whole by every row of the group: no mask."""
    if j < n_free:
        p, m_new, alpha = _softmax_step(s, m_i, qk_scale, j * BLOCK_N, row0, N_K, False, CAUSAL, s_layout,
                                        BLOCK_M, BLOCK_N)
    else:
        p, m_new, alpha = _softmax_step(s, m_i, qk_scale, j * BLOCK_N, row0, N_K, True, CAUSAL, s_layout,
                                        BLOCK_M, BLOCK_N)
    return p, m_new, alpha


@gluon.jit
def _wait_turn(turn, C: gl.constexpr, r, PINGPONG: gl.constexpr):
    # Round r: consumer 0 issues after consumer 1 issued round r-1, consumer 1 after consumer 0 issued round r.
    # Neither can run two rounds ahead, so a parity wait is unambiguous.
    if PINGPONG:
        if C == 0:
            mbarrier.wait(turn.index(0), (r - 1) & 1, pred=r > 0)
        else:
            mbarrier.wait(turn.index(C), r & 1)


@gluon.jit
def _pass_turn(turn, C: gl.constexpr, PINGPONG: gl.constexpr):
    if PINGPONG:
        mbarrier.arrive(turn.index(1 - C), count=1)


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_tiles, k_tiles, v_tiles, q_ready, k_ready, v_ready, k_free, v_free, b, h,
              off_m, n_blocks, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    for c in gl.static_range(2):
        mbarrier.expect(q_ready.index(c), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [b, h, off_m + c * q_desc.block_type.shape[2], 0],
                                        q_ready.index(c), q_tiles.index(c))
    for j in range(n_blocks):
        stage = j % STAGES
        # Block j reuses the buffer of block j - STAGES: wait until both consumers freed it.
        free_phase = ((j // STAGES) & 1) ^ 1
        mbarrier.wait(k_free.index(stage), free_phase, pred=j >= STAGES)
        mbarrier.expect(k_ready.index(stage), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [b, h, j * BLOCK_N, 0], k_ready.index(stage), k_tiles.index(stage))
        mbarrier.wait(v_free.index(stage), free_phase, pred=j >= STAGES)
        mbarrier.expect(v_ready.index(stage), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [b, h, j * BLOCK_N, 0], v_ready.index(stage), v_tiles.index(stage))


@gluon.jit
def _consumer(C: gl.constexpr, o_desc, Lse, q_tiles, k_tiles, v_tiles, q_ready, k_ready, v_ready, k_free, v_free,
              turn, b, h, bh, off_m, n_blocks, n_free, qk_scale, N_Q, N_K, BLOCK_N: gl.constexpr,
              HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr, PINGPONG: gl.constexpr):
    dtype: gl.constexpr = o_desc.dtype
    BLOCK_M: gl.constexpr = o_desc.block_type.shape[2]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    row0 = off_m + C * BLOCK_M
    q = q_tiles.index(C).reshape([BLOCK_M, HEAD_DIM])

    s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, s_rows)

    # Block 0: its scores and softmax; its P·V is issued in the loop's first trip, beside S_1.
    mbarrier.wait(q_ready.index(C), 0)
    mbarrier.wait(k_ready.index(0), 0)
    _wait_turn(turn, C, 0, PINGPONG)
    s_token = warpgroup_mma(q, k_tiles.index(0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), s, use_acc=False,
                            is_async=True)
    _pass_turn(turn, C, PINGPONG)
    s = warpgroup_mma_wait(0, deps=[s_token])
    mbarrier.arrive(k_free.index(0), count=1)
    p, m_i, alpha = _softmax(s, m_i, qk_scale, 0, n_free, row0, N_K, CAUSAL, s_layout, BLOCK_M, BLOCK_N)
    l_i = gl.sum(p, 1)

    # Invariant at the top of trip j: acc holds sum_{i<j-1} P_i V_i against the maxima m_i of block j-1,
    # and p = P_{j-1} against the same maxima.
    for j in range(1, n_blocks):
        stage = j % STAGES
        prev = (j - 1) % STAGES
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        mbarrier.wait(k_ready.index(stage), (j // STAGES) & 1)
        mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
        _wait_turn(turn, C, j, PINGPONG)
        s_token = warpgroup_mma(q, k_tiles.index(stage).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), s,
                                use_acc=False, is_async=True)
        o_token = warpgroup_mma(p_op, v_tiles.index(prev).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
        _pass_turn(turn, C, PINGPONG)
        # Wait for S_j only (wgmma groups complete in order); P_{j-1} V_{j-1} stays in flight.
        s = warpgroup_mma_wait(1, deps=[s_token])
        mbarrier.arrive(k_free.index(stage), count=1)
        p, m_i, alpha = _softmax(s, m_i, qk_scale, j, n_free, row0, N_K, CAUSAL, s_layout, BLOCK_M, BLOCK_N)
        l_i = l_i * alpha + gl.sum(p, 1)
        acc = warpgroup_mma_wait(0, deps=[o_token])
        mbarrier.arrive(v_free.index(prev), count=1)
        # acc now includes P_{j-1} V_{j-1} against the old maxima: move it to the new ones.
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, o_rows), 1)

    last = n_blocks - 1
    p_op = gl.convert_layout(p.to(dtype), p_layout)
    mbarrier.wait(v_ready.index(last % STAGES), (last // STAGES) & 1)
    _wait_turn(turn, C, n_blocks, PINGPONG)
    o_token = warpgroup_mma(p_op, v_tiles.index(last % STAGES).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
    _pass_turn(turn, C, PINGPONG)
    acc = warpgroup_mma_wait(0, deps=[o_token])

    seen = l_i > 0.0
    l_safe = gl.where(seen, l_i, 1.0)
    lse = gl.where(seen, (m_i + gl.log2(l_safe)) * 0.6931471805599453, float("-inf"))  # log2 -> natural log
    rows = row0 + gl.arange(0, BLOCK_M, layout=s_rows)
    gl.store(Lse + bh * N_Q + rows, lse, mask=rows < N_Q)
    # The group's Q buffer is free now: stage the output there for one TMA store (rows past N_Q are clipped).
    q.store((acc / gl.expand_dims(gl.convert_layout(l_safe, o_rows), 1)).to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [b, h, row0, 0], q_tiles.index(C))
    tma.store_wait(0)


@gluon.jit
def attn_fwd_ws(q_desc, k_desc, v_desc, o_desc, Lse, qk_scale, N_Q, N_K, H, BLOCK_N: gl.constexpr,
                HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr, PINGPONG: gl.constexpr,
                CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
    """One program per (128 query rows, batch*head); causal programs run the longest rows first."""
    dtype: gl.constexpr = q_desc.dtype
    ROWS_PER_GROUP: gl.constexpr = q_desc.block_type.shape[2]
    BLOCK_M: gl.constexpr = 2 * ROWS_PER_GROUP
    pid_m = gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // H
    h = bh % H
    if CAUSAL:
        off_m = (gl.num_programs(0) - 1 - pid_m) * BLOCK_M
        n_blocks = (gl.minimum(N_K, off_m + BLOCK_M) + BLOCK_N - 1) // BLOCK_N
        n_free = gl.minimum((off_m + 1) // BLOCK_N, N_K // BLOCK_N)
    else:
        off_m = pid_m * BLOCK_M
        n_blocks = (N_K + BLOCK_N - 1) // BLOCK_N
        n_free = N_K // BLOCK_N

    q_tiles = gl.allocate_shared_memory(dtype, [2, 1, 1, ROWS_PER_GROUP, HEAD_DIM], q_desc.layout)
    k_tiles = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_tiles = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for c in gl.static_range(2):
        mbarrier.init(q_ready.index(c), count=1)
        mbarrier.init(turn.index(c), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_free.index(i), count=2)
        mbarrier.init(v_free.index(i), count=2)
    fence_async_shared()

    gl.warp_specialize([
        (_consumer, (0, o_desc, Lse, q_tiles, k_tiles, v_tiles, q_ready, k_ready, v_ready, k_free, v_free, turn, b,
                     h, bh, off_m, n_blocks, n_free, qk_scale, N_Q, N_K, BLOCK_N, HEAD_DIM, STAGES, CAUSAL,
                     PINGPONG)),
        (_consumer, (1, o_desc, Lse, q_tiles, k_tiles, v_tiles, q_ready, k_ready, v_ready, k_free, v_free, turn, b,
                     h, bh, off_m, n_blocks, n_free, qk_scale, N_Q, N_K, BLOCK_N, HEAD_DIM, STAGES, CAUSAL,
                     PINGPONG)),
        (_producer, (q_desc, k_desc, v_desc, q_tiles, k_tiles, v_tiles, q_ready, k_ready, v_ready, k_free, v_free,
                     b, h, off_m, n_blocks, BLOCK_N, STAGES)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])  # fmt: skip


def _gl_dtype(name: str):
    return {"bf16": gl.bfloat16, "fp16": gl.float16}[name]


def _layouts(dtype: str, head_dim: int, block_n: int):
    """Shared-memory layouts of the Q/O boxes (one consumer's rows) and of the K/V boxes."""
    return (gl.NVMMASharedLayout.get_default_for([1, 1, ROWS, head_dim], _gl_dtype(dtype)),
            gl.NVMMASharedLayout.get_default_for([1, 1, block_n, head_dim], _gl_dtype(dtype)))


def shared_memory_bytes(head_dim: int, block_n: int, stages: int, element_size: int = 2) -> int:
    """Tiles only (the barriers add under 100 bytes): both groups' Q tiles and the K/V ring."""
    return element_size * head_dim * (CONSUMERS * ROWS + 2 * stages * block_n)


def attention(q, k, v, *, causal: bool = False, scale: float | None = None, block_n: int = 128, stages: int = 3,
              pingpong: bool = False, poison: bool = False):
    """Run the kernel (contract in the module docstring). ``poison`` fills the outputs with NaN first."""
    import torch
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    if q.dim() != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"q must be (B, H, Nq, D) and k, v (B, H, Nk, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(q.dtype)
    if dtype is None or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must all be fp16 or all bf16; got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, heads, n_q, head_dim = q.shape
    if head_dim not in (64, 128):
        raise ValueError(f"head dim must be 64 or 128; got {head_dim}")
    if shared_memory_bytes(head_dim, block_n, stages) > 227 * 1024:
        raise ValueError(f"block_n={block_n} with stages={stages} needs more than 227 KiB of shared memory at "
                         f"D={head_dim}")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if scale < 0:
        raise ValueError(f"scale must be >= 0 (the row maxima are taken before scaling); got {scale}")
    out = torch.empty_like(q)
    lse = torch.empty((batch, heads, n_q), device=q.device, dtype=torch.float32)
    if poison:
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
    q_layout, kv_layout = _layouts(dtype, head_dim, block_n)
    q_box, kv_box = [1, 1, ROWS, head_dim], [1, 1, block_n, head_dim]
    descs = (TensorDescriptor.from_tensor(q, q_box, q_layout), TensorDescriptor.from_tensor(k, kv_box, kv_layout),
             TensorDescriptor.from_tensor(v, kv_box, kv_layout), TensorDescriptor.from_tensor(out, q_box, q_layout))
    grid = (triton.cdiv(n_q, CONSUMERS * ROWS), batch * heads)
    attn_fwd_ws[grid](*descs, lse, scale * LOG2E, n_q, k.shape[2], heads, BLOCK_N=block_n, HEAD_DIM=head_dim,
                      STAGES=stages, CAUSAL=causal, PINGPONG=pingpong, CONSUMER_REGS=CONSUMER_REGISTERS,
                      PRODUCER_REGS=PRODUCER_REGISTERS, num_warps=4)
    return out, lse


def compile_for_sm90(head_dim: int, *, block_n: int = 128, stages: int = 3, causal: bool = False,
                     pingpong: bool = False, dtype: str = "bf16"):
    """Compile for sm_90 on a machine without a GPU, specialised as a launch from PyTorch would be."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    q_layout, kv_layout = _layouts(dtype, head_dim, block_n)
    q_desc = f"tensordesc<{dtype}[1, 1, {ROWS}, {head_dim}],{q_layout!r}>"
    kv_desc = f"tensordesc<{dtype}[1, 1, {block_n}, {head_dim}],{kv_layout!r}>"
    signature = {"q_desc": q_desc, "k_desc": kv_desc, "v_desc": kv_desc, "o_desc": q_desc, "Lse": "*fp32",
                 "qk_scale": "fp32", "N_Q": "i32", "N_K": "i32", "H": "i32"}
    constants = {"BLOCK_N": block_n, "HEAD_DIM": head_dim, "STAGES": stages, "CAUSAL": causal,
                 "PINGPONG": pingpong, "CONSUMER_REGS": CONSUMER_REGISTERS, "PRODUCER_REGS": PRODUCER_REGISTERS}
    signature.update(dict.fromkeys(constants, "constexpr"))
    names = list(signature)
    source = GluonASTSource(attn_fwd_ws, signature, constexprs={(names.index(k),): v for k, v in constants.items()},
                            attrs={(names.index("Lse"),): [["tt.divisibility", 16]]})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


def main() -> None:
    parser = argparse.ArgumentParser(description="Compile the Gluon forward experiment for sm_90 and print its "
                                                 "registers, spills and shared memory (no GPU needed).")
    parser.add_argument("head_dim", type=int, choices=[64, 128])
    parser.add_argument("--block-n", type=int, default=128, choices=[64, 128])
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--pingpong", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sass_report import resource_usage

    compiled = compile_for_sm90(args.head_dim, block_n=args.block_n, stages=args.stages, causal=args.causal,
                                pingpong=args.pingpong)
    print(f"shared memory: {compiled.metadata.shared} bytes")
    print(resource_usage(compiled).strip())


if __name__ == "__main__":
    main()
