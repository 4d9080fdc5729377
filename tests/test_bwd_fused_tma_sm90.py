"""Hopper's fused backward in FlashAttention-3's layout, attn_bwd_fused_tma_sm90 (one Gluon kernel of five products
a step, dQ summed by the TMA engine's reduce-adds), at D=64 and D=128: what it can run, how dispatch weighs it (never
where deterministic gradients are asked for), what it compiles to for sm_90 (no GPU needed), and, marked `gpu`, its
gradients against the float64 reference."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flashgen
from flashgen import dispatch
from flashgen.checks import default_cases
from flashgen.defaults import default_for
from flashgen.shapes import ShapeBucket
from flashgen.spec import (
    BACKWARD_FUSED_SM90,
    BACKWARD_FUSED_TMA_SM90,
    BACKWARD_SM90,
    Variant,
    backward_template_of,
    knob_table,
)
from flashgen.sram import estimate_fused_tma_sm90_backward_shared_bytes, fits
from flashgen.tuner import search_space

from .test_bwd_sm90 import assert_attention_gradients, assert_gradients_match, hopper
from .test_dispatch import fresh_dispatch  # noqa: F401  (the fixture: no shipped caches, no user database)
from .test_sm90 import A100, H100_SHARED, sm90_entry, use_index
from .test_store import H200

FUSED_TMA = knob_table(BACKWARD_FUSED_TMA_SM90)
D128 = Variant(128, "bf16", causal=True)
D64 = Variant(64, "bf16", causal=True)


@pytest.mark.parametrize("variant, capability, reason", [
    (Variant(128, "bf16", causal=True), (9, 0), None),
    (Variant(128, "fp16"), (9, 0), None),
    (Variant(64, "fp16"), (9, 0), None),
    (Variant(96, "bf16"), (9, 0), "head_dim 96"),
    (Variant(128, "fp32"), (9, 0), "dtype fp32"),
    (Variant(128, "fp16", dropout=True), (9, 0), "dropout"),
    (Variant(128, "fp16"), (8, 0), "compute capability (8, 0)"),
    (Variant(128, "fp16"), None, "interpreter"),
])  # fmt: skip
def test_supports_declares_what_the_kernel_runs(variant, capability, reason):
    refusal = FUSED_TMA.supports.refusal(variant, capability)
    assert refusal is None if reason is None else reason in refusal


def test_its_rings_fit_hopper_by_head_dim_and_it_is_not_bit_reproducible():
    config = FUSED_TMA.default_config()
    assert backward_template_of(config) == BACKWARD_FUSED_TMA_SM90 and config.key == "m64-n128-w4-s2"
    assert default_for(BACKWARD_FUSED_TMA_SM90, D128, H200) == config
    assert default_for(BACKWARD_FUSED_TMA_SM90, D64, H200) == config
    assert not FUSED_TMA.supports.deterministic
    # At D=128, 2 stages take 214.5 KB of the H100's 227 KiB: the deeper rings are left out, and a budget below
    # that leaves nothing to run.
    bucket = ShapeBucket.of(D128, batch=4, heads_q=16, heads_kv=16, n_q=4096, n_k=4096)
    assert search_space(bucket, sram_budget=H100_SHARED, template=BACKWARD_FUSED_TMA_SM90) == [config]
    assert 210_000 < estimate_fused_tma_sm90_backward_shared_bytes(D128, config) < H100_SHARED
    assert not fits(D128, config, 200_000, BACKWARD_FUSED_TMA_SM90)
    assert search_space(bucket, sram_budget=200_000, template=BACKWARD_FUSED_TMA_SM90) == []
    # At D=64 every ring fits (4 stages: 166 KB); a 160 KB budget leaves out the 4-deep one.
    bucket = ShapeBucket.of(D64, batch=4, heads_q=16, heads_kv=16, n_q=4096, n_k=4096)
    rings = [FUSED_TMA.config(num_stages=n) for n in (2, 3, 4)]
    assert set(search_space(bucket, sram_budget=H100_SHARED, template=BACKWARD_FUSED_TMA_SM90)) == set(rings)
    assert 160_000 < estimate_fused_tma_sm90_backward_shared_bytes(D64, rings[2]) < 170_000
    assert set(search_space(bucket, sram_budget=160_000, template=BACKWARD_FUSED_TMA_SM90)) == set(rings[:2])


def bucket_of(n, variant=D128):
    return ShapeBucket.of(variant, batch=4, heads_q=16, heads_kv=16, n_q=n, n_k=n)


def test_dispatch_takes_it_where_faster_but_never_for_deterministic_gradients(monkeypatch):
    stored = [sm90_entry(n, ms=ms, template=template, variant=D128)
              for n, fused_ms, sm90_ms in ((1024, 0.9, 0.8), (4096, 0.8, 0.9))
              for template, ms in ((BACKWARD_FUSED_TMA_SM90, fused_ms), (BACKWARD_SM90, sm90_ms))]  # fmt: skip
    use_index(monkeypatch, stored)
    assert dispatch.backward_choice(bucket_of(1024), H200).template == BACKWARD_SM90
    assert dispatch.backward_choice(bucket_of(4096), H200).template == BACKWARD_FUSED_TMA_SM90
    reproducible = dispatch.backward_choice(bucket_of(4096), H200, deterministic=True)
    assert reproducible.template == BACKWARD_SM90 and reproducible.kind == "tuned"
    assert dispatch.backward_choice(bucket_of(4096), A100).template != BACKWARD_FUSED_TMA_SM90
    with pytest.raises(ValueError, match="attn_bwd_fused_tma_sm90, which cannot run head_dim 96"):
        dispatch.backward_choice(bucket_of(1024, Variant(96, "bf16")), H200, FUSED_TMA.default_config())


def test_at_d64_dispatch_takes_the_faster_of_the_two_fused_backwards(monkeypatch):
    stored = [sm90_entry(n, ms=ms, template=template, variant=D64)
              for n, tma_ms, fused_ms in ((1024, 0.9, 0.8), (4096, 0.8, 0.9))
              for template, ms in ((BACKWARD_FUSED_TMA_SM90, tma_ms), (BACKWARD_FUSED_SM90, fused_ms))]  # fmt: skip
    use_index(monkeypatch, stored)
    assert dispatch.backward_choice(bucket_of(1024, D64), H200).template == BACKWARD_FUSED_SM90
    assert dispatch.backward_choice(bucket_of(4096, D64), H200).template == BACKWARD_FUSED_TMA_SM90


def test_forcing_it_with_deterministic_gradients_is_a_clear_error():
    q = torch.randn(1, 1, 16, 128, dtype=torch.float16, requires_grad=True)
    with pytest.raises(ValueError, match="attn_bwd_fused_tma_sm90.*deterministic"):
        flashgen.attention(q, q, q, backward_config=FUSED_TMA.default_config(), deterministic=True)


def test_flashgen_check_runs_its_gradients_on_hopper():
    cases = [case for case in default_cases(H200) if case.backward == BACKWARD_FUSED_TMA_SM90]
    assert {case.head_dim for case in cases} == {64, 128}
    assert all(case.dtype in ("fp16", "bf16") for case in cases)


# What the fused kernel compiles to, checked without a GPU (in a fresh process: see tests/test_sm90.py).
_COMPILE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from sass_report import compile_for_sm90, resource_usage
from flashgen.spec import Variant, knob_table
from flashgen.sram import estimate_fused_tma_sm90_backward_shared_bytes
table = knob_table("attn_bwd_fused_tma_sm90")
rows = []
for head_dim, stages, causal in json.loads(sys.argv[2]):
    variant, config = Variant(head_dim, "bf16", causal=causal), table.config(num_stages=stages)
    compiled = compile_for_sm90("attn_bwd_fused_tma_sm90", "attn_bwd_fused", variant, config)
    rows.append({"shared": compiled.metadata.shared, "usage": resource_usage(compiled), "ptx": compiled.asm["ptx"],
                 "estimate": estimate_fused_tma_sm90_backward_shared_bytes(variant, config)})
print(json.dumps(rows))
"""


