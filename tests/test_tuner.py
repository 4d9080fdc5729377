"""The search logic with an injected evaluator: a fake clock instead of a GPU, no kernels compiled."""

import itertools

import optuna
import pytest

from flashgen.shapes import ShapeBucket
from flashgen.spec import FORWARD_SM90, TileConfig, Variant, knob_table
from flashgen.sram import estimate_shared_bytes
from flashgen.tuner import BucketResult, Budget, Outcome, final_round, finalists, search_space, tune_bucket

H100_SHARED = 232448  # the opt-in limit of shared memory per program
BUCKET = ShapeBucket.of(Variant(64, "fp16"), batch=1, heads_q=8, heads_kv=8, n_q=1024, n_k=1024)
table = knob_table("attn_fwd")
# The Hopper knobs held off: the searches below are about tile shapes.
PLAIN = {"tma": [False], "warp_specialize": [False]}
SMALL = {"block_m": [64, 128], "block_n": [32, 64], "num_warps": [4, 8], "num_stages": [2, 3], "split_masked": [True], **PLAIN}


def cost(config) -> float:
    """A smooth fake latency with one best config: m128 n64 w8 s3."""
    return (1.0 + 0.3 * abs(config.block_m - 128) / 64 + 0.2 * abs(config.block_n - 64) / 32
            + 0.1 * (config.num_warps != 8) + 0.05 * abs(config.num_stages - 3))  # fmt: skip


class FakeEvaluator:
    def __init__(self, failing=(), wrong=(), interrupt_after=None):
        self.failing, self.wrong, self.interrupt_after = set(failing), set(wrong), interrupt_after
        self.measured, self.prepared = [], []

    def prepare(self, configs):
        self.prepared.extend(c.key for c in configs)

    def measure(self, config):
        if self.interrupt_after is not None and len(self.measured) >= self.interrupt_after:
            raise KeyboardInterrupt
        self.measured.append(config.key)
        if config.key in self.failing:
            return Outcome(failure="compile: CompilationError: boom")
        if config.key in self.wrong:
            return Outcome(error=0.5, failure="wrong: relative error 0.5 > tolerance 0.002")
        return Outcome(median_ms=cost(config), error=1e-4)


def run(evaluator, *, storage=None, name="s", budget=Budget(trials=8, patience=None), exhaustive=False, restrict=SMALL, **kw):
    space = search_space(BUCKET, sram_budget=None, restrict=restrict)
    return tune_bucket(BUCKET, evaluator, space=space, storage=storage or optuna.storages.InMemoryStorage(), name=name,
                       budget=budget, exhaustive=exhaustive, **kw)  # fmt: skip


def test_exhaustive_measures_every_config_once_and_finds_the_optimum():
    evaluator = FakeEvaluator()
    result = run(evaluator, exhaustive=True)
    assert sorted(evaluator.measured) == sorted(c.key for c in search_space(BUCKET, sram_budget=None, restrict=SMALL))
    assert len(set(evaluator.measured)) == len(evaluator.measured) == 16 == result.measured
    assert result.best_config.key == "m128-n64-w8-s3-split_masked=1-tma=0-warp_specialize=0" and result.stopped_by == "exhausted"


def test_trial_budget_is_measured_configs_and_configs_are_prepared_before_they_are_measured():
    evaluator = FakeEvaluator()
    result = run(evaluator, budget=Budget(trials=6, patience=None))
    assert result.measured == len(evaluator.measured) == 6 and result.stopped_by == "trials"
    assert len(set(evaluator.measured)) == 6  # never the same config twice
    assert all(key in evaluator.prepared for key in evaluator.measured)
    assert result.best.median_ms == min(cost(table.config(**_values(k))) for k in evaluator.measured)


def _values(key):
    return table.parse_key(key).to_dict()


def test_patience_stops_a_search_that_no_longer_improves():
    result = run(FakeEvaluator(), budget=Budget(trials=None, patience=3), restrict=None)
    assert result.stopped_by == "patience"
    assert result.measured - result.trials_to_best == 3


