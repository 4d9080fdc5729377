"""Runtime dispatch: lookup order, nearest buckets, sources and their failures, fallbacks, explain, the
per-signature plan memo, torch.compile and the transformers integration."""

import os
import sqlite3
import subprocess
import sys
import warnings
from dataclasses import replace

import pytest
import torch

import flashgen
from flashgen import dispatch, ops
from flashgen.caches import dumps
from flashgen.db import TuningStore
from flashgen.device import device_info
from flashgen.shapes import ShapeBucket
from flashgen.spec import Variant, knob_table

from .test_caches import current_entry
from .test_store import H200

FWD = knob_table("attn_fwd")
VARIANT = Variant(128, "bf16", causal=True)  # the variant test_store.make_entry tunes


def bucket(n=1024, batch_heads=64, group=1, variant=VARIANT) -> ShapeBucket:
    return ShapeBucket.of(variant, batch=1, heads_q=batch_heads, heads_kv=batch_heads // group, n_q=n, n_k=n)


def entry(n=1024, block_m=128, **kw):
    return current_entry(n=n, block_m=block_m, **kw)


@pytest.fixture(autouse=True)
def fresh_dispatch(monkeypatch, tmp_path):
    """No user database unless a test makes one, no shipped caches, nothing remembered between tests."""
    monkeypatch.delenv("FLASHGEN_DB", raising=False)  # and the default database is one that does not exist:
    absent = f"sqlite:///{tmp_path / 'absent.sqlite3'}"
    monkeypatch.setattr(dispatch, "default_database_url", lambda: os.environ.get("FLASHGEN_DB") or absent)
    monkeypatch.delenv("FLASHGEN_AUTOTUNE", raising=False)
    monkeypatch.delenv("FLASHGEN_STRICT", raising=False)
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setattr(dispatch, "tuning_db_dir", lambda: shipped)
    monkeypatch.setattr(dispatch, "_warned", set())
    dispatch.reload()
    ops._plans.clear()
    yield shipped
    dispatch.reload()
    ops._plans.clear()


def test_lookup_order_tuned_then_nearest_then_default():
    index = dispatch.DispatchIndex(H200, [("test", [entry(n=1024, block_m=64)])])
    kind, found = index.lookup("attn_fwd", bucket(1024))
    assert kind == "tuned" and found.entry.config == FWD.config(block_m=64)
    kind, found = index.lookup("attn_fwd", bucket(2048))
    assert kind == "nearest" and found.entry.bucket == bucket(1024)
    assert index.lookup("attn_fwd", bucket(1024, variant=Variant(64, "bf16"))) is None  # another variant
    assert index.lookup("attn_bwd", bucket(1024)) is None  # another template


def test_nearest_bucket_is_the_closest_in_log2_steps():
    entries = [entry(n=512, block_m=16), entry(n=4096, block_m=32), entry(n=16384, block_m=64)]
    index = dispatch.DispatchIndex(H200, [("test", entries)])
    # 2048 is one step from 4096 and two from 512.
    assert index.lookup("attn_fwd", bucket(2048))[1].entry.bucket.n_q == 4096
    assert index.lookup("attn_fwd", bucket(1024))[1].entry.bucket.n_q == 512
    # 8192 is one step from both 4096 and 16384: ties go to the larger bucket.
    assert index.lookup("attn_fwd", bucket(8192))[1].entry.bucket.n_q == 16384
    assert dispatch.bucket_distance(bucket(1024), bucket(1024, group=2)) == 1


def test_unusable_entries_are_not_indexed():
    other_gpu = replace(H200, name="NVIDIA H100 80GB HBM3")
    stale = entry(n=2048)
    stale = replace(stale, template_digest="fedcba9876543210")
    old_triton = replace(entry(n=4096), toolchain={**entry().toolchain, "triton": "3.5.0"})
    index = dispatch.DispatchIndex(H200, [("test", [entry(n=1024, device=other_gpu), stale, old_triton])])
    assert len(index) == 0


def test_the_user_database_overlays_the_shipped_caches(fresh_dispatch, tmp_path, monkeypatch):
    (fresh_dispatch / "nvidia-h200.json").write_text(dumps([entry(n=1024, block_m=64), entry(n=4096, block_m=64)]))
    url = f"sqlite:///{tmp_path / 'user.sqlite3'}"
    TuningStore(url).put(entry(n=1024, block_m=32))
    monkeypatch.setenv("FLASHGEN_DB", url)
    index = dispatch.index_for(H200)
    assert index.lookup("attn_fwd", bucket(1024))[1].entry.config["block_m"] == 32  # the user's
    assert index.lookup("attn_fwd", bucket(4096))[1].entry.config["block_m"] == 64  # shipped
    choice = dispatch.forward_choice(bucket(1024), H200)
    assert choice.kind == "tuned" and choice.source.startswith("database")
    assert dispatch.forward_choice(bucket(4096), H200).source == "shipped cache nvidia-h200.json"


def test_a_broken_shipped_cache_is_skipped_with_one_warning(fresh_dispatch):
    (fresh_dispatch / "broken.json").write_text("{not json")
    (fresh_dispatch / "good.json").write_text(dumps([entry(n=1024, block_m=64)]))
    with pytest.warns(dispatch.FlashgenWarning, match="broken.json"):
        index = dispatch.index_for(H200)
    assert len(index) == 1


def _locked(path):
    """A writer holding an exclusive lock on a rollback-journal database (in WAL mode readers never wait)."""
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode=DELETE")
    connection.execute("BEGIN EXCLUSIVE")
    return connection


@pytest.mark.parametrize("kind", ["garbage", "foreign", "newer", "locked", "missing"])
def test_a_bad_database_warns_once_and_dispatch_goes_on(kind, tmp_path, monkeypatch):
    path = tmp_path / "db.sqlite3"
    url = f"sqlite:///{path}"
    lock = None
    if kind == "garbage":
        path.write_bytes(b"this is not a database" * 100)
    elif kind == "foreign":
        sqlite3.connect(path).execute("CREATE TABLE customers (id INTEGER)").connection.commit()
    elif kind == "newer":
        TuningStore(url)
        with sqlite3.connect(path) as connection:
            connection.execute("UPDATE flashgen_meta SET value = '99' WHERE key = 'schema_version'")
    elif kind == "locked":
        store = TuningStore(url)
        store.put(entry())
        store.engine.dispose()
        lock = _locked(path)
        monkeypatch.setattr(dispatch, "DATABASE_TIMEOUT_MS", 200)
    monkeypatch.setenv("FLASHGEN_DB", url)
    try:
        with pytest.warns(dispatch.FlashgenWarning) as caught:
            choice = dispatch.forward_choice(bucket(1024), H200)
            dispatch.reload()
            dispatch.forward_choice(bucket(1024), H200)  # the same trouble again: no second warning
    finally:
        if lock is not None:
            lock.close()
    assert choice.kind == "default"
    assert len([w for w in caught if issubclass(w.category, dispatch.FlashgenWarning)]) == 1
    assert str(path) in str(caught[0].message)


@pytest.mark.cpu_interpreter
def test_a_broken_database_does_not_break_attention_on_the_cpu(tmp_path, monkeypatch):
    path = tmp_path / "db.sqlite3"
    path.write_bytes(b"\x00" * 4096)
    monkeypatch.setenv("FLASHGEN_DB", f"sqlite:///{path}")
    q = torch.randn(1, 2, 16, 16)
    with pytest.warns(dispatch.FlashgenWarning, match="ignoring the tuning database"):
        out = flashgen.attention(q, q, q)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, q, q))


