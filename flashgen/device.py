"""The GPU flashgen runs on (or Triton's CPU interpreter when there is none), and the toolchain's versions.

Triton decorates its own library functions when it is imported, so whether kernels run compiled or in
the interpreter is decided once per process, at that import. :func:`import_triton` is flashgen's one
place that imports Triton: without a CUDA GPU it turns the interpreter on first (unless the user already
imported Triton, in which case :func:`interpreter_active` reports what they chose).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from types import ModuleType

import torch


def import_triton() -> ModuleType:
    if "triton" not in sys.modules and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton

    return triton


@cache
def tensor_descriptor_type() -> type:
    """Triton's host-side tensor descriptor (``triton.tools.tensor_descriptor.TensorDescriptor``), the
    argument a kernel loads through TMA from."""
    import_triton()
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor


_interpreter: bool | None = None  # a module global, not functools.cache: torch.compile traces a global read


def interpreter_active() -> bool:
    """True when this process's Triton runs kernels in its CPU interpreter."""
    global _interpreter
    if _interpreter is None:
        import_triton()
        from triton.language import random
        from triton.runtime.interpreter import InterpretedFunction

        _interpreter = isinstance(random.philox, InterpretedFunction)
    return _interpreter


@dataclass(frozen=True)
class DeviceInfo:
    """What the tuner, the SRAM model and the database need to know about a device.

    max_shared_mem: bytes of shared memory one program may use (the opt-in limit), or None where there is
    no limit (the interpreter).
    """

    name: str
    capability: tuple[int, int] | None
    sm_count: int | None
    max_shared_mem: int | None
    interpreter: bool

    @property
    def key(self) -> str:
        if self.interpreter:
            return "interpreter"
        major, minor = self.capability or (0, 0)
        return f"{self.name.replace(' ', '_')}-sm{major}{minor}"


INTERPRETER = DeviceInfo(
    name="Triton interpreter (CPU)", capability=None, sm_count=None, max_shared_mem=None, interpreter=True
)


@cache
def _cuda_device_info(index: int) -> DeviceInfo:
    triton = import_triton()
    props = torch.cuda.get_device_properties(index)
    shared = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return DeviceInfo(
        name=props.name,
        capability=(props.major, props.minor),
        sm_count=props.multi_processor_count,
        max_shared_mem=int(shared),
        interpreter=False,
    )


def device_info(device: torch.device | str | None = None) -> DeviceInfo:
    """The device kernels for tensors on ``device`` run on (default: the current CUDA device, else the CPU)."""
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_device_info(device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "cpu":
        return INTERPRETER
    raise ValueError(f"flashgen runs on CUDA devices or, through Triton's interpreter, the CPU; got {device}")


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@cache
def toolchain() -> dict[str, str]:
    """Versions that invalidate generated kernels and measurements when they change."""
    triton = import_triton()
    return {
        "flashgen": metadata.version("flashgen") if _installed("flashgen") else "0+checkout",
        "triton": triton.__version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
    }


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True
