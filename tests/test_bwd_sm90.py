"""Hopper's own backward, attn_bwd_sm90 (a Gluon dQ kernel before attn_bwd's dK/dV kernel): what it can run, how
dispatch chooses between it and attn_bwd, what its dQ kernel compiles to for sm_90 (no GPU needed), and, marked
`gpu`, its gradients against the float64 reference."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flashgen
from flashgen import codegen, dispatch
from flashgen.bench import config_peer
from flashgen.launch import attention_backward, attention_forward, dkdv_config_of
from flashgen.reference import reference_gradients, relative_error, tolerance
from flashgen.shapes import ShapeBucket
from flashgen.spec import BACKWARD, BACKWARD_SM90, TORCH_DTYPES, Variant, backward_template_of, knob_table
from flashgen.sram import estimate_sm90_backward_shared_bytes, fits
from flashgen.tuner import search_space

from .test_dispatch import fresh_dispatch  # noqa: F401  (the fixture: no shipped caches, no user database)
from .test_sm90 import A100, H100_SHARED, sm90_entry, use_index
from .test_store import H200

SM90 = knob_table(BACKWARD_SM90)
BWD = knob_table(BACKWARD)


@pytest.mark.parametrize("variant, capability, reason", [
    (Variant(128, "bf16", causal=True), (9, 0), None),
    (Variant(64, "fp16"), (9, 0), None),
    (Variant(96, "bf16"), (9, 0), "head_dim 96"),
    (Variant(64, "fp32"), (9, 0), "dtype fp32"),
    (Variant(64, "fp16", dropout=True), (9, 0), "dropout"),
    (Variant(64, "fp16"), (8, 0), "compute capability (8, 0)"),
    (Variant(64, "fp16"), None, "interpreter"),
])  # fmt: skip
def test_supports_declares_what_the_kernels_run(variant, capability, reason):
    refusal = SM90.supports.refusal(variant, capability)
    assert refusal is None if reason is None else reason in refusal
    assert BWD.supports.refusal(variant, capability) is None  # attn_bwd runs everything


def test_a_config_belongs_to_exactly_one_backward_template():
    assert backward_template_of(SM90.default_config()) == BACKWARD_SM90
    assert backward_template_of(BWD.default_config()) == BACKWARD
    with pytest.raises(ValueError, match="not a config of a backward template.*attn_bwd.*attn_bwd_sm90"):
        backward_template_of(knob_table("attn_fwd").default_config())


def test_its_dkdv_kernel_is_attn_bwds_with_the_same_tiles_through_tma():
    config = SM90.config(block_m=32, block_n=128, num_warps=8, num_stages=3, dq_block_n=128, dq_stages=2)
    assert dkdv_config_of(config) == BWD.config(block_m=32, block_n=128, num_warps=8, num_stages=3, tma=True)


def test_its_digest_covers_attn_bwd(tmp_path, monkeypatch):
    # Its entries were timed with attn_bwd's dK/dV kernel: editing attn_bwd must retire them too.
    before = {t: codegen.template_digest(t) for t in ("attn_bwd", "attn_bwd_sm90", "attn_fwd")}
    copy = tmp_path / "templates"
    copy.mkdir()
    for path in codegen.templates_dir().iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    with (copy / "attn_bwd.py.j2").open("a") as source:
        source.write("\n# an edit\n")
    monkeypatch.setattr(codegen, "templates_dir", lambda: copy)
    codegen.template_digest.cache_clear()
    try:
        after = {t: codegen.template_digest(t) for t in before}
    finally:
        codegen.template_digest.cache_clear()
    assert after["attn_bwd"] != before["attn_bwd"] and after["attn_bwd_sm90"] != before["attn_bwd_sm90"]
    assert after["attn_fwd"] == before["attn_fwd"]


def test_shared_memory_model_prunes_what_does_not_fit_a_hopper():
    d128 = Variant(128, "bf16")
    # The dQ kernel: 128 rows of Q and dO (64 KiB at D=128) and a ring of 3 x 128-key K and V buffers (192 KiB).
    too_big = SM90.config(dq_block_n=128, dq_stages=3)
    assert estimate_sm90_backward_shared_bytes(d128, too_big) > H100_SHARED
    assert fits(d128, SM90.config(dq_block_n=128, dq_stages=2), H100_SHARED, BACKWARD_SM90)
    bucket = ShapeBucket.of(d128, batch=1, heads_q=16, heads_kv=16, n_q=4096, n_k=4096)
    space = search_space(bucket, sram_budget=H100_SHARED, template=BACKWARD_SM90)
    assert too_big not in space and SM90.default_config() in space
    assert all(c["dq_block_n"] == 64 or c["dq_stages"] == 2 for c in space)


def bucket_of(n, variant=Variant(128, "bf16", causal=True)):
    return ShapeBucket.of(variant, batch=4, heads_q=16, heads_kv=16, n_q=n, n_k=n)


@pytest.mark.parametrize("bwd_ms, sm90_ms, expected", [(1.0, 0.8, BACKWARD_SM90), (0.8, 1.0, BACKWARD)])
def test_dispatch_takes_the_faster_backward_where_both_are_tuned(monkeypatch, bwd_ms, sm90_ms, expected):
    use_index(monkeypatch, [sm90_entry(ms=sm90_ms, template=BACKWARD_SM90), sm90_entry(ms=bwd_ms, template=BACKWARD)])
    choice = dispatch.backward_choice(bucket_of(1024), H200)
    assert choice.template == expected and choice.kind == "tuned"
    # It has no atomics: asking for deterministic gradients leaves the choice as it is.
    assert dispatch.backward_choice(bucket_of(1024), H200, deterministic=True) == choice


def test_dispatch_never_picks_it_where_it_cannot_run(monkeypatch):
    fp32 = Variant(128, "fp32", causal=True)
    use_index(monkeypatch, [sm90_entry(ms=0.1, template=BACKWARD_SM90), sm90_entry(ms=5.0, template=BACKWARD)])
    assert dispatch.backward_choice(bucket_of(1024), A100).template == BACKWARD  # another GPU
    assert dispatch.backward_choice(bucket_of(1024, fp32), H200).template == BACKWARD
    with pytest.raises(ValueError, match="attn_bwd_sm90, which cannot run dtype fp32"):
        dispatch.backward_choice(bucket_of(1024, fp32), H200, SM90.default_config())


def test_untuned_buckets_run_attn_bwd_by_default(monkeypatch):
    use_index(monkeypatch, [])
    choice = dispatch.backward_choice(bucket_of(1024), H200)
    assert choice.template == BACKWARD and choice.kind == "default"


@pytest.mark.cpu_interpreter
def test_forcing_it_in_the_interpreter_is_a_clear_error():
    q = torch.randn(1, 1, 16, 64, dtype=torch.float16, requires_grad=True)
    out = flashgen.attention(q, q, q, backward_config=SM90.default_config())
    with pytest.raises(ValueError, match="attn_bwd_sm90, which cannot run Triton's interpreter"):
        out.sum().backward()


def test_bench_names_configs_of_either_backward_template():
    assert config_peer("attn_bwd_sm90:m64-n64-w4-s2-dq_stages=4", backward=True).endswith("dq_stages=4")
    with pytest.raises(ValueError, match="dq_stages"):
        config_peer("m64-n64-w4-s2-dq_stages=4", backward=True)  # attn_bwd when no template is named
    with pytest.raises(ValueError, match="template must be one of"):
        config_peer("attn_bwd_sm90:m64-n64-w4-s2", backward=False)


# What the dQ kernel compiles to, checked without a GPU (in a fresh process: see tests/test_sm90.py).
_COMPILE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from sass_report import compile_for_sm90, resource_usage
from flashgen.spec import Variant, knob_table
from flashgen.sram import estimate_sm90_backward_shared_bytes
table = knob_table("attn_bwd_sm90")
rows = []
for head_dim, causal, knobs in json.loads(sys.argv[2]):
    variant, config = Variant(head_dim, "bf16", causal=causal), table.config(**knobs)
    compiled = compile_for_sm90("attn_bwd_sm90", "attn_bwd_dq", variant, config)
    rows.append({"shared": compiled.metadata.shared, "estimate": estimate_sm90_backward_shared_bytes(variant, config),
                 "usage": resource_usage(compiled), "ptx": compiled.asm["ptx"]})
print(json.dumps(rows))
"""


