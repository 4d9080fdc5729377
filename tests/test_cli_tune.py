"""`flashgen tune` and the database commands, end to end in the interpreter on tiny shapes."""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from flashgen.cli import main
from flashgen.db import TuningStore

pytestmark = pytest.mark.cpu_interpreter

TINY = ["tune", "--preset", "tiny", "--patience", "50", "--compile-workers", "0"]


def _env(tmp_path):
    return {**os.environ, "TRITON_INTERPRET": "1", "FLASHGEN_CACHE_DIR": str(tmp_path / "cache"), "COLUMNS": "200"}


def test_tune_stores_marked_interpreter_results_and_the_db_commands_read_them(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    runner = CliRunner()
    result = runner.invoke(main, [*TINY, "--trials", "3", "--db", url, "--json"])
    assert result.exit_code == 0, result.output
    assert "interpreter" in result.stderr
    summary = json.loads(result.stdout)
    assert len(summary) == 2 and all(row["measured"] == 3 and row["best_config"] for row in summary)
    entries = TuningStore(url).entries()
    assert len(entries) == 2 and all(e.device.interpreter and e.key.startswith("interpreter/") for e in entries)

    listed = json.loads(runner.invoke(main, ["list", "--db", url, "--json"]).stdout)
    assert {row["key"] for row in listed} == {e.key for e in entries}
    shown = runner.invoke(main, ["show", entries[0].key, "--db", url])
    assert shown.exit_code == 0 and "@triton.jit" in shown.stdout and entries[0].config.key in shown.stdout

    exported = tmp_path / "cache.json"
    assert runner.invoke(main, ["export", str(exported), "--db", url]).exit_code == 0
    other = f"sqlite:///{tmp_path / 'other.sqlite3'}"
    imported = runner.invoke(main, ["import", str(exported), "--db", other])
    assert imported.exit_code == 0, imported.output
    assert {e.key for e in TuningStore(other).entries()} == {e.key for e in entries}

    exported.write_text(exported.read_text().replace('"num_warps": ', '"num_warps": 3 + '))
    rejected = runner.invoke(main, ["import", str(exported), "--db", other])
    assert rejected.exit_code == 1 and "rejected" in rejected.output and "Traceback" not in rejected.output


def test_running_the_same_tune_again_continues_the_study(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    runner = CliRunner()
    first = json.loads(runner.invoke(main, [*TINY, "--trials", "2", "--db", url, "--json"]).stdout)
    second = json.loads(runner.invoke(main, [*TINY, "--trials", "4", "--db", url, "--json"]).stdout)
    assert [r["measured"] for r in first] == [2, 2] and [r["measured"] for r in second] == [4, 4]
    assert all(b["best_ms"] <= a["best_ms"] for a, b in zip(first, second))
    # A finished study measures nothing new, but a final round re-times its fastest configs (within 10%); the
    # stored winner is the fastest median of that round.
    third = runner.invoke(main, [*TINY, "--trials", "4", "--final-rounds", "2", "--db", url, "--json"])
    assert third.exit_code == 0, third.output
    for row in json.loads(third.stdout):
        assert row["measured"] == 4
        if row["final_times"]:
            assert row["best_ms"] == min(row["final_times"].values()) == row["final_times"][row["best_config"]]
    stored = {e.bucket.key: e.median_ms for e in TuningStore(url).entries()}
    assert sorted(stored.values()) == sorted(row["best_ms"] for row in json.loads(third.stdout))


def test_two_concurrent_tuners_on_one_sqlite_file_lose_nothing(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    TuningStore(url)
    command = [sys.executable, "-m", "flashgen", "tune", "--head-dim", "32", "--seqlen", "32", "--tokens", "32",
               "--hidden", "64", "--trials", "4", "--patience", "50", "--db", url, "--json"]  # fmt: skip
    runs = [
        subprocess.Popen([*command, "--causal", causal], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(tmp_path), text=True)
        for causal in ("off", "on")
    ]
    outputs = [run.communicate(timeout=600) for run in runs]
    for run, (out, err) in zip(runs, outputs):
        assert run.returncode == 0, err
    keys = {json.loads(out)[0]["bucket"] for out, _ in outputs}
    assert {e.bucket.key for e in TuningStore(url).entries()} == keys and len(keys) == 2
    import optuna

    storage = optuna.storages.RDBStorage(url)
    measured = [t for s in optuna.get_all_study_summaries(storage) for t in optuna.load_study(study_name=s.study_name, storage=storage).trials
                if t.user_attrs.get("measured")]  # fmt: skip
    assert len(measured) == 8


def test_tune_needs_to_be_told_what_and_refuses_gpu_sizes_in_the_interpreter(tmp_path):
    runner = CliRunner()
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    assert "say what to tune" in runner.invoke(main, ["tune", "--db", url]).output
    refused = runner.invoke(main, ["tune", "--preset", "llm", "--db", url])
    assert refused.exit_code == 2 and "too large" in refused.output
    bad_space = runner.invoke(main, [*TINY, "--space", "block_m=48", "--db", url])
    assert bad_space.exit_code == 2 and "--space" in bad_space.output


def test_a_broken_database_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.sqlite3"
    path.write_bytes(b"garbage" * 1000)
    result = CliRunner().invoke(main, ["list", "--db", f"sqlite:///{path}"])
    assert result.exit_code == 1 and "cannot open tuning database" in result.output and "Traceback" not in result.output


def test_backward_tuning_has_its_own_space_entries_and_cache_round_trip(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    runner = CliRunner()
    result = runner.invoke(main, [*TINY, "--direction", "both", "--trials", "2", "--db", url, "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert sorted({row["template"] for row in rows}) == ["attn_bwd", "attn_fwd"] and len(rows) == 4
    entries = TuningStore(url).entries()
    backward = [e for e in entries if e.template == "attn_bwd"]
    assert len(backward) == 2 and all("/attn_bwd/" in e.key and "split_masked" not in e.config.to_dict() for e in backward)
    exported = tmp_path / "cache.json"
    assert runner.invoke(main, ["export", str(exported), "--db", url]).exit_code == 0
    other = f"sqlite:///{tmp_path / 'other.sqlite3'}"
    assert runner.invoke(main, ["import", str(exported), "--db", other]).exit_code == 0
    assert {e.key for e in TuningStore(other).entries()} == {e.key for e in entries}
    shown = runner.invoke(main, ["show", backward[0].key, "--db", url])
    assert shown.exit_code == 0 and "attn_bwd_dkdv" in shown.stdout
    mixed = runner.invoke(main, [*TINY, "--direction", "both", "--space", "block_m=32", "--db", url])
    assert mixed.exit_code == 2 and "--space" in mixed.output
