"""How much shared memory a kernel needs, so configs over the budget are pruned before compiling.

The model counts the tiles a kernel keeps in shared memory: for the forward, the Q tile (loaded once) and
``num_stages`` buffers of the K and V tiles (the software pipeline's ring); each other template's below.
Registers are not modelled. The error of this estimate against what Triton reports for compiled kernels is
written in ``docs/sram.md``.
"""

from __future__ import annotations

from flashgen.device import DeviceInfo
from flashgen.spec import (
    BACKWARD,
    BACKWARD_FUSED_SM90,
    BACKWARD_FUSED_TMA_SM90,
    BACKWARD_SM90,
    FORWARD,
    FORWARD_SM90,
    TileConfig,
    Variant,
)


def estimate_shared_bytes(variant: Variant, config: TileConfig) -> int:
    """Estimated shared memory of one program of the forward kernel, in bytes."""
    row_bytes = variant.head_dim_padded * variant.element_size
    q_tile = config.block_m * row_bytes
    kv_ring = config.num_stages * 2 * config.block_n * row_bytes
    return q_tile + kv_ring


SM90_RESERVED_PER_PROGRAM = 1024  # shared memory the hardware keeps for each resident program on sm_90


def sm90_forward_programs_per_sm(config: TileConfig) -> int:
    """Programs of the Hopper forward (attn_fwd_sm90) that share an SM: two with one consumer warp group (block_m
    64), which then take half of the registers and of the shared memory each; otherwise one."""
    return 2 if config.block_m == 64 else 1


def estimate_sm90_shared_bytes(variant: Variant, config: TileConfig) -> int:
    """Shared memory of one program of the Hopper forward (attn_fwd_sm90), in bytes: the consumers' Q
    tiles, two per consumer with ``persistent`` (each also stages its tile's output), ``num_stages`` K and V
    buffers, and 640 bytes for the mbarriers, warp specialisation and alignment
    (compiled for sm_90 with Triton 3.6, D 64/128, 2-4 stages: 344-448 bytes above the tiles with two
    consumers, 532 with three). Where two programs share an SM, the bytes of both and of the reserve between
    them, so that the budget of one program bounds the pair."""
    row_bytes = variant.head_dim * variant.element_size
    query_tiles = 2 if config["persistent"] else 1
    program = query_tiles * config.block_m * row_bytes + config.num_stages * 2 * config.block_n * row_bytes + 640
    programs = sm90_forward_programs_per_sm(config)
    return programs * (program + SM90_RESERVED_PER_PROGRAM) - SM90_RESERVED_PER_PROGRAM


def estimate_backward_shared_bytes(variant: Variant, config: TileConfig) -> int:
    """Estimated shared memory of one program of the dK/dV kernel (the backward's largest), in bytes: the
    K and V tiles, ``num_stages`` buffers of the Q and dO tiles, and a BLOCK_N x BLOCK_M tile for dS.
    Not yet compared with compiled kernels on a GPU."""
    row_bytes = variant.head_dim_padded * variant.element_size
    kv_tiles = 2 * config.block_n * row_bytes
    q_do_ring = config.num_stages * 2 * config.block_m * row_bytes
    ds_tile = config.block_m * config.block_n * variant.element_size
    return kv_tiles + q_do_ring + ds_tile


def estimate_sm90_backward_shared_bytes(variant: Variant, config: TileConfig) -> int:
    """Shared memory of the larger program of the Hopper backward (attn_bwd_sm90), in bytes: its dK/dV kernel
    (attn_bwd's, see :func:`estimate_backward_shared_bytes`) or its dQ kernel. The dQ kernel holds the Q and dO
    tiles of its two consumers (128 query rows), ``dq_stages`` K and V buffers of ``dq_block_n`` rows, and
    768 bytes for the mbarriers, warp specialisation and alignment (compiled for sm_90 with Triton 3.6, D
    64/128, 2-3 stages: 600-664 bytes above the tiles)."""
    row_bytes = variant.head_dim * variant.element_size
    dq_kernel = 2 * 128 * row_bytes + config["dq_stages"] * 2 * config["dq_block_n"] * row_bytes + 768
    return max(estimate_backward_shared_bytes(variant, config), dq_kernel)


