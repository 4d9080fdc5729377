"""Hopper's fused backward, attn_bwd_fused_sm90 (one Gluon kernel of five products a step, dQ summed with atomics):
what it can run, how dispatch weighs it (never where deterministic gradients are asked for), what it compiles to
for sm_90 (no GPU needed), and, marked `gpu`, its gradients against the float64 reference."""

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
from flashgen.launch import FUSED_FALLBACK
from flashgen.shapes import ShapeBucket
from flashgen.spec import (
    BACKWARD,
    BACKWARD_FUSED_SM90,
    BACKWARD_SM90,
    Variant,
    backward_template_of,
    knob_table,
)
from flashgen.sram import estimate_fused_sm90_backward_shared_bytes, fits
from flashgen.tuner import search_space
from flashgen.tuning import sibling_entry

from .test_bwd_sm90 import assert_attention_gradients, assert_gradients_match, hopper
from .test_dispatch import fresh_dispatch  # noqa: F401  (the fixture: no shipped caches, no user database)
from .test_sm90 import A100, H100_SHARED, sm90_entry, use_index
from .test_store import H200

FUSED = knob_table(BACKWARD_FUSED_SM90)
D64 = Variant(64, "bf16", causal=True)


@pytest.mark.parametrize("variant, capability, reason", [
    (Variant(64, "bf16", causal=True), (9, 0), None),
    (Variant(64, "fp16"), (9, 0), None),
    (Variant(128, "bf16"), (9, 0), "head_dim 128"),
    (Variant(64, "fp32"), (9, 0), "dtype fp32"),
    (Variant(64, "fp16", dropout=True), (9, 0), "dropout"),
    (Variant(64, "fp16"), (8, 0), "compute capability (8, 0)"),
    (Variant(64, "fp16"), None, "interpreter"),
])  # fmt: skip
def test_supports_declares_what_the_kernels_run(variant, capability, reason):
    refusal = FUSED.supports.refusal(variant, capability)
    assert refusal is None if reason is None else reason in refusal


def test_its_configs_are_its_own_and_not_bit_reproducible():
    assert backward_template_of(FUSED.default_config()) == BACKWARD_FUSED_SM90
    assert FUSED.default_config().key == "m64-n128-w4-s3-defer_dq=1"
    assert not FUSED.supports.deterministic
    assert knob_table(BACKWARD).supports.deterministic and knob_table(BACKWARD_SM90).supports.deterministic
    # Where TMA cannot address the tensors it runs attn_bwd's default tiles, with dQ summed atomically too.
    assert backward_template_of(FUSED_FALLBACK) == BACKWARD and FUSED_FALLBACK["atomic_dq"]


def test_search_space_is_every_ring_depth_and_dq_schedule_that_fits():
    bucket = ShapeBucket.of(D64, batch=4, heads_q=16, heads_kv=16, n_q=4096, n_k=4096)
    space = search_space(bucket, sram_budget=H100_SHARED, template=BACKWARD_FUSED_SM90)
    assert sorted((c.num_stages, c["defer_dq"]) for c in space) == [(s, d) for s in (2, 3, 4) for d in (False, True)]
    # 4 stages need 166 KB; a 150 KB budget leaves 2 and 3.
    assert estimate_fused_sm90_backward_shared_bytes(D64, FUSED.config(num_stages=4)) > 150_000
    assert fits(D64, FUSED.config(num_stages=3), 150_000, BACKWARD_FUSED_SM90)
    small = search_space(bucket, sram_budget=150_000, template=BACKWARD_FUSED_SM90)
    assert {c.num_stages for c in small} == {2, 3}


def bucket_of(n, variant=D64):
    return ShapeBucket.of(variant, batch=4, heads_q=16, heads_kv=16, n_q=n, n_k=n)


def entries(fused_ms, sm90_ms, bwd_ms, n=1024):
    return [sm90_entry(n, ms=fused_ms, template=BACKWARD_FUSED_SM90, variant=D64),
            sm90_entry(n, ms=sm90_ms, template=BACKWARD_SM90, variant=D64),
            sm90_entry(n, ms=bwd_ms, template=BACKWARD, variant=D64)]  # fmt: skip


def test_dispatch_takes_the_fastest_of_three_but_never_it_for_deterministic_gradients(monkeypatch):
    use_index(monkeypatch, entries(fused_ms=0.7, sm90_ms=0.8, bwd_ms=1.0) + entries(0.9, 0.8, 1.0, n=4096))
    assert dispatch.backward_choice(bucket_of(1024), H200).template == BACKWARD_FUSED_SM90
    reproducible = dispatch.backward_choice(bucket_of(1024), H200, deterministic=True)
    assert reproducible.template == BACKWARD_SM90 and reproducible.kind == "tuned"
    assert dispatch.backward_choice(bucket_of(4096), H200).template == BACKWARD_SM90
    # Not on another GPU, nor where its table says it cannot run.
    use_index(monkeypatch, entries(fused_ms=0.1, sm90_ms=0.8, bwd_ms=1.0))
    assert dispatch.backward_choice(bucket_of(1024), A100).template == BACKWARD
    with pytest.raises(ValueError, match="attn_bwd_fused_sm90, which cannot run head_dim 128"):
        dispatch.backward_choice(bucket_of(1024, Variant(128, "bf16")), H200, FUSED.default_config())


