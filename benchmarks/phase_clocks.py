"""Where a consumer warp group of attn_fwd_sm90 spends its clocks, phase by phase, on a Hopper GPU:

    python benchmarks/phase_clocks.py m128-n128-w4-s4-persistent=1 --seqlen 1024 --causal

A diagnosis tool, not a benchmark of flashgen: it renders the template for one forced config, inserts reads of
the SM's clock register (``%clock``) at the phase boundaries of each consumer, runs it once on bf16 inputs of
16k tokens and 32 heads (D=64), and prints the median of each phase over every tile a consumer runs (the first
and last of each program left out), in SM clocks:

- per tile: S0 (from the tile's start until S_0 is back), soft0 (block 0's softmax), loop (the trips of blocks
  1..n-1), lastPV (the last P.V, issued and waited for), epi (lse and the output's store), gap (to the next tile);
- per trip of the loop: cvt+ringwait (P's conversion and the waits for K and V), Swait (issuing S_j and P.V,
  then waiting for S_j), soft (the softmax of S_j), PVwait, rescale;
- phaseC01: consumer 1's clock minus consumer 0's when each has S_j back for the tile's middle block (both
  read the same SM's clock).

It places the reads by the lines of the template as of v20, whose key loop was written out in the consumer; since
v21 a trip is a function of its own (``_trip``), and the tool stops with a message naming the reads it could not
place. Run it on a checkout of v20 (commit 8bd9e55) until it is brought up to date.

The reads cost a few percent (``tflops_clocked`` against ``tflops``, the uninstrumented kernel). The output is
checked against SDPA in float32 before anything is timed. Results also go to ``$OUT/phase_clocks.jsonl``
(or the working directory).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from flashgen.codegen import load, render  # noqa: E402
from flashgen.launch import Sm90ForwardLaunch  # noqa: E402
from flashgen.spec import FORWARD_SM90, Variant, knob_table  # noqa: E402

SLOTS, MAX_ROUNDS = 16, 48  # clock values per (program, consumer, tile); tiles recorded per program
HELPERS = '''

@gluon.jit
def _clock(x):
    return gl.inline_asm_elementwise("mov.u32 $0, %clock;", "=r,r", [x], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _record(Clocks, C: gl.constexpr, k, e: gl.constexpr, v, rows):
    index = ((gl.program_id(0) * CONSUMERS + C) * MAX_ROUNDS + k) * SLOTS + e
    gl.store(Clocks + index + rows * 0, v, mask=(rows == 0) & (k < MAX_ROUNDS))

'''
# Lines of the rendered consumer (stripped) after which a clock read goes, and the name it gets.
AFTER = {
    "s = warpgroup_mma_wait(0, deps=[s_token])": ("        ", "t1"),
    "l_i = gl.sum(p, 1)": ("        ", "t2"),
    "l_i = l_i * alpha + gl.sum(p, 1)": ("            ", "td"),
}
PER_TILE = ["S0", "soft0", "loop", "lastPV", "epi"]
PER_TRIP = ["cvt+ringwait", "Swait", "soft", "PVwait", "rescale"]


def instrument(text: str) -> str:
    """``text`` (attn_fwd_sm90 as rendered) with clock reads in each consumer and a ``Clocks`` int32 argument."""
    out: list[str] = []
    in_consumer = in_signature = False
    for line in text.split("\n"):
        s = line.strip()
        if line.startswith("LN2 = "):
            out += [line, f"SLOTS = gl.constexpr({SLOTS})", f"MAX_ROUNDS = gl.constexpr({MAX_ROUNDS})"]
            continue
        if line.startswith("def _consumer("):
            out[-1:-1] = HELPERS.split("\n")
            line = line.replace("def _consumer(C: gl.constexpr, ", "def _consumer(C: gl.constexpr, Clocks, ")
            in_consumer = True
        if line.startswith("def attn_fwd("):
            in_consumer, in_signature = False, True
        if in_signature and s.endswith("):"):
            line, in_signature = line[:-2] + ", Clocks):", False
        if s.startswith("(_consumer, ("):
            line = line.replace(", o_desc,", ", Clocks, o_desc,")
        if not in_consumer:
            out.append(line)
            continue
        if s.startswith("done = 0"):
            out += [line, "    clock_rows = gl.arange(0, ROWS, layout=s_rows)"]
        elif s.startswith("for k in range(_rounds"):
            out += [line, "        t0 = _clock(clock_rows)",
                    *[f"        a{x} = gl.zeros([ROWS], gl.int32, s_rows)" for x in range(5)],
                    "        mid = gl.zeros([ROWS], gl.int32, s_rows)"]
        elif s.startswith("stage = (ring + j) % NUM_STAGES"):
            out += ["            ta = _clock(clock_rows)", line]
        elif s.startswith("_wait_turn(turn, C, r + j)"):
            out += ["            tb = _clock(clock_rows)", line]
        elif s == "s = warpgroup_mma_wait(1, deps=[s_token])":
            out += [line, "            tc = _clock(clock_rows)", "            mid = gl.where(j == n_blocks // 2, tc, mid)"]
        elif s == "acc = warpgroup_mma_wait(0, deps=[o_token])" and line.startswith("            "):
            out += [line, "            te = _clock(clock_rows)"]
        elif s.startswith("acc = acc * gl.expand_dims(gl.convert_layout(alpha, o_rows), 1)"):
            out += [line, "            tf = _clock(clock_rows)", "            a0 += tb - ta", "            a1 += tc - tb",
                    "            a2 += td - tc", "            a3 += te - td", "            a4 += tf - te"]
        elif s.startswith("last = ring + n_blocks - 1"):
            out += ["        t3 = _clock(clock_rows)", line]
        elif s == "acc = warpgroup_mma_wait(0, deps=[o_token])":
            out += [line, "        t4 = _clock(clock_rows)"]
        elif s.startswith("tma.async_copy_shared_to_global(o_desc"):
            out += [line, "        t5 = _clock(clock_rows)"]
            for e, name in enumerate(["t0", "t1", "t2", "t3", "t4", "t5", "a0", "a1", "a2", "a3", "a4", "mid"]):
                out.append(f"        _record(Clocks, C, k, {e}, {name}, clock_rows)")
            out.append("        _record(Clocks, C, k, 12, clock_rows * 0 + n_blocks, clock_rows)")
        elif s in AFTER:
            indent, name = AFTER[s]
            out += [line, f"{indent}{name} = _clock(clock_rows)"]
        else:
            out.append(line)
    result = "\n".join(out)
    missing = [name for name in ("t0", "t1", "t2", "t3", "t4", "t5", "ta", "tb", "tc", "td", "te", "tf")
               if f"{name} = _clock(" not in result]  # fmt: skip
    if missing:
        raise SystemExit(f"the template changed: no place found for clock reads {missing}")
    return result


def phases(clocks: torch.Tensor, consumers: int) -> dict[str, float]:
    """Medians of each phase over the recorded tiles (the first and last of each program left out)."""
    d = clocks[:, :consumers].cpu().long()
    wrap = lambda x: x % (1 << 32)  # noqa: E731  (%clock is 32 bits)
    values: dict[str, list[float]] = {name: [] for name in [*PER_TILE, "gap", "per_tile", "per_block", *PER_TRIP,
                                                            "phaseC01"]}  # fmt: skip
    for p in range(d.shape[0]):
        for c in range(consumers):
            rounds = int((d[p, c, :, 12] > 0).sum())
            for k in range(1, min(rounds, MAX_ROUNDS) - 1):
                row, following = d[p, c, k], d[p, c, k + 1]
                n_blocks, t = int(row[12]), [int(row[e]) for e in range(6)]
                for e, name in enumerate(PER_TILE):
                    values[name].append(wrap(t[e + 1] - t[e]))
                values["gap"].append(wrap(int(following[0]) - t[5]))
                values["per_tile"].append(wrap(int(following[0]) - t[0]))
                if n_blocks > 1:
                    for e, name in enumerate(PER_TRIP):
                        values[name].append(wrap(int(row[6 + e])) / (n_blocks - 1))
                    values["per_block"].append(wrap(t[3] - t[2]) / (n_blocks - 1))
                if c == 1 and n_blocks > 2:
                    x = wrap(int(d[p, 1, k, 11]) - int(d[p, 0, k, 11]))
                    values["phaseC01"].append(x - (1 << 32) if x >= 1 << 31 else x)
    return {name: round(statistics.median(v), 1) if v else float("nan") for name, v in values.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="an attn_fwd_sm90 config key, e.g. m128-n128-w4-s4-persistent=1")
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--causal", action="store_true")
    args = parser.parse_args()
    import triton.testing

    variant = Variant(64, "bf16", causal=args.causal)
    config = knob_table(FORWARD_SM90).parse_key(args.config)
    source = render(FORWARD_SM90, variant, config)
    clocked = load(dataclasses.replace(source, text=instrument(source.text))).attn_fwd
    n, heads = args.seqlen, 32
    batch = max(1, 16384 // n)
    q, k, v = (torch.randn(batch, heads, n, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    launch = Sm90ForwardLaunch(variant, config, q.shape, k.shape)
    out, lse = torch.full_like(q, float("nan")), torch.empty(batch, heads, n, device="cuda")
    arguments = launch.arguments(q, k, v, out, lse, 64**-0.5)
    clocks = torch.zeros(launch.grid[0], 3, MAX_ROUNDS, SLOTS, dtype=torch.int32, device="cuda")
    run = lambda: clocked[launch.grid](*arguments, clocks, num_warps=config.num_warps)  # noqa: E731
    run()
    torch.cuda.synchronize()
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=args.causal)
    error = ((out.float() - ref).norm() / ref.norm()).item()
    if not error < 1e-2:
        raise SystemExit(f"the clocked kernel is wrong: relative error {error:.2e}")
    flops = 4 * batch * heads * n * n * 64 / (2 if args.causal else 1)
    clocked_ms = triton.testing.do_bench(run, warmup=50, rep=300)
    plain_ms = triton.testing.do_bench(lambda: launch(q, k, v, 64**-0.5), warmup=50, rep=300)
    clocks.zero_()
    run()
    torch.cuda.synchronize()
    row = {"config": config.key, "seqlen": n, "causal": args.causal, "error": error,
           "tflops": round(flops / plain_ms / 1e9, 1), "tflops_clocked": round(flops / clocked_ms / 1e9, 1),
           **phases(clocks, config.block_m // 64)}  # fmt: skip
    with open(Path(os.environ.get("OUT", ".")) / "phase_clocks.jsonl", "a") as log:
        log.write(json.dumps(row) + "\n")
    print(" | ".join(f"{name} {value}" for name, value in row.items()))


if __name__ == "__main__":
    main()
