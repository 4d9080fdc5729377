import json
from pathlib import Path

import pytest

from flashgen.caches import MAX_BYTES, CacheError, dumps, entry_to_dict, loads, read
from flashgen.codegen import render, template_digest
from flashgen.entries import TunedEntry

from .test_store import make_entry


def current_entry(**kw) -> TunedEntry:
    """An entry from this flashgen's templates, with the true source hash."""
    entry = make_entry(digest=template_digest("attn_fwd"), **kw)
    source = render("attn_fwd", entry.bucket.variant, entry.config)
    return TunedEntry(**{**entry.__dict__, "source_sha256": source.digest, "source_text": source.text})


def cache_with(mutate) -> str:
    data = json.loads(dumps([current_entry()]))
    mutate(data)
    return json.dumps(data)


def test_round_trip_regenerates_the_source():
    entry = current_entry()
    (back,) = loads(dumps([entry]))
    assert entry_to_dict(back) == entry_to_dict(entry)
    assert back.source_text == entry.source_text  # regenerated from our templates, not read from the file


def test_export_is_stable_text():
    entries = [current_entry(n=4096), current_entry(n=1024)]
    assert dumps(entries) == dumps(list(reversed(entries)))


def test_stale_entries_are_kept_without_source():
    entry = make_entry(digest="fedcba9876543210")
    (back,) = loads(dumps([entry]))
    assert back.source_text == "" and back.is_stale(template_digest("attn_fwd"), "3.6.0")


def test_an_entry_from_before_a_knob_was_added_is_kept_stale():
    # A cache exported by an older flashgen: its entry's config lacks a knob the template has since gained.
    entry = make_entry(digest="fedcba9876543210")
    data = json.loads(dumps([entry]))
    del data["entries"][0]["config"]["split_masked"]
    (back,) = loads(json.dumps(data))
    assert back.is_stale(template_digest("attn_fwd"), "3.6.0") and "split_masked" not in back.config.to_dict()
    # From the current templates, the same config is rejected: it could not be rendered.
    data["entries"][0]["template_digest"] = template_digest("attn_fwd")
    with pytest.raises(CacheError, match="missing knob"):
        loads(json.dumps(data))


def _stale(mutate):
    def both(data):
        data["entries"][0]["template_digest"] = "fedcba9876543210"
        mutate(data)

    return both


def _set(path, value):
    def mutate(data):
        target = data["entries"][0]
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _delete(path):
    def mutate(data):
        target = data["entries"][0]
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return mutate


KNOBS = json.loads(dumps([current_entry()]))["entries"][0]["config"]
HOSTILE = {
    "not json": "this is not json {",
    "not an object": json.dumps([1, 2, 3]),
    "other format": json.dumps({"format": "something-else", "version": 1, "entries": []}),
    "future version": json.dumps({"format": "flashgen-tuning-cache", "version": 2, "entries": []}),
    "NaN": cache_with(lambda d: None).replace('"median_ms": 1.0', '"median_ms": NaN'),
    "duplicate key": cache_with(lambda d: None).replace('"trials": 30', '"trials": 30, "trials": 31'),
    "unknown field": cache_with(_set(["payload"], "__import__('os').system('rm -rf /')")),
    "missing field": cache_with(_delete(["median_ms"])),
    "unknown knob": cache_with(_set(["config", "evil"], 1)),
    "knob value": cache_with(_set(["config", "block_m"], 48)),
    "knob type": cache_with(_set(["config", "split_masked"], 1)),
    "bool for int": cache_with(_set(["trials"], True)),
    "string for number": cache_with(_set(["median_ms"], "1.0")),
    "negative": cache_with(_set(["median_ms"], -1.0)),
    "huge count": cache_with(_set(["trials"], 10**30)),
    "bad variant": cache_with(_set(["bucket", "variant", "head_dim"], 4096)),
    "bad bucket": cache_with(_set(["bucket", "n_q"], 1000)),
    "unknown template": cache_with(_set(["template"], "../../etc/passwd")),
    "bad digest": cache_with(_set(["template_digest"], "zz")),
    "tampered source": cache_with(_set(["source_sha256"], "0" * 64)),
    "long name": cache_with(_set(["device", "name"], "x" * 10_000)),
    "control chars": cache_with(_set(["toolchain", "triton"], "3.6\n0")),
    "bad date": cache_with(_set(["created_at"], "yesterday")),
    "trials_to_best > trials": cache_with(_set(["trials_to_best"], 31)),
    "deep nesting": "[" * 100_000 + "]" * 100_000,
    "stale: many knobs": cache_with(_stale(_set(["config"], {**KNOBS, **{f"k{i}": 1 for i in range(40)}}))),
    "stale: odd knob name": cache_with(_stale(_set(["config", "__import__('os')"], 1))),
    "stale: long knob name": cache_with(_stale(_set(["config", "k" * 1000], 1))),
    "stale: long knob value": cache_with(_stale(_set(["config", "split_masked"], "x" * 1000))),
    "stale: float knob value": cache_with(_stale(_set(["config", "split_masked"], 0.5))),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_and_malformed_caches_are_rejected_with_a_message(name):
    with pytest.raises(CacheError) as info:
        loads(HOSTILE[name], source="x.json")
    assert str(info.value).startswith("x.json: ")


def test_a_valid_cache_passes_so_the_hostile_ones_fail_for_their_flaw():
    assert len(loads(cache_with(lambda d: None))) == 1
    assert len(loads(cache_with(_stale(lambda d: None)))) == 1


def test_oversized_files_are_refused_before_reading(tmp_path):
    path = tmp_path / "big.json"
    with path.open("wb") as out:
        out.truncate(MAX_BYTES + 1)
    with pytest.raises(CacheError, match="over the"):
        read(path)
    with pytest.raises(CacheError, match="cannot read"):
        read(tmp_path / "missing.json")


def test_the_file_is_never_executed(tmp_path, monkeypatch):
    import builtins

    calls = []
    monkeypatch.setattr(builtins, "exec", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(builtins, "eval", lambda *a, **k: calls.append(a))
    loads(cache_with(lambda d: None))
    assert calls == []


SHIPPED_CACHES = sorted((Path(__file__).resolve().parent.parent / "tuning_db").glob("*.json"))


@pytest.mark.parametrize("path", SHIPPED_CACHES, ids=lambda p: p.name)
def test_shipped_caches_were_tuned_with_the_current_templates(path):
    # Editing a template changes its digest, and dispatch then ignores every shipped entry of it (they are
    # stale): re-tune that template on each GPU, or leave the template as it was.
    entries = read(path)
    assert entries
    stale = sorted({e.template for e in entries if e.template_digest != template_digest(e.template)})
    assert not stale, f"{path.name}: the entries of {stale} were tuned with other versions of those templates"
