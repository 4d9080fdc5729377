"""Tune a list of shape buckets on this device and keep each winner in the tuning database.

The glue between the tuner (search, measure) and the store (persist): each faster config found is written
at once, so an interrupted run loses nothing, and running the same buckets again resumes their studies.
After each bucket's search comes a final round: its fastest configs, and the fastest stored winner of the other
templates of the same direction (dispatch picks among them by their times), are timed again side by side, and the
medians of that round are what is stored.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch

from flashgen.codegen import FORWARD, render, template_digest
from flashgen.db.store import TuningStore
from flashgen.entries import TunedEntry
from flashgen.device import DeviceInfo, device_info, toolchain
from flashgen.defaults import default_for
from flashgen.shapes import ShapeBucket, bucket_distance
from flashgen.spec import BACKWARD_TEMPLATES, FORWARD_TEMPLATES, KnobTable, KnobValue, TileConfig, knob_table
from flashgen.sram import shared_budget
from flashgen.tuner import (
    Budget,
    BucketResult,
    KernelEvaluator,
    TrialReport,
    FINAL_MARGIN,
    compile_pool,
    evaluator_for,
    final_round,
    finalists,
    search_space,
    study_name,
    tune_bucket,
)


@dataclass(frozen=True)
class TuneOptions:
    template: str = FORWARD  # which template's kernels are tuned: attn_fwd, attn_fwd_sm90 or attn_bwd
    budget: Budget = Budget()
    exhaustive: bool = False
    seed: int = 0
    sram_budget: int | None = None
    restrict: dict[str, list[KnobValue]] | None = None
    compile_workers: int | None = None  # None: up to 8, one per spare CPU core, on a GPU
    final_rounds: int | None = None  # turns of the final round; None: FINAL_ROUNDS on a GPU, none in the interpreter


FINAL_ROUNDS = 3


def default_compile_workers(info: DeviceInfo) -> int:
    return 0 if info.interpreter else max(1, min(8, (os.cpu_count() or 2) - 1))


def entry_for(result: BucketResult, info: DeviceInfo, evaluator: KernelEvaluator) -> TunedEntry:
    assert result.best_config is not None and result.best is not None
    template = evaluator.template
    source = render(template, result.bucket.variant, result.best_config)
    return TunedEntry(
        template=template,
        template_digest=template_digest(template),
        device=info,
        toolchain=toolchain(),
        bucket=result.bucket,
        config=result.best_config,
        median_ms=result.best.median_ms,
        tflops=evaluator.tflops(result.best.median_ms),
        error=result.best.error if result.best.error is not None else 0.0,
        trials=result.measured,
        trials_to_best=result.trials_to_best,
        tuning_seconds=result.seconds,
        source_sha256=source.digest,
        source_text=source.text,
    )


def tune_buckets(
    buckets: list[ShapeBucket],
    store: TuningStore,
    options: TuneOptions = TuneOptions(),
    *,
    device: torch.device | str | None = None,
    on_bucket_start: Callable[[ShapeBucket, int], None] | None = None,
    on_trial: Callable[[TrialReport], None] | None = None,
) -> list[BucketResult]:
    """Tune each bucket in turn; returns what each search found (its best is already in ``store``). A bucket
    the template cannot run (its table's ``[template.supports]``) is not searched: its result says why in
    ``stopped_by``."""
    info = device_info(device)
    device = torch.device("cuda" if not info.interpreter else "cpu") if device is None else torch.device(device)
    storage = store.optuna_storage()
    budget_bytes = shared_budget(info, options.sram_budget)
    workers = default_compile_workers(info) if options.compile_workers is None else options.compile_workers
    pool = None if info.interpreter else compile_pool(workers)
    results = []
    try:
        for bucket in buckets:
            reason = knob_table(options.template).refusal(bucket.variant, info)
            if reason is not None:
                results.append(BucketResult(bucket=bucket, space_size=0, stopped_by=f"not run: {reason}",
                                            template=options.template))  # fmt: skip
                continue
            results.append(_tune_one(bucket, store, storage, options, info, device, budget_bytes, pool, workers,
                                     on_bucket_start, on_trial))  # fmt: skip
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return results


def _tune_one(bucket, store, storage, options, info, device, budget_bytes, pool, workers, on_bucket_start, on_trial):
    template = options.template
    space = search_space(bucket, sram_budget=budget_bytes, restrict=options.restrict, template=template)
    if on_bucket_start:
        on_bucket_start(bucket, len(space))
    evaluator = evaluator_for(template, bucket, device, info=info, pool=pool)
    default = default_for(template, bucket.variant, info, sram_budget=options.sram_budget)
    stored = store.entries()  # read once: the search's start configs and the final round's sibling
    start_with = [] if options.exhaustive else start_configs(stored, template, bucket, info, default)
    rounds = options.final_rounds if options.final_rounds is not None else (0 if info.interpreter else FINAL_ROUNDS)
    try:
        result = tune_bucket(
            bucket,
            evaluator,
            space=space,
            storage=storage,
            name=study_name(info, bucket, template, template_digest(template), exhaustive=options.exhaustive),
            budget=options.budget,
            exhaustive=options.exhaustive,
            seed=options.seed,
            batch=4,  # asked two batches ahead: up to 8 compiling while one is measured
            start_with=start_with,
            on_trial=on_trial,
            on_best=lambda r: store.put(entry_for(r, info, evaluator)),
        )
        if result.best_config is not None and rounds > 0:
            sibling = sibling_entry(stored, template, bucket, info)
            _final_round(result, evaluator, sibling, store, info, device, pool, rounds)
    finally:
        evaluator.close()
    if result.best_config is not None:
        # The final counts (trials, time) replace those written when the best was found; a final round's median
        # replaces the search's time even where it is slower.
        store.put(entry_for(result, info, evaluator), replace=bool(result.final_times))
    result.default_config, result.template = default, template
    return result


def start_configs(entries: list[TunedEntry], template: str, bucket: ShapeBucket, info: DeviceInfo,
                  default: TileConfig) -> list[TileConfig]:
    """What a search of ``bucket`` measures first, in order: the bucket's own stored winners on this device, newest
    first, even those a template edit made stale (after the edit they are still the best guess; with each value of
    any knob added since); the default config; then what the NEIGHBOURING_BUCKETS nearest buckets of its
    variant found (nearby lengths and batch sizes usually share their best tiles; far ones, such as 16k's for 1k,
    took trials that the best config's own neighbours needed). The search then never ends worse than any of them.
    Its first batches are asked before any result is in, so they are the first start config's neighbours: a stored
    winner's, not the default's (at D=64 causal 1k the default's took the trials that found a 4% faster config)."""
    table = knob_table(template)
    mine = [e for e in entries if e.template == template and e.device == info and e.bucket.variant == bucket.variant]
    own = [config for e in sorted(mine, key=lambda e: e.created_at, reverse=True) if e.bucket == bucket
           for config in _as_knobs_now_stand(table, e.config)]  # fmt: skip
    others = sorted({e.bucket for e in mine if e.bucket != bucket}, key=lambda b: (bucket_distance(b, bucket), b.key))
    nearest = others[:NEIGHBOURING_BUCKETS]
    neighbours = [configs[0] for near in nearest for e in mine
                  if e.bucket == near if (configs := _as_knobs_now_stand(table, e.config))]  # fmt: skip
    return list(dict.fromkeys([*own, default, *neighbours]))


NEIGHBOURING_BUCKETS = 2  # other buckets whose winners start a search (see start_configs)


def _as_knobs_now_stand(table: KnobTable, config: TileConfig) -> list[TileConfig]:
    """A stored ``config`` in the template's current knobs. Knobs added since it was stored take each of their
    choices that its values allow (a knob's ``requires``), the default first (the kernel it was): the search then
    measures what a new knob does to a known winner before anything else. Empty if it names a knob or a value the
    template no longer has."""
    values = config.to_dict()
    added = [knob for knob in table.knobs if knob.name not in values]
    choices = [[knob.default, *(c for c in knob.choices if c != knob.default)] for knob in added]
    configs = []
    for combo in itertools.product(*choices):
        try:  # a value of an added knob may need other values of the stored ones (its `requires`): skip that one
            configs.append(table.config(**values, **dict(zip((knob.name for knob in added), combo))))
        except ValueError:
            continue
    return configs


def sibling_entry(entries: list[TunedEntry], template: str, bucket: ShapeBucket, info: DeviceInfo) -> TunedEntry | None:
    """Among stored ``entries``, the fastest current winner for ``bucket`` on this device of the other templates of
    ``template``'s direction (the one dispatch weighs it against), if there is one and it can run here."""
    family = FORWARD_TEMPLATES if template in FORWARD_TEMPLATES else BACKWARD_TEMPLATES
    triton_version = toolchain()["triton"]
    rivals = [entry for entry in entries
              if entry.template in family and entry.template != template and entry.device == info
              and entry.bucket == bucket and not entry.is_stale(template_digest(entry.template), triton_version)
              and knob_table(entry.template).refusal(bucket.variant, info) is None]  # fmt: skip
    return min(rivals, key=lambda entry: entry.median_ms, default=None)


def _final_round(result: BucketResult, evaluator: KernelEvaluator, sibling: TunedEntry | None, store: TuningStore,
                 info: DeviceInfo, device: torch.device, pool, rounds: int) -> None:  # fmt: skip
    """Time the search's finalists and the sibling template's winner side by side (:func:`final_round`); the
    fastest finalist becomes the result's best, and the sibling's entry gets its new time. Only close races are
    run again: finalists within FINAL_MARGIN of the best, and the sibling if its stored time is as close."""
    table = knob_table(evaluator.template)
    configs = {key: table.parse_key(key) for key in finalists(result, margin=FINAL_MARGIN)}
    best_ms = result.best.median_ms
    if sibling is not None and not best_ms / (1 + FINAL_MARGIN) <= sibling.median_ms <= best_ms * (1 + FINAL_MARGIN):
        sibling = None  # not a close race: a few per cent of noise cannot change what dispatch picks
    if len(configs) + (sibling is not None) < 2:
        return
    evaluator.prepare(list(configs.values()))  # a resumed search measured them in another process
    candidates = {key: partial(evaluator.measure, config) for key, config in configs.items()}
    sibling_evaluator = None
    if sibling is not None:
        sibling_evaluator = evaluator_for(sibling.template, result.bucket, device, info=info, pool=pool)
        sibling_evaluator.prepare([sibling.config])
        candidates[f"{sibling.template}:{sibling.config.key}"] = partial(sibling_evaluator.measure, sibling.config)
    try:
        final = final_round(candidates, rounds)
    finally:
        if sibling_evaluator is not None:
            sibling_evaluator.close()
    result.final_times = {key: outcome.median_ms for key, outcome in final.items()}
    ours = {key: outcome for key, outcome in final.items() if key in configs}
    if ours:
        best = min(ours, key=lambda key: ours[key].median_ms)
        result.best_config, result.best = configs[best], ours[best]
    label = f"{sibling.template}:{sibling.config.key}" if sibling is not None else None
    if label in final:
        ms = final[label].median_ms
        store.put(replace(sibling, median_ms=ms, tflops=evaluator.tflops(ms)), replace=True)