def test_forcing_it_with_deterministic_gradients_is_a_clear_error():
    q = torch.randn(1, 1, 16, 64, dtype=torch.float16, requires_grad=True)
    with pytest.raises(ValueError, match="attn_bwd_fused_sm90, which sums dQ atomically.*deterministic"):
        flashgen.attention(q, q, q, backward_config=FUSED.default_config(), deterministic=True)


def test_the_final_round_weighs_the_fastest_other_template(monkeypatch):
    from flashgen import tuning

    monkeypatch.setattr(tuning, "toolchain", lambda: {"triton": "3.6.0"})
    stored = entries(fused_ms=0.7, sm90_ms=0.8, bwd_ms=0.75)
    assert sibling_entry(stored, BACKWARD_FUSED_SM90, bucket_of(1024), H200).template == BACKWARD
    assert sibling_entry(stored, BACKWARD, bucket_of(1024), H200).template == BACKWARD_FUSED_SM90


def test_flashgen_check_runs_its_gradients_on_hopper():
    cases = [case for case in default_cases(H200) if case.backward == BACKWARD_FUSED_SM90]
    assert cases and all(case.head_dim == 64 and case.dtype in ("fp16", "bf16") for case in cases)
    assert {case.causal for case in cases} >= {None, "top_left", "bottom_right"}


# What the fused kernel compiles to, checked without a GPU (in a fresh process: see tests/test_sm90.py).
_COMPILE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from sass_report import compile_for_sm90, resource_usage
from flashgen.spec import Variant, knob_table
from flashgen.sram import estimate_fused_sm90_backward_shared_bytes
table = knob_table("attn_bwd_fused_sm90")
rows = []
for causal, knobs in json.loads(sys.argv[2]):
    variant, config = Variant(64, "bf16", causal=causal), table.config(**knobs)
    compiled = compile_for_sm90("attn_bwd_fused_sm90", "attn_bwd_fused", variant, config)
    rows.append({"shared": compiled.metadata.shared, "usage": resource_usage(compiled), "ptx": compiled.asm["ptx"],
                 "estimate": estimate_fused_sm90_backward_shared_bytes(variant, config)})
print(json.dumps(rows))
"""


def test_fused_kernel_compiles_for_sm90_with_vector_atomics_and_no_spills():
    cases = [(False, {"num_stages": 3}), (False, {"num_stages": 4, "defer_dq": False}), (True, {"num_stages": 3})]
    benchmarks = Path(__file__).resolve().parent.parent / "benchmarks"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE, str(benchmarks), json.dumps(cases)], capture_output=True,
                            text=True, timeout=900, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout.splitlines()[-1])
    for (causal, knobs), row in zip(cases, rows):
        assert "setmaxnreg" in row["ptx"]  # the producer warp gives its registers to the consumers
        assert "wgmma.wait_group.sync.aligned 1;" in row["ptx"]  # exp2(S^T) while dP^T is in flight
        assert ".v4.f32" in row["ptx"] and "red." in row["ptx"]  # dQ: four floats per atomic request
        # The model counts every buffer; the rest is mbarriers (80-112 bytes measured).
        assert row["estimate"] - 128 <= row["shared"] <= row["estimate"], row
        if not causal:  # (the causal mask costs a few bytes of spills at 3 stages with the deferred dQ)
            assert "0 bytes spill stores" in row["usage"], (knobs, row["usage"])


# --- On a Hopper GPU: against the float64 reference -----------------------------------------------------------

CONFIGS = [FUSED.default_config(), FUSED.config(defer_dq=False), FUSED.config(num_stages=2),
           FUSED.config(num_stages=4, defer_dq=False)]
# (B, Hq, Hkv, Nq, Nk): GQA with ragged lengths (an odd number of steps), more queries than keys (bottom-right:
# rows that see no key), one query row, keys that are not a multiple of a program's 128, and one longer case.
SHAPES = [(2, 4, 2, 333, 517), (1, 2, 1, 517, 333), (2, 2, 2, 1, 300), (1, 3, 1, 640, 1000), (1, 2, 2, 2048, 2048)]


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("causal", [None, "top_left", "bottom_right"], ids=lambda c: c or "full")
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.key)
def test_gradients_match_reference_on_hopper(dtype, causal, config):
    assert_gradients_match(Variant(64, dtype, causal=causal is not None), causal, config, SHAPES)


@pytest.mark.gpu
@hopper
def test_through_attention_and_tensors_tma_cannot_address():
    # Views TMA cannot address run FUSED_FALLBACK.
    assert_attention_gradients(FUSED.default_config())