def test_failing_and_wrong_configs_are_failed_trials_and_the_search_goes_on():
    space = search_space(BUCKET, sram_budget=None, restrict=SMALL)
    failing, wrong = space[0].key, "m128-n64-w8-s3-split_masked=1-tma=0-warp_specialize=0"
    storage = optuna.storages.InMemoryStorage()
    result = run(FakeEvaluator(failing=[failing], wrong=[wrong]), storage=storage, exhaustive=True)
    assert result.failed == 2 and {c for c, _ in result.failures} == {failing, wrong}
    assert result.best_config.key != wrong and result.best is not None
    study = optuna.load_study(study_name="s", storage=storage)
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL and t.user_attrs.get("measured")]
    assert {t.user_attrs["failure"].split(":")[0] for t in failed} == {"compile", "wrong"}


def test_configs_over_the_sram_budget_are_never_measured():
    budget_bytes = 40_000
    space = search_space(BUCKET, sram_budget=budget_bytes)
    assert space and all(estimate_shared_bytes(BUCKET.variant, c) <= budget_bytes for c in space)
    evaluator = FakeEvaluator()
    tune_bucket(BUCKET, evaluator, space=space, storage=optuna.storages.InMemoryStorage(), name="s",
                budget=Budget(trials=10, patience=None))  # fmt: skip
    assert len(evaluator.measured) == 10
    assert all(estimate_shared_bytes(BUCKET.variant, table.config(**_values(k))) <= budget_bytes for k in evaluator.measured)


def test_tiles_longer_than_the_sequences_are_not_in_the_space():
    short = ShapeBucket.of(Variant(64, "fp16"), batch=1, heads_q=2, heads_kv=2, n_q=30, n_k=60)
    space = search_space(short, sram_budget=None)
    assert space and max(c.block_m for c in space) == 32 and max(c.block_n for c in space) == 64


def test_a_resumed_search_continues_where_it_stopped(tmp_path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'studies.sqlite3'}")
    first = run(FakeEvaluator(), storage=storage, budget=Budget(trials=5, patience=None))
    second_eval = FakeEvaluator()
    second = run(second_eval, storage=storage, budget=Budget(trials=9, patience=None))
    assert first.measured == 5 and second.measured == 9 and len(second_eval.measured) == 4
    assert second.best.median_ms <= first.best.median_ms


def test_an_interrupted_search_keeps_what_it_measured_and_resumes(tmp_path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'studies.sqlite3'}")
    bests = []
    with pytest.raises(KeyboardInterrupt):
        run(FakeEvaluator(interrupt_after=3), storage=storage, budget=Budget(trials=8, patience=None),
            on_best=lambda r: bests.append(r.best.median_ms))  # fmt: skip
    assert bests  # the best so far was handed out before the interrupt
    study = optuna.load_study(study_name="s", storage=storage)
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    resumed_eval = FakeEvaluator()
    resumed = run(resumed_eval, storage=storage, budget=Budget(trials=8, patience=None))
    assert resumed.measured == 8 and len(resumed_eval.measured) == 5


def test_the_seeded_sampler_repeats_itself():
    a, b = FakeEvaluator(), FakeEvaluator()
    run(a, restrict=None, seed=3)
    run(b, restrict=None, seed=3)
    assert a.measured == b.measured


