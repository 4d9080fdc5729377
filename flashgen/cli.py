"""The `flashgen` command line: generate, check, configs, bench, and the tuning database's
tune, list, show, export, import, prune."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from flashgen.bench import ROUNDS as BENCH_ROUNDS
from flashgen.codegen import FORWARD
from flashgen.spec import DTYPES, HEAD_DIM_MAX, HEAD_DIM_MIN, TEMPLATES, Knob, TileConfig, Variant, knob_table

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
@click.option("--template", type=click.Choice(list(TEMPLATES)), default="attn_fwd", show_default=True,
              help="The forward kernel (attn_fwd: Triton, any GPU; attn_fwd_sm90: Gluon, Hopper only), or the "
                   "backward's kernels (attn_bwd: dQ, then dK/dV; with atomic_dq, a row preprocess, then "
                   "dK/dV; attn_bwd_sm90: its Gluon dQ kernel, Hopper only, before attn_bwd's dK/dV; "
                   "attn_bwd_fused_sm90 (D=64) and attn_bwd_fused_tma_sm90 (D=64 and 128): Hopper's one-kernel "
                   "backwards, dQ summed in float32 in varying order).")  # fmt: skip
@click.option("--knob", "knob_items", multiple=True, metavar="NAME=VALUE",
              help="Set a knob of --template by name (the only way for the templates other than attn_fwd; their "
                   "knobs: templates/<template>.toml).")  # fmt: skip
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write the source here instead of stdout.")
def generate(head_dim: int, dtype: str, causal: bool, dropout: bool, template: str, knob_items: tuple[str, ...],
             output: Path | None, **knobs) -> None:  # fmt: skip
    """Print the Triton (or, for the *_sm90 templates, Gluon) source for a variant and tile config.

    Knobs left out take the template's defaults (templates/<template>.toml). The --block-m ... flags set the
    forward template's knobs; --knob NAME=VALUE sets any template's.
    """
    from flashgen.codegen import render

    variant = Variant(head_dim, dtype, causal=causal, dropout=dropout)
    by_name = {name: values[0] for name, values in _parse_space(knob_items, template, single=True).items()}
    if template == FORWARD:
        config = _config_from_options({**knobs, **by_name})
    else:
        flags = sorted(name for name, value in knobs.items() if value is not None)
        if flags:
            raise click.UsageError(f"--{flags[0].replace('_', '-')} sets a knob of attn_fwd; use --knob for {template}")
        config = knob_table(template).config(**by_name)
    source = render(template, variant, config)
    if output:
        output.write_text(source.text)
        err_console.print(f"wrote {output} (sha256 {source.digest[:16]})")
    else:
        click.echo(source.text, nl=False)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--no-backward", is_flag=True, help="Check the forward kernels only.")
def check(as_json: bool, no_backward: bool) -> None:
    """Run generated kernels on this machine against a float64 reference and print the errors.

    Covers padded head dims, ragged and unequal lengths, GQA, strided inputs, both causal alignments and
    dropout, forward and (unless --no-backward) gradients. Exits 1 if any case is outside its tolerance
    (twice plain torch's error in the same dtype).
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
    cases = default_cases(info)
    with console.status("checking") as status:
        for number, case in enumerate(cases, 1):
            status.update(f"checking {case.label}")
            results.append(run_case(case, device, gradients=not no_backward))
            r = results[-1]  # a line per case as it finishes: the first compiles of each kernel take seconds on a GPU
            err_console.print(f"[{number}/{len(cases)}] {'ok' if r.ok else 'FAILED'} {case.label}: error {r.error:.2e} "
                              f"(tolerance {r.tolerance:.2e}), {r.config.key}", highlight=False)  # fmt: skip
    if as_json:
        click.echo(json.dumps([
            {"case": r.case.label, "config": r.config.key, "error": r.error, "torch_error": r.torch_error,
             "tolerance": r.tolerance, "lse_error": r.lse_error, "grad_error": r.grad_error,
             "grad_tolerance": r.grad_tolerance, "ok": r.ok} for r in results
        ], indent=2))  # fmt: skip
    else:
        table = Table(title=f"flashgen check on {info.name}")
        for column in ("case", "config", "rel. error", "torch same dtype", "tolerance", "lse error", "grad error",
                       "grad tolerance", "ok"):  # fmt: skip
            table.add_column(column)
        for r in results:
            grads = (f"{r.grad_error:.2e}", f"{r.grad_tolerance:.2e}") if r.grad_error is not None else ("-", "-")
            table.add_row(r.case.label, r.config.key, f"{r.error:.2e}", f"{r.torch_error:.2e}", f"{r.tolerance:.2e}",
                          f"{r.lse_error:.1e}", *grads, "[green]yes[/]" if r.ok else "[red]NO[/]")  # fmt: skip
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
@click.option("--peer", "peers", type=click.Choice(["default", "cudnn", "flash", "efficient", "flex"]), multiple=True,
              default=("default", "cudnn", "flash", "efficient", "flex"), show_default=True,
              help="Kernels to compare against (default: flashgen with its default configs instead of dispatch's).")  # fmt: skip
@click.option("--config", "config_keys", multiple=True, metavar="KEY",
              help="Also run flashgen forced to this tile config, e.g. m128-n64-w8-s3-tma=1, or one of another "
                   "template, attn_fwd_sm90:m128-n128-w4-s3 (repeatable; knobs left out take their defaults; a "
                   "backward config with --direction bwd, attn_bwd_sm90:..., attn_bwd_fused_sm90:... or "
                   "attn_bwd_fused_tma_sm90:... for Hopper's).")  # fmt: skip
@click.option("--tokens", type=click.IntRange(min=1), default=16384, show_default=True, help="batch * seqlen.")
@click.option("--hidden", type=click.IntRange(min=1), default=2048, show_default=True, help="heads * head_dim.")
@click.option("--direction", type=click.Choice(["fwd", "bwd"]), default="fwd", show_default=True, help="Time the forward, or the backward alone (FLOPs 2.5x).")
@click.option("--rounds", type=click.IntRange(min=1), default=BENCH_ROUNDS, show_default=True,
              help="Time every kernel of a point this many times (about 100 ms each), taking turns, and report the "
                   "median: the GPU's changing clock (faster after a pause) then falls on all of them alike.")  # fmt: skip
@click.option("--overhead", is_flag=True, help="Instead of the grid: per-call time on tiny shapes against a direct launch of the same kernel and SDPA, and CUDA-graph replay.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write all measurements as JSON here.")
@click.option("--png", "png_out", type=click.Path(dir_okay=False, path_type=Path), help="Plot TFLOP/s against seqlen, a panel per variant, here (needs matplotlib).")
@click.option("--from-json", "from_json", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Measure nothing: plot (--png) a run saved with --json (no GPU needed).")  # fmt: skip
def bench(head_dims, seqlens, causal_modes, dtype, peers, config_keys, tokens, hidden, direction, rounds, overhead, json_out,
          png_out, from_json) -> None:  # fmt: skip
    """TFLOP/s of flashgen (as dispatched) against its default configs, SDPA's backends and compiled
    FlexAttention (GPU only).

    Same process, same inputs; outputs (forward) or dQ (backward, seqlen <= 4096) are checked against a
    reference before they are timed, and the kernels of a point are timed in turn (--rounds). The flashgen column
    says which config dispatch picked and why.
    """
    import torch

    from flashgen import bench as b

    if from_json:
        if not png_out:
            raise click.UsageError("--from-json plots a saved run: give --png FILE")
        _bench_png(json.loads(from_json.read_text()), png_out, f"flashgen bench: {from_json.name}")
        return
    try:
        forced = tuple(b.config_peer(key, backward=direction == "bwd") for key in config_keys)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--config") from None
    if not torch.cuda.is_available():
        raise click.UsageError("bench needs a CUDA GPU; `flashgen check` runs without one")
    if overhead:
        _bench_overhead(dtype, json_out)
        return
    grid = b.points(head_dims, seqlens, [c == "on" for c in causal_modes], dtype, tokens=tokens, hidden=hidden,
                    backward=direction == "bwd")  # fmt: skip
    peers = (*peers, *forced)
    all_peers = ("flashgen", *peers)
    results = []
    with console.status("benchmarking") as status:
        for point in grid:
            status.update(f"benchmarking {point.label}")
            results.append(b.bench_point(point, all_peers, rounds=rounds))
            err_console.print(_bench_line(results[-1], all_peers))
            if json_out:  # after every point, so an interrupted run keeps what it measured
                json_out.write_text(json.dumps([r.to_dict() for r in results], indent=2))
    table = Table(title=f"{'backward' if direction == 'bwd' else 'forward'} TFLOP/s, {dtype}, {torch.cuda.get_device_name()}")
    table.add_column("point")
    for peer in all_peers:
        table.add_column(peer)
    for peer in peers:
        table.add_column(f"x {peer}")
    table.add_column("flashgen config")
    for r in results:
        cells = [_tflops_cell(r.measurements[p]) for p in all_peers]
        ratios = [b.ratio(r, p) for p in peers]
        table.add_row(r.point.label, *cells, *(f"{x:.2f}" if x else "-" for x in ratios), r.measurements["flashgen"].config or "-")
    console.print(table)
    for peer in peers:
        mean = b.geometric_mean([b.ratio(r, peer) for r in results])
        if mean:
            console.print(f"flashgen / {peer}: geometric mean {mean:.2f}x")
    if json_out:
        json_out.write_text(json.dumps([r.to_dict() for r in results], indent=2))
    if png_out:
        title = f"{'backward' if direction == 'bwd' else 'forward'} TFLOP/s, {dtype}, {torch.cuda.get_device_name()}"
        _bench_png([r.to_dict() for r in results], png_out, title)


def _bench_png(results: list[dict], path: Path, title: str) -> None:
    from flashgen.plot import plot_results

    try:
        console.print(f"plot written to {plot_results(results, path, title=title)}")
    except (RuntimeError, KeyError, TypeError) as exc:
        raise click.ClickException(f"cannot plot: {exc}") from None


def _bench_overhead(dtype: str, json_out: Path | None) -> None:
    import torch

    from flashgen import bench as b

    points = [b.OverheadPoint(dtype=dtype, causal=causal, seqlen=n) for n in (128, 512) for causal in (False, True)]
    rows = b.measure_overhead(points)
    table = Table(title=f"per-call time, microseconds, {torch.cuda.get_device_name()}")
    for column in ("point", "direct launch", "flashgen", "x direct", "cudnn", "flash", "efficient", "graph replay"):
        table.add_column(column)
    fmt = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
    for r in rows:
        table.add_row(r["point"], fmt(r["direct_us"]), fmt(r["flashgen_us"]), f"{r['overhead_vs_direct']:.3f}",
                      fmt(r["cudnn_us"]), fmt(r["flash_us"]), fmt(r["efficient_us"]),
                      "ok" if r["cuda_graph_replay_matches"] else "MISMATCH")  # fmt: skip
    console.print(table)
    if json_out:
        json_out.write_text(json.dumps(rows, indent=2))


def _tflops_cell(m) -> str:
    return f"{m.tflops:.0f}" if m.tflops is not None else "fail"


def _bench_line(result, peers) -> str:
    parts = []
    for peer in peers:
        m = result.measurements[peer]
        parts.append(f"{peer} {m.tflops:.0f}" if m.tflops is not None else f"{peer} FAILED ({m.failure})")
    return f"{result.point.label}: " + ", ".join(parts)



# --- the tuning database -------------------------------------------------------------------------------

_DB_OPTION = click.option(
    "--db", "db_url", envvar="FLASHGEN_DB", show_envvar=True,
    help="SQLAlchemy URL of the tuning database [default: an SQLite file in the user data directory].",
)  # fmt: skip


def _open_store(db_url: str | None):
    from flashgen.db import StoreError, TuningStore

    try:
        return TuningStore(db_url)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None


def _parse_space(items: tuple[str, ...], template: str = FORWARD, *, single: bool = False) -> dict:
    """``block_m=64,128`` -> {"block_m": [64, 128]}, typed by the template's knob table (``single``: one
    value per knob, for --knob)."""
    table = knob_table(template)
    hint = "--knob" if single else "--space"
    space: dict = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or name not in table.names or (single and "," in values):
            form = "NAME=VALUE" if single else "KNOB=V1,V2"
            raise click.BadParameter(f"{item!r}: expected {form} with a knob of {template}: {list(table.names)}", param_hint=hint)
        knob = table[name]
        parsed = []
        for text in values.split(","):
            if isinstance(knob.default, bool):
                if text.lower() not in ("true", "false", "1", "0"):
                    raise click.BadParameter(f"{name} takes true or false, got {text!r}", param_hint=hint)
                parsed.append(text.lower() in ("true", "1"))
            else:
                try:
                    parsed.append(type(knob.default)(text))
                except ValueError:
                    raise click.BadParameter(f"{name} takes {list(knob.choices)}, got {text!r}", param_hint=hint) from None
        bad = [v for v in parsed if v not in knob.choices]
        if bad:
            raise click.BadParameter(f"{name} cannot take {bad}; its choices are {list(knob.choices)}", param_hint=hint)
        space[name] = parsed
    return space


@main.command()
@click.option("--preset", type=click.Choice(["llm", "tiny"]), help="A grid of buckets: llm = head dims 64/128, causal off/on, fp16/bf16, seqlens 512..16k; tiny = what the interpreter can do.")
@click.option("--head-dim", "head_dims", type=_HEAD_DIM, multiple=True, help="Tune these head dims (instead of a preset).")
@click.option("--dtype", "dtypes", type=click.Choice(DTYPES), multiple=True, help="[default: fp16 and bf16; fp16 in the interpreter]")
@click.option("--causal", "causal_modes", type=click.Choice(["off", "on"]), multiple=True, help="[default: off and on]")
@click.option("--seqlen", "seqlens", type=click.IntRange(min=1), multiple=True, help="Sequence lengths (self-attention).")
@click.option("--tokens", type=click.IntRange(min=1), default=16384, show_default=True, help="batch * seqlen of each bucket.")
@click.option("--hidden", type=click.IntRange(min=1), default=2048, show_default=True, help="heads * head_dim of each bucket.")
@click.option("--trials", type=click.IntRange(min=1), default=40, show_default=True, help="Measured configs per bucket at most.")
@click.option("--time-budget", type=click.FloatRange(min=1), help="Seconds per bucket at most.")
@click.option("--patience", type=click.IntRange(min=1), default=15, show_default=True, help="Stop a bucket after this many measured configs without improvement.")
@click.option("--direction", type=click.Choice(["fwd", "bwd", "both"]), default="fwd", show_default=True,
              help="Tune the forward kernels (attn_fwd, and attn_fwd_sm90 on Hopper for what it runs), the backward "
                   "kernels (attn_bwd, and attn_bwd_sm90 and the fused ones on Hopper for what they run), or both.")  # fmt: skip
@click.option("--template", "only_templates", type=click.Choice(list(TEMPLATES)), multiple=True,
              help="Tune only these templates (instead of --direction).")  # fmt: skip
@click.option("--exhaustive", is_flag=True, help="Measure the whole pruned space (how the sampler is judged).")
@click.option("--space", "space_items", multiple=True, metavar="KNOB=V1,V2", help="Restrict a knob to these values (repeatable).")
@click.option("--sram-budget", type=click.IntRange(min=1), help="Shared-memory budget in bytes [default: the device's limit].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampler.")
@click.option("--compile-workers", type=click.IntRange(min=0), help="Processes compiling candidates ahead [default: up to 8 on a GPU].")
@click.option("--final-rounds", type=click.IntRange(min=0),
              help="After each bucket's search, time its three fastest configs (within 10%) and the fastest stored "
                   "winner of the direction's other templates (if within 10% too) this many times each, side by side, "
                   "and store those medians [default: 3 on a GPU, 0 in the interpreter; 0 skips it].")  # fmt: skip
@_DB_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def tune(preset, head_dims, dtypes, causal_modes, seqlens, tokens, hidden, trials, time_budget, patience, direction,
         only_templates, exhaustive, space_items, sram_budget, seed, compile_workers, final_rounds, db_url,
         as_json) -> None:  # fmt: skip
    """Search tile configs for shape buckets on this GPU and store the winners in the tuning database.

    Each bucket is tuned by timing its representative shape; every candidate is checked against a float64
    reference first. A final round then times the fastest few again side by side, with the fastest winner of
    the other templates for the bucket where its time is close. Ctrl-C keeps everything measured; running the
    same command again continues (and runs the final rounds again).
    Without a GPU, tuning runs in Triton's interpreter on tiny shapes and its results are marked as
    interpreter results, which a GPU never uses.
    """
    from flashgen.db import StoreError
    from flashgen.device import device_info
    from flashgen.shapes import grid_buckets, preset_buckets
    from flashgen.tuner import Budget
    from flashgen.tuning import TuneOptions, tune_buckets

    info = device_info()
    if preset and head_dims:
        raise click.UsageError("give --preset or --head-dim, not both")
    if preset:
        if dtypes or causal_modes or seqlens:
            raise click.UsageError("--dtype, --causal and --seqlen go with --head-dim, not --preset")
        buckets = preset_buckets(preset)
    elif head_dims:
        if not seqlens:
            raise click.UsageError("--head-dim needs at least one --seqlen")
        buckets = grid_buckets(
            head_dims=list(head_dims), dtypes=list(dtypes or (["fp16"] if info.interpreter else ["fp16", "bf16"])),
            causal=[c == "on" for c in (causal_modes or ("off", "on"))], seqlens=list(seqlens), tokens=tokens, hidden=hidden,
        )  # fmt: skip
    else:
        raise click.UsageError("say what to tune: --preset llm, or --head-dim D --seqlen N ...")
    if info.interpreter:
        err_console.print("[yellow]No CUDA GPU: tuning in Triton's CPU interpreter. Times are CPU wall clock, the results "
                          "are stored as interpreter results, and dispatch on a GPU never uses them.[/]")  # fmt: skip
        too_big = [b.key for b in buckets if b.n_q * b.n_k * b.batch_heads > 64 * 64 * 64 or "bf16" in b.key]
        if too_big:
            raise click.UsageError(f"too large (or bf16) for the interpreter: {too_big[:3]}...; use --preset tiny or a GPU")
    from flashgen.spec import BACKWARD_TEMPLATES, FORWARD_TEMPLATES

    def refusal(template, bucket, info):
        return knob_table(template).refusal(bucket.variant, info)

    if only_templates:
        templates = list(dict.fromkeys(only_templates))
    else:
        def runnable(family):  # the Triton template always; the others where they can run some bucket
            return [family[0]] + [t for t in family[1:] if any(refusal(t, b, info) is None for b in buckets)]

        forward, backward = runnable(FORWARD_TEMPLATES), runnable(BACKWARD_TEMPLATES)
        templates = {"fwd": forward, "bwd": backward, "both": [*forward, *backward]}[direction]
    if space_items and len(templates) > 1:
        raise click.UsageError(f"--space names knobs of one template, and this run tunes {', '.join(templates)}: "
                               "name one with --template")  # fmt: skip
    for template in templates:
        refused = [(b.key, why) for b in buckets if (why := refusal(template, b, info)) is not None]
        if refused:
            err_console.print(f"[yellow]{template} skips {len(refused)} of {len(buckets)} bucket(s): it cannot run "
                              f"{refused[0][1]}{' (and others)' if len(refused) > 1 else ''}.[/]")  # fmt: skip
    options = [TuneOptions(
        template=template, budget=Budget(trials=trials, seconds=time_budget, patience=patience), exhaustive=exhaustive,
        seed=seed, sram_budget=sram_budget, restrict=_parse_space(space_items, template), compile_workers=compile_workers,
        final_rounds=final_rounds,
    ) for template in templates]  # fmt: skip
    store = _open_store(db_url)
    err_console.print(f"Tuning {len(buckets)} bucket(s) x {', '.join(templates)} on {info.name} into {store.url}")
    results = []
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[best]}"))  # fmt: skip
    interrupted = False
    with Progress(*columns, console=err_console, transient=False) as progress:
        runnable = sum(refusal(t, b, info) is None for t in templates for b in buckets)
        overall = progress.add_task("buckets", total=runnable, best="")
        current = {"task": None, "template": FORWARD}

        def on_bucket_start(bucket, space_size):
            if current["task"] is not None:
                progress.update(current["task"], visible=False)
                progress.advance(overall)
            total = space_size if exhaustive else min(trials, space_size)
            label = f"{current['template']} {bucket.key} ({space_size} configs)"
            current["task"] = progress.add_task(label, total=total, best="")

        def on_trial(report):
            best = f"best {report.best_config.key} {report.best_ms:.3f} ms" if report.best_config else "no valid config yet"
            progress.update(current["task"], completed=report.measured, best=best)

        try:
            for template_options in options:
                current["template"] = template_options.template
                results += tune_buckets(buckets, store, template_options, on_bucket_start=on_bucket_start,
                                        on_trial=on_trial)  # fmt: skip
            progress.advance(overall)
        except KeyboardInterrupt:
            interrupted = True
        except Exception as exc:
            # Ctrl-C in the middle of a database commit reaches us wrapped in the storage layer's error.
            if not _caused_by_interrupt(exc):
                if isinstance(exc, StoreError):
                    raise click.ClickException(f"{exc} (what was stored before this error is kept)") from None
                raise
            interrupted = True
    if interrupted:
        err_console.print("[yellow]Interrupted: every config measured so far is stored; run the same command to continue.[/]")
        sys.exit(130)
    _print_tune_summary(results, as_json)


def _caused_by_interrupt(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _print_tune_summary(results, as_json: bool) -> None:
    rows = [{
        "template": r.template, "bucket": r.bucket.key, "space": r.space_size, "measured": r.measured, "failed": r.failed,
        "best_config": r.best_config.key if r.best_config else None,
        "best_ms": r.best.median_ms if r.best else None, "trials_to_best": r.trials_to_best,
        "default_config": r.default_config.key if r.default_config else None,
        "default_ms": r.times.get(r.default_config.key) if r.default_config else None,
        "seconds": round(r.seconds, 2), "stopped_by": r.stopped_by,
        "failures": [{"config": c, "reason": why} for c, why in r.failures],
        "times": r.times, "final_times": r.final_times,
    } for r in results]  # fmt: skip
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="tuned")
    for column in ("template", "bucket", "best config", "ms", "measured", "failed", "to best", "seconds", "stopped by"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["template"], row["bucket"], row["best_config"] or "-", f"{row['best_ms']:.4f}" if row["best_ms"] else "-",
                      f"{row['measured']}/{row['space']}", str(row["failed"]), str(row["trials_to_best"]),
                      f"{row['seconds']:.1f}", row["stopped_by"])  # fmt: skip
    console.print(table)


def _stale(entry) -> bool:
    from flashgen.codegen import template_digest
    from flashgen.device import toolchain

    return entry.is_stale(template_digest(entry.template), toolchain()["triton"])


@main.command("list")
@_DB_OPTION
@click.option("--json", "as_json", is_flag=True)
def list_entries(db_url, as_json) -> None:
    """List the tuned entries of the tuning database (stale ones are marked: they are never used)."""
    entries = _open_store(db_url).entries()
    if as_json:
        from flashgen.caches import entry_to_dict

        click.echo(json.dumps([{"id": e.id, "key": e.key, "stale": _stale(e), **entry_to_dict(e)} for e in entries], indent=2))
        return
    table = Table(title=f"{len(entries)} tuned entries")
    for column in ("id", "key", "config", "ms", "TFLOP/s", "trials", "state"):
        table.add_column(column)
    for e in entries:
        state = "stale" if _stale(e) else ("interpreter" if e.device.interpreter else "current")
        table.add_row(str(e.id), e.key, e.config.key, f"{e.median_ms:.4f}", f"{e.tflops:.1f}", str(e.trials), state)
    console.print(table)


@main.command()
@click.argument("key")
@_DB_OPTION
@click.option("--source/--no-source", default=True, show_default=True, help="Print the generated source too.")
def show(key, db_url, source) -> None:
    """Show one entry (KEY: an id or a key from `flashgen list`): config, numbers and generated source."""
    from flashgen.codegen import render

    entries = _open_store(db_url).find(key)
    if not entries:
        raise click.ClickException(f"no entry {key!r} in the tuning database; `flashgen list` shows what there is")
    for e in entries:
        console.print(f"[bold]{e.key}[/] (id {e.id}){' [red]stale[/]' if _stale(e) else ''}")
        console.print(f"  device     {e.device.name} capability {e.device.capability} SMs {e.device.sm_count} "
                      f"shared {e.device.max_shared_mem}{' (interpreter)' if e.device.interpreter else ''}")  # fmt: skip
        console.print(f"  toolchain  {e.toolchain}  template digest {e.template_digest}")
        console.print(f"  config     {e.config.key}")
        console.print(f"  median     {e.median_ms:.4f} ms, {e.tflops:.1f} TFLOP/s, error {e.error:.2e}")
        console.print(f"  tuning     {e.trials} trials, best at {e.trials_to_best}, {e.tuning_seconds:.1f} s, {e.created_at:%Y-%m-%d %H:%M}")
        if source:
            if _stale(e):
                click.echo("# stored source (stale entry, shown for inspection only):")
                click.echo(e.source_text)
            else:
                regenerated = render(e.template, e.bucket.variant, e.config)
                if regenerated.digest != e.source_sha256:
                    raise click.ClickException("the stored source hash does not match the regenerated source")
                click.echo(regenerated.text)


@main.command("export")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@_DB_OPTION
@click.option("--include-stale", is_flag=True, help="Export stale entries too.")
def export_cmd(path, db_url, include_stale) -> None:
    """Write the tuning database's entries to PATH as JSON text (a diff shows what changed)."""
    from flashgen.caches import dumps

    entries = [e for e in _open_store(db_url).entries() if include_stale or not _stale(e)]
    path.write_text(dumps(entries))
    err_console.print(f"exported {len(entries)} entries to {path}")


@main.command("import")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@_DB_OPTION
def import_cmd(path, db_url) -> None:
    """Read a JSON tuning cache (from `flashgen export`) into the tuning database, validating every field.

    Nothing in the file is executed: kernels are regenerated from flashgen's templates and checked against
    the stored hashes. A malformed or altered file is rejected whole.
    """
    from flashgen.caches import CacheError, read

    try:
        entries = read(path)
    except CacheError as exc:
        raise click.ClickException(f"rejected: {exc}") from None
    store = _open_store(db_url)
    written = sum(store.put(e) for e in entries)
    stale = sum(_stale(e) for e in entries)
    err_console.print(f"imported {written} of {len(entries)} entries from {path} "
                      f"({len(entries) - written} already as fast or faster; {stale} stale)")  # fmt: skip


@main.command()
@_DB_OPTION
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
def prune(db_url, dry_run) -> None:
    """Remove stale entries: those made by other templates or another Triton version than this one."""
    store = _open_store(db_url)
    stale = [e for e in store.entries() if _stale(e)]
    if not stale:
        err_console.print("no stale entries")
        return
    for e in stale:
        err_console.print(f"stale: {e.key} (template {e.template_digest}, triton {e.toolchain['triton']})")
    if not dry_run:
        removed = store.delete([e.id for e in stale])
        err_console.print(f"removed {removed} stale entries")


if __name__ == "__main__":
    main()
