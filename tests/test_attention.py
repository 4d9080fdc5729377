"""The forward kernel against the float64 reference, on the interpreter (CPU) and, marked `gpu`, a GPU."""

import math

import pytest
import torch

import flashgen
from flashgen.checks import Case, run_case
from flashgen.launch import dropout_keep_mask
from flashgen.ops import draw_dropout_seed
from flashgen.reference import reference_attention, relative_error, tolerance
from flashgen.spec import Variant, causal_offset, knob_table

from .conftest import DEVICE_DTYPES

table = knob_table("attn_fwd")

# (B, Hq, Hkv, Nq, Nk, D): odd head dims (padded in the kernel), ragged and unequal lengths, GQA, decode.
SHAPES = [
    pytest.param((3, 4, 1, 77, 133, 80), id="gqa4-d80-77x133-b3"),
    pytest.param((1, 2, 2, 133, 77, 64), id="d64-133x77"),
    pytest.param((2, 2, 1, 64, 64, 16), id="gqa2-d16-64x64"),
    pytest.param((1, 2, 1, 1, 50, 40), id="decode-d40-1x50"),
]
CAUSAL = [None, "top_left", "bottom_right"]


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", CAUSAL, ids=lambda c: c or "full")
def test_forward_matches_reference(device, dtype, shape, causal):
    result = run_case(Case(*shape, dtype=dtype, causal=causal), device)
    assert result.error <= result.tolerance, result
    assert result.lse_error <= 1e-3, result


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("split_masked", [True, False])
@pytest.mark.parametrize(
    "blocks", [(16, 16), (32, 64), (64, 16)], ids=lambda b: f"m{b[0]}n{b[1]}"
)
def test_every_loop_structure_and_tile_shape_is_correct(device, dtype, split_masked, blocks):
    config = table.config(block_m=blocks[0], block_n=blocks[1], num_warps=4, num_stages=2, split_masked=split_masked)
    for causal in CAUSAL:
        result = run_case(Case(2, 2, 1, 45, 83, 48, dtype=dtype, causal=causal), device, config=config)
        assert result.error <= result.tolerance, result


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("knobs", [{"tma": True}, {"warp_specialize": True}, {"tma": True, "warp_specialize": True}],
                         ids=lambda k: "+".join(k))  # fmt: skip
def test_hopper_knobs_are_correct(device, dtype, knobs):
    config = table.config(block_m=32, block_n=16, num_warps=4, num_stages=2, **knobs)
    for causal in CAUSAL:  # ragged lengths and a padded head dim: the copy engine's zero fill and clipping
        result = run_case(Case(2, 4, 2, 45, 83, 48, dtype=dtype, causal=causal), device, config=config)
        assert result.error <= result.tolerance, result


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_tma_config_runs_plain_loads_on_tensors_the_copy_engine_cannot_address(device, dtype):
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    wide = torch.randn(3, 1, 2, 40, 33, dtype=torch_dtype, device=device)
    q, k, v = wide[..., :32].unbind(0)  # row stride 33 elements: not a multiple of 16 bytes
    config = table.config(block_m=16, block_n=16, num_warps=4, num_stages=1, tma=True)
    out = flashgen.attention(q, k, v, causal=True, config=config)
    ref, _ = reference_attention(q, k, v, causal_offset=0)
    same, _ = reference_attention(q, k, v, causal_offset=0, compute_dtype=torch_dtype)
    assert relative_error(out, ref) <= tolerance(torch_dtype, relative_error(same, ref))


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_strided_inputs_work_without_a_copy(device, dtype):
    result = run_case(Case(2, 4, 2, 50, 70, 32, dtype=dtype, causal="top_left", transposed=True), device)
    assert result.error <= result.tolerance, result


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_public_api_scale_lse_and_layout(device, dtype):
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    q = torch.randn(1, 2, 40, 64, dtype=torch_dtype, device=device)
    kv = torch.randn(1, 23, 2, 2, 64, dtype=torch_dtype, device=device)  # (B, N, 2, H, D): k and v interleaved
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    out, lse = flashgen.attention(q, k, v, scale=0.3, return_lse=True, causal=True, causal_alignment="bottom_right")
    ref, ref_lse = reference_attention(q, k, v, scale=0.3, causal_offset=causal_offset("bottom_right", 40, 23))
    same, _ = reference_attention(q, k, v, scale=0.3, causal_offset=-17, compute_dtype=torch_dtype)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert relative_error(out, ref) <= tolerance(torch_dtype, relative_error(same, ref))
    # bottom-right with Nq > Nk: the first 17 rows see no key: output 0, lse -inf
    assert torch.all(out[:, :, :17] == 0) and torch.all(torch.isneginf(lse[:, :, :17]))
    assert torch.allclose(lse[:, :, 17:].double().cpu(), ref_lse[:, :, 17:].cpu(), atol=1e-4)


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("scale", [-1.0, 0.0])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_negative_and_zero_scales(device, dtype, scale, causal):
    # The kernel scales row maxima rather than scores in its mask-free steps, which holds only for scale >= 0:
    # with a negative one the running "maximum" would be a minimum, and these scores (|s| up to ~200) would
    # overflow exp2. Small tiles give these lengths mask-free steps as well as masked ones.
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    q = 8 * torch.randn(1, 2, 50, 32, device=device)
    q, k, v = (t.to(torch_dtype) for t in (q, *torch.randn(2, 1, 2, 70, 32, device=device)))
    config = table.config(block_m=16, block_n=16, num_warps=4, num_stages=1)
    out, lse = flashgen.attention(q, k, v, scale=scale, causal=causal, config=config, return_lse=True)
    offset = 0 if causal else None
    ref, ref_lse = reference_attention(q, k, v, scale=scale, causal_offset=offset)
    same, _ = reference_attention(q, k, v, scale=scale, causal_offset=offset, compute_dtype=torch_dtype)
    assert relative_error(out, ref) <= tolerance(torch_dtype, relative_error(same, ref))
    assert torch.allclose(lse.double().cpu(), ref_lse.cpu(), atol=1e-4)


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_dropout_matches_reference_with_the_kernels_mask(device, dtype):
    result = run_case(Case(2, 2, 1, 70, 90, 40, dtype=dtype, causal="top_left", dropout_p=0.3), device)
    assert result.error <= result.tolerance, result


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_dropout_is_seeded_by_torch(device, dtype):
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    q, k, v = (torch.randn(1, 2, 33, 32, dtype=torch_dtype, device=device) for _ in range(3))
    torch.manual_seed(7)
    a = flashgen.attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(7)
    b = flashgen.attention(q, k, v, dropout_p=0.5)
    c = flashgen.attention(q, k, v, dropout_p=0.5)  # the generator moved on: another mask
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # dropout_p = 0 is exactly no dropout: the dropout code is not even compiled in
    assert torch.equal(flashgen.attention(q, k, v, dropout_p=0.0), flashgen.attention(q, k, v))


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keeps_the_expected_fraction(device, dtype, p):
    shape = (2, 3, 64, 96)
    variant = Variant(32, dtype, dropout=True)
    keep = dropout_keep_mask(shape, variant=variant, config=table.default_config(), dropout_p=p, seed=draw_dropout_seed(), device=device)
    n = keep.numel()
    kept = keep.float().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept - (1 - p)) < 5 * sigma, (kept, 1 - p, sigma)
    # the stream differs across batch, head and row (not one mask repeated)
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1])


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _t(*shape, dtype=torch.float16):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


