"""Tuning caches as text: export the database to JSON, import JSON back (a shipped cache is the same file).

An imported file is data from elsewhere. Every field is validated against the spec and the knob tables;
anything malformed or hostile (not JSON, NaN, duplicate keys, unknown fields, wrong types, out-of-range
values, a file over :data:`MAX_BYTES`) rejects the whole file with a :class:`CacheError` that says where and
why. Nothing from the file is executed: the kernel source of each entry is regenerated from flashgen's own
templates, and an entry from the current templates whose stored hash differs from the regenerated one is
rejected. Entries from other template digests or Triton versions are kept but are stale (never used). A stale
entry's config names its own template version's knobs (a knob added since is missing), so it is checked for
plain values and short knob names instead of against the current knob table.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from flashgen.codegen import render, template_digest
from flashgen.entries import TunedEntry
from flashgen.device import DeviceInfo
from flashgen.shapes import ShapeBucket
from flashgen.spec import TileConfig, knob_table

FORMAT = "flashgen-tuning-cache"
FORMAT_VERSION = 1
MAX_BYTES = 16 * 1024 * 1024
MAX_ENTRIES = 100_000
MAX_STALE_KNOBS = 16  # template knobs of a config from another template version (no template has half as many)
_HEX = re.compile(r"[0-9a-f]+")
_KNOB_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
_ENTRY_FIELDS = {
    "template", "template_digest", "device", "toolchain", "bucket", "config", "median_ms", "tflops", "error",
    "trials", "trials_to_best", "tuning_seconds", "source_sha256", "created_at",
}  # fmt: skip
_DEVICE_FIELDS = {"name", "capability", "sm_count", "max_shared_mem", "interpreter"}
_TOOLCHAIN_FIELDS = {"flashgen", "triton", "torch", "cuda"}


class CacheError(ValueError):
    """A cache file that cannot be imported; the message names the file, the entry and the field."""


def entry_to_dict(entry: TunedEntry) -> dict[str, Any]:
    device = entry.device
    return {
        "template": entry.template,
        "template_digest": entry.template_digest,
        "device": {"name": device.name, "capability": list(device.capability) if device.capability else None,
                   "sm_count": device.sm_count, "max_shared_mem": device.max_shared_mem,
                   "interpreter": device.interpreter},  # fmt: skip
        "toolchain": dict(entry.toolchain),
        "bucket": entry.bucket.to_dict(),
        "config": entry.config.to_dict(),
        "median_ms": entry.median_ms,
        "tflops": entry.tflops,
        "error": entry.error,
        "trials": entry.trials,
        "trials_to_best": entry.trials_to_best,
        "tuning_seconds": entry.tuning_seconds,
        "source_sha256": entry.source_sha256,
        "created_at": entry.created_at.isoformat(),
    }


def dumps(entries: list[TunedEntry]) -> str:
    """The cache file's text: sorted keys and one entry per key order, so a diff shows what changed."""
    body = {"format": FORMAT, "version": FORMAT_VERSION,
            "entries": [entry_to_dict(e) for e in sorted(entries, key=lambda e: (e.key, e.template_digest))]}  # fmt: skip
    return json.dumps(body, indent=1, sort_keys=True) + "\n"


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise CacheError(f"duplicate keys in an object: {sorted({k for k in keys if keys.count(k) > 1})}")
    return dict(pairs)


def _reject_constant(token: str) -> None:
    raise CacheError(f"{token} is not a number a cache may hold")


