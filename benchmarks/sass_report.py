"""What a generated kernel compiles to on Hopper, without a GPU: registers, spills, and the instructions of each
loop, from Triton's sm_90 compiler and the ptxas/cuobjdump that ship with Triton.

    python benchmarks/sass_report.py attn_fwd 64 m128-n64-w8-s3
    python benchmarks/sass_report.py attn_bwd 128 m64-n64-w4-s2-tma=1 --causal --kernel attn_bwd_dkdv
    python benchmarks/sass_report.py attn_fwd_sm90 128 m128-n128-w4-s3-pingpong=1
    python benchmarks/sass_report.py attn_bwd_fused_sm90 64 m64-n128-w4-s3-defer_dq=1 --causal
    python benchmarks/sass_report.py attn_bwd_fused_tma_sm90 128 m64-n128-w4-s2 --causal

Instruction counts are per thread and per trip of a loop (each warp issues them all). The kernel is compiled
as a launch from PyTorch would specialise it: unit head-dim strides, 16-divisible pointers, strides and
lengths. Static counts say where issue slots go; only a GPU says how fast the kernel runs.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from flashgen.codegen import kernel_module  # noqa: E402
from flashgen.spec import Variant, knob_table  # noqa: E402

TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
KERNELS = {"attn_fwd": ["attn_fwd"], "attn_fwd_sm90": ["attn_fwd"], "attn_bwd": ["attn_bwd_dkdv", "attn_bwd_dq"],
           "attn_bwd_sm90": ["attn_bwd_dq", "attn_bwd_dkdv"],
           "attn_bwd_fused_sm90": ["attn_bwd_fused", "attn_bwd_rows"],
           "attn_bwd_fused_tma_sm90": ["attn_bwd_fused", "attn_bwd_rows"]}
ELEMENT_POINTERS = {"Q", "K", "V", "Out", "DO", "DK", "DV", "DQ"}
FLOAT32_POINTERS = {"Lse", "Lse2", "Delta", "DQ_ACC"}
FLOAT_SCALARS = {"qk_scale", "sm_scale", "dropout_p"}
MATH = {"FMUL", "FFMA", "FADD", "FMNMX", "MUFU", "F2FP", "HGMMA", "SHFL", "FSEL", "FSETP"}


def descriptor_rows(template: str, kernel: str, config) -> dict[str, int]:
    """Rows of each tensor descriptor's box, as flashgen.launch builds them (the dQ kernel's are swapped)."""
    if not config.to_dict().get("tma"):
        return {}
    if template == "attn_fwd":
        return {"Q": config.block_m, "K": config.block_n, "V": config.block_n, "Out": config.block_m}
    query, key = (config.block_m, config.block_n) if kernel == "attn_bwd_dkdv" else (config.block_n, config.block_m)
    return {"Q": query, "DO": query, "K": key, "V": key}


def compile_for_sm90(template: str, kernel: str, variant: Variant, config):
    if template == "attn_fwd_sm90":
        return _compile_gluon_forward(variant, config)
    if template == "attn_bwd_sm90" and kernel == "attn_bwd_dq":
        return _compile_gluon_dq(variant, config)
    if template in ("attn_bwd_fused_sm90", "attn_bwd_fused_tma_sm90") and kernel == "attn_bwd_fused":
        return _compile_gluon_fused(template, variant, config)
    if template == "attn_bwd_sm90":  # its dK/dV kernel is attn_bwd's
        from flashgen.launch import dkdv_config_of

        template, config = "attn_bwd", dkdv_config_of(config)
    fn = getattr(kernel_module(template, variant, config), kernel)
    rows = descriptor_rows(template, kernel, config)
    signature, constexprs, attrs = {}, {}, {}
    # attn_bwd_fused_sm90's rows kernel zeroes a float32 dQ, which its fused kernel adds to.
    float32_pointers = FLOAT32_POINTERS | ({"DQ"} if template.startswith("attn_bwd_fused") else set())
    for i, name in enumerate(fn.arg_names):
        if name in rows:
            signature[name] = f"tensordesc<{variant.dtype}[1, 1, {rows[name]}, {variant.head_dim_padded}]>"
        elif name.startswith("stride_") and name.endswith("d"):  # head-dim strides are 1: Triton specialises them
            signature[name], constexprs[(i,)] = "constexpr", 1
        else:
            if name in float32_pointers:
                signature[name] = "*fp32"
            elif name in ELEMENT_POINTERS:
                signature[name] = f"*{variant.dtype}"
            else:
                signature[name] = "fp32" if name in FLOAT_SCALARS else "i32"
            if signature[name].startswith("*") or name.startswith("stride_") or name in ("N_Q", "N_K"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def _gluon_descriptor_type(variant: Variant, rows: int, dtype: str | None = None, columns: int | None = None) -> str:
    """The signature type of a descriptor :mod:`flashgen.launch` builds: a box of ``rows`` by ``columns`` (default
    the head dim) elements of ``dtype`` (default the variant's)."""
    from flashgen.launch import _gluon_box

    dtype, columns = dtype or variant.dtype, columns or variant.head_dim
    layout = _gluon_box(dtype, rows, columns)[2]
    return f"tensordesc<{dtype}[1, 1, {rows}, {columns}],{layout!r}>"


def _compile_gluon_dq(variant: Variant, config):
    """attn_bwd_sm90's dQ kernel (Gluon) with the descriptors :mod:`flashgen.launch` builds for it."""
    from triton.experimental.gluon._runtime import GluonASTSource

    kernel = kernel_module("attn_bwd_sm90", variant, config).attn_bwd_dq
    rows, keys = _gluon_descriptor_type(variant, 64), _gluon_descriptor_type(variant, config["dq_block_n"])
    signature = {"q_desc": rows, "k_desc": keys, "v_desc": keys, "do_desc": rows, "dq_desc": rows,
                 "Out": f"*{variant.dtype}", "Lse": "*fp32", "Lse2": "*fp32", "Delta": "*fp32", "stride_ob": "i32",
                 "stride_oh": "i32", "stride_om": "i32", "qk_scale": "fp32", "sm_scale": "fp32", "H_Q": "i32",
                 "GROUP_SIZE": "i32", "N_Q": "i32", "N_K": "i32"}
    if variant.causal:
        signature["causal_offset"] = "i32"
    assert list(signature) == kernel.arg_names, f"the kernel's arguments changed: {kernel.arg_names}"
    names = list(signature)
    aligned = ("Out", "Lse", "Lse2", "Delta", "stride_ob", "stride_oh", "stride_om", "N_Q", "N_K")
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = GluonASTSource(kernel, signature, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


def _compile_gluon_fused(template: str, variant: Variant, config):
    """A fused backward template's fused kernel (Gluon) with the descriptors :mod:`flashgen.launch` builds for it."""
    from triton.experimental.gluon._runtime import GluonASTSource

    from flashgen.launch import _row_layout

    kernel = kernel_module(template, variant, config).attn_bwd_fused
    rows, keys = _gluon_descriptor_type(variant, config.block_m), _gluon_descriptor_type(variant, config.block_n // 2)
    row_inputs = f"tensordesc<fp32[{config.block_m}],{_row_layout()[1]!r}>"
    dq = ("dq_desc", _gluon_descriptor_type(variant, config.block_m, "fp32", variant.head_dim // 2))
    if template == "attn_bwd_fused_sm90":  # its atomics take a pointer
        dq = ("DQ", "*fp32")
    signature = {"q_desc": rows, "k_desc": keys, "v_desc": keys, "do_desc": rows, "dk_desc": keys, "dv_desc": keys,
                 "lse2_desc": row_inputs, "delta_desc": row_inputs, dq[0]: dq[1], "qk_scale": "fp32",
                 "sm_scale": "fp32", "H_Q": "i32", "GROUP_SIZE": "i32", "N_Q": "i32", "N_K": "i32", "ROW_STRIDE": "i32"}
    if variant.causal:
        signature["causal_offset"] = "i32"
    assert list(signature) == kernel.arg_names, f"the kernel's arguments changed: {kernel.arg_names}"
    names = list(signature)
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in ("DQ", "N_Q", "N_K", "ROW_STRIDE")
             if name in names}
    source = GluonASTSource(kernel, signature, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": config.num_warps})


def _compile_gluon_forward(variant: Variant, config):
    """attn_fwd_sm90 (Gluon) with the descriptors :class:`flashgen.launch.Sm90ForwardLaunch` builds."""
    from triton.experimental.gluon._runtime import GluonASTSource

    from flashgen.launch import Sm90ForwardLaunch

    launch = Sm90ForwardLaunch(variant, config, (1, 1, 1024, variant.head_dim), (1, 1, 1024, variant.head_dim))
    (q_box, q_layout), (kv_box, kv_layout) = launch.descriptor_specs
    q_desc = f"tensordesc<{variant.dtype}[{', '.join(map(str, q_box))}],{q_layout!r}>"
    kv_desc = f"tensordesc<{variant.dtype}[{', '.join(map(str, kv_box))}],{kv_layout!r}>"
    signature = {"q_desc": q_desc, "k_desc": kv_desc, "v_desc": kv_desc, "o_desc": q_desc, "Lse": "*fp32",
                 "Tickets": "*i32", "qk_scale": "fp32", "B": "i32", "H_Q": "i32", "GROUP_SIZE": "i32", "N_Q": "i32",
                 "N_K": "i32"}
    if variant.causal:
        signature["causal_offset"] = "i32"
    assert list(signature) == launch.kernel.arg_names, f"the kernel's arguments changed: {launch.kernel.arg_names}"
    names = list(signature)
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in ("Lse", "Tickets", "N_Q", "N_K")}
    source = GluonASTSource(launch.kernel, signature, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": config.num_warps})


def _run_tool(tool: str, suffix: str, data: bytes | str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.NamedTemporaryFile(suffix=suffix) as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        return subprocess.run([str(TOOLS / tool), *args, f.name], capture_output=True, text=True, check=True)


def resource_usage(compiled) -> str:
    """ptxas's line on registers, stack and spills."""
    result = _run_tool("ptxas", ".ptx", compiled.asm["ptx"], "-arch=sm_90a", "-v", "-o", "/dev/null")
    lines = [line.split("info    :")[-1].strip() for line in result.stderr.splitlines()]
    return "; ".join(line for line in lines if "registers" in line or "spill" in line)


def loop_opcodes(compiled) -> list[collections.Counter]:
    """The opcodes of each innermost loop (a backward branch with no other backward branch inside it)."""
    instructions = []  # (address, opcode, branch target or None)
    for line in _run_tool("cuobjdump", ".cubin", compiled.asm["cubin"], "-sass").stdout.splitlines():
        match = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)([^;]*);", line)
        if match:
            target = re.search(r"0x([0-9a-f]+)", match.group(3)) if match.group(2) == "BRA" else None
            instructions.append((int(match.group(1), 16), match.group(2), int(target.group(1), 16) if target else None))
    loops = [(target, address) for address, _, target in instructions if target is not None and target < address]
    innermost = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    return [collections.Counter(op for address, op, _ in instructions if a <= address <= b) for a, b in innermost]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("template", choices=sorted(KERNELS))
    parser.add_argument("head_dim", type=int)
    parser.add_argument("config", help="a config key, e.g. m128-n64-w8-s3-tma=1 (knobs left out take their defaults)")
    parser.add_argument("--dtype", default="bf16", choices=["fp16", "bf16"])
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--kernel", help="one kernel of the template (default: all of them)")
    args = parser.parse_args()
    variant = Variant(args.head_dim, args.dtype, causal=args.causal)
    config = knob_table(args.template).parse_key(args.config)
    for kernel in [args.kernel] if args.kernel else KERNELS[args.template]:
        compiled = compile_for_sm90(args.template, kernel, variant, config)
        print(f"{kernel} {variant.key} {config.key}: {resource_usage(compiled)}")
        for opcodes in loop_opcodes(compiled):
            total = sum(opcodes.values())
            if total < 8:  # a thread spinning on a barrier (tensor-descriptor loads), not a loop of the kernel
                continue
            math = sum(n for op, n in opcodes.items() if op.split(".")[0] in MATH)
            top = ", ".join(f"{op} {n}" for op, n in opcodes.most_common(10))
            print(f"  loop: {total} instructions ({math} math, {total - math} other): {top}")


if __name__ == "__main__":
    main()
