#!/usr/bin/env bash
# The tuner judged against exhaustive search over the same space, on six buckets (GPU only).
# Usage: benchmarks/tuner_vs_exhaustive.sh OUTDIR [extra flashgen tune options]
# Writes OUTDIR/exhaustive.json and OUTDIR/tpe.json (flashgen tune --json summaries) and their databases.
set -euo pipefail
out=${1:?usage: $0 OUTDIR}
shift
mkdir -p "$out"
buckets=(--head-dim 128 --dtype bf16 --causal off --causal on --seqlen 1024 --seqlen 4096 --seqlen 16384)
# 72 configs: 2 x 3 x 2 x 3 x 2
space=(--space block_m=64,128 --space block_n=32,64,128 --space num_warps=4,8 --space num_stages=2,3,4
       --space split_masked=true,false)
# An exhaustive.json already in OUTDIR (from an earlier run on the same GPU) is reused: it is the slow half.
if [ ! -s "$out/exhaustive.json" ]; then
  python3 -m flashgen tune "${buckets[@]}" "${space[@]}" --exhaustive --db "sqlite:///$out/exhaustive.sqlite3" --json "$@" \
    > "$out/exhaustive.json" 2> "$out/exhaustive.log"
fi
# A quarter of the space's trials at most (the 64 configs that survive pruning: 16).
python3 -m flashgen tune "${buckets[@]}" "${space[@]}" --trials 16 --patience 16 --db "sqlite:///$out/tpe.sqlite3" --json "$@" \
  > "$out/tpe.json" 2> "$out/tpe.log"
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
exh = {r["bucket"]: r for r in json.load(open(f"{out}/exhaustive.json"))}
tpe = {r["bucket"]: r for r in json.load(open(f"{out}/tpe.json"))}
# "in exh": the tuned config's time as the exhaustive run measured it, over that run's best: the quality of
# the choice, free of run-to-run noise. "direct": the tuned run's own time over the exhaustive best.
print(f"{'bucket':40} {'exh best':>9} {'tuned':>9} {'direct':>6} {'in exh':>6} {'trials':>6} {'space':>5} {'to best':>7} "
      f"{'default':>8} {'x dflt':>6} {'s tuned':>7} {'s exh':>6}  tuned config")
for key, e in exh.items():
    t = tpe[key]
    in_exh = e["times"].get(t["best_config"], float("nan")) / e["best_ms"]
    dflt = e["times"].get(t["default_config"], float("nan"))
    print(f"{key:40} {e['best_ms']:9.4f} {t['best_ms']:9.4f} {t['best_ms'] / e['best_ms']:6.3f} {in_exh:6.3f} {t['measured']:6d} "
          f"{e['measured']:5d} {t['trials_to_best']:7d} {dflt:8.4f} {dflt / e['times'].get(t['best_config'], float('nan')):6.3f} "
          f"{t['seconds']:7.1f} {e['seconds']:6.1f}  {t['best_config']}")
PY
