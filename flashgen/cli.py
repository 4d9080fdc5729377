"""The `flashgen` command line: generate, check, configs, bench."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from flashgen.codegen import FORWARD
from flashgen.spec import DTYPES, HEAD_DIM_MAX, HEAD_DIM_MIN, Knob, TileConfig, Variant, knob_table

console = Console()
err_console = Console(stderr=True)

_HEAD_DIM = click.IntRange(HEAD_DIM_MIN, HEAD_DIM_MAX)


def _variant_options(fn):
    fn = click.option("--dropout", is_flag=True, help="Compile the dropout path in.")(fn)
    fn = click.option("--causal", is_flag=True, help="Causal mask (the alignment is a runtime argument).")(fn)
    fn = click.option("--dtype", type=click.Choice(DTYPES), default="fp16", show_default=True)(fn)
    fn = click.option("--head-dim", type=_HEAD_DIM, required=True, help=f"Head dimension, {HEAD_DIM_MIN}..{HEAD_DIM_MAX}.")(fn)
    return fn


def _knob_option(knob: Knob):
    """A CLI option for one knob of the forward template's table (so `--help` lists exactly the table)."""
    help_text = f"{knob.help} [choices: {', '.join(map(str, knob.choices))}; default: {knob.default}]"
    flag = knob.name.replace("_", "-")
    if isinstance(knob.default, bool):
        return click.option(f"--{flag}/--no-{flag}", knob.name, default=None, help=help_text)
    return click.option(f"--{flag}", knob.name, type=click.Choice([str(c) for c in knob.choices]), default=None, help=help_text)


def _knob_options(fn):
    for knob in reversed(knob_table(FORWARD).knobs):
        fn = _knob_option(knob)(fn)
    return fn


def _config_from_options(values: dict) -> TileConfig:
    table = knob_table(FORWARD)
    chosen = {}
    for knob in table.knobs:
        value = values.get(knob.name)
        if value is not None:
            chosen[knob.name] = value if isinstance(knob.default, bool) else type(knob.default)(value)
    return table.config(**chosen)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flashgen", message="%(prog)s %(version)s")
def main() -> None:
    """flashgen: FlashAttention kernels generated from Jinja templates into Triton, tuned on your GPU.

    Without a GPU, kernels run in Triton's CPU interpreter (slow: small shapes only; no bf16).
    """


@main.command()
@_variant_options
@_knob_options
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write the source here instead of stdout.")
def generate(head_dim: int, dtype: str, causal: bool, dropout: bool, output: Path | None, **knobs) -> None:
    """Print the Triton source of the forward kernel for a variant and tile config.

    Knobs left out take the template's defaults (templates/attn_fwd.toml).
    """
    from flashgen.codegen import render

    variant = Variant(head_dim, dtype, causal=causal, dropout=dropout)
    source = render(FORWARD, variant, _config_from_options(knobs))
    if output:
        output.write_text(source.text)
        err_console.print(f"wrote {output} (sha256 {source.digest[:16]})")
    else:
        click.echo(source.text, nl=False)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def check(as_json: bool) -> None:
    """Run generated kernels on this machine against a float64 reference and print the errors.

    Covers padded head dims, ragged and unequal lengths, GQA, strided inputs, both causal alignments and
    dropout. Exits 1 if any case is outside its tolerance (twice plain torch's error in the same dtype).
    """
    from flashgen.checks import default_cases, run_case
    from flashgen.device import default_device, device_info

    device = default_device()
    info = device_info(device)
    if info.interpreter:
        err_console.print("[yellow]No CUDA GPU: running kernels in Triton's CPU interpreter on small shapes (fp16, fp32).[/]")
    else:
        err_console.print(f"Running on {info.name} (sm{info.capability[0]}{info.capability[1]}).")
    results = []
    with console.status("checking") as status:
        for case in default_cases(info):
            status.update(f"checking {case.label}")
            results.append(run_case(case, device))
    if as_json:
        click.echo(json.dumps([
            {"case": r.case.label, "config": r.config.key, "error": r.error, "torch_error": r.torch_error,
             "tolerance": r.tolerance, "lse_error": r.lse_error, "ok": r.ok} for r in results
        ], indent=2))  # fmt: skip
    else:
        table = Table(title=f"flashgen check on {info.name}")
        for column in ("case", "config", "rel. error", "torch same dtype", "tolerance", "lse error", "ok"):
            table.add_column(column)
        for r in results:
            table.add_row(r.case.label, r.config.key, f"{r.error:.2e}", f"{r.torch_error:.2e}", f"{r.tolerance:.2e}",
                          f"{r.lse_error:.1e}", "[green]yes[/]" if r.ok else "[red]NO[/]")  # fmt: skip
        console.print(table)
    failed = [r for r in results if not r.ok]
    if failed:
        err_console.print(f"[red]{len(failed)} of {len(results)} cases are outside their tolerance.[/]")
        sys.exit(1)
    err_console.print(f"[green]all {len(results)} cases within tolerance.[/]")