def test_fused_kernel_compiles_for_sm90_with_tma_reduce_adds():
    cases = [(128, 2, False), (128, 2, True), (64, 2, False), (64, 4, True)]  # (head dim, stages, causal)
    benchmarks = Path(__file__).resolve().parent.parent / "benchmarks"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE, str(benchmarks), json.dumps(cases)], capture_output=True,
                            text=True, timeout=900, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout.splitlines()[-1])
    for (head_dim, _, causal), row in zip(cases, rows):
        assert "setmaxnreg" in row["ptx"]  # the producer warp gives its registers to the consumers
        assert "wgmma.wait_group.sync.aligned 1;" in row["ptx"]  # exp2(S) while dP is in flight
        assert "cp.reduce.async.bulk.tensor.4d.global.shared::cta.add" in row["ptx"]  # dQ by the TMA engine
        assert "atom." not in row["ptx"] and "red.global" not in row["ptx"]  # and no atomics from registers
        # The model counts every buffer; the rest is mbarriers and alignment (480-528 bytes measured).
        assert row["estimate"] - 64 <= row["shared"] <= row["estimate"], row
        if head_dim == 64 or not causal:  # (at D=128 the causal mask's selects cost 124 bytes of spills)
            assert "0 bytes spill stores" in row["usage"], row["usage"]


# --- On a Hopper GPU: against the float64 reference -----------------------------------------------------------

# (B, Hq, Hkv, Nq, Nk): GQA with ragged lengths, more queries than keys (bottom-right: rows that see no key), one
# query row, keys that are not a multiple of a program's 128, and one longer case.
SHAPES = [(2, 4, 2, 333, 517), (1, 2, 1, 517, 333), (2, 2, 2, 1, 300), (1, 3, 1, 640, 1000), (1, 2, 2, 2048, 2048)]


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("head_dim, stages", [(128, 2), (64, 2), (64, 4)], ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("causal", [None, "top_left", "bottom_right"], ids=lambda c: c or "full")
def test_gradients_match_reference_on_hopper(head_dim, stages, dtype, causal):
    config = FUSED_TMA.config(num_stages=stages)
    assert_gradients_match(Variant(head_dim, dtype, causal=causal is not None), causal, config, SHAPES)


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("head_dim", [64, 128])
def test_through_attention_and_tensors_tma_cannot_address(head_dim):
    # Views TMA cannot address run FUSED_FALLBACK.
    assert_attention_gradients(FUSED_TMA.default_config(), head_dim=head_dim)