def _qkv(**overrides):
    base = {"q": _t(1, 4, 8, 32), "k": _t(1, 2, 8, 32), "v": _t(1, 2, 8, 32)}
    base.update(overrides)
    return base


@pytest.mark.parametrize(
    "inputs, options, error, match",
    [
        (_qkv(q=[[1.0]]), {}, TypeError, "q must be a torch.Tensor"),
        (_qkv(q=_t(4, 8, 32)), {}, ValueError, "q must have 4 dimensions"),
        (_qkv(k=_t(1, 2, 8, 32, dtype=torch.float32)), {}, TypeError, "k.dtype must match"),
        (_qkv(q=_t(1, 4, 8, 32).to(torch.int32)), {}, TypeError, "q.dtype must be a floating-point type"),
        (_qkv(q=_t(1, 4, 8, 32, dtype=torch.float64)), {}, TypeError, "k.dtype must match"),
        (_qkv(v=_t(1, 2, 9, 32)), {}, ValueError, "k and v must have the same shape"),
        (_qkv(q=_t(1, 3, 8, 32)), {}, ValueError, "multiple of k's and v's heads"),
        (_qkv(q=_t(2, 4, 8, 32)), {}, ValueError, "batch size must match"),
        (_qkv(q=_t(1, 4, 8, 8)), {}, ValueError, "k's head_dim must match"),
        (_qkv(), {"dropout_p": 1.0}, ValueError, "dropout_p must be in"),
        (_qkv(), {"dropout_p": -0.1}, ValueError, "dropout_p must be in"),
        (_qkv(), {"dropout_p": "0.1"}, TypeError, "dropout_p must be a float"),
        (_qkv(), {"causal": "yes"}, TypeError, "causal must be a bool"),
        (_qkv(), {"causal": True, "causal_alignment": "diagonal"}, ValueError, "causal_alignment"),
        (_qkv(), {"scale": float("nan")}, TypeError, "scale must be"),
        (_qkv(), {"config": {"block_m": 64}}, TypeError, "config must be"),
    ],
)  # fmt: skip
def test_bad_input_is_named_in_the_error(inputs, options, error, match):
    with pytest.raises(error, match=match):
        flashgen.attention(inputs["q"], inputs["k"], inputs["v"], **options)


def test_bad_config_is_rejected_by_the_knob_table():
    from flashgen.spec import TileConfig

    with pytest.raises(ValueError, match="unknown knob"):
        flashgen.attention(**_qkv(), config=TileConfig(64, 64, 4, 2, extra={"split_masked": True, "x": 1}))


@pytest.mark.cpu_interpreter
def test_bf16_on_cpu_is_refused_clearly_in_strict_mode():
    q = torch.randn(1, 1, 8, 32, dtype=torch.bfloat16)
    with pytest.raises(flashgen.UnsupportedError, match="bfloat16 on the CPU"):
        flashgen.attention(q, q, q, strict=True)


@pytest.mark.cpu_interpreter
def test_empty_query_returns_empty_output():
    q = torch.randn(1, 2, 0, 32, dtype=torch.float16)
    k = torch.randn(1, 2, 5, 32, dtype=torch.float16)
    out, lse = flashgen.attention(q, k, k, return_lse=True)
    assert out.shape == (1, 2, 0, 32) and lse.shape == (1, 2, 0)