@main.command()
@_variant_options
@click.option("--budget", type=click.IntRange(min=1), help="Shared-memory budget in bytes (default: the device's limit).")
@click.option("--compile", "compile_", is_flag=True, help="Compile each config (GPU only) and show Triton's shared memory next to the estimate.")
@click.option("--sample", type=click.IntRange(min=1), help="Show only N configs, evenly spread over the table (compiling all takes long).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the rows as JSON here.")
def configs(head_dim: int, dtype: str, causal: bool, dropout: bool, budget: int | None, compile_: bool, sample: int | None, json_out: Path | None) -> None:
    """List the forward template's tile configs for a variant with the SRAM model's estimate.

    Configs over the budget are what the tuner prunes before compiling. With --compile, the estimate is
    compared with what Triton reports for the compiled kernel.
    """
    from flashgen.device import device_info
    from flashgen.sram import estimate_shared_bytes, shared_budget

    variant = Variant(head_dim, dtype, causal=causal, dropout=dropout)
    info = device_info()
    limit = shared_budget(info, budget)
    if compile_ and info.interpreter:
        raise click.UsageError("--compile needs a CUDA GPU (the interpreter compiles nothing)")
    candidates = list(knob_table(FORWARD).all_configs())
    if sample and sample < len(candidates):
        candidates = [candidates[i * len(candidates) // sample] for i in range(sample)]
    rows = []
    for config in candidates:
        estimate = estimate_shared_bytes(variant, config)
        row = {"config": config.key, "estimate": estimate, "fits": limit is None or estimate <= limit}
        if compile_:
            row.update(_compiled_shared(variant, config))
        rows.append(row)
    table = Table(title=f"{variant.key} on {info.name}: budget {limit if limit else 'none'} bytes")
    columns = ["config", "estimate", "fits"] + (["compiled", "error"] if compile_ else [])
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(row.get(c, "")) for c in columns))
    console.print(table)
    fitting = sum(row["fits"] for row in rows)
    console.print(f"{fitting} of {len(rows)} configs listed fit the budget.")
    if compile_:
        _print_sram_model_error(rows)
    if json_out:
        json_out.write_text(json.dumps({"variant": variant.to_dict(), "budget": limit, "rows": rows}, indent=2))


def _compiled_shared(variant: Variant, config: TileConfig) -> dict:
    from flashgen.launch import compile_forward

    try:
        kernel = compile_forward(variant, config)
    except Exception as exc:  # a config Triton cannot compile is a data point, not a crash
        return {"compiled": f"failed: {type(exc).__name__}", "error": ""}
    shared = int(kernel.metadata.shared)
    from flashgen.sram import estimate_shared_bytes

    estimate = estimate_shared_bytes(variant, config)
    return {"compiled": shared, "error": f"{(estimate - shared) / max(shared, 1):+.0%}"}