def test_dq_kernel_compiles_for_sm90_with_async_wgmma_and_no_spills():
    cases = [(64, True, {"dq_block_n": 64, "dq_stages": 3}), (128, False, {"dq_block_n": 64, "dq_stages": 4}),
             (128, True, {"dq_block_n": 64, "dq_stages": 2})]
    benchmarks = Path(__file__).resolve().parent.parent / "benchmarks"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE, str(benchmarks), json.dumps(cases)], capture_output=True,
                            text=True, timeout=600, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for row in json.loads(result.stdout.splitlines()[-1]):
        # dS_j is computed while dS_{j-1} K_{j-1} is in flight: a wait that leaves one wgmma group open.
        assert "wgmma.wait_group.sync.aligned 1;" in row["ptx"]
        assert "setmaxnreg" in row["ptx"]  # the producer warp gives its registers to the consumers
        assert "0 bytes spill stores" in row["usage"], row["usage"]
        # The dK/dV kernel of these configs needs less: the estimate is the dQ kernel's, within 768 bytes.
        assert row["estimate"] - 768 <= row["shared"] <= row["estimate"], row


# --- On a Hopper GPU: against the float64 reference -----------------------------------------------------------

hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                            reason="needs an sm_90 GPU")  # fmt: skip
CONFIGS = [SM90.default_config(), SM90.config(dq_block_n=128, dq_stages=2),
           SM90.config(block_m=32, dq_block_n=64, dq_stages=2, num_stages=3)]
