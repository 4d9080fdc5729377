"""Pick the tile config a call runs with: tuned for this GPU and shape bucket, else the nearest tuned bucket,
else the default heuristic.

The tuned entries come from an in-memory index built once per device, on first use: the shipped caches in
``tuning_db/*.json`` for this GPU model, overlaid by the user's tuning database (``FLASHGEN_DB``, else the
default SQLite file), whose entries win for the same bucket. Only entries made by the current templates and
the running Triton version are used. A broken, locked, foreign or missing database or cache file never
breaks a model: it is skipped with one warning and the rest (shipped caches, defaults) is used.

Lookup order for a (template, bucket):
1. ``tuned``: an entry for exactly this bucket.
2. ``nearest``: the tuned bucket of the same variant closest in log2 of the lengths and of batch*heads
   (distance |dlog2 Nq| + |dlog2 Nk| + |dlog2 (B*H)| / 2, plus 1 if the GQA group differs; ties go to the
   larger bucket), so a shape between tuned ones borrows its neighbour's tiles.
3. ``default``: :mod:`flashgen.defaults`' heuristic.

The forward has two templates: attn_fwd (Triton, every GPU) and attn_fwd_sm90 (Gluon, Hopper; fp16/bf16, head
dim 64 or 128, no dropout). The backward has four: attn_bwd (Triton), attn_bwd_sm90 (a Gluon dQ kernel before
attn_bwd's dK/dV kernel; the same limits), attn_bwd_fused_sm90 (one Gluon kernel, head dim 64 only, dQ summed
atomically) and attn_bwd_fused_tma_sm90 (one Gluon kernel, head dim 64 or 128, dQ summed by TMA reduce-adds); the
fused two are never picked when deterministic gradients are asked for. Where several can run, each is looked up
as above and the best answer wins: an exact entry over a borrowed one, a nearer borrowed bucket over a farther
one, then the faster tuned time (all are timed by the same evaluator on the same shapes, and where they are within
10% the tuner's final round times them side by side); with none tuned, the Triton default.

Decisions are memoised per (template, variant, bucket), so the runtime cost after the first call of a shape
is a dictionary lookup. ``FLASHGEN_LOG=1`` logs each decision when it is first made (logger
``flashgen.dispatch``, to stderr).

Opt-in online tuning: with ``FLASHGEN_AUTOTUNE=1`` on a GPU, a bucket with no entry of its own is tuned on
its first use (``FLASHGEN_AUTOTUNE_TRIALS`` measured configs, default 12, and at most
``FLASHGEN_AUTOTUNE_SECONDS``, default 60), stored in the user's database and used from then on. The first
call of such a shape waits for the tuning; a failure warns once and leaves the call on its previous choice.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from flashgen.defaults import default_for
from flashgen.device import DeviceInfo, toolchain
from flashgen.entries import TunedEntry
from flashgen.resources import default_database_url, tuning_db_dir
from flashgen.shapes import ShapeBucket, bucket_distance
from flashgen.spec import (
    BACKWARD,
    BACKWARD_TEMPLATES,
    FORWARD_TEMPLATES,
    TEMPLATES,
    TileConfig,
    Variant,
    backward_template_of,
    forward_template_of,
    knob_table,
)

def env_flag(name: str) -> bool:
    """An on/off environment variable: unset, empty, 0, false, no and off are off."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