def test_a_missing_default_database_is_silent_and_not_created(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.forward_choice(bucket(1024), H200).kind == "default"
    assert not (tmp_path / "absent.sqlite3").exists()


@pytest.mark.cpu_interpreter
def test_attention_uses_the_tuned_config_on_the_cpu(tmp_path, monkeypatch):
    """End to end in the interpreter: an entry tuned for this 'device' is what attention runs."""
    cpu = device_info("cpu")
    variant = Variant(16, "fp32")
    tuned = FWD.config(block_m=16, block_n=32, num_warps=2, num_stages=1)
    shape_bucket = ShapeBucket.of(variant, batch=1, heads_q=2, heads_kv=2, n_q=40, n_k=40)
    url = f"sqlite:///{tmp_path / 'user.sqlite3'}"
    base = entry()
    TuningStore(url).put(replace(base, device=cpu, bucket=shape_bucket, config=tuned))
    monkeypatch.setenv("FLASHGEN_DB", url)
    q = torch.randn(1, 2, 40, 16)
    why = flashgen.explain(q, q, q)
    assert why.forward.kind == "tuned" and why.forward.config == tuned
    assert why.backward.kind == "default"
    assert "tuned" in str(why) and shape_bucket.key in str(why)
    torch.testing.assert_close(flashgen.attention(q, q, q), torch.nn.functional.scaled_dot_product_attention(q, q, q))


@pytest.mark.cpu_interpreter
def test_the_plan_is_made_once_per_signature(monkeypatch):
    calls = []
    original = ops._plan
    monkeypatch.setattr(ops, "_plan", lambda *a: calls.append(1) or original(*a))
    q = torch.randn(1, 2, 16, 16)
    for _ in range(3):
        flashgen.attention(q, q, q)
    flashgen.attention(q, q, q, causal=True)
    flashgen.attention(torch.randn(1, 2, 24, 16), q, q)
    assert len(calls) == 3
    with pytest.raises(ValueError, match="dropout_p must be in"):  # per-call values are still checked
        flashgen.attention(q, q, q, dropout_p=2.0)


@pytest.mark.cpu_interpreter
def test_the_backward_is_chosen_once_per_plan_until_reload(monkeypatch):
    calls = []
    original = ops.backward_choice
    monkeypatch.setattr(ops, "backward_choice", lambda *a, **kw: calls.append(kw) or original(*a, **kw))
    q = torch.randn(1, 2, 16, 16, requires_grad=True)
    for _ in range(3):
        flashgen.attention(q, q, q, deterministic=False).sum().backward()
    assert len(calls) == 1
    flashgen.attention(q, q, q, deterministic=True).sum().backward()  # the same plan, another decision
    assert [c["deterministic"] for c in calls] == [False, True]
    plans = len(ops._plans)
    flashgen.reload()  # after tuning in the same process: plans and their choices are made again
    assert not ops._plans and plans
    flashgen.attention(q, q, q, deterministic=False).sum().backward()
    assert len(calls) == 3


@pytest.mark.cpu_interpreter
@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda: {"q": torch.randn(1, 2, 8, 16, dtype=torch.float64)}, "dtype torch.float64"),
        (lambda: {"q": torch.randn(1, 2, 8, 8)}, "head_dim 8"),
        (lambda: {"q": torch.randn(1, 2, 8, 16), "attn_mask": torch.rand(8, 8) > 0.3}, "attn_mask"),
        (lambda: {"q": torch.randn(1, 2, 8, 16, dtype=torch.bfloat16)}, "bfloat16 on the CPU"),
    ],
)  # fmt: skip
def test_unsupported_calls_fall_back_to_sdpa_or_raise_in_strict_mode(make, reason, monkeypatch):
    inputs = make()
    q = inputs.pop("q")
    mask = inputs.get("attn_mask")
    expected = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    with pytest.warns(dispatch.FlashgenWarning, match=reason):
        out = flashgen.attention(q, q, q, **inputs)
    torch.testing.assert_close(out, expected)
    assert flashgen.explain(q, q, q, **inputs).route == "sdpa"
    with pytest.raises(flashgen.UnsupportedError, match=reason):
        flashgen.attention(q, q, q, strict=True, **inputs)
    monkeypatch.setenv("FLASHGEN_STRICT", "1")
    with pytest.raises(flashgen.UnsupportedError, match=reason):
        flashgen.attention(q, q, q, **inputs)


