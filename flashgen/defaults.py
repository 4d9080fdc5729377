"""The default tile configs: what a kernel runs with when nothing tuned is known, and where every tuning
search starts. A heuristic over the head dim, filtered by the shared-memory budget; not a tuned answer.
"""

from __future__ import annotations

from functools import cache

from flashgen.codegen import BACKWARD, FORWARD
from flashgen.device import DeviceInfo
from flashgen.spec import (
    BACKWARD_FUSED_SM90,
    BACKWARD_FUSED_TMA_SM90,
    BACKWARD_SM90,
    FORWARD_SM90,
    TileConfig,
    Variant,
    knob_table,
)
from flashgen.sram import ESTIMATES, estimate_shared_bytes, shared_budget

# (block_m, block_n, num_warps, num_stages[, template knobs]), best first; the first that fits the
# shared-memory budget wins. A starting point until a tuned entry exists, not a tuned answer.
_GPU_PREFERENCE = {
    64: [(128, 64, 4, 3), (128, 64, 4, 2), (64, 64, 4, 2), (64, 32, 4, 1)],
    128: [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 1)],
    256: [(64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 1), (16, 16, 4, 1)],
}
# Hopper (sm90 and later), from the 2026-11-22 sweep on an H200 (bf16, seqlens 1k..16k, docs/hopper-notes.md):
# at D=128, 128x128 tiles loaded through TMA beat the 128x64 plain default by 4-14%; at D=64 TMA gained
# nothing in the forward.
_HOPPER_PREFERENCE = {
    64: [(128, 64, 8, 3), *_GPU_PREFERENCE[64]],
    128: [(128, 128, 8, 3, {"tma": True}), (128, 64, 8, 3, {"tma": True}), *_GPU_PREFERENCE[128]],
    256: _GPU_PREFERENCE[256],
}
# The interpreter's cost is per inner-loop step, not per element: large-ish tiles, no pipelining.
_INTERPRETER_DEFAULT = (64, 32, 4, 1)


def _first_fitting(template: str, candidates, variant: Variant, device: DeviceInfo,
                   sram_budget: int | None) -> TileConfig | None:  # fmt: skip
    """The first of ``candidates`` whose shared memory (``template``'s SRAM model) fits the budget, or None."""
    table, estimate = knob_table(template), ESTIMATES[template]
    budget = shared_budget(device, sram_budget)
    for block_m, block_n, num_warps, num_stages, *knobs in candidates:
        config = table.config(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages,
                              **(knobs[0] if knobs else {}))  # fmt: skip
        if budget is None or estimate(variant, config) <= budget:
            return config
    return None


def _first_fitting_or_error(template: str, candidates, variant: Variant, device: DeviceInfo,
                            sram_budget: int | None) -> TileConfig:  # fmt: skip
    config = _first_fitting(template, candidates, variant, device, sram_budget)
    if config is None:
        raise ValueError(f"no {template} config for {variant.key} fits a shared-memory budget of "
                         f"{shared_budget(device, sram_budget)} bytes")  # fmt: skip
    return config


def _candidates(preference: dict, hopper: dict, interpreter_default: tuple, variant: Variant, device: DeviceInfo) -> list[tuple]:
    if device.interpreter:
        return [interpreter_default]
    if device.capability is not None and device.capability >= (9, 0):
        preference = hopper
    return preference[next(bound for bound in sorted(preference) if variant.head_dim_padded <= bound)]


@cache  # on every attention call without a config: a dictionary lookup after the first
def default_config(variant: Variant, device: DeviceInfo, *, sram_budget: int | None = None) -> TileConfig:
    """The forward config used when nothing better is known for ``variant`` on ``device``."""
    candidates = _candidates(_GPU_PREFERENCE, _HOPPER_PREFERENCE, _INTERPRETER_DEFAULT, variant, device) + [(16, 16, 4, 1)]
    config = _first_fitting(FORWARD, candidates, variant, device, sram_budget)
    if config is None:
        smallest = knob_table(FORWARD).config(block_m=16, block_n=16, num_warps=4, num_stages=1)
        raise ValueError(
            f"no forward config for {variant.key} fits a shared-memory budget of {shared_budget(device, sram_budget)} "
            f"bytes (the smallest, {smallest.key}, needs {estimate_shared_bytes(variant, smallest)})"
        )
    return config


# Backward (block_m, block_n, num_warps, num_stages), from backward tuning on an H200 (bf16, seqlens 1k to
# 16k): 64x64 tiles with 4 warps won every bucket at both head dims, 3 stages at D=64; 8 warps at D=128 was
# 2x slower. dQ in its own kernel: accumulating it atomically was 17-25% slower where both were measured.
_GPU_BACKWARD_PREFERENCE = {
    64: [(64, 64, 4, 3), (64, 64, 4, 2), (32, 64, 4, 2), (32, 32, 4, 1)],
    128: [(64, 64, 4, 2), (32, 64, 4, 2), (32, 32, 4, 1)],
    256: [(32, 32, 4, 1), (16, 32, 4, 1), (16, 16, 4, 1)],
}
# Hopper: the same tiles with Q, K, V and dO loaded through TMA were 0-9% faster in the 2026-11-22 sweep.
_HOPPER_BACKWARD_PREFERENCE = {
    64: [(64, 64, 4, 3, {"tma": True}), *_GPU_BACKWARD_PREFERENCE[64]],
    128: [(64, 64, 4, 2, {"tma": True}), *_GPU_BACKWARD_PREFERENCE[128]],
    256: _GPU_BACKWARD_PREFERENCE[256],
}
_INTERPRETER_BACKWARD_DEFAULT = (32, 32, 4, 1)