log = logging.getLogger("flashgen.dispatch")
if env_flag("FLASHGEN_LOG"):
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("flashgen: %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)

DATABASE_TIMEOUT_MS = 2000  # the longest a locked database may delay the first call of a model


class FlashgenWarning(UserWarning):
    """flashgen fell back to something slower or skipped a tuning source; the message says why."""


_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Warn with ``message`` the first time it is seen in this process (and log it). Silent while
    torch.compile traces, which supports neither warnings nor logging calls in a full graph."""
    if torch.compiler.is_compiling():
        return
    if message not in _warned:
        _warned.add(message)
        log.info("warning: %s", message)
        warnings.warn(message, FlashgenWarning, stacklevel=3)


@dataclass(frozen=True)
class Choice:
    """The config one kernel runs with and why.

    kind: "requested" (the caller's config), "tuned" (an entry for this bucket), "nearest" (the entry of
    ``tuned_bucket``) or "default" (the heuristic). source: where the entry came from.
    """

    template: str
    bucket: ShapeBucket
    config: TileConfig
    kind: str
    source: str
    tuned_bucket: ShapeBucket | None = None
    tuned_ms: float | None = None

    def describe(self) -> str:
        text = f"{self.template} {self.config.key}: {self.kind}"
        if self.kind == "tuned":
            text += f" for {self.bucket.key} ({self.tuned_ms:.4g} ms when tuned; {self.source})"
        elif self.kind == "nearest":
            text += (f" (no entry for {self.bucket.key}; borrowed from the nearest tuned bucket "
                     f"{self.tuned_bucket.key}, {self.source})")  # fmt: skip
        else:
            text += f" ({self.source}) for {self.bucket.key}"
        return text


@dataclass(frozen=True)
class _Tuned:
    entry: TunedEntry
    source: str


class DispatchIndex:
    """The usable tuned entries for one device, by (template, bucket) and by (template, variant)."""

    def __init__(self, device: DeviceInfo, sources: list[tuple[str, list[TunedEntry]]]) -> None:
        from flashgen.codegen import template_digest

        self.device = device
        self.exact: dict[tuple[str, ShapeBucket], _Tuned] = {}
        triton_version = toolchain()["triton"]
        digests = {template: template_digest(template) for template in TEMPLATES}
        for source, entries in sources:  # later sources overlay earlier ones
            for entry in entries:
                usable = (entry.device.key == device.key and entry.template in digests
                          and not entry.is_stale(digests[entry.template], triton_version))  # fmt: skip
                if usable:
                    self.exact[(entry.template, entry.bucket)] = _Tuned(entry, source)
        self.by_variant: dict[tuple[str, Variant], list[ShapeBucket]] = {}
        for template, bucket in self.exact:
            self.by_variant.setdefault((template, bucket.variant), []).append(bucket)

    def __len__(self) -> int:
        return len(self.exact)

    def lookup(self, template: str, bucket: ShapeBucket) -> tuple[str, _Tuned] | None:
        """("tuned" | "nearest", the entry) or None."""
        found = self.exact.get((template, bucket))
        if found is not None:
            return "tuned", found
        candidates = self.by_variant.get((template, bucket.variant))
        if not candidates:
            return None
        nearest = min(candidates, key=lambda other: (bucket_distance(bucket, other), -other.n_q, -other.n_k,
                                                     -other.batch_heads, other.key))  # fmt: skip
        return "nearest", self.exact[(template, nearest)]


def _shipped_sources() -> list[tuple[str, list[TunedEntry]]]:
    from flashgen.caches import CacheError, read

    sources = []
    try:
        paths = sorted(tuning_db_dir().glob("*.json"))
    except FileNotFoundError as exc:
        warn_once(f"no shipped tuning caches: {exc}")
        return sources
    for path in paths:
        try:
            sources.append((f"shipped cache {path.name}", read(path)))
        except CacheError as exc:
            warn_once(f"skipping shipped tuning cache: {exc}")
    return sources


def _database_source() -> tuple[str, list[TunedEntry]] | None:
    url = default_database_url()
    explicit = bool(os.environ.get("FLASHGEN_DB"))
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        path = Path(url[len("sqlite:///"):])
        if not path.is_file():
            if explicit and not env_flag("FLASHGEN_AUTOTUNE"):  # (autotuning creates it)
                warn_once(f"FLASHGEN_DB names {path}, which does not exist: using shipped caches and defaults")
            return None  # no user database yet: nothing tuned here
    try:
        from flashgen.db.store import StoreError, TuningStore
    except ImportError as exc:
        warn_once(f"cannot read the tuning database {url} ({exc}): using shipped caches and defaults")
        return None
    try:
        store = TuningStore(url, readonly=True, busy_timeout_ms=DATABASE_TIMEOUT_MS)
        try:
            return f"database {url}", store.entries()
        finally:
            store.engine.dispose()
    except (StoreError, ValueError, TypeError, KeyError) as exc:
        warn_once(f"ignoring the tuning database {url}: {exc}; using shipped caches and defaults")
        return None


_indexes: dict[DeviceInfo, DispatchIndex] = {}
_choices: dict[tuple, Choice] = {}
_lock = threading.Lock()


def index_for(device: DeviceInfo) -> DispatchIndex:
    """The device's index, built on first use (shipped caches, then the user's database over them)."""
    index = _indexes.get(device)
    if index is None:
        with _lock:
            index = _indexes.get(device)
            if index is None:
                sources = [] if device.interpreter else _shipped_sources()
                database = _database_source()
                if database is not None:
                    sources.append(database)
                index = DispatchIndex(device, sources)
                log.info("dispatch index for %s: %d tuned entries from %s", device.key, len(index),
                         ", ".join(name for name, _ in sources) or "no source")  # fmt: skip
                _indexes[device] = index
    return index


def reload() -> None:
    """Forget the indexes and decisions: the next call reads the caches and the database again (after a
    ``flashgen tune`` in the same process, say)."""
    with _lock:
        _indexes.clear()
        _choices.clear()


def choose(template: str, bucket: ShapeBucket, device: DeviceInfo, requested: TileConfig | None = None) -> Choice:
    """The config for ``template`` on ``bucket`` (memoised; see the module docstring for the order)."""
    if requested is not None:
        return Choice(template, bucket, requested, "requested", "the caller's config")
    key = (template, bucket, device)
    choice = _choices.get(key)
    if choice is None:
        choice = _decide(template, bucket, device)
        _choices[key] = choice
        log.info("%s", choice.describe())
    return choice


def _decide(template: str, bucket: ShapeBucket, device: DeviceInfo) -> Choice:
    found = index_for(device).lookup(template, bucket)
    if (found is None or found[0] != "tuned") and _autotune(template, bucket, device):
        found = index_for(device).lookup(template, bucket)
    if found is not None:
        kind, tuned = found
        entry = tuned.entry
        return Choice(template, bucket, entry.config, kind, tuned.source,
                      tuned_bucket=entry.bucket, tuned_ms=entry.median_ms)  # fmt: skip
    return Choice(template, bucket, default_for(template, bucket.variant, device), "default", "the default heuristic")


def _env_number(name: str, default: float, kind: type) -> float:
    text = os.environ.get(name, "").strip()
    try:
        value = kind(text) if text else default
    except ValueError:
        value = 0
    if value <= 0:
        warn_once(f"{name}={text!r} is not a positive number: using {default}")
        return default
    return value


_autotuned: set[tuple[str, ShapeBucket, DeviceInfo]] = set()


def _autotune(template: str, bucket: ShapeBucket, device: DeviceInfo) -> bool:
    """Tune ``bucket`` now if ``FLASHGEN_AUTOTUNE`` asks for it (once per process and bucket); True when an
    entry was stored and the index rebuilt."""
    if not env_flag("FLASHGEN_AUTOTUNE") or (template, bucket, device) in _autotuned:
        return False
    _autotuned.add((template, bucket, device))
    trials = int(_env_number("FLASHGEN_AUTOTUNE_TRIALS", 12, int))
    seconds = _env_number("FLASHGEN_AUTOTUNE_SECONDS", 60.0, float)
    log.info("autotuning %s %s (%d trials, %.0f s at most)", template, bucket.key, trials, seconds)
    try:
        from flashgen.db.store import TuningStore
        from flashgen.tuner import Budget
        from flashgen.tuning import TuneOptions, tune_buckets

        store = TuningStore()
        options = TuneOptions(template=template, budget=Budget(trials=trials, seconds=seconds, patience=trials),
                              compile_workers=0)  # fmt: skip
        results = tune_buckets([bucket], store, options)
    except Exception as exc:  # a model must keep running: report and carry on with what we had
        warn_once(f"FLASHGEN_AUTOTUNE could not tune {template} {bucket.key}: {type(exc).__name__}: {exc}")
        return False
    if not results or results[0].best_config is None:
        warn_once(f"FLASHGEN_AUTOTUNE found no valid config for {template} {bucket.key}")
        return False
    with _lock:
        _indexes.pop(device, None)
    return True


_CHOICE_KINDS = ("requested", "tuned", "nearest", "default")


def _preference(choice: Choice, templates: tuple[str, ...]) -> tuple:
    """Sort key of one direction's choices, best first (see the module docstring)."""
    distance = bucket_distance(choice.bucket, choice.tuned_bucket) if choice.kind == "nearest" else 0.0
    median = choice.tuned_ms if choice.tuned_ms is not None else math.inf
    return _CHOICE_KINDS.index(choice.kind), distance, median, templates.index(choice.template)