def test_fallback_keeps_causal_alignment_and_gqa():
    q, k = torch.randn(1, 4, 6, 16, dtype=torch.float64), torch.randn(1, 2, 9, 16, dtype=torch.float64)
    with pytest.warns(dispatch.FlashgenWarning):
        out = flashgen.attention(q, k, k, causal=True, causal_alignment="bottom_right")
    keep = torch.ones(6, 9, dtype=torch.bool).tril(3)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), k.repeat_interleave(2, 1), attn_mask=keep)
    torch.testing.assert_close(out, expected)


@pytest.mark.cpu_interpreter  # (a GPU machine's numpy may be one Triton 3.6's interpreter breaks on)
def test_flashgen_log_reports_decisions(tmp_path):
    code = ("import torch, flashgen\n"
            "q = torch.randn(1, 1, 16, 16)\n"
            "flashgen.attention(q, q, q)\nflashgen.attention(q, q, q)\n")  # fmt: skip
    env = {**os.environ, "TRITON_INTERPRET": "1", "FLASHGEN_LOG": "1", "FLASHGEN_DB": f"sqlite:///{tmp_path / 'x.db'}"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    decisions = [line for line in result.stderr.splitlines() if line.startswith("flashgen: attn_fwd")]
    assert len(decisions) == 1 and "default" in decisions[0]  # logged when made, not on every call


@pytest.mark.cpu_interpreter
def test_compile_fullgraph_runs_the_kernels_and_their_gradients():
    q = torch.randn(1, 4, 24, 16, requires_grad=True)
    k, v = (torch.randn(1, 2, 24, 16, requires_grad=True) for _ in range(2))

    def loss(q, k, v):
        return (flashgen.attention(q, k, v, causal=True) ** 2).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v)
    got.backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    expected = loss(q, k, v)
    expected.backward()
    torch.testing.assert_close(got, expected)
    for ours, theirs in zip(grads, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(ours, theirs)
    assert len(ops._plans) >= 1  # the custom op dispatched through the same plans


def test_compile_fullgraph_falls_back_without_a_graph_break():
    q = torch.randn(1, 2, 8, 16, dtype=torch.float64)
    compiled = torch.compile(lambda q: flashgen.attention(q, q, q), fullgraph=True, backend="aot_eager")
    out = compiled(q)  # (dynamo swallows the one-time warning while it traces)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, q, q))


@pytest.mark.cpu_interpreter
def test_autotune_tunes_a_missing_bucket_on_first_use(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'auto.sqlite3'}"
    monkeypatch.setenv("FLASHGEN_DB", url)
    monkeypatch.setenv("FLASHGEN_AUTOTUNE", "1")
    monkeypatch.setenv("FLASHGEN_AUTOTUNE_TRIALS", "2")
    q = torch.randn(1, 1, 32, 16, dtype=torch.float16)
    out = flashgen.attention(q, q, q)
    torch.testing.assert_close(out.float(), torch.nn.functional.scaled_dot_product_attention(q.float(), q.float(), q.float()), atol=2e-3, rtol=2e-3)
    (stored,) = TuningStore(url).entries()
    assert stored.bucket.key == "d16-fp16/q32-k32-bh1-g1" and stored.device.interpreter
    assert flashgen.explain(q, q, q).forward.kind == "tuned"


@pytest.mark.gpu
def test_attention_replays_in_a_cuda_graph():
    q, k, v = (torch.randn(2, 4, 256, 64, dtype=torch.bfloat16, device="cuda") for _ in range(3))
    eager = flashgen.attention(q, k, v, causal=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        flashgen.attention(q, k, v, causal=True)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = flashgen.attention(q, k, v, causal=True)
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.testing.assert_close(captured, flashgen.attention(q, k, v, causal=True))
    assert not torch.equal(captured, eager)


@pytest.mark.gpu
def test_compile_fullgraph_with_inductor_on_the_gpu():
    q, k, v = (torch.randn(2, 8, 512, 64, dtype=torch.bfloat16, device="cuda", requires_grad=True) for _ in range(3))
    compiled = torch.compile(lambda q, k, v: flashgen.attention(q, k, v, causal=True), fullgraph=True)
    out = compiled(q, k, v)
    out.sum().backward()
    torch.testing.assert_close(out, flashgen.attention(q, k, v, causal=True))
