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
python3 -m flashgen tune "${buckets[@]}" "${space[@]}" --exhaustive --db "sqlite:///$out/exhaustive.sqlite3" --json "$@" \
  > "$out/exhaustive.json" 2> "$out/exhaustive.log"
# A quarter of the space's trials at most.
python3 -m flashgen tune "${buckets[@]}" "${space[@]}" --trials 18 --patience 18 --db "sqlite:///$out/tpe.sqlite3" --json "$@" \
  > "$out/tpe.json" 2> "$out/tpe.log"
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
exh = {r["bucket"]: r for r in json.load(open(f"{out}/exhaustive.json"))}
tpe = {r["bucket"]: r for r in json.load(open(f"{out}/tpe.json"))}
print(f"{'bucket':44} {'exh best ms':>11} {'tuned ms':>9} {'tuned/exh':>9} {'trials':>6} {'to best':>7} {'default ms':>10} {'s tuned':>7} {'s exh':>6}")
for key, e in exh.items():
    t = tpe[key]
    print(f"{key:44} {e['best_ms']:11.4f} {t['best_ms']:9.4f} {t['best_ms'] / e['best_ms']:9.3f} {t['measured']:6d} "
          f"{t['trials_to_best']:7d} {t['default_ms'] or float('nan'):10.4f} {t['seconds']:7.1f} {e['seconds']:6.1f}")
PY
