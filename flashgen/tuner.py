"""Search a template's tile configs for one shape bucket on this device (the only module that imports Optuna).

The search space is the template's knob table (``templates/<template>.toml``), optionally restricted by the
caller, minus configs whose tiles exceed the bucket's lengths and configs over the shared-memory budget:
those are removed before anything is compiled and never count as trials.

Optuna's ask/tell loop runs the search: the given start configs first (stored winners, the default, neighbouring
buckets' winners), then the neighbours of the best so far, then Optuna's TPE sampler (seeded) where the
neighbourhood is used up; with ``exhaustive``, every config of the pruned space in turn. Candidates are asked
a batch ahead and handed to :meth:`Evaluator.prepare`, which compiles them in worker processes while the GPU
measures the previous batch. Every candidate is checked against the
float64 reference on fresh random inputs before it is timed; one that fails to compile, runs out of
resources or computes a wrong result is a failed trial with the reason recorded, and the search goes on.

The evaluator (kernel and clock) is injected, so the search logic is tested without a GPU.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import optuna
import torch

from flashgen.device import DeviceInfo
from flashgen.launch import attention_backward, attention_forward, forward_launch
from flashgen.reference import reference_attention, reference_gradients, relative_error, tolerance
from flashgen.shapes import ShapeBucket
from flashgen.spec import (
    BACKWARD,
    BACKWARD_FUSED_SM90,
    BACKWARD_FUSED_TMA_SM90,
    BACKWARD_SM90,
    BACKWARD_TEMPLATES,
    FORWARD,
    FORWARD_SM90,
    TORCH_DTYPES,
    KnobValue,
    TileConfig,
    knob_table,
)
from flashgen.sram import fits
from flashgen.timing import attention_flops, median_ms

CHECK_ROWS = 128  # query rows compared with the float64 reference per candidate (the last rows: under a
# causal mask they see every key, so the unmasked and the diagonal loop are both checked)


@dataclass(frozen=True)
class Budget:
    """When a bucket's search stops: after ``trials`` measured configs, ``seconds`` of wall time, or
    ``patience`` measured configs in a row without a better one (None: no such limit)."""

    trials: int | None = 40
    seconds: float | None = None
    patience: int | None = 15

    def __post_init__(self) -> None:
        for name in ("trials", "seconds", "patience"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"Budget.{name} must be positive or None, got {value}")


@dataclass(frozen=True)
class Outcome:
    """What measuring one config gave: a time and an error, or the reason it failed."""

    median_ms: float | None = None
    error: float | None = None
    failure: str | None = None  # "compile: ...", "resources: ...", "wrong: ...", "run: ..."

    @property
    def ok(self) -> bool:
        return self.failure is None and self.median_ms is not None


class Evaluator(Protocol):
    def prepare(self, configs: Sequence[TileConfig]) -> None:
        """Start work on configs that will be measured soon (compiling them); may do nothing."""

    def measure(self, config: TileConfig) -> Outcome:
        """Check ``config`` against the reference, then time it."""


@dataclass
class TrialReport:
    bucket: ShapeBucket
    measured: int
    config: TileConfig
    outcome: Outcome
    best_config: TileConfig | None
    best_ms: float | None


@dataclass
class BucketResult:
    bucket: ShapeBucket
    space_size: int
    best_config: TileConfig | None = None
    best: Outcome | None = None
    measured: int = 0
    failed: int = 0
    trials_to_best: int = 0
    seconds: float = 0.0
    stopped_by: str = ""
    failures: list[tuple[str, str]] = field(default_factory=list)  # (config key, reason)
    times: dict[str, float] = field(default_factory=dict)  # config key -> median ms, of every correct config
    default_config: TileConfig | None = None  # set by the caller that chose it, for reporting
    template: str = FORWARD
    # The final round (flashgen.tuning): median ms of each finalist by config key, and of the fastest other
    # template's winner by "template:key"; empty when there was none.
    final_times: dict[str, float] = field(default_factory=dict)


def search_space(
    bucket: ShapeBucket,
    *,
    sram_budget: int | None,
    restrict: dict[str, list[KnobValue]] | None = None,
    template: str = FORWARD,
) -> list[TileConfig]:
    """The configs worth measuring for ``bucket``: the knob table's product, restricted to ``restrict``'s
    values, without tiles longer than the bucket's sequences (where a shorter one exists) or over the
    shared-memory budget."""
    table = knob_table(template)
    restrict = restrict or {}
    for name, values in restrict.items():
        knob = table[name]
        bad = [v for v in values if v not in knob.choices or type(v) is not type(knob.default)]
        if bad:
            raise ValueError(f"knob {name!r} cannot take {bad}; its choices are {list(knob.choices)}")
    # A tile longer than the sequence only computes padding, unless the template has no shorter one.
    longest_m = max(bucket.n_q, min(table["block_m"].choices))
    longest_n = max(bucket.n_k, min(table["block_n"].choices))
    space = []
    for config in table.all_configs():
        if any(config[name] not in values for name, values in restrict.items()):
            continue
        if config.block_m > longest_m or config.block_n > longest_n:
            continue
        if not fits(bucket.variant, config, sram_budget, template):
            continue
        space.append(config)
    return space


def study_name(device: DeviceInfo, bucket: ShapeBucket, template: str, template_digest: str, *, exhaustive: bool) -> str:
    return f"{device.key}/{template}/{template_digest}/{bucket.key}/{'exhaustive' if exhaustive else 'search'}"


def tune_bucket(
    bucket: ShapeBucket,
    evaluator: Evaluator,
    *,
    space: list[TileConfig],
    storage: optuna.storages.BaseStorage | str,
    name: str,
    budget: Budget = Budget(),
    exhaustive: bool = False,
    seed: int = 0,
    batch: int = 4,
    start_with: Sequence[TileConfig] = (),
    local_search: bool = True,
    on_trial: Callable[[TrialReport], None] | None = None,
    on_best: Callable[[BucketResult], None] | None = None,
) -> BucketResult:
    """Search ``space`` for the fastest correct config of ``bucket``; resumes the study ``name`` if it exists.

    ``start_with``: configs measured first (stored winners, the default config, winners of neighbouring buckets;
    before any is measured, the neighbourhood asked ahead is the first one's), so the
    search starts from what is known to be good rather than from random samples; they count as trials.
    ``local_search``: before the sampler is asked, measure the unmeasured neighbours of the best config so
    far (see :func:`_neighbours`): tile spaces are smooth near their optimum, and on the H200 the exhaustive
    winners were one or two such steps from the default. The sampler (TPE) takes over where the
    neighbourhood is used up.
    ``on_best`` runs each time a faster config is found (store it there: an interrupted search then loses
    nothing). ``exhaustive`` measures every config of the space and ignores the trial and patience limits.
    """
    if not space:
        raise ValueError(f"no config of the search space fits bucket {bucket.key}")
    knob_names = list(space[0].to_dict())
    choices = {n: sorted({c[n] for c in space}, key=lambda v: (str(type(v)), v)) for n in knob_names}
    in_space = {c.key: c for c in space}
    if exhaustive:
        # Every config of the space is enqueued below, in order; the sampler is never consulted.
        sampler: optuna.samplers.BaseSampler = optuna.samplers.RandomSampler(seed=seed)
        budget = Budget(trials=None, seconds=budget.seconds, patience=None)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True,
                                             n_startup_trials=min(10, max(1, len(space) // 4)))  # fmt: skip
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage, study_name=name, sampler=sampler, direction="minimize", load_if_exists=True)
    result = BucketResult(bucket=bucket, space_size=len(space))

    # Resume: what earlier runs of this study measured counts, and its best is the best so far.
    seen: dict[str, float | None] = {}
    since_best = 0
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        key = trial.user_attrs.get("config")
        if not trial.user_attrs.get("measured") or key is None:
            continue
        result.measured += 1
        seen[key] = trial.value if trial.state == optuna.trial.TrialState.COMPLETE else None
        if trial.state == optuna.trial.TrialState.COMPLETE:
            result.times[key] = trial.value
            if result.best is None or trial.value < result.best.median_ms:
                result.best_config = in_space.get(key) or TileConfig.from_dict(trial.user_attrs["config_values"])
                result.best = Outcome(median_ms=trial.value, error=trial.user_attrs.get("error"))
                result.trials_to_best = result.measured
                since_best = 0
            else:
                since_best += 1
        else:
            result.failed += 1
            since_best += 1

    waiting = optuna.trial.TrialState.WAITING
    # Enqueued trials keep their values in system_attrs["fixed_params"] until they are asked.
    queued = {
        TileConfig.from_dict(t.system_attrs["fixed_params"]).key
        for t in study.get_trials(deepcopy=False, states=(waiting,))
        if "fixed_params" in t.system_attrs
    }
    for config in list(start_with) + (space if exhaustive else []):
        if config.key in in_space and config.key not in seen and config.key not in queued:
            study.enqueue_trial(config.to_dict())
            queued.add(config.key)
    start = time.monotonic()
    queue_done = False

    def stop_reason() -> str | None:
        if budget.trials is not None and result.measured >= budget.trials:
            return "trials"
        if budget.seconds is not None and time.monotonic() - start >= budget.seconds:
            return "time"
        if budget.patience is not None and since_best >= budget.patience:
            return "patience"
        if len(seen) >= len(space):
            return "exhausted"
        return None

    def enqueue_neighbours() -> None:
        # Around the best so far; before anything is measured, around the first start config, so that the
        # first batches asked ahead are its neighbourhood rather than the sampler's random start.
        centre = result.best_config or next((c for c in start_with if c.key in in_space), None)
        if not local_search or exhaustive or centre is None:
            return
        for config in _neighbours(centre, choices, in_space):  # queued after what is already waiting
            if config.key not in seen and config.key not in queued:
                study.enqueue_trial(config.to_dict())
                queued.add(config.key)

    def ask_batch() -> list[tuple[optuna.trial.Trial, TileConfig]]:
        nonlocal queue_done
        enqueue_neighbours()
        asked: list[tuple[optuna.trial.Trial, TileConfig]] = []
        wanted = batch if budget.trials is None else min(batch, budget.trials - result.measured)
        skipped = 0
        while len(asked) < wanted and skipped < 200:
            if exhaustive and not study.get_trials(deepcopy=False, states=(waiting,)):
                queue_done = True
                break
            trial = study.ask()
            config = TileConfig.from_dict({n: trial.suggest_categorical(n, choices[n]) for n in knob_names})
            if config.key not in in_space:
                # Outside the pruned space (over the SRAM budget, or tiles longer than the sequences):
                # no compile, no trial counted; PRUNED steers the sampler away from it.
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                skipped += 1
            elif config.key in seen or any(config == c for _, c in asked):
                # Measured already: tell the sampler what it gave instead of measuring it again.
                known = seen.get(config.key)
                trial.set_user_attr("duplicate", True)
                if known is None:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                else:
                    study.tell(trial, known)
                skipped += 1
            else:
                asked.append((trial, config))
        return asked

    untold: dict[int, optuna.trial.Trial] = {}  # asked, not yet told: failed if we are interrupted

    def tell(trial: optuna.trial.Trial, value: float | None = None, state=None) -> None:
        untold.pop(trial.number, None)
        study.tell(trial, value, state=state)

    def ask_ahead() -> list[tuple[optuna.trial.Trial, TileConfig]]:
        asked = ask_batch()
        untold.update((trial.number, trial) for trial, _ in asked)
        evaluator.prepare([config for _, config in asked])
        return asked

    try:
        current = ask_ahead() if stop_reason() is None else []
        while current:
            upcoming_room = stop_reason() is None and (budget.trials is None or result.measured + len(current) < budget.trials)
            upcoming = ask_ahead() if upcoming_room else []  # compiles while the GPU measures `current`
            for trial, config in current:
                if stop_reason() is not None:
                    tell(trial, state=optuna.trial.TrialState.PRUNED)
                    continue
                outcome = evaluator.measure(config)
                result.measured += 1
                trial.set_user_attr("measured", True)
                trial.set_user_attr("config", config.key)
                trial.set_user_attr("config_values", config.to_dict())
                if outcome.error is not None and math.isfinite(outcome.error):
                    trial.set_user_attr("error", outcome.error)
                if outcome.ok:
                    seen[config.key] = result.times[config.key] = outcome.median_ms
                    tell(trial, outcome.median_ms)
                    if result.best is None or outcome.median_ms < result.best.median_ms:
                        result.best_config, result.best = config, outcome
                        result.trials_to_best = result.measured
                        since_best = 0
                        result.seconds = time.monotonic() - start
                        if on_best:
                            on_best(result)
                    else:
                        since_best += 1
                else:
                    seen[config.key] = None
                    result.failed += 1
                    result.failures.append((config.key, outcome.failure or "failed"))
                    trial.set_user_attr("failure", outcome.failure)
                    tell(trial, state=optuna.trial.TrialState.FAIL)
                    since_best += 1
                if on_trial:
                    on_trial(TrialReport(bucket, result.measured, config, outcome, result.best_config,
                                         result.best.median_ms if result.best else None))  # fmt: skip
            current = upcoming
    finally:
        for trial in list(untold.values()):  # asked but never measured (interrupted): leave none running
            tell(trial, state=optuna.trial.TrialState.FAIL)
    result.seconds = time.monotonic() - start
    result.stopped_by = stop_reason() or ("exhausted" if queue_done else "converged")
    return result


FINAL_MARGIN = 0.1  # the final round re-times configs within 10% of the search's best (flashgen.tuning)


def finalists(result: BucketResult, *, count: int = 3, margin: float = FINAL_MARGIN) -> list[str]:
    """Keys of the fastest configs a search measured: at most ``count``, each within ``margin`` (a fraction) of
    the best time."""
    ranked = sorted(result.times.items(), key=lambda item: item[1])
    return [key for key, ms in ranked[:count] if ms <= ranked[0][1] * (1 + margin)]


def final_round(candidates: dict[str, Callable[[], Outcome]], rounds: int) -> dict[str, Outcome]:
    """Measure every candidate ``rounds`` times, taking turns (a, b, c, a, b, c, ...), and return each one's
    median time; a candidate that fails in any round is left out.

    A search times each config once, and one timing can be off by more than the gap between the best configs:
    on an H100 the backward's m32 and m64 tiles (D=64, 4k tokens) timed 3.522 and 3.523 ms in a search, and
    359 against 408 TFLOP/s side by side afterwards (2026-11-22). Taking turns spreads the machine's drift over
    every candidate alike.
    """
    samples: dict[str, list[float]] = {key: [] for key in candidates}
    last: dict[str, Outcome] = {}
    for _ in range(rounds):
        for key, measure in candidates.items():
            if key not in samples:
                continue  # failed in an earlier round
            outcome = measure()
            if not outcome.ok:
                del samples[key]
                continue
            samples[key].append(outcome.median_ms)
            last[key] = outcome
    return {key: Outcome(median_ms=statistics.median(times), error=last[key].error)
            for key, times in samples.items() if times}  # fmt: skip


def _neighbours(config: TileConfig, choices: dict[str, list[KnobValue]],
                in_space: Mapping[str, TileConfig]) -> list[TileConfig]:  # fmt: skip
    """Configs of the space (``in_space``, by key) one step from ``config``: one knob moved to the adjacent value
    of its (sorted) choices; and block_m and num_warps moved together, which keeps the rows per warp. They are
    coupled on Hopper, where a warpgroup of 4 warps serves 64 query rows: on the H200, m64-n64-w4-s3 beat the
    default m128-n64-w8-s3 by 12% on short causal sequences while m64 with 8 warps was slower than both, so single
    steps never got there. A move the shared-memory budget pruned takes the deepest shallower ring that fits:
    attn_fwd_sm90's 64-row tiles run two programs an SM, so m128-n128-s4 is next to m64-n128-s3, not m64-n128-s4."""
    return [fitting for moved in _moves(config, choices) if (fitting := _into_space(moved, choices, in_space))]


def _into_space(config: TileConfig, choices: dict[str, list[KnobValue]],
                in_space: Mapping[str, TileConfig]) -> TileConfig | None:  # fmt: skip
    """``config`` if it is in the space, else the same with the deepest shallower ring that is, else None."""
    if config.key in in_space:
        return config
    for stages in sorted((s for s in choices.get("num_stages", []) if s < config.num_stages), reverse=True):
        shallower = TileConfig.from_dict({**config.to_dict(), "num_stages": stages})
        if shallower.key in in_space:
            return shallower
    return None


def _moves(config: TileConfig, choices: dict[str, list[KnobValue]]) -> list[TileConfig]:
    """Configs one step from ``config`` (see :func:`_neighbours`), in or out of the space."""
    values = config.to_dict()
    found = []

    def step(name: str, direction: int) -> KnobValue | None:
        options = choices.get(name, [])
        if values.get(name) not in options:
            return None
        at = options.index(values[name]) + direction
        return options[at] if 0 <= at < len(options) else None

    for name in choices:
        for direction in (-1, 1):
            moved = step(name, direction)
            if moved is not None:
                found.append(TileConfig.from_dict({**values, name: moved}))
    for direction in (-1, 1):
        block_m, num_warps = step("block_m", direction), step("num_warps", direction)
        if block_m is not None and num_warps is not None:
            found.append(TileConfig.from_dict({**values, "block_m": block_m, "num_warps": num_warps}))
    return found


def _compile_in_worker(template: str, variant_dict: dict, config_dict: dict, shape: tuple[int, int, int, int, int]) -> str | None:
    """Run in a worker process: compile one template's kernels into Triton's on-disk cache. Returns a
    failure or None."""
    from flashgen.launch import compile_backward, compile_forward
    from flashgen.spec import BACKWARD_TEMPLATES, TileConfig, Variant

    variant, config = Variant.from_dict(variant_dict), TileConfig.from_dict(config_dict)
    try:
        if template in BACKWARD_TEMPLATES:
            compile_backward(variant, config, shape=shape)
        else:
            compile_forward(variant, config, shape=shape, template=template)
    except Exception as exc:  # reported as the trial's failure; the search goes on
        return _failure(exc)
    return None


def _failure(exc: BaseException) -> str:
    name = type(exc).__name__
    kind = "resources" if name == "OutOfResources" else "compile" if "Compil" in name else "run"
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return f"{kind}: {name}: {first}"


COMPILE_WAIT_S = 300.0  # longest wait for a compile worker's answer: a real compile takes seconds


class KernelEvaluator:
    """Measures configs of one template's kernels for one bucket on one device (a GPU, or the interpreter).

    Timing inputs are fresh normal tensors at the bucket's representative shape, rotated among enough
    copies that together they exceed twice the L2 cache; each candidate is first checked on new random
    values of the first copy. In the interpreter times are wall clock and mean nothing for a GPU.
    Subclasses say what is run and how it is checked: :class:`ForwardEvaluator`, :class:`BackwardEvaluator`.
    """

    template = FORWARD

    def __init__(self, bucket: ShapeBucket, device: torch.device | str, *, info: DeviceInfo,
                 pool: ProcessPoolExecutor | None = None,
                 timer: Callable[[Callable[[], object]], float] | None = None) -> None:  # fmt: skip
        self.bucket = bucket
        self.variant = bucket.variant
        self.device = torch.device(device)
        self.info = info
        self.shape = bucket.representative()
        self.timer = timer or (median_ms if not info.interpreter else _wall_ms)
        batch, heads_q, heads_kv, n_q, n_k = self.shape
        self.dtype = TORCH_DTYPES[self.variant.dtype]
        self.q_shape = (batch, heads_q, n_q, self.variant.head_dim)
        self.kv_shape = (batch, heads_kv, n_k, self.variant.head_dim)
        set_bytes = (2 * math.prod(self.q_shape) + 2 * math.prod(self.kv_shape)) * self.variant.element_size
        l2 = torch.cuda.get_device_properties(self.device).L2_cache_size if self.device.type == "cuda" else 0
        copies = min(16, max(1, math.ceil(2 * l2 / set_bytes)))
        self.inputs = [
            tuple(torch.randn(s, dtype=self.dtype, device=self.device) for s in (self.q_shape, self.kv_shape, self.kv_shape))
            for _ in range(copies)
        ]
        self.scale = 1.0 / math.sqrt(self.variant.head_dim)
        self.causal_offset = 0  # the representative shape is square: both alignments coincide
        self.flops = attention_flops(batch, heads_q, n_q, n_k, self.variant.head_dim, causal=self.variant.causal,
                                     backward=self.template in BACKWARD_TEMPLATES)  # fmt: skip
        self._pool = None if info.interpreter else pool
        self._pending: dict[str, Future] = {}

    def prepare(self, configs: Sequence[TileConfig]) -> None:
        if self._pool is None:
            return
        for config in configs:
            if config.key not in self._pending:
                self._pending[config.key] = self._pool.submit(
                    _compile_in_worker, self.template, self.variant.to_dict(), config.to_dict(), self.shape
                )

    def _compile_failure(self, config: TileConfig) -> str | None:
        pending = self._pending.pop(config.key, None)
        if pending is None:
            return None
        try:
            return pending.result(timeout=COMPILE_WAIT_S)
        except TimeoutError:
            # A worker that has not answered in minutes is stuck, not slow (2026-11-22, H100: a backward
            # tune hung at one bucket with every worker idle): give up on it, the launch compiles here.
            warnings.warn(f"compile worker gave no answer for {config.key} in {COMPILE_WAIT_S:.0f} s; compiling in "
                          "the tuning process instead", RuntimeWarning, stacklevel=2)  # fmt: skip
            return None
        except Exception:  # the worker process died: the first launch compiles here instead
            return None

    def _check_rows(self) -> tuple[slice, int | None]:
        """The query rows checked against the reference (the last ones: under a causal mask they see every
        key) and the causal offset that slice needs."""
        n_q = self.q_shape[2]
        rows = slice(max(0, n_q - CHECK_ROWS), n_q)
        return rows, (self.causal_offset + rows.start if self.variant.causal else None)

    def _time(self, config: TileConfig, error: float, run: Callable[[int], object]) -> Outcome:
        """Median time of ``run(i)`` over the rotating input copies."""
        turn = iter(range(1 << 62))
        try:
            return Outcome(median_ms=self.timer(lambda: run(next(turn) % len(self.inputs))), error=error)
        except Exception as exc:
            return Outcome(error=error, failure=_failure(exc))

    def measure(self, config: TileConfig) -> Outcome:
        raise NotImplementedError

    def tflops(self, ms: float) -> float:
        return self.flops / (ms * 1e-3) / 1e12

    def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()


class ForwardEvaluator(KernelEvaluator):
    """The forward kernel of attn_fwd: its output rows checked against the float64 reference, then timed."""

    template = FORWARD

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._launches: dict[TileConfig, object] = {}

    def _forward(self, config: TileConfig, q, k, v):
        # One launch object per config, made before timing, as a call of flashgen.attention has its plan's:
        # the time is the kernel's and the per-call host work, not the set-up.
        launch = self._launches.get(config)
        if launch is None:
            launch = self._launches[config] = forward_launch(self.template, self.variant, config, q.shape, k.shape,
                                                             self.causal_offset)  # fmt: skip
        return launch(q, k, v, self.scale)

    def measure(self, config: TileConfig) -> Outcome:
        failure = self._compile_failure(config)
        if failure:
            return Outcome(failure=failure)
        q, k, v = self.inputs[0]
        for tensor in (q, k, v):
            tensor.normal_()  # fresh values for the check: the config must be right on any input
        try:
            out, _ = self._forward(config, q, k, v)
        except Exception as exc:
            return Outcome(failure=_failure(exc))
        rows, offset = self._check_rows()
        ref, _ = reference_attention(q[:, :, rows], k, v, causal_offset=offset)
        same_dtype, _ = reference_attention(q[:, :, rows], k, v, causal_offset=offset, compute_dtype=self.dtype)
        error = relative_error(out[:, :, rows], ref)
        limit = tolerance(self.dtype, relative_error(same_dtype, ref))
        if not error <= limit:  # NaN fails too
            return Outcome(error=error, failure=f"wrong: relative error {error:.3g} > tolerance {limit:.3g}")
        return self._time(config, error, lambda i: self._forward(config, *self.inputs[i]))


class Sm90ForwardEvaluator(ForwardEvaluator):
    """The Hopper forward, attn_fwd_sm90: checked and timed as attn_fwd is, so their times compare."""

    template = FORWARD_SM90


class BackwardEvaluator(KernelEvaluator):
    """The backward kernels. The forward runs once per input copy with the default forward config; each
    candidate's dQ rows are checked against the float64 reference (rows are independent, so a slice is
    exact), and its dK and dV, which need every row, against the default backward config's on the same
    inputs (that config is itself checked against the reference by the tests)."""

    template = BACKWARD

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from flashgen.defaults import default_backward_config, default_config

        self.forward_config = default_config(self.variant, self.info)
        self.reference_config = default_backward_config(self.variant, self.info)
        self.grads = [torch.randn(self.q_shape, dtype=self.dtype, device=self.device) for _ in self.inputs]
        self.saved = [self._forward(*inputs) for inputs in self.inputs]

    def _forward(self, q, k, v):
        return attention_forward(q, k, v, variant=self.variant, config=self.forward_config, scale=self.scale,
                                 causal_offset=self.causal_offset)  # fmt: skip

    def _backward(self, config: TileConfig, i: int):
        (q, k, v), (out, lse) = self.inputs[i], self.saved[i]
        return attention_backward(self.grads[i], q, k, v, out, lse, variant=self.variant, config=config,
                                  scale=self.scale, causal_offset=self.causal_offset)  # fmt: skip

    def measure(self, config: TileConfig) -> Outcome:
        failure = self._compile_failure(config)
        if failure:
            return Outcome(failure=failure)
        for tensor in (*self.inputs[0], self.grads[0]):
            tensor.normal_()  # fresh values for the check
        self.saved[0] = self._forward(*self.inputs[0])
        try:
            dq, dk, dv = self._backward(config, 0)
        except Exception as exc:
            return Outcome(failure=_failure(exc))
        (q, k, v), grad = self.inputs[0], self.grads[0]
        rows, offset = self._check_rows()
        exact = reference_gradients(q[:, :, rows], k, v, grad[:, :, rows], causal_offset=offset)[0]
        plain = reference_gradients(q[:, :, rows], k, v, grad[:, :, rows], causal_offset=offset, compute_dtype=self.dtype)[0]
        error = relative_error(dq[:, :, rows], exact)
        limit = tolerance(self.dtype, relative_error(plain, exact))
        if not error <= limit:
            return Outcome(error=error, failure=f"wrong: dq relative error {error:.3g} > tolerance {limit:.3g}")
        if config != self.reference_config:
            _, ref_dk, ref_dv = self._backward(self.reference_config, 0)
            for name, ours, theirs in (("dk", dk, ref_dk), ("dv", dv, ref_dv)):
                gap = relative_error(ours, theirs)
                if not gap <= limit:
                    return Outcome(error=error, failure=f"wrong: {name} differs from the default config's by {gap:.3g}")
        return self._time(config, error, lambda i: self._backward(config, i))


class Sm90BackwardEvaluator(BackwardEvaluator):
    """The Hopper backward, attn_bwd_sm90: checked against the same references and timed as attn_bwd is, so
    their times compare."""

    template = BACKWARD_SM90


class FusedSm90BackwardEvaluator(BackwardEvaluator):
    """Hopper's fused backward, attn_bwd_fused_sm90: checked and timed as attn_bwd is (its time includes the rows
    kernel and dQ's cast), so their times compare."""

    template = BACKWARD_FUSED_SM90


class FusedTmaSm90BackwardEvaluator(BackwardEvaluator):
    """Hopper's fused backward in FlashAttention-3's layout, attn_bwd_fused_tma_sm90: checked and timed as attn_bwd
    is."""

    template = BACKWARD_FUSED_TMA_SM90


def evaluator_for(template: str, bucket: ShapeBucket, device: torch.device | str, **kwargs) -> KernelEvaluator:
    evaluators = {FORWARD: ForwardEvaluator, FORWARD_SM90: Sm90ForwardEvaluator, BACKWARD: BackwardEvaluator,
                  BACKWARD_SM90: Sm90BackwardEvaluator, BACKWARD_FUSED_SM90: FusedSm90BackwardEvaluator,
                  BACKWARD_FUSED_TMA_SM90: FusedTmaSm90BackwardEvaluator}  # fmt: skip
    return evaluators[template](bucket, device, **kwargs)


def compile_pool(workers: int) -> ProcessPoolExecutor | None:
    """Processes that compile candidates into Triton's on-disk cache while the GPU measures (spawned:
    CUDA does not survive a fork). None for no workers."""
    if workers <= 0:
        return None
    import multiprocessing

    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_ignore_sigint)


def _ignore_sigint() -> None:
    # Ctrl-C (or `timeout -s INT`) reaches the whole process group: the tuner stops its workers itself, and
    # workers dying of KeyboardInterrupt would only print a traceback each.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _wall_ms(fn: Callable[[], object], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]