def _best_choice(templates: tuple[str, ...], template_of, bucket: ShapeBucket, device: DeviceInfo,
                 requested: TileConfig | None) -> Choice:  # fmt: skip
    if requested is not None:
        template = template_of(requested)
        reason = knob_table(template).refusal(bucket.variant, device)
        if reason is not None:
            raise ValueError(f"config {requested.key} is of {template}, which cannot run {reason}")
        return choose(template, bucket, device, requested)
    choices = [choose(template, bucket, device) for template in templates
               if knob_table(template).refusal(bucket.variant, device) is None]  # fmt: skip
    return min(choices, key=lambda choice: _preference(choice, templates))


def forward_choice(bucket: ShapeBucket, device: DeviceInfo, requested: TileConfig | None = None) -> Choice:
    """The forward choice among the forward templates that can run ``bucket`` on ``device``; a requested
    config runs with its own template (ValueError if that template cannot run the call)."""
    return _best_choice(FORWARD_TEMPLATES, forward_template_of, bucket, device, requested)


def backward_choice(
    bucket: ShapeBucket, device: DeviceInfo, requested: TileConfig | None = None, *, deterministic: bool = False
) -> Choice:
    """The backward choice among the backward templates that can run ``bucket`` on ``device``, as
    :func:`forward_choice` picks; with ``deterministic``, only among the templates whose gradients can be
    bit-reproducible (not attn_bwd_fused_sm90), and a picked attn_bwd config is switched to the separate dQ
    kernel (no atomics; attn_bwd_sm90 has none). A requested config is used as it is (``flashgen.attention``
    refuses an atomic one when deterministic gradients are asked for)."""
    templates = BACKWARD_TEMPLATES
    if deterministic and requested is None:
        templates = tuple(t for t in templates if knob_table(t).supports.deterministic)
    choice = _best_choice(templates, backward_template_of, bucket, device, requested)
    if deterministic and requested is None and choice.template == BACKWARD and choice.config["atomic_dq"]:
        choice = replace(choice, config=_without_atomics(choice.config))
    return choice


def _without_atomics(config: TileConfig) -> TileConfig:
    return TileConfig.from_dict({**config.to_dict(), "atomic_dq": False})
