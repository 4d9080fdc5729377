"""Test setup: Triton's interpreter without a GPU, and a `gpu` marker that skips cleanly without one.

bf16 is not tested on the CPU: Triton 3.6's interpreter computes bf16 dot products on the raw 16-bit
integers (relative error ~1e9), so bf16 runs only in the `gpu` tests.
"""

import pytest
import torch

from flashgen.device import import_triton, interpreter_active

import_triton()  # before anything else imports triton: without a GPU this turns the interpreter on

HAS_GPU = torch.cuda.is_available()
INTERPRETER = interpreter_active()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_cpu = pytest.mark.skip(reason="CPU kernels need Triton's interpreter (TRITON_INTERPRET=1)")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)
        if "cpu_interpreter" in item.keywords and not INTERPRETER:
            item.add_marker(skip_cpu)


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_interpreter: runs kernels on the CPU through Triton's interpreter")


# Devices and dtypes to run kernels on: the interpreter for fp16/fp32, the GPU for everything.
DEVICE_DTYPES = [
    pytest.param("cpu", "fp16", marks=pytest.mark.cpu_interpreter, id="cpu-fp16"),
    pytest.param("cpu", "fp32", marks=pytest.mark.cpu_interpreter, id="cpu-fp32"),
    pytest.param("cuda", "fp16", marks=pytest.mark.gpu, id="cuda-fp16"),
    pytest.param("cuda", "bf16", marks=pytest.mark.gpu, id="cuda-bf16"),
    pytest.param("cuda", "fp32", marks=pytest.mark.gpu, id="cuda-fp32"),
]