def test_tpe_reaches_the_exhaustive_best_in_a_quarter_of_the_trials_on_a_smooth_cost():
    space = search_space(BUCKET, sram_budget=None)
    best = min(cost(c) for c in space)
    result = run(FakeEvaluator(), restrict=None, budget=Budget(trials=len(space) // 4, patience=None))
    assert result.best.median_ms <= 1.03 * best


def test_restricting_to_unknown_values_is_an_error():
    with pytest.raises(ValueError, match="cannot take"):
        search_space(BUCKET, sram_budget=None, restrict={"block_m": [48]})
    with pytest.raises(KeyError, match="no knob"):
        search_space(BUCKET, sram_budget=None, restrict={"bogus": [1]})


def test_start_with_configs_are_measured_first_so_the_search_never_ends_worse():
    space = search_space(BUCKET, sram_budget=None)
    default = table.config(block_m=64, block_n=32, num_warps=4, num_stages=2)
    evaluator = FakeEvaluator()
    result = run(evaluator, restrict=None, start_with=[default, default], budget=Budget(trials=5, patience=None))
    assert evaluator.measured[0] == default.key and evaluator.measured.count(default.key) == 1
    assert result.best.median_ms <= cost(default) and result.times[default.key] == cost(default)
    assert default in space


def test_local_search_climbs_from_the_start_to_the_optimum_in_few_trials():
    start = table.config(block_m=64, block_n=32, num_warps=4, num_stages=2, split_masked=True)
    space = search_space(BUCKET, sram_budget=None, restrict=PLAIN)
    best = min(space, key=cost)
    budget = Budget(trials=len(space) // 20, patience=None)  # 50 of 1000 configs
    local = run(FakeEvaluator(), restrict=PLAIN, start_with=[start], budget=budget)
    sampler_only = run(FakeEvaluator(), restrict=PLAIN, start_with=[start], budget=budget, local_search=False)
    assert local.best_config == best
    assert sampler_only.best.median_ms > local.best.median_ms  # the seeded TPE alone does not get there


def test_neighbours_move_one_knob_or_block_m_with_num_warps():
    from flashgen.tuner import _neighbours

    choices = {"block_m": [64, 128, 256], "block_n": [32, 64], "num_warps": [4, 8], "num_stages": [3], "split_masked": [False, True],
               "tma": [False, True], "warp_specialize": [False]}  # fmt: skip
    centre = table.config(block_m=128, block_n=64, num_warps=8, num_stages=3, split_masked=True)
    everything = {c.key: c for c in (TileConfig.from_dict(dict(zip(choices, values)))
                                     for values in itertools.product(*choices.values()))}  # fmt: skip
    keys = {c.key.removesuffix("-warp_specialize=0") for c in _neighbours(centre, choices, everything)}
    assert keys == {
        "m64-n64-w8-s3-split_masked=1-tma=0", "m256-n64-w8-s3-split_masked=1-tma=0", "m128-n32-w8-s3-split_masked=1-tma=0",
        "m128-n64-w4-s3-split_masked=1-tma=0", "m128-n64-w8-s3-split_masked=0-tma=0", "m64-n64-w4-s3-split_masked=1-tma=0",
        "m128-n64-w8-s3-split_masked=1-tma=1",
    }  # fmt: skip


def test_a_neighbour_over_the_sram_budget_takes_a_shallower_ring():
    from flashgen.tuner import _neighbours

    # attn_fwd_sm90 at D=64: 64-row programs run two an SM, so with 128-key blocks a 4-deep ring no longer fits and
    # 3 is the deepest that does.
    sm90 = knob_table(FORWARD_SM90)
    space = search_space(BUCKET, sram_budget=H100_SHARED, template=FORWARD_SM90)
    choices = {n: sorted({c[n] for c in space}) for n in sm90.names}
    centre = sm90.config(block_m=128, block_n=128, num_stages=4, persistent=True)
    assert centre in space and sm90.config(block_m=64, block_n=128, num_stages=4, persistent=True) not in space
    found = _neighbours(centre, choices, {c.key: c for c in space})
    assert sm90.config(block_m=64, block_n=128, num_stages=3, persistent=True) in found
    assert all(c in space for c in found) and len(found) == len(set(found))


def test_the_backward_space_comes_from_its_own_knob_table_and_sram_model():
    from flashgen.sram import estimate_backward_shared_bytes

    space = search_space(BUCKET, sram_budget=60_000, template="attn_bwd")
    backward_table = knob_table("attn_bwd")
    assert space and all(set(c.to_dict()) == set(backward_table.names) for c in space)
    assert all(estimate_backward_shared_bytes(BUCKET.variant, c) <= 60_000 for c in space)
    assert len(space) < len(list(backward_table.all_configs()))


def test_a_compile_worker_that_never_answers_is_given_up_on(monkeypatch):
    from concurrent.futures import Future

    from flashgen import tuner
    from flashgen.device import DeviceInfo

    class StuckPool:
        def submit(self, *args):
            return Future()  # never runs, never finishes

    monkeypatch.setattr(tuner, "COMPILE_WAIT_S", 0.05)
    info = DeviceInfo(name="fake GPU", capability=(9, 0), sm_count=1, max_shared_mem=None, interpreter=False)
    bucket = ShapeBucket.of(Variant(16, "fp32"), batch=1, heads_q=1, heads_kv=1, n_q=16, n_k=16)
    evaluator = tuner.ForwardEvaluator(bucket, "cpu", info=info, pool=StuckPool())
    config = table.config(block_m=16, block_n=16)
    evaluator.prepare([config])
    with pytest.warns(RuntimeWarning, match="gave no answer"):
        assert evaluator._compile_failure(config) is None  # the launch then compiles in the tuning process


def test_finalists_are_the_fastest_few_within_the_margin():
    result = BucketResult(bucket=BUCKET, space_size=9, times={"a": 1.00, "b": 1.05, "c": 1.09, "d": 1.095, "e": 1.5})
    assert finalists(result, count=3, margin=0.1) == ["a", "b", "c"]
    assert finalists(result, count=5, margin=0.1) == ["a", "b", "c", "d"]
    assert finalists(result, count=3, margin=0.02) == ["a"]


def test_the_final_round_takes_turns_and_keeps_medians_of_what_stayed_correct():
    order = []
    times = {"a": iter([1.0, 1.3, 1.2]), "b": iter([1.1, 1.1, 1.1]), "c": iter([0.9, None])}

    def measure(key):
        order.append(key)
        ms = next(times[key])
        return Outcome(median_ms=ms, error=1e-4) if ms is not None else Outcome(failure="wrong: relative error 1")

    final = final_round({key: (lambda key=key: measure(key)) for key in "abc"}, rounds=3)
    assert order == ["a", "b", "c", "a", "b", "c", "a", "b"]  # c failed in round 2 and is not measured again
    assert final == {"a": Outcome(median_ms=1.2, error=1e-4), "b": Outcome(median_ms=1.1, error=1e-4)}


def test_the_final_round_re_times_the_other_templates_winner_and_keeps_the_fastest_finalist(tmp_path, monkeypatch):
    from flashgen import tuning
    from flashgen.codegen import template_digest
    from flashgen.db import TunedEntry, TuningStore
    from flashgen.device import DeviceInfo, toolchain

    h100 = DeviceInfo("NVIDIA H100 80GB HBM3", (9, 0), 132, 232448, interpreter=False)
    sibling_config = knob_table("attn_fwd_sm90").config(block_m=192)
    store = TuningStore(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    # The other forward template's winner was stored with a lucky time; side by side it runs at 1.2 ms.
    store.put(TunedEntry(template="attn_fwd_sm90", template_digest=template_digest("attn_fwd_sm90"), device=h100,
                         toolchain=toolchain(), bucket=BUCKET, config=sibling_config, median_ms=0.95, tflops=1.0,
                         error=1e-3, trials=20, trials_to_best=3, tuning_seconds=9.0, source_sha256="a" * 64))

    class Clock:
        def __init__(self, template, times):
            self.template, self.times, self.prepared, self.closed = template, times, [], False

        def prepare(self, configs):
            self.prepared += [c.key for c in configs]

        def measure(self, config):
            return Outcome(median_ms=self.times[config.key], error=1e-4)

        def tflops(self, ms):
            return 1.0 / ms

        def close(self):
            self.closed = True

    fast, steady = table.config(block_m=128), table.config(block_m=64)
    ours = Clock("attn_fwd", {fast.key: 1.10, steady.key: 1.05})  # the search's best was a lucky 1.00
    theirs = Clock("attn_fwd_sm90", {sibling_config.key: 1.2})
    monkeypatch.setattr(tuning, "evaluator_for", lambda template, *args, **kwargs: theirs)
    result = BucketResult(bucket=BUCKET, space_size=2, times={fast.key: 1.00, steady.key: 1.02, "slow": 2.0},
                          best_config=fast, best=Outcome(median_ms=1.00))  # fmt: skip
    sibling = tuning.sibling_entry(store.entries(), "attn_fwd", BUCKET, h100)
    assert sibling is not None and sibling.config == sibling_config
    tuning._final_round(result, ours, sibling, store, h100, "cpu", None, rounds=3)
    assert result.best_config == steady and result.best.median_ms == 1.05
    assert result.final_times == {fast.key: 1.10, steady.key: 1.05, f"attn_fwd_sm90:{sibling_config.key}": 1.2}
    assert ours.prepared == [fast.key, steady.key] and theirs.prepared == [sibling_config.key] and theirs.closed
    (stored,) = store.entries()
    assert stored.template == "attn_fwd_sm90" and stored.median_ms == 1.2 and stored.config == sibling_config


def test_the_final_round_leaves_alone_a_bucket_with_no_close_race(tmp_path):
    from flashgen import tuning
    from flashgen.db import TuningStore
    from flashgen.device import DeviceInfo

    class Untouchable:
        template = "attn_fwd"

        def prepare(self, configs):
            raise AssertionError("nothing to compile")

        def measure(self, config):
            raise AssertionError("nothing to measure")

    h100 = DeviceInfo("NVIDIA H100 80GB HBM3", (9, 0), 132, 232448, interpreter=False)
    best = table.config(block_m=128)
    result = BucketResult(bucket=BUCKET, space_size=2, times={best.key: 1.0, table.config(block_m=64).key: 1.2},
                          best_config=best, best=Outcome(median_ms=1.0))  # fmt: skip
    store = TuningStore(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    tuning._final_round(result, Untouchable(), None, store, h100, "cpu", None, rounds=3)
    assert result.best_config == best and result.final_times == {}


def test_a_search_starts_from_the_buckets_own_winners_even_stale_ones_then_the_default():
    from datetime import datetime

    from flashgen.db import TunedEntry
    from flashgen.device import DeviceInfo, toolchain
    from flashgen.tuning import start_configs

    h100 = DeviceInfo("NVIDIA H100 80GB HBM3", (9, 0), 132, 232448, interpreter=False)
    h200 = DeviceInfo("NVIDIA H200", (9, 0), 132, 232448, interpreter=False)
    longer = ShapeBucket.of(BUCKET.variant, batch=1, heads_q=2, heads_kv=2, n_q=4 * BUCKET.n_q, n_k=4 * BUCKET.n_k)

    def entry(config, *, bucket=BUCKET, device=h100, digest="old", day=1):
        return TunedEntry(template="attn_fwd", template_digest=digest, device=device, toolchain=toolchain(),
                          bucket=bucket, config=config, median_ms=1.0, tflops=1.0, error=1e-3, trials=5,
                          trials_to_best=1, tuning_seconds=1.0, source_sha256="a" * 64,
                          created_at=datetime(2026, 11, day))  # fmt: skip

    default, older, newer, neighbour, elsewhere = (table.config(block_m=m, block_n=n) for m, n in
                                                   ((64, 64), (32, 32), (128, 32), (64, 32), (128, 64)))  # fmt: skip
    entries = [entry(neighbour, bucket=longer), entry(older, day=1), entry(elsewhere, device=h200),
               entry(newer, digest="newer", day=2), entry(default, bucket=longer)]
    assert start_configs(entries, "attn_fwd", BUCKET, h100, default) == [newer, older, default, neighbour]
    assert start_configs(entries, "attn_fwd_sm90", BUCKET, h100, default) == [default]
    # Only the two nearest other buckets lend their winners, nearest first: lengths 2x and 4x away, not 16x.
    near, nearer, far = (ShapeBucket.of(BUCKET.variant, batch=1, heads_q=8, heads_kv=8, n_q=f * BUCKET.n_q,
                                        n_k=f * BUCKET.n_k) for f in (4, 2, 16))  # fmt: skip
    lent = [table.config(block_m=m, block_n=n) for m, n in ((16, 16), (32, 16), (16, 32))]
    entries = [entry(lent[0], bucket=near), entry(lent[1], bucket=nearer), entry(lent[2], bucket=far)]
    assert start_configs(entries, "attn_fwd", BUCKET, h100, default) == [default, lent[1], lent[0]]


def test_a_winner_stored_before_a_knob_existed_starts_the_search_with_each_of_its_values():
    from dataclasses import replace
    from datetime import datetime

    from flashgen.db import TunedEntry
    from flashgen.device import DeviceInfo, toolchain
    from flashgen.spec import TileConfig
    from flashgen.tuning import start_configs

    sm90 = knob_table("attn_fwd_sm90")
    h100 = DeviceInfo("NVIDIA H100 80GB HBM3", (9, 0), 132, 232448, interpreter=False)
    longer = ShapeBucket.of(BUCKET.variant, batch=1, heads_q=2, heads_kv=2, n_q=4 * BUCKET.n_q, n_k=4 * BUCKET.n_k)

    def stored(bucket, **knobs):  # a winner of a template that had no `persistent` knob yet
        values = {k: v for k, v in sm90.config(**knobs).to_dict().items() if k != "persistent"}
        return TunedEntry(template="attn_fwd_sm90", template_digest="old", device=h100, toolchain=toolchain(),
                          bucket=bucket, config=TileConfig.from_dict(values), median_ms=1.0, tflops=1.0, error=1e-3,
                          trials=5, trials_to_best=1, tuning_seconds=1.0, source_sha256="a" * 64,
                          created_at=datetime(2026, 11, 1))  # fmt: skip

    gone = TileConfig.from_dict({**sm90.config(block_n=64).to_dict(), "num_stages": 9})  # a choice since dropped
    entries = [stored(BUCKET, block_n=64, pingpong=True), stored(longer, num_stages=2),
               stored(BUCKET, block_n=128), stored(longer, num_stages=4)]
    entries.append(replace(entries[0], config=gone))
    default = sm90.default_config()
    # The bucket's own winners with the new knob at its default (the kernel they were) and at each other value;
    # other buckets' winners at the default only; a config the template cannot express any more is dropped.
    assert start_configs(entries, "attn_fwd_sm90", BUCKET, h100, default) == [
        sm90.config(block_n=64, pingpong=True), sm90.config(block_n=64, pingpong=True, persistent=True),
        default, sm90.config(block_n=128, persistent=True),  # (that winner was the default config)
        sm90.config(num_stages=2), sm90.config(num_stages=4),
    ]  # fmt: skip


def test_an_added_knobs_values_that_a_stored_winner_cannot_take_are_skipped_not_the_winner():
    from flashgen.tuning import _as_knobs_now_stand

    sm90 = knob_table("attn_fwd_sm90")

    def stored(config):  # as stored before the template had a `pingpong` knob
        return TileConfig.from_dict({k: v for k, v in config.to_dict().items() if k != "pingpong"})

    # pingpong=True requires block_m 128 or 192: a 64-row winner keeps only the default, and is not dropped.
    lone = sm90.config(block_m=64, block_n=128, num_stages=3, persistent=True)
    assert _as_knobs_now_stand(sm90, stored(lone)) == [lone]
    pair = sm90.config(block_m=128, early_scores=True)
    assert _as_knobs_now_stand(sm90, stored(pair)) == [pair, sm90.config(block_m=128, early_scores=True, pingpong=True)]