def _print_sram_model_error(rows: list[dict]) -> None:
    pairs = [(row["estimate"], row["compiled"]) for row in rows if isinstance(row.get("compiled"), int)]
    if not pairs:
        return
    errors = [(est - real) / real for est, real in pairs if real]
    under = sum(est < real for est, real in pairs)
    console.print(
        f"SRAM model over {len(pairs)} compiled configs: error min {min(errors):+.0%}, max {max(errors):+.0%}, "
        f"mean |error| {sum(map(abs, errors)) / len(errors):.0%}; under-estimates: {under}"
    )


@main.command()
@click.option("--head-dim", "head_dims", type=_HEAD_DIM, multiple=True, default=(64, 128), show_default=True)
@click.option("--seqlen", "seqlens", type=click.IntRange(min=1), multiple=True, default=(1024, 4096, 16384), show_default=True)
@click.option("--causal", "causal_modes", type=click.Choice(["off", "on"]), multiple=True, default=("off", "on"), show_default=True)
@click.option("--dtype", type=click.Choice(["fp16", "bf16"]), default="bf16", show_default=True)
@click.option("--peer", "peers", type=click.Choice(["cudnn", "flash", "efficient", "flex"]), multiple=True,
              default=("cudnn", "flash", "efficient", "flex"), show_default=True, help="Kernels to compare against.")  # fmt: skip
@click.option("--tokens", type=click.IntRange(min=1), default=16384, show_default=True, help="batch * seqlen.")
@click.option("--hidden", type=click.IntRange(min=1), default=2048, show_default=True, help="heads * head_dim.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write all measurements as JSON here.")
def bench(head_dims, seqlens, causal_modes, dtype, peers, tokens, hidden, json_out) -> None:
    """Forward TFLOP/s of flashgen against SDPA's backends and compiled FlexAttention (GPU only).

    Same process, same inputs; every output is checked against a float64 reference before it is timed.
    """
    import torch

    from flashgen import bench as b

    if not torch.cuda.is_available():
        raise click.UsageError("bench needs a CUDA GPU; `flashgen check` runs without one")
    grid = [b.Point(d, c == "on", n, dtype, tokens, hidden) for d in head_dims for c in causal_modes for n in seqlens]
    all_peers = ("flashgen", *peers)
    results = []
    with console.status("benchmarking") as status:
        for point in grid:
            status.update(f"benchmarking {point.label}")
            results.append(b.bench_point(point, all_peers))
            err_console.print(_bench_line(results[-1], all_peers))
    table = Table(title=f"forward TFLOP/s, {dtype}, {torch.cuda.get_device_name()}")
    table.add_column("point")
    for peer in all_peers:
        table.add_column(peer)
    for peer in peers:
        table.add_column(f"x {peer}")
    for r in results:
        cells = [_tflops_cell(r.measurements[p]) for p in all_peers]
        ratios = [b.ratio(r, p) for p in peers]
        table.add_row(r.point.label, *cells, *(f"{x:.2f}" if x else "-" for x in ratios))
    console.print(table)
    for peer in peers:
        mean = b.geometric_mean([b.ratio(r, peer) for r in results])
        if mean:
            console.print(f"flashgen / {peer}: geometric mean {mean:.2f}x")
    if json_out:
        json_out.write_text(json.dumps([r.to_dict() for r in results], indent=2))


def _tflops_cell(m) -> str:
    return f"{m.tflops:.0f}" if m.tflops is not None else "fail"


def _bench_line(result, peers) -> str:
    parts = []
    for peer in peers:
        m = result.measurements[peer]
        parts.append(f"{peer} {m.tflops:.0f}" if m.tflops is not None else f"{peer} FAILED ({m.failure})")
    return f"{result.point.label}: " + ", ".join(parts)


if __name__ == "__main__":
    main()