@cache
def default_backward_config(variant: Variant, device: DeviceInfo, *, sram_budget: int | None = None) -> TileConfig:
    """The backward config used when nothing better is known (the backward is not tuned yet)."""
    candidates = _candidates(_GPU_BACKWARD_PREFERENCE, _HOPPER_BACKWARD_PREFERENCE, _INTERPRETER_BACKWARD_DEFAULT,
                             variant, device)  # fmt: skip
    return _first_fitting_or_error(BACKWARD, candidates, variant, device, sram_budget)


# Hopper's own forward (attn_fwd_sm90), from the 2026-11-22 runs of its experiment on the H100 and H200
# (docs/hopper-notes.md, v5): 128-key blocks with a 3-deep ring were fastest at both head dims; 64-key blocks
# where shared memory is short. At D=64, three consumer groups (192 rows), persistent, with 128-key blocks beat
# that by 10% at 4k and 16k tokens on the H100 (v9).
_SM90_PREFERENCE = {
    64: [(192, 128, 4, 2, {"persistent": True}), (128, 128, 4, 3), (128, 64, 4, 3), (128, 64, 4, 2)],
    128: [(128, 128, 4, 3), (128, 64, 4, 3), (128, 64, 4, 2)],
}


@cache
def default_sm90_config(variant: Variant, device: DeviceInfo, *, sram_budget: int | None = None) -> TileConfig:
    """The attn_fwd_sm90 config used when nothing tuned is known and where its searches start."""
    candidates = _SM90_PREFERENCE.get(variant.head_dim, _SM90_PREFERENCE[128])
    return _first_fitting_or_error(FORWARD_SM90, candidates, variant, device, sram_budget)


# Hopper's own backward (attn_bwd_sm90): the dK/dV tiles attn_bwd's tuning chose at each head dim, and the Gluon
# dQ kernel's fastest ring in the 2026-11-22 experiment on the H100 (docs/hopper-notes.md, v8): 64-key blocks,
# 3 deep.
_SM90_BACKWARD_PREFERENCE = {
    64: [(64, 64, 4, 3, {"dq_block_n": 64, "dq_stages": 3}), (64, 64, 4, 2, {"dq_block_n": 64, "dq_stages": 2})],
    128: [(64, 64, 4, 2, {"dq_block_n": 64, "dq_stages": 3}), (64, 64, 4, 2, {"dq_block_n": 64, "dq_stages": 2})],
}


@cache
def default_sm90_backward_config(variant: Variant, device: DeviceInfo, *, sram_budget: int | None = None) -> TileConfig:
    """The attn_bwd_sm90 config used when nothing tuned is known and where its searches start."""
    candidates = _SM90_BACKWARD_PREFERENCE.get(variant.head_dim, _SM90_BACKWARD_PREFERENCE[128])
    return _first_fitting_or_error(BACKWARD_SM90, candidates, variant, device, sram_budget)


# Hopper's fused backward (attn_bwd_fused_sm90), from its experiment on the H100 and H200 (docs/hopper-notes.md,
# v12): a 3-deep ring with the deferred dQ product was fastest at 4k and 16k tokens; 2 deep where shared memory is
# short.
_FUSED_SM90_BACKWARD_PREFERENCE = [(64, 128, 4, 3, {"defer_dq": True}), (64, 128, 4, 2, {"defer_dq": True})]


@cache
def default_fused_sm90_backward_config(variant: Variant, device: DeviceInfo, *,
                                       sram_budget: int | None = None) -> TileConfig:  # fmt: skip
    """The attn_bwd_fused_sm90 config used when nothing tuned is known and where its searches start."""
    return _first_fitting_or_error(BACKWARD_FUSED_SM90, _FUSED_SM90_BACKWARD_PREFERENCE, variant, device,
                                   sram_budget)  # fmt: skip


@cache
def default_fused_tma_sm90_backward_config(variant: Variant, device: DeviceInfo, *,
                                           sram_budget: int | None = None) -> TileConfig:  # fmt: skip
    """The attn_bwd_fused_tma_sm90 config: its table's default, a 2-deep ring, where it fits the budget. It is
    the only ring that fits at D=128 (docs/hopper-notes.md, v19), and the tuner's pick in most D=64 buckets (v27)."""
    only = knob_table(BACKWARD_FUSED_TMA_SM90).default_config()
    candidates = [(only.block_m, only.block_n, only.num_warps, only.num_stages)]
    return _first_fitting_or_error(BACKWARD_FUSED_TMA_SM90, candidates, variant, device, sram_budget)


def default_for(template: str, variant: Variant, device: DeviceInfo, *, sram_budget: int | None = None) -> TileConfig:
    """The default config of ``template`` (one of :data:`flashgen.spec.TEMPLATES`)."""
    defaults = {FORWARD: default_config, FORWARD_SM90: default_sm90_config, BACKWARD: default_backward_config,
                BACKWARD_SM90: default_sm90_backward_config,
                BACKWARD_FUSED_SM90: default_fused_sm90_backward_config,
                BACKWARD_FUSED_TMA_SM90: default_fused_tma_sm90_backward_config}  # fmt: skip
    if template not in defaults:
        raise ValueError(f"template must be one of {sorted(defaults)}, got {template!r}")
    return defaults[template](variant, device, sram_budget=sram_budget)
