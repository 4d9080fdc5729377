"""Launch a generated kernel at a fixed grid with a fraction of the host time of Triton's ``kernel[grid](*args)``.

On every call Triton's JIT binds the arguments, works out what it specialises on, formats the key of its kernel
cache and looks it up before it launches: 44 us of Python per launch on an H100 machine's host, against 16 us for
the compiled kernel's own launcher (docs/hopper-notes.md, v19 and v20). A :class:`CompiledLaunch` sends the first
launch of each argument specialisation through the JIT, which compiles or loads the kernel, and keeps the compiled
kernel it returns; later calls with the same specialisation go straight to that kernel's launcher.

The specialisation key mirrors Triton 3.6's rules (``native_specialize_impl``): a tensor by its dtype and whether
its address is 16-byte aligned; an integer by whether it is 1, a multiple of 16, and which integer type holds it; a
float by nothing (always fp32); a tensor descriptor by its dtype, alignment, shape, strides and box; anything else
(bool, None) by its value. It may tell apart calls Triton would not, never the reverse, so a compiled kernel only
ever runs arguments it was specialised for. Launches go through the JIT when Triton runs kernels in its
interpreter, or while a launch hook is installed (a profiler then sees them as usual).
"""

from __future__ import annotations

import functools

import torch

from flashgen.device import import_triton, interpreter_active

_MAX_SPECIALISATIONS = 64  # compiled kernels one launch remembers; past that it starts over


def current_stream_handle(device: int) -> int:
    """The raw handle of ``device``'s current CUDA stream (what Triton's JIT launches on)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # what Triton's driver calls; a Stream object is slower
    return raw(device) if raw is not None else torch.cuda.current_stream(device).cuda_stream


@functools.cache
def _runtime_knobs():
    """Triton's runtime settings (``triton.knobs.runtime``), where its launch hooks are installed."""
    return import_triton().knobs.runtime


def _hooked(hook) -> bool:
    """Whether a Triton launch hook is installed (3.6 keeps a chain of hooks, empty unless a profiler adds one)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _arg_key(arg: object) -> object:
    """What Triton's kernel cache key depends on, of one argument (see the module's docstring). Integers first:
    most of a kernel's arguments are sizes and strides."""
    kind = type(arg)
    if kind is int:
        return arg == 1, arg % 16 == 0, -(2**31) <= arg < 2**31, arg >= 2**63
    if kind is float:
        return float
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if kind is bool or arg is None:
        return arg
    base = getattr(arg, "base", None)
    if isinstance(base, torch.Tensor):  # a tensor descriptor (Triton's or Gluon's)
        return (kind, base.dtype, base.data_ptr() % 16 == 0, len(arg.shape), *arg.shape, *arg.strides, *arg.block_shape,
                arg.padding)  # fmt: skip
    raise TypeError(f"no specialisation key for a kernel argument of type {kind.__name__}")


class CompiledLaunch:
    """``kernel`` (a Triton or Gluon JIT function) launched on ``grid`` with Triton's launch ``options``
    (num_warps, num_stages): ``launch(*args)`` does what ``kernel[grid](*args, **options)`` does. The kernel
    must take exactly ``args``, positionally (no constexpr parameters, no defaults)."""

    __slots__ = ("kernel", "grid", "options", "_compiled", "_direct")

    def __init__(self, kernel, grid: tuple[int, ...], **options) -> None:
        self.kernel, self.grid, self.options = kernel, tuple(grid) + (1,) * (3 - len(grid)), options
        self._compiled: dict[tuple, object] = {}
        self._direct: bool | None = None  # decided at the first launch (not in the interpreter; all parameters passed)

    def __call__(self, *args) -> None:
        if self._direct is None:
            self._direct = not interpreter_active() and len(args) == len(self.kernel.params)
        runtime = _runtime_knobs()
        if not self._direct or _hooked(runtime.launch_enter_hook) or _hooked(runtime.launch_exit_hook):
            self.kernel[self.grid](*args, **self.options)
            return
        device = torch.cuda.current_device()
        key = (device, *map(_arg_key, args))
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self.kernel[self.grid](*args, **self.options)
            if hasattr(compiled, "packed_metadata"):  # a compiled kernel (Triton 3.6's JIT returns the one it ran)
                if len(self._compiled) >= _MAX_SPECIALISATIONS:
                    self._compiled.clear()
                self._compiled[key] = compiled
            return
        grid_0, grid_1, grid_2 = self.grid
        compiled.run(grid_0, grid_1, grid_2, current_stream_handle(device), compiled.function, compiled.packed_metadata,
                     None, None, None, *args)  # fmt: skip

    def warmup(self, *args):
        """Compile for ``args`` without launching (Triton's ``warmup``); returns the compiled kernel."""
        return self.kernel.warmup(*args, grid=self.grid, **self.options)