def loads(text: str | bytes, *, source: str = "<cache>") -> list[TunedEntry]:
    """Parse and validate a cache file's text; raises CacheError naming what is wrong."""
    if len(text) > MAX_BYTES:
        raise CacheError(f"{source}: {len(text)} bytes is over the {MAX_BYTES}-byte limit for a cache file")
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except CacheError as exc:
        raise CacheError(f"{source}: {exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CacheError(f"{source}: not JSON ({exc})") from None
    except RecursionError:
        raise CacheError(f"{source}: nested too deeply to be a cache file") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CacheError(f"{source}: not a flashgen tuning cache (expected an object with format {FORMAT!r})")
    if data.get("version") != FORMAT_VERSION:
        raise CacheError(f"{source}: cache format version {data.get('version')!r}; this flashgen reads {FORMAT_VERSION}")
    if set(data) != {"format", "version", "entries"}:
        raise CacheError(f"{source}: unexpected top-level fields {sorted(set(data) - {'format', 'version', 'entries'})}")
    entries = data["entries"]
    if not isinstance(entries, list) or len(entries) > MAX_ENTRIES:
        raise CacheError(f"{source}: 'entries' must be a list of at most {MAX_ENTRIES} entries")
    parsed = []
    for index, raw in enumerate(entries):
        try:
            parsed.append(_parse_entry(raw))
        except (CacheError, ValueError, TypeError, KeyError) as exc:
            raise CacheError(f"{source}: entry {index}: {exc}") from None
    return parsed


def read(path: Path) -> list[TunedEntry]:
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise CacheError(f"{path}: {size} bytes is over the {MAX_BYTES}-byte limit for a cache file")
        return loads(path.read_bytes(), source=str(path))
    except OSError as exc:
        raise CacheError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _expect(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    if isinstance(value, bool) and kind is not bool:
        raise CacheError(f"{where} must be {_kind_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise CacheError(f"{where} must be {_kind_name(kind)}, got {type(value).__name__}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _text(value: Any, where: str, limit: int = 128) -> str:
    _expect(value, str, where)
    if not value or len(value) > limit or not value.isprintable():
        raise CacheError(f"{where} must be 1 to {limit} printable characters")
    return value


def _number(value: Any, where: str) -> float:
    _expect(value, (int, float), where)
    if not math.isfinite(value) or value < 0:
        raise CacheError(f"{where} must be a finite number >= 0, got {value!r}")
    return float(value)


def _count(value: Any, where: str, limit: int = 10**9) -> int:
    _expect(value, int, where)
    if not 0 <= value <= limit:
        raise CacheError(f"{where} must be an integer in [0, {limit}], got {value}")
    return value


def _hex(value: Any, where: str, length: int) -> str:
    _expect(value, str, where)
    if len(value) != length or not _HEX.fullmatch(value):
        raise CacheError(f"{where} must be {length} lowercase hex digits")
    return value


def _check_stale_config(config: TileConfig) -> None:
    """A config from another version of its template names that version's knobs (one added since is missing),
    so the current knob table cannot judge it; it is never rendered. It must still be small and plain."""
    if len(config.extra) > MAX_STALE_KNOBS:
        raise CacheError(f"config has {len(config.extra)} template knobs; at most {MAX_STALE_KNOBS} are read")
    for name, value in config.extra:
        if not _KNOB_NAME.fullmatch(name):
            raise CacheError(f"config knob name {name[:40]!r} is not a lowercase identifier of at most 32 characters")
        if isinstance(value, str):
            _text(value, f"config.{name}", 32)


def _fields(raw: Any, expected: set[str], where: str) -> dict[str, Any]:
    _expect(raw, dict, where)
    if set(raw) != expected:
        missing, unknown = sorted(expected - set(raw)), sorted(set(raw) - expected)
        raise CacheError(f"{where}: missing fields {missing}, unknown fields {unknown}")
    return raw


def _parse_entry(raw: Any) -> TunedEntry:
    raw = _fields(raw, _ENTRY_FIELDS, "the entry")
    template = _text(raw["template"], "template", 64)
    try:
        table = knob_table(template)
    except ValueError:
        raise CacheError(f"template {template!r} is not one of flashgen's templates") from None
    device_raw = _fields(raw["device"], _DEVICE_FIELDS, "device")
    capability = device_raw["capability"]
    if capability is not None:
        _expect(capability, list, "device.capability")
        if len(capability) != 2:
            raise CacheError("device.capability must be [major, minor]")
        capability = (_count(capability[0], "device.capability[0]", 99), _count(capability[1], "device.capability[1]", 99))
    device = DeviceInfo(
        name=_text(device_raw["name"], "device.name"),
        capability=capability,
        sm_count=None if device_raw["sm_count"] is None else _count(device_raw["sm_count"], "device.sm_count", 100_000),
        max_shared_mem=None if device_raw["max_shared_mem"] is None
        else _count(device_raw["max_shared_mem"], "device.max_shared_mem", 1 << 30),
        interpreter=_expect(device_raw["interpreter"], bool, "device.interpreter"),
    )
    toolchain_raw = _fields(raw["toolchain"], _TOOLCHAIN_FIELDS, "toolchain")
    toolchain = {name: _text(toolchain_raw[name], f"toolchain.{name}", 64) for name in sorted(_TOOLCHAIN_FIELDS)}
    bucket = ShapeBucket.from_dict(_expect(raw["bucket"], dict, "bucket"))
    config = TileConfig.from_dict(_expect(raw["config"], dict, "config"))
    trials = _count(raw["trials"], "trials")
    trials_to_best = _count(raw["trials_to_best"], "trials_to_best")
    if trials_to_best > trials:
        raise CacheError(f"trials_to_best ({trials_to_best}) exceeds trials ({trials})")
    digest = _hex(raw["template_digest"], "template_digest", 16)
    stored_sha = _hex(raw["source_sha256"], "source_sha256", 64)
    source_text = ""
    if digest == template_digest(template):
        config = table.validate(config)
        source = render(template, bucket.variant, config)
        if source.digest != stored_sha:
            raise CacheError(
                "source_sha256 does not match the source flashgen's templates generate for this variant and "
                "config: the entry was altered or made by a modified flashgen"
            )
        source_text = source.text
    else:
        _check_stale_config(config)
    try:
        created_at = datetime.fromisoformat(_text(raw["created_at"], "created_at", 40))
    except ValueError:
        raise CacheError("created_at must be an ISO 8601 date and time") from None
    return TunedEntry(
        template=template,
        template_digest=digest,
        device=device,
        toolchain=toolchain,
        bucket=bucket,
        config=config,
        median_ms=_number(raw["median_ms"], "median_ms"),
        tflops=_number(raw["tflops"], "tflops"),
        error=_number(raw["error"], "error"),
        trials=trials,
        trials_to_best=trials_to_best,
        tuning_seconds=_number(raw["tuning_seconds"], "tuning_seconds"),
        source_sha256=stored_sha,
        source_text=source_text,
        created_at=created_at.replace(tzinfo=None),
    )
