import ast
import os
from pathlib import Path

import jinja2
import pytest

from flashgen import codegen
from flashgen.spec import Variant, knob_table

GOLDEN = Path(__file__).parent / "golden"
table = knob_table("attn_fwd")

# A few variants whose rendered source is kept verbatim: a template change shows up as a reviewable diff.
# Regenerate after an intended change with FLASHGEN_UPDATE_GOLDEN=1 pytest tests/test_codegen.py
GOLDEN_CASES = {
    "d128-fp16-plain": ("attn_fwd", Variant(128, "fp16"), table.config(block_m=128, block_n=64, num_warps=8, num_stages=3)),
    "d80-bf16-causal-dropout": ("attn_fwd", Variant(80, "bf16", causal=True, dropout=True), table.config(block_m=64, block_n=32)),
    "d64-fp32-causal-nosplit": ("attn_fwd", Variant(64, "fp32", causal=True), table.config(split_masked=False)),
    "bwd-d80-fp16-causal-dropout": ("attn_bwd", Variant(80, "fp16", causal=True, dropout=True), knob_table("attn_bwd").default_config()),
    "bwd-d128-bf16-causal-atomic": ("attn_bwd", Variant(128, "bf16", causal=True), knob_table("attn_bwd").config(block_m=32, block_n=128, atomic_dq=True)),
    "d96-bf16-causal-tma-ws": ("attn_fwd", Variant(96, "bf16", causal=True), table.config(tma=True, warp_specialize=True)),
    "bwd-d64-fp16-tma": ("attn_bwd", Variant(64, "fp16"), knob_table("attn_bwd").config(tma=True)),
    "sm90-d128-bf16-causal-pingpong": ("attn_fwd_sm90", Variant(128, "bf16", causal=True), knob_table("attn_fwd_sm90").config(pingpong=True)),
    "sm90-d64-fp16-n64-s2-persistent": ("attn_fwd_sm90", Variant(64, "fp16"), knob_table("attn_fwd_sm90").config(block_n=64, num_stages=2, persistent=True)),
    "sm90-d64-bf16-causal-persistent-early": ("attn_fwd_sm90", Variant(64, "bf16", causal=True), knob_table("attn_fwd_sm90").config(persistent=True, early_scores=True)),
    "sm90-bwd-d128-bf16-causal": ("attn_bwd_sm90", Variant(128, "bf16", causal=True), knob_table("attn_bwd_sm90").default_config()),
    "sm90-fused-bwd-d64-bf16-causal": ("attn_bwd_fused_sm90", Variant(64, "bf16", causal=True), knob_table("attn_bwd_fused_sm90").default_config()),
    "sm90-fused-tma-bwd-d128-bf16-causal": ("attn_bwd_fused_tma_sm90", Variant(128, "bf16", causal=True), knob_table("attn_bwd_fused_tma_sm90").default_config()),
    "sm90-fused-bwd-d64-fp16-shared-dq": ("attn_bwd_fused_sm90", Variant(64, "fp16"), knob_table("attn_bwd_fused_sm90").config(defer_dq=False, num_stages=2)),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_rendered_source_matches_golden(name):
    template, variant, config = GOLDEN_CASES[name]
    text = codegen.render(template, variant, config).text
    path = GOLDEN / f"{name}.py"
    if os.environ.get("FLASHGEN_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.is_file(), f"missing golden file {path}; run with FLASHGEN_UPDATE_GOLDEN=1"
    assert text == path.read_text()


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_rendered_source_is_valid_python_with_a_header(name):
    template, variant, config = GOLDEN_CASES[name]
    source = codegen.render(template, variant, config)
    ast.parse(source.text)
    header = source.text.splitlines()[:4]
    assert any(codegen.template_digest(template) in line for line in header)
    assert any(variant.key in line for line in header)
    assert any(config.key in line for line in header)


def test_rendering_is_deterministic_and_config_sensitive():
    variant = Variant(64, "fp16", causal=True)
    a = codegen.render("attn_fwd", variant, table.default_config())
    b = codegen.render("attn_fwd", variant, table.default_config())
    c = codegen.render("attn_fwd", variant, table.config(block_n=32))
    assert a.text == b.text and a.digest == b.digest
    assert c.digest != a.digest


def test_features_not_asked_for_are_not_in_the_source():
    plain = codegen.render("attn_fwd", Variant(64, "fp16"), table.default_config()).text
    assert "tl.rand" not in plain and "causal_offset" not in plain and "< HEAD_DIM" not in plain
    full = codegen.render("attn_fwd", Variant(80, "fp16", causal=True, dropout=True), table.default_config()).text
    assert "tl.rand" in full and "causal_offset" in full and "offs_d[:, None] < HEAD_DIM" in full


def test_render_validates_the_config():
    from flashgen.spec import TileConfig

    with pytest.raises(ValueError, match="unknown knob"):
        codegen.render("attn_fwd", Variant(64, "fp16"), TileConfig(64, 64, 4, 2, extra={"bogus": 1}))


def test_undefined_template_values_are_errors():
    with pytest.raises(jinja2.UndefinedError):
        codegen._environment().from_string("{{ missing }}").render()


def test_write_is_atomic_named_readably_and_skips_identical_content(tmp_path):
    source = codegen.render("attn_fwd", Variant(96, "fp16", causal=True), table.default_config())
    path = codegen.write(source, tmp_path)
    assert path.name.startswith("flashgen_attn_fwd__d96_fp16_causal__m128_n64")
    assert path.read_text() == source.text
    assert not list(tmp_path.glob("*.tmp"))
    mtime = path.stat().st_mtime_ns
    os.utime(path, ns=(mtime - 10**9, mtime - 10**9))
    assert codegen.write(source, tmp_path) == path
    assert path.stat().st_mtime_ns == mtime - 10**9  # identical content: not rewritten
    path.write_text("corrupted")
    codegen.write(source, tmp_path)
    assert path.read_text() == source.text  # different content: replaced


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHGEN_CACHE_DIR", str(tmp_path))
    assert codegen.cache_dir() == tmp_path / "kernels"


def test_template_digest_changes_with_the_template(tmp_path, monkeypatch):
    import shutil

    from flashgen import resources

    for path in resources.templates_dir().iterdir():
        shutil.copy(path, tmp_path / path.name)
    before, before_bwd = codegen.template_digest("attn_fwd"), codegen.template_digest("attn_bwd")
    monkeypatch.setattr(resources, "templates_dir", lambda: tmp_path)
    monkeypatch.setattr(codegen, "templates_dir", lambda: tmp_path)
    codegen.template_digest.cache_clear()
    try:
        assert codegen.template_digest("attn_fwd") == before
        # Another template's edit leaves this one's digest (and the entries tuned against it) alone.
        (tmp_path / "attn_bwd.py.j2").write_text((tmp_path / "attn_bwd.py.j2").read_text() + "\n# changed\n")
        codegen.template_digest.cache_clear()
        assert codegen.template_digest("attn_fwd") == before
        assert codegen.template_digest("attn_bwd") != before_bwd
        (tmp_path / "attn_macros.j2").write_text((tmp_path / "attn_macros.j2").read_text() + "\n{# changed #}\n")
        codegen.template_digest.cache_clear()
        assert codegen.template_digest("attn_fwd") != before
    finally:
        codegen.template_digest.cache_clear()
