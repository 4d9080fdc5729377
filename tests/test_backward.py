"""Gradients of flashgen.attention against float64 autograd through the reference, on the interpreter (CPU)
and, marked `gpu`, a GPU; tolerance: twice what the same reference shows in the inputs' dtype, plus a floor."""

import pytest
import torch

import flashgen
from flashgen.launch import dropout_keep_mask
from flashgen.ops import draw_dropout_seed
from flashgen.reference import reference_gradients, relative_error, tolerance
from flashgen.spec import TORCH_DTYPES, Variant, causal_offset, knob_table

from .conftest import DEVICE_DTYPES

# (B, Hq, Hkv, Nq, Nk, D): the head dim 40, Nq 70 vs Nk 90, GQA 2:1; the reverse lengths; a padded
# head dim with GQA 4:1; equal lengths with a power-of-two head dim.
SHAPES = [
    pytest.param((2, 4, 2, 70, 90, 40), id="gqa2-d40-70x90"),
    pytest.param((1, 2, 1, 90, 70, 64), id="gqa2-d64-90x70"),
    pytest.param((1, 4, 1, 33, 47, 80), id="gqa4-d80-33x47"),
    pytest.param((2, 2, 2, 64, 64, 32), id="d32-64x64"),
]
CAUSAL = [None, "top_left", "bottom_right"]


def _leaf(shape, dtype, device):
    return torch.randn(shape, dtype=dtype, device=device, requires_grad=True)


def _check(q, k, v, out, grad, **reference_kwargs):
    ref_grads = reference_gradients(q, k, v, grad, **reference_kwargs)
    same_grads = reference_gradients(q, k, v, grad, compute_dtype=q.dtype, **reference_kwargs)
    for name, ours, ref, same in zip("qkv", (q.grad, k.grad, v.grad), ref_grads, same_grads):
        assert ours.shape == ref.shape and ours.dtype == q.dtype
        error, limit = relative_error(ours, ref), tolerance(q.dtype, relative_error(same, ref))
        assert error <= limit, f"d{name}: relative error {error:.3g} > {limit:.3g}"


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", CAUSAL, ids=lambda c: c or "full")
def test_gradients_match_reference(device, dtype, shape, causal):
    batch, heads_q, heads_kv, n_q, n_k, head_dim = shape
    torch_dtype = TORCH_DTYPES[dtype]
    q = _leaf((batch, heads_q, n_q, head_dim), torch_dtype, device)
    k, v = (_leaf((batch, heads_kv, n_k, head_dim), torch_dtype, device) for _ in range(2))
    out = flashgen.attention(q, k, v, causal=causal is not None, causal_alignment=causal or "top_left")
    grad = torch.randn_like(out)
    out.backward(grad)
    offset = causal_offset(causal, n_q, n_k) if causal else None
    _check(q, k, v, out, grad, causal_offset=offset)


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("atomic_dq", [False, True], ids=["dq-kernel", "atomic-dq"])
def test_dropout_gradients_use_the_forwards_mask(device, dtype, atomic_dq):
    torch_dtype = TORCH_DTYPES[dtype]
    q = _leaf((1, 4, 50, 32), torch_dtype, device)
    k, v = (_leaf((1, 2, 60, 32), torch_dtype, device) for _ in range(2))
    backward_config = None
    if atomic_dq:
        backward_config = knob_table("attn_bwd").config(block_m=16, block_n=32, num_warps=4, num_stages=1, atomic_dq=True)
    torch.manual_seed(11)
    out = flashgen.attention(q, k, v, causal=True, dropout_p=0.3, backward_config=backward_config)
    torch.manual_seed(11)
    seed = draw_dropout_seed()
    variant = Variant(32, dtype, causal=True, dropout=True)
    keep = dropout_keep_mask((1, 4, 50, 60), variant=variant, config=knob_table("attn_fwd").default_config(),
                             dropout_p=0.3, seed=seed, device=device)  # fmt: skip
    grad = torch.randn_like(out)
    out.backward(grad)
    _check(q, k, v, out, grad, causal_offset=0, dropout_keep=keep, dropout_p=0.3)


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_gradients_with_a_negative_scale(device, dtype):
    # The forward runs (-q, -scale) for a negative scale; the gradients must still be those of (q, scale).
    torch_dtype = TORCH_DTYPES[dtype]
    q = (4 * torch.randn(1, 2, 40, 32, device=device)).to(torch_dtype).requires_grad_()
    k, v = (_leaf((1, 2, 56, 32), torch_dtype, device) for _ in range(2))
    config = knob_table("attn_fwd").config(block_m=16, block_n=16, num_warps=4, num_stages=1)
    out = flashgen.attention(q, k, v, scale=-1.0, causal=True, config=config)
    grad = torch.randn_like(out)
    out.backward(grad)
    _check(q, k, v, out, grad, causal_offset=0, scale=-1.0)


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_gradients_are_deterministic(device, dtype):
    torch_dtype = TORCH_DTYPES[dtype]
    q = _leaf((1, 4, 45, 64), torch_dtype, device)
    k, v = (_leaf((1, 2, 77, 64), torch_dtype, device) for _ in range(2))
    grad = torch.randn(1, 4, 45, 64, dtype=torch_dtype, device=device)
    grads = []
    for _ in range(2):
        q.grad = k.grad = v.grad = None
        flashgen.attention(q, k, v, causal=True).backward(grad)
        grads.append([t.grad.clone() for t in (q, k, v)])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.cpu_interpreter
