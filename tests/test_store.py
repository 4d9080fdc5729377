"""One suite every storage URL must pass, plus what is SQLite's own (files, concurrency, schema)."""

import multiprocessing
from datetime import datetime

import pytest
from sqlalchemy import text

from flashgen.db import SCHEMA_VERSION, StoreError, TunedEntry, TuningStore
from flashgen.device import DeviceInfo
from flashgen.shapes import ShapeBucket
from flashgen.spec import Variant, knob_table

H200 = DeviceInfo("NVIDIA H200", (9, 0), 132, 232448, interpreter=False)
TOOLCHAIN = {"flashgen": "0.1.0", "triton": "3.6.0", "torch": "2.11.0", "cuda": "13.0"}
table = knob_table("attn_fwd")


def make_entry(*, n=1024, ms=1.0, block_m=128, digest="0123456789abcdef", device=H200) -> TunedEntry:
    bucket = ShapeBucket.of(Variant(128, "bf16", causal=True), batch=4, heads_q=16, heads_kv=16, n_q=n, n_k=n)
    return TunedEntry(
        template="attn_fwd", template_digest=digest, device=device, toolchain=dict(TOOLCHAIN), bucket=bucket,
        config=table.config(block_m=block_m), median_ms=ms, tflops=100.0 / ms, error=1e-3, trials=30,
        trials_to_best=12, tuning_seconds=42.0, source_sha256="a" * 64, source_text="# source",
        created_at=datetime(2026, 11, 21, 12, 0, 0),
    )  # fmt: skip


@pytest.fixture(params=["file", "memory"])
def store(request, tmp_path):
    url = f"sqlite:///{tmp_path / 'tuning.sqlite3'}" if request.param == "file" else "sqlite://"
    return TuningStore(url)


def test_round_trip(store):
    entry = make_entry()
    assert store.put(entry)
    (back,) = store.entries()
    assert back.id is not None
    for field in ("key", "template", "template_digest", "device", "toolchain", "bucket", "config", "median_ms",
                  "tflops", "error", "trials", "trials_to_best", "tuning_seconds", "source_sha256", "source_text",
                  "created_at"):  # fmt: skip
        assert getattr(back, field) == getattr(entry, field), field
    assert store.find(entry.key)[0].config == entry.config
    assert store.find(str(back.id))[0].key == entry.key
    assert store.find("nothing") == []


def test_put_keeps_the_faster_entry(store):
    assert store.put(make_entry(ms=2.0, block_m=64))
    assert not store.put(make_entry(ms=3.0, block_m=32))
    assert store.put(make_entry(ms=1.0, block_m=128))
    (only,) = store.entries()
    assert only.median_ms == 1.0 and only.config.block_m == 128


def test_put_with_replace_stores_a_slower_time(store):
    # A final round's median supersedes the lucky single timing of a search.
    store.put(make_entry(ms=1.0, block_m=128))
    assert store.put(make_entry(ms=1.2, block_m=64), replace=True)
    (only,) = store.entries()
    assert only.median_ms == 1.2 and only.config.block_m == 64


def test_entries_of_other_toolchains_and_buckets_coexist(store):
    store.put(make_entry(n=1024))
    store.put(make_entry(n=4096))
    store.put(make_entry(n=1024, digest="fedcba9876543210"))
    assert len(store.entries()) == 3
    stale = [e for e in store.entries() if e.is_stale("0123456789abcdef", "3.6.0")]
    assert len(stale) == 1 and stale[0].template_digest == "fedcba9876543210"
    assert store.delete([stale[0].id]) == 1 and len(store.entries()) == 2


def test_interpreter_entries_have_their_own_key(store):
    interp = DeviceInfo("Triton interpreter (CPU)", None, None, None, interpreter=True)
    store.put(make_entry())
    store.put(make_entry(device=interp))
    keys = {e.key for e in store.entries()}
    assert len(keys) == 2 and any(k.startswith("interpreter/") for k in keys)


def test_schema_version_is_recorded(store):
    assert store.schema_version == SCHEMA_VERSION


def test_a_newer_schema_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    store = TuningStore(url)
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE flashgen_meta SET value = '99' WHERE key = 'schema_version'"))
    with pytest.raises(StoreError, match="newer than this flashgen"):
        TuningStore(url)


def test_a_file_that_is_not_a_database_is_a_store_error(tmp_path):
    path = tmp_path / "garbage.sqlite3"
    path.write_bytes(b"this is not an sqlite file" * 100)
    with pytest.raises(StoreError, match="cannot open"):
        TuningStore(f"sqlite:///{path}")


def test_sqlite_runs_in_wal_mode(tmp_path):
    store = TuningStore(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    with store.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"


def _writer(url: str, start: int, count: int) -> None:
    store = TuningStore(url)
    for i in range(start, start + count):
        store.put(_entry_i(i))


def _entry_i(i: int) -> TunedEntry:
    entry = make_entry()
    bucket = ShapeBucket(entry.bucket.variant, n_q=1024, n_k=1024, batch_heads=1 << (i % 12), group=1 + i // 12)
    return TunedEntry(**{**entry.__dict__, "bucket": bucket, "id": None})


def test_two_processes_writing_one_file_lose_nothing(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    TuningStore(url)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_writer, args=(url, start, 48)) for start in (0, 48)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
        assert w.exitcode == 0
    assert len({e.key for e in TuningStore(url).entries()}) == 96


def test_the_same_winner_stored_again_updates_its_counts(store):
    store.put(make_entry(ms=1.0))
    again = make_entry(ms=1.0)
    again = TunedEntry(**{**again.__dict__, "trials": 60, "tuning_seconds": 99.0})
    assert store.put(again)
    (only,) = store.entries()
    assert only.trials == 60 and only.tuning_seconds == 99.0
    assert not store.put(make_entry(ms=1.0, block_m=64))  # a different config at the same time does not replace it
