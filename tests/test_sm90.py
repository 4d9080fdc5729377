"""Hopper's own forward, attn_fwd_sm90 (Gluon): what it can run, how dispatch chooses between it and attn_fwd,
what it compiles to for sm_90 (no GPU needed), and, marked `gpu`, its results against the float64 reference."""

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import flashgen
from flashgen import dispatch, ops
from flashgen.bench import config_peer
from flashgen.checks import Case, run_case
from flashgen.codegen import render, template_digest
from flashgen.device import DeviceInfo
from flashgen.entries import TunedEntry
from flashgen.compiled_launch import CompiledLaunch
from flashgen.launch import Sm90ForwardLaunch
from flashgen.reference import reference_attention, relative_error, tolerance
from flashgen.shapes import ShapeBucket
from flashgen.spec import FORWARD, FORWARD_SM90, Variant, forward_template_of, knob_table
from flashgen.sram import estimate_sm90_shared_bytes, fits
from flashgen.tuner import search_space

from .test_dispatch import fresh_dispatch  # noqa: F401  (the fixture: no shipped caches, no user database)
from .test_store import H200, TOOLCHAIN

SM90 = knob_table(FORWARD_SM90)
FWD = knob_table(FORWARD)
A100 = DeviceInfo("NVIDIA A100-SXM4-80GB", (8, 0), 108, 166912, interpreter=False)
H100_SHARED = 232448  # bytes one program may use on an H100 or H200


@pytest.mark.parametrize("variant, capability, reason", [
    (Variant(128, "bf16", causal=True), (9, 0), None),
    (Variant(64, "fp16"), (9, 0), None),
    (Variant(80, "bf16"), (9, 0), "head_dim 80"),
    (Variant(128, "fp32"), (9, 0), "dtype fp32"),
    (Variant(64, "fp16", dropout=True), (9, 0), "dropout"),
    (Variant(64, "fp16"), (8, 0), "compute capability (8, 0)"),
    (Variant(64, "fp16"), (10, 0), "compute capability (10, 0)"),
    (Variant(64, "fp16"), None, "interpreter"),
])  # fmt: skip
def test_supports_declares_what_the_kernel_runs(variant, capability, reason):
    refusal = SM90.supports.refusal(variant, capability)
    if reason is None:
        assert refusal is None
    else:
        assert reason in refusal
    assert FWD.supports.refusal(variant, capability) is None  # attn_fwd runs everything


def test_a_config_belongs_to_exactly_one_forward_template():
    assert forward_template_of(SM90.default_config()) == FORWARD_SM90
    assert forward_template_of(FWD.default_config()) == FORWARD
    with pytest.raises(ValueError, match="not a config of a forward template.*attn_fwd.*attn_fwd_sm90"):
        forward_template_of(knob_table("attn_bwd").default_config())


def test_shared_memory_model_prunes_what_does_not_fit_a_hopper():
    d128 = Variant(128, "bf16")
    too_big = SM90.config(block_n=128, num_stages=4)  # 2 * 128 * (128 + 1024) bytes of tiles alone
    assert estimate_sm90_shared_bytes(d128, too_big) > H100_SHARED
    assert fits(d128, SM90.config(block_n=128, num_stages=3), H100_SHARED, FORWARD_SM90)
    bucket = ShapeBucket.of(d128, batch=1, heads_q=16, heads_kv=16, n_q=4096, n_k=4096)
    space = search_space(bucket, sram_budget=H100_SHARED, template=FORWARD_SM90)
    assert too_big not in space and SM90.default_config() in space
    # A persistent program has a second Q tile per consumer (where its outputs are staged too): 32 KiB more at D=128.
    assert not fits(d128, SM90.config(block_n=128, num_stages=3, persistent=True), H100_SHARED, FORWARD_SM90)
    assert SM90.config(block_n=128, num_stages=2, persistent=True) in space
    # Out, with 128 rows: n128 with 4 stages (either ping-pong, either persistent), and n128 with 3 stages when
    # persistent. With 192 rows (a third Q tile, 16 KiB at D=128): n128 with 3 or 4 stages. With 64 rows two
    # programs share the SM, each with half of it less the 1 KiB reserved per program: of the 12, only n64 with 2
    # stages, and with 3 when not persistent (one Q tile), fit. Each of those with early_scores on or off, which
    # changes no buffer.
    assert SM90.config(block_m=192, block_n=128, num_stages=2, persistent=True) in space
    assert estimate_sm90_shared_bytes(d128, SM90.config(block_m=64, block_n=64, num_stages=3)) <= H100_SHARED
    assert SM90.config(block_m=64, block_n=64, num_stages=3, persistent=True) not in space
    assert len(space) == len(list(SM90.all_configs())) - 2 * (6 + 8 + 9)


