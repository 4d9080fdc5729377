"""CompiledLaunch: the first launch of each specialisation through Triton's JIT, later ones straight to the compiled
kernel, never a compiled kernel on arguments it was not specialised for. The logic runs here against a stand-in
JIT function; the GPU tests of every template launch real kernels through it."""

import pytest
import torch

from flashgen import compiled_launch
from flashgen.compiled_launch import CompiledLaunch, _arg_key
from flashgen.device import tensor_descriptor_type
from flashgen.launch import _gluon_box, _gluon_descriptor, _descriptor, tma_ready
from flashgen.spec import Variant


class FakeCompiled:
    packed_metadata = "packed"
    function = "function"

    def __init__(self):
        self.direct = []

    def run(self, *launch):
        self.direct.append(launch)


class FakeKernel:
    """What CompiledLaunch uses of a JITFunction: ``params``, ``kernel[grid](*args, **options)`` returning the
    compiled kernel, and ``warmup``."""

    def __init__(self, n_params):
        self.params = [None] * n_params
        self.jit = []
        self.compiled = []

    def __getitem__(self, grid):
        def launch(*args, **options):
            self.jit.append((grid, args, options))
            self.compiled.append(FakeCompiled())
            return self.compiled[-1]

        return launch


@pytest.fixture
def compiled_mode(monkeypatch):
    """As on a GPU: no interpreter, a current device and stream."""
    monkeypatch.setattr(compiled_launch, "interpreter_active", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(compiled_launch, "current_stream_handle", lambda device: 1234)


def test_the_second_launch_of_a_specialisation_goes_to_the_compiled_kernel(compiled_mode):
    kernel = FakeKernel(4)
    launch = CompiledLaunch(kernel, (3, 2), num_warps=4)
    x = torch.zeros(64)
    launch(x, 64, 0.5, True)
    assert len(kernel.jit) == 1 and kernel.jit[0] == ((3, 2, 1), (x, 64, 0.5, True), {"num_warps": 4})
    y = torch.ones(64)  # another tensor, another float: the same specialisation
    launch(y, 128, 0.25, True)
    assert len(kernel.jit) == 1
    (direct,) = kernel.compiled[0].direct
    assert direct[:7] == (3, 2, 1, 1234, "function", "packed", None) and direct[9:] == (y, 128, 0.25, True)


@pytest.mark.parametrize(
    "first, second",
    [
        ((torch.zeros(64), 16), (torch.zeros(64)[1:], 16)),  # a pointer no longer 16-byte aligned
        ((torch.zeros(64), 16), (torch.zeros(64), 17)),  # an integer no longer a multiple of 16
        ((torch.zeros(64), 2), (torch.zeros(64), 1)),  # an integer equal to 1 (a constant to Triton)
        ((torch.zeros(64), 2), (torch.zeros(64), 2**31)),  # an integer past int32
        ((torch.zeros(64), 2), (torch.zeros(64, dtype=torch.float16), 2)),  # another dtype
        ((torch.zeros(64), True), (torch.zeros(64), False)),  # a bool's value
    ],
)
def test_another_specialisation_goes_through_the_jit_again(compiled_mode, first, second):
    kernel = FakeKernel(2)
    launch = CompiledLaunch(kernel, (1,))
    launch(*first)
    launch(*second)
    assert len(kernel.jit) == 2 and not kernel.compiled[0].direct
    launch(*second)  # and is then remembered
    assert len(kernel.jit) == 2 and kernel.compiled[1].direct


def test_launch_hooks_and_the_interpreter_get_the_jit_every_time(compiled_mode, monkeypatch):
    import triton

    kernel = FakeKernel(1)
    launch = CompiledLaunch(kernel, (1,))
    hooks = triton.knobs.runtime.launch_enter_hook  # Triton 3.6: a chain, empty until a profiler adds to it

    def hook(metadata):
        return None

    hooks.add(hook)
    try:
        launch(torch.zeros(4))
        launch(torch.zeros(4))
    finally:
        hooks.remove(hook)
    assert len(kernel.jit) == 2  # a profiler's hook sees every launch
    launch(torch.zeros(4))
    launch(torch.zeros(4))
    assert len(kernel.jit) == 3 and kernel.compiled[2].direct  # without the hook: direct again
    monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", hook)  # a bare function, as older Tritons take
    launch(torch.zeros(4))
    assert len(kernel.jit) == 4
    monkeypatch.setattr(compiled_launch, "interpreter_active", lambda: True)
    monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", None)
    launch = CompiledLaunch(kernel := FakeKernel(1), (1,))
    launch(torch.zeros(4))
    launch(torch.zeros(4))
    assert len(kernel.jit) == 2 and not kernel.compiled[0].direct


def test_a_kernel_with_parameters_not_passed_is_never_launched_directly(compiled_mode):
    kernel = FakeKernel(3)  # a constexpr with a default, say: Triton would pass it, we would not
    launch = CompiledLaunch(kernel, (1,))
    for _ in range(2):
        launch(torch.zeros(4), 2)
    assert len(kernel.jit) == 2


def test_descriptors_are_keyed_by_strides_and_alignment():
    t = torch.zeros(2, 3, 64, 32, dtype=torch.float16)
    view = torch.zeros(2, 3, 64, 48, dtype=torch.float16)[..., :32]
    assert tma_ready(t, view)
    key = _arg_key(_descriptor(t, 16, 32))
    assert key == _arg_key(_descriptor(torch.ones_like(t), 16, 32))
    assert key != _arg_key(_descriptor(view, 16, 32))  # same shape, other strides
    assert key != _arg_key(_descriptor(t, 32, 32))  # another box
    assert _arg_key(1.0) == _arg_key(3.5)
    with pytest.raises(TypeError, match="no specialisation key"):
        _arg_key("text")


def test_descriptors_made_without_checks_equal_checked_ones():
    # The launch builds descriptors without their constructors' checks (tma_ready ran instead); they must be the
    # objects the constructors would have made.
    t = torch.zeros(2, 3, 64, 32, dtype=torch.float16)
    checked = tensor_descriptor_type()(t, list(t.shape), list(t.stride()), [1, 1, 16, 32])
    assert _descriptor(t, 16, 32) == checked
    descriptor_type, box, layout = _gluon_box("fp16", 16, 32)
    assert _gluon_descriptor(t, 16, Variant(32, "fp16")) == descriptor_type(t, list(t.shape), list(t.stride()), box, layout)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_real_launches_after_the_first_run_the_compiled_kernel_and_stay_correct(dtype):
    # attn_fwd without TMA takes raw pointers: a view one element in is another specialisation (no 16-byte
    # alignment), which must not run the kernel compiled for aligned pointers.
    from flashgen.launch import ForwardLaunch
    from flashgen.reference import reference_attention, relative_error, tolerance
    from flashgen.spec import TORCH_DTYPES, knob_table

    torch_dtype = TORCH_DTYPES[dtype]
    variant, config = Variant(64, dtype, causal=True), knob_table("attn_fwd").config(block_m=64, block_n=32)
    launch = ForwardLaunch(variant, config, (2, 4, 200, 64), (2, 2, 200, 64))
    buffer = torch.randn(2 * 4 * 200 * 64 + 1, device="cuda", dtype=torch_dtype)
    for q in (buffer[:-1].view(2, 4, 200, 64), buffer[:-1].view(2, 4, 200, 64), buffer[1:].view(2, 4, 200, 64)):
        k, v = torch.randn(2, 2, 2, 200, 64, device="cuda", dtype=torch_dtype)
        out = torch.full_like(q, float("nan"))
        launch(q, k, v, 0.125, out=out)
        ref, _ = reference_attention(q, k, v, scale=0.125, causal_offset=0)
        same, _ = reference_attention(q, k, v, scale=0.125, causal_offset=0, compute_dtype=torch_dtype)
        assert relative_error(out, ref) <= tolerance(torch_dtype, relative_error(same, ref))
    assert len(launch.launcher._compiled) == 2  # aligned and unaligned q, each compiled once