# (B, Hq, Hkv, Nq, Nk): GQA with ragged lengths, more queries than keys (bottom-right: rows that see no key), one
# query row.
SHAPES = [(2, 4, 2, 333, 517), (1, 2, 1, 517, 333), (2, 2, 2, 1, 300)]


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [None, "top_left", "bottom_right"], ids=lambda c: c or "full")
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.key)
def test_gradients_match_reference_on_hopper(dtype, head_dim, causal, config):
    assert_gradients_match(Variant(head_dim, dtype, causal=causal is not None), causal, config, SHAPES)


def assert_gradients_match(variant, causal, config, shapes):
    """attention_backward with ``config`` against float64 on each (B, Hq, Hkv, Nq, Nk) of ``shapes``."""
    forward = knob_table("attn_fwd").config(block_m=64, block_n=64, num_warps=4, num_stages=2)
    for batch, heads_q, heads_kv, n_q, n_k in shapes:
        offset = 0 if causal in (None, "top_left") else n_k - n_q
        q = torch.randn(batch, heads_q, n_q, variant.head_dim, device="cuda", dtype=TORCH_DTYPES[variant.dtype])
        k, v = (torch.randn(batch, heads_kv, n_k, variant.head_dim, device="cuda", dtype=q.dtype) for _ in range(2))
        grad = torch.randn_like(q)
        out, lse = attention_forward(q, k, v, variant=variant, config=forward, scale=0.125, causal_offset=offset)
        ours = attention_backward(grad, q, k, v, out, lse, variant=variant, config=config, scale=0.125,
                                  causal_offset=offset)  # fmt: skip
        where = None if causal is None else offset
        exact = reference_gradients(q, k, v, grad, scale=0.125, causal_offset=where)
        plain = reference_gradients(q, k, v, grad, scale=0.125, causal_offset=where, compute_dtype=q.dtype)
        for name, got, want, same in zip(("dq", "dk", "dv"), ours, exact, plain):
            error, limit = relative_error(got, want), tolerance(q.dtype, relative_error(same, want))
            assert error <= limit, f"{name} {(batch, heads_q, heads_kv, n_q, n_k)}: {error:.3g} > {limit:.3g}"


@pytest.mark.gpu
@hopper
def test_through_attention_and_tensors_tma_cannot_address():
    # Views TMA cannot address run attn_bwd with the same dK/dV tiles.
    assert_attention_gradients(CONFIGS[0])


def assert_attention_gradients(config, head_dim=64):
    """Autograd through flashgen.attention with a forced backward ``config`` (bf16, causal) against float64, on
    (B, N, H, D) storage viewed as (B, H, N, D): rows of ``head_dim`` elements, which TMA can address, and of one
    more, which it cannot (an odd row stride)."""
    for width in (head_dim, head_dim + 1):
        base = torch.randn(3, 2, 300, 2, width, device="cuda", dtype=torch.bfloat16)
        q, k, v = (t[..., :head_dim].transpose(1, 2).detach().requires_grad_() for t in base.unbind(0))
        out = flashgen.attention(q, k, v, causal=True, backward_config=config)
        grad = torch.randn_like(out)
        out.backward(grad)
        exact = reference_gradients(q, k, v, grad, causal_offset=0)
        plain = reference_gradients(q, k, v, grad, causal_offset=0, compute_dtype=q.dtype)
        for got, want, same in zip((q.grad, k.grad, v.grad), exact, plain):
            assert relative_error(got, want) <= tolerance(q.dtype, relative_error(same, want))