@pytest.mark.parametrize("block_m, maxnreg", [(64, 128), (128, None)])
def test_one_consumer_programs_launch_with_half_the_registers(block_m, maxnreg):
    # Two 64-row programs share an SM: each starts with half of the 65536 registers over its 256 threads.
    config = SM90.config(block_m=block_m, block_n=128, num_stages=2)
    launch = Sm90ForwardLaunch(Variant(64, "bf16"), config, (2, 4, 300, 64), (2, 4, 300, 64))
    assert launch.options.get("maxnreg") == maxnreg and launch.grid == (-(-300 // block_m) * 8,)


def test_ping_pong_needs_two_consumer_groups():
    with pytest.raises(ValueError, match="'pingpong'=True of template 'attn_fwd_sm90' needs block_m in"):
        SM90.config(block_m=64, pingpong=True)
    assert not any(c.block_m == 64 and c["pingpong"] for c in SM90.all_configs())
    assert SM90.config(block_m=64)["pingpong"] is False and SM90.config(block_m=128, pingpong=True)["pingpong"]


def test_short_sequences_keep_the_only_query_tile():
    # block_m is at least 64: a 32-row bucket still has configs to tune (the kernel clips the padding rows).
    bucket = ShapeBucket.of(Variant(64, "fp16"), batch=8, heads_q=8, heads_kv=8, n_q=32, n_k=32)
    space = search_space(bucket, sram_budget=None, template=FORWARD_SM90)
    assert space and all(c.block_m == 64 and c.block_n == 64 for c in space)


def sm90_entry(n=1024, ms=1.0, template=FORWARD_SM90, config=None, variant=Variant(128, "bf16", causal=True)):
    table = knob_table(template)
    config = config or table.default_config()
    bucket = ShapeBucket.of(variant, batch=4, heads_q=16, heads_kv=16, n_q=n, n_k=n)
    source = render(template, variant, config)
    return TunedEntry(
        template=template, template_digest=template_digest(template), device=H200, toolchain=dict(TOOLCHAIN),
        bucket=bucket, config=config, median_ms=ms, tflops=100.0 / ms, error=1e-3, trials=10, trials_to_best=3,
        tuning_seconds=9.0, source_sha256=source.digest, source_text=source.text,
    )  # fmt: skip


def use_index(monkeypatch, entries):
    monkeypatch.setattr(dispatch, "toolchain", lambda: dict(TOOLCHAIN))
    index = dispatch.DispatchIndex(H200, [("test", entries)])
    monkeypatch.setattr(dispatch, "index_for", lambda device: index)


def bucket_of(n, variant=Variant(128, "bf16", causal=True)):
    return ShapeBucket.of(variant, batch=4, heads_q=16, heads_kv=16, n_q=n, n_k=n)


@pytest.mark.parametrize("fwd_ms, sm90_ms, expected", [(1.0, 0.8, FORWARD_SM90), (0.8, 1.0, FORWARD)])
def test_dispatch_takes_the_faster_template_where_both_are_tuned(monkeypatch, fwd_ms, sm90_ms, expected):
    use_index(monkeypatch, [sm90_entry(ms=sm90_ms), sm90_entry(ms=fwd_ms, template=FORWARD)])
    choice = dispatch.forward_choice(bucket_of(1024), H200)
    assert choice.template == expected and choice.kind == "tuned"


def test_dispatch_prefers_an_exact_entry_to_a_borrowed_one(monkeypatch):
    # attn_fwd is tuned at 1024 only (faster there); attn_fwd_sm90 at 4096: a 4096 call runs attn_fwd_sm90.
    use_index(monkeypatch, [sm90_entry(n=4096, ms=9.0), sm90_entry(n=1024, ms=0.1, template=FORWARD)])
    assert dispatch.forward_choice(bucket_of(4096), H200).template == FORWARD_SM90
    assert dispatch.forward_choice(bucket_of(1024), H200).template == FORWARD
    # 2048 borrows from both, at equal distance: the faster borrowed time wins.
    assert dispatch.forward_choice(bucket_of(2048), H200).template == FORWARD


def test_dispatch_never_picks_it_where_it_cannot_run(monkeypatch):
    fp32 = Variant(128, "fp32", causal=True)
    use_index(monkeypatch, [sm90_entry(ms=0.1), sm90_entry(ms=5.0, template=FORWARD)])
    assert dispatch.forward_choice(bucket_of(1024), A100).template == FORWARD  # another GPU
    assert dispatch.forward_choice(bucket_of(1024, fp32), H200).template == FORWARD
    with pytest.raises(ValueError, match="attn_fwd_sm90, which cannot run dtype fp32"):
        dispatch.forward_choice(bucket_of(1024, fp32), H200, SM90.default_config())


def test_untuned_buckets_run_attn_fwd_by_default(monkeypatch):
    use_index(monkeypatch, [])
    choice = dispatch.forward_choice(bucket_of(1024), H200)
    assert choice.template == FORWARD and choice.kind == "default"


@pytest.mark.cpu_interpreter
def test_forcing_it_in_the_interpreter_is_a_clear_error():
    q = torch.randn(1, 1, 16, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="attn_fwd_sm90, which cannot run Triton's interpreter"):
        flashgen.attention(q, q, q, config=SM90.default_config())


def test_tuning_skips_what_it_cannot_run(tmp_path):
    from flashgen.db import TuningStore
    from flashgen.tuning import TuneOptions, tune_buckets

    assert "dtype fp32" in SM90.refusal(Variant(64, "fp32"), H200)
    assert SM90.refusal(Variant(64, "fp16"), H200) is None
    store = TuningStore(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    (result,) = tune_buckets([bucket_of(64, Variant(64, "fp16"))], store, TuneOptions(template=FORWARD_SM90),
                             device="cpu")  # fmt: skip
    assert result.measured == 0 and "interpreter" in result.stopped_by and not store.entries()


def test_bench_names_configs_of_either_forward_template():
    assert config_peer("attn_fwd_sm90:m128-n64-w4-s2-pingpong=1", backward=False).endswith("pingpong=1")
    assert config_peer("m128-n64-w8-s3", backward=False)  # attn_fwd when no template is named
    with pytest.raises(ValueError, match="pingpong"):
        config_peer("m128-n64-w8-s3-pingpong=1", backward=False)
    with pytest.raises(ValueError, match="template must be one of"):
        config_peer("attn_bwd:m64-n64-w4-s2", backward=False)


# What the kernel compiles to, checked without a GPU: Triton's sm_90 compiler and the ptxas it ships with.
# In a fresh process, since the compiler cannot build Gluon's warp specialisation with the interpreter on.
_COMPILE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from sass_report import compile_for_sm90, resource_usage
from flashgen.spec import Variant, knob_table
from flashgen.sram import estimate_sm90_shared_bytes
table = knob_table("attn_fwd_sm90")
rows = []
for head_dim, causal, knobs in json.loads(sys.argv[2]):
    variant, config = Variant(head_dim, "bf16", causal=causal), table.config(**knobs)
    compiled = compile_for_sm90("attn_fwd_sm90", "attn_fwd", variant, config)
    rows.append({"shared": compiled.metadata.shared, "estimate": estimate_sm90_shared_bytes(variant, config),
                 "usage": resource_usage(compiled), "ptx": compiled.asm["ptx"]})
print(json.dumps(rows))
"""


def test_compiles_for_sm90_with_async_wgmma_and_few_spills_at_d64():
    cases = [(64, True, {"block_n": 128, "num_stages": 3, "pingpong": True}),
             (128, False, {"block_n": 64, "num_stages": 2}),
             (64, True, {"block_n": 128, "num_stages": 3, "persistent": True}),
             (64, False, {"block_m": 192, "block_n": 64, "num_stages": 3, "pingpong": True, "persistent": True}),
             (64, False, {"block_m": 192, "block_n": 128, "num_stages": 2, "persistent": True, "early_scores": True})]
    benchmarks = Path(__file__).resolve().parent.parent / "benchmarks"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE, str(benchmarks), json.dumps(cases)], capture_output=True,
                            text=True, timeout=600, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout.splitlines()[-1])
    for (head_dim, _, _), row in zip(cases, rows):
        # The softmax of S_j runs while P_{j-1} V_{j-1} is in flight: a wait that leaves one wgmma group open.
        assert "wgmma.wait_group.sync.aligned 1;" in row["ptx"]
        assert "setmaxnreg" in row["ptx"]  # the producer warp gives its registers to the consumers
        assert row["estimate"] - 640 <= row["shared"] <= row["estimate"], row
    # The causal mask's bounds cost a few registers: at most four values per thread (a tile's indices) go to local
    # memory before the key-block loop and come back after it; none inside it (sass, 2026-11-22).
    assert int(re.search(r"(\d+) bytes spill stores", rows[0]["usage"]).group(1)) <= 16, rows[0]["usage"]
    assert int(re.search(r"(\d+) bytes spill stores", rows[2]["usage"]).group(1)) <= 16, rows[2]["usage"]
    # Three consumer groups share the registers the producer gives up: 160 each, and 64-key blocks fit in them.
    assert "setmaxnreg.inc.sync.aligned.u32 \t160;" in rows[3]["ptx"]
    assert "0 bytes spill stores" in rows[3]["usage"], rows[3]["usage"]
    # With early_scores, P crosses the loop's back edge in the matmul's input type (half the registers): 128-key
    # blocks then fit in 160 too (in the other order they spill, docs/hopper-notes.md, v23).
    assert "0 bytes spill stores" in rows[4]["usage"], rows[4]["usage"]
    # A persistent program gives a Q tile back once the output staged in it has been read by its store.
    assert re.search(r"cp\.async\.bulk\.wait_group\.read\s+0;\s+bar\.sync", rows[2]["ptx"])


# --- On a Hopper GPU: against the float64 reference -----------------------------------------------------------

hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                            reason="needs an sm_90 GPU")  # fmt: skip
CONFIGS = [SM90.config(block_n=128, num_stages=3), SM90.config(block_n=64, num_stages=2, pingpong=True),
           SM90.config(block_n=128, num_stages=2, pingpong=True, persistent=True, early_scores=True),
           SM90.config(block_m=192, block_n=64, num_stages=3, pingpong=True),
           SM90.config(block_m=192, block_n=128, num_stages=2, persistent=True, early_scores=True),  # 160 registers
           SM90.config(block_m=64, block_n=128, num_stages=3, persistent=True)]  # one consumer, two programs an SM
# (B, Hq, Hkv, Nq, Nk): GQA with ragged lengths, more queries than keys (bottom-right: rows that see no key), decode.
SHAPES = [(2, 4, 2, 333, 517), (1, 2, 1, 517, 333), (2, 2, 2, 1, 300)]


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [None, "top_left", "bottom_right"], ids=lambda c: c or "full")
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.key)
def test_matches_reference_on_hopper(dtype, head_dim, causal, config):
    for shape in SHAPES:
        for transposed in (False, True):
            case = Case(*shape, head_dim, dtype, causal=causal, transposed=transposed, template=FORWARD_SM90)
            result = run_case(case, "cuda", config=config, gradients=shape[3] > 1 and not transposed)
            assert result.ok, result


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("scale", [-1.0, 0.0, 0.3])
def test_any_scale_on_hopper(scale):
    q = (8 * torch.randn(1, 2, 300, 64, device="cuda")).to(torch.bfloat16)
    k, v = torch.randn(2, 1, 2, 400, 64, device="cuda", dtype=torch.bfloat16)
    out, lse = flashgen.attention(q, k, v, scale=scale, causal=True, config=CONFIGS[0], return_lse=True)
    ref, ref_lse = reference_attention(q, k, v, scale=scale, causal_offset=0)
    same, _ = reference_attention(q, k, v, scale=scale, causal_offset=0, compute_dtype=torch.bfloat16)
    assert relative_error(out, ref) <= tolerance(torch.bfloat16, relative_error(same, ref))
    assert torch.allclose(lse.double().cpu(), ref_lse.cpu(), atol=1e-3)


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("programs", [1, 5])
@pytest.mark.parametrize("config", [CONFIGS[1], CONFIGS[2], SM90.config(block_n=64, num_stages=3, persistent=True),
                                    SM90.config(block_m=192, block_n=64, num_stages=2, pingpong=True, persistent=True),
                                    CONFIGS[5]],
                         ids=lambda c: c.key)  # fmt: skip
@pytest.mark.parametrize("n_q, n_k, causal_offset", [(517, 700, None), (700, 517, 0), (517, 333, -184), (1024, 600, 0)])
def test_a_program_runs_tile_after_tile(programs, config, n_q, n_k, causal_offset):
    # A grid far smaller than the tiles: each program carries its ring position and barrier phases across tiles
    # of different lengths (causal), with ragged tails, GQA and rows that see no key (the negative offset). Where
    # BLOCK_M does not divide N_Q, consumers whose rows all lie past it only take part in the ring and the turns
    # (700 and 192 rows: the last consumer of a head's last tile; 1024: the last two; 517 and 128: the last one).
    variant = Variant(64, "bf16", causal=causal_offset is not None)
    q = torch.randn(2, 4, n_q, 64, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn(2, 2, 2, n_k, 64, device="cuda", dtype=torch.bfloat16)
    launch = Sm90ForwardLaunch(variant, config, q.shape, k.shape, causal_offset or 0)
    launch.launcher = CompiledLaunch(launch.kernel, (programs,), **launch.options)
    out = torch.full_like(q, float("nan"))
    out, lse = launch(q, k, v, 0.125, out=out)
    ref, ref_lse = reference_attention(q, k, v, scale=0.125, causal_offset=causal_offset)
    same, _ = reference_attention(q, k, v, scale=0.125, causal_offset=causal_offset, compute_dtype=torch.bfloat16)
    assert relative_error(out, ref) <= tolerance(torch.bfloat16, relative_error(same, ref))
    assert torch.allclose(lse.double(), ref_lse, atol=1e-3)


@pytest.mark.gpu
@hopper
def test_tensors_tma_cannot_address_run_attn_fwd_instead():
    wide = torch.randn(3, 1, 2, 200, 65, dtype=torch.float16, device="cuda")
    q, k, v = wide[..., :64].unbind(0)  # row stride 65 elements: not a multiple of 16 bytes
    out = flashgen.attention(q, k, v, causal=True, config=CONFIGS[0])
    ref, _ = reference_attention(q, k, v, causal_offset=0)
    same, _ = reference_attention(q, k, v, causal_offset=0, compute_dtype=torch.float16)
    assert relative_error(out, ref) <= tolerance(torch.float16, relative_error(same, ref))
    (plan,) = [p for p in ops._plans.values() if p.forward is not None and p.forward.template == FORWARD_SM90]
    assert plan.launch._fallback is not None  # it did run attn_fwd


def test_case_labels_name_the_template():
    case = Case(1, 2, 2, 64, 64, 64, "bf16")
    assert FORWARD_SM90 in replace(case, template=FORWARD_SM90).label and FORWARD_SM90 not in case.label