def estimate_fused_sm90_backward_shared_bytes(variant: Variant, config: TileConfig) -> int:
    """Shared memory of one program of Hopper's fused backward (attn_bwd_fused_sm90), in bytes: ``num_stages``
    buffers of a step's Q and dO tiles and its rows' float32 lse2 and delta; the program's K and V (``block_n``
    keys); two dS^T buffers of ``block_n`` x ``block_m``; the two consumer groups' scratch for moving their dQ
    (``block_m`` x D float32 each) into the atomics' layout; and 128 bytes for the mbarriers (compiled for sm_90
    with Triton 3.6, D=64, 2-4 stages: 80-112 bytes above the rest)."""
    row_bytes = variant.head_dim * variant.element_size
    ring = config.num_stages * (2 * config.block_m * row_bytes + 2 * config.block_m * 4)
    keys = 2 * config.block_n * row_bytes
    ds_tiles = 2 * config.block_n * config.block_m * variant.element_size
    dq_scratch = 2 * config.block_m * variant.head_dim * 4
    return ring + keys + ds_tiles + dq_scratch + 128


def estimate_fused_tma_sm90_backward_shared_bytes(variant: Variant, config: TileConfig) -> int:
    """Shared memory of one program of Hopper's fused backward with TMA-summed dQ (attn_bwd_fused_tma_sm90), in
    bytes: ``num_stages`` buffers of a step's Q and dO tiles and its rows' float32 lse2 and delta; the program's K and
    V (``block_n`` keys); each consumer group's P tile and two dS tiles (``block_m`` x ``block_n / 2``); each group's
    float32 staging tile of half of dQ's columns; and 464 bytes plus two 8-byte mbarriers a ring buffer for the other
    mbarriers, warp specialisation and alignment (compiled for sm_90 with Triton 3.6: 480-496 bytes above the rest at
    D=128 with 2 stages, 480, 512 and 528 at D=64 with 2, 3 and 4)."""
    row_bytes = variant.head_dim * variant.element_size
    ring = config.num_stages * (2 * config.block_m * row_bytes + 2 * config.block_m * 4)
    keys = 2 * config.block_n * row_bytes
    score_tiles = 3 * config.block_m * config.block_n * variant.element_size  # P, and dS twice, of both groups
    dq_staging = config.block_m * variant.head_dim * 4
    return ring + keys + score_tiles + dq_staging + 464 + 16 * config.num_stages


def shared_budget(device: DeviceInfo, user_budget: int | None = None) -> int | None:
    """The bytes a program may use: the device's limit, lowered to ``user_budget`` if given (None: no limit)."""
    if user_budget is not None and (isinstance(user_budget, bool) or not isinstance(user_budget, int) or user_budget <= 0):
        raise ValueError(f"sram budget must be a positive number of bytes, got {user_budget!r}")
    limits = [b for b in (device.max_shared_mem, user_budget) if b is not None]
    return min(limits) if limits else None


ESTIMATES = {
    FORWARD: estimate_shared_bytes,
    FORWARD_SM90: estimate_sm90_shared_bytes,
    BACKWARD: estimate_backward_shared_bytes,
    BACKWARD_SM90: estimate_sm90_backward_shared_bytes,
    BACKWARD_FUSED_SM90: estimate_fused_sm90_backward_shared_bytes,
    BACKWARD_FUSED_TMA_SM90: estimate_fused_tma_sm90_backward_shared_bytes,
}


def fits(variant: Variant, config: TileConfig, budget: int | None, template: str = FORWARD) -> bool:
    return budget is None or ESTIMATES[template](variant, config) <= budget