def test_a_tiny_model_trains_in_the_interpreter():
    torch.manual_seed(0)
    dim, heads = 64, 2
    qkv, proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
    params = [*qkv.parameters(), *proj.parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)
    x = torch.randn(4, 24, dim)
    target = torch.roll(x, 1, dims=1)  # a task attention can learn: copy the previous token
    losses = []
    for _ in range(12):
        q, k, v = qkv(x).view(4, 24, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        out = flashgen.attention(q, k, v, causal=True)
        loss = torch.nn.functional.mse_loss(proj(out.transpose(1, 2).reshape(4, 24, dim)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(p.grad).all() for p in params)
    assert losses[-1] < 0.9 * losses[0]


def test_lse_is_not_differentiable():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q = _leaf((1, 1, 16, 16), torch.float32, device)
    _, lse = flashgen.attention(q, q, q, return_lse=True)
    assert not lse.requires_grad


@pytest.mark.cpu_interpreter
def test_training_check_script_agrees_with_sdpa_in_the_interpreter():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "train_check.py"
    spec = importlib.util.spec_from_file_location("train_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--steps", "3", "--tiny"])
    assert result["gap_flashgen_vs_sdpa"]["max"] < 1e-4  # fp32 in the interpreter: the curves agree to rounding
    assert result["agrees"]
    assert set(result["curves"]) == {"sdpa", "eager", "flashgen"}
    assert all(len(curve) == 3 for curve in result["curves"].values())


# Backward configs beyond the interpreter default: the dQ kernel's swapped tiles (block_m != block_n) and
# dQ accumulated atomically in the dK/dV kernel.
BACKWARD_CONFIGS = [
    pytest.param({"block_m": 16, "block_n": 64}, id="m16-n64"),
    pytest.param({"block_m": 64, "block_n": 16}, id="m64-n16"),
    pytest.param({"block_m": 32, "block_n": 32, "atomic_dq": True}, id="m32-n32-atomic"),
    pytest.param({"block_m": 16, "block_n": 32, "atomic_dq": True}, id="m16-n32-atomic"),
    pytest.param({"block_m": 16, "block_n": 32, "tma": True}, id="m16-n32-tma"),
    pytest.param({"block_m": 32, "block_n": 16, "tma": True, "atomic_dq": True}, id="m32-n16-tma-atomic"),
]


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("knobs", BACKWARD_CONFIGS)
@pytest.mark.parametrize("causal", [None, "bottom_right"], ids=lambda c: c or "full")
def test_backward_configs_match_reference(device, dtype, knobs, causal):
    batch, heads_q, heads_kv, n_q, n_k, head_dim = 2, 4, 2, 70, 90, 40
    torch_dtype = TORCH_DTYPES[dtype]
    q = _leaf((batch, heads_q, n_q, head_dim), torch_dtype, device)
    k, v = (_leaf((batch, heads_kv, n_k, head_dim), torch_dtype, device) for _ in range(2))
    config = knob_table("attn_bwd").config(num_warps=4, num_stages=1, **knobs)
    out = flashgen.attention(q, k, v, causal=causal is not None, causal_alignment=causal or "top_left",
                             backward_config=config, deterministic=False)  # fmt: skip
    grad = torch.randn_like(out)
    out.backward(grad)
    _check(q, k, v, out, grad, causal_offset=causal_offset(causal, n_q, n_k) if causal else None)


def test_deterministic_refuses_an_atomic_backward_config():
    q = torch.randn(1, 1, 8, 16)
    config = knob_table("attn_bwd").config(atomic_dq=True)
    with pytest.raises(ValueError, match="atomic_dq=True.*deterministic"):
        flashgen.attention(q, q, q, backward_config=config, deterministic=True)
    with pytest.raises(TypeError, match="deterministic must be None or a bool"):
        flashgen.attention(q, q, q, deterministic=1)


def test_deterministic_switches_a_picked_atomic_config_to_the_dq_kernel(monkeypatch):
    from flashgen import dispatch
    from flashgen.device import device_info
    from flashgen.shapes import ShapeBucket

    atomic = knob_table("attn_bwd").config(block_m=32, block_n=32, num_warps=4, num_stages=1, atomic_dq=True)
    monkeypatch.setattr(dispatch, "default_for", lambda template, variant, device: atomic)
    monkeypatch.setattr(dispatch, "_choices", {})
    bucket = ShapeBucket.of(Variant(16, "fp32"), batch=1, heads_q=1, heads_kv=1, n_q=16, n_k=16)
    cpu = device_info(torch.device("cpu"))
    picked = dispatch.backward_choice(bucket, cpu, deterministic=True).config
    assert picked["atomic_dq"] is False
    assert picked.to_dict() == {**atomic.to_dict(), "atomic_dq": False}
    assert dispatch.backward_choice(bucket, cpu, deterministic=False).config == atomic
