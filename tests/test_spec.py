import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flashgen.spec import CORE_KNOBS, TileConfig, Variant, causal_offset, knob_table

variants = st.builds(
    Variant,
    head_dim=st.integers(16, 256),
    dtype=st.sampled_from(["fp16", "bf16", "fp32"]),
    causal=st.booleans(),
    dropout=st.booleans(),
)
table = knob_table("attn_fwd")
configs = st.fixed_dictionaries({knob.name: st.sampled_from(knob.choices) for knob in table.knobs}).map(TileConfig.from_dict)


@given(variants)
def test_variant_round_trips_and_key_is_a_function_of_the_value(variant):
    again = Variant.from_dict(variant.to_dict())
    assert again == variant and again.key == variant.key and hash(again) == hash(variant)


@given(configs)
def test_config_round_trips_and_validates(config):
    again = TileConfig.from_dict(config.to_dict())
    assert again == config and again.key == config.key and again.digest == config.digest
    assert table.validate(again) is again


@given(variants, variants)
def test_distinct_variants_have_distinct_keys(a, b):
    assert (a.key == b.key) == (a == b)


def test_keys_are_readable_and_stable():
    # These strings name database entries and cache files: changing them orphans every stored result.
    assert Variant(80, "bf16", causal=True, dropout=True).key == "d80-bf16-causal-dropout"
    assert table.config(block_m=64, block_n=32, num_warps=4, num_stages=3, split_masked=False).key == (
        "m64-n32-w4-s3-split_masked=0-tma=0-warp_specialize=0"
    )


def test_extra_knob_order_does_not_change_the_config():
    a = TileConfig(64, 32, 4, 2, extra={"b": 1, "a": True})
    b = TileConfig(64, 32, 4, 2, extra=(("a", True), ("b", 1)))
    assert a == b and a.key == b.key


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"head_dim": 8, "dtype": "fp16"}, ValueError, "head_dim must be in"),
        ({"head_dim": 257, "dtype": "fp16"}, ValueError, "head_dim must be in"),
        ({"head_dim": 64.0, "dtype": "fp16"}, TypeError, "head_dim must be an int"),
        ({"head_dim": True, "dtype": "fp16"}, TypeError, "head_dim must be an int"),
        ({"head_dim": 64, "dtype": "fp64"}, ValueError, "dtype must be one of"),
        ({"head_dim": 64, "dtype": "fp16", "causal": 1}, TypeError, "causal must be a bool"),
    ],
)
def test_variant_rejects_bad_fields(kwargs, error, match):
    with pytest.raises(error, match=match):
        Variant(**kwargs)


def test_variant_from_dict_rejects_unknown_and_missing_fields():
    with pytest.raises(ValueError, match="unknown variant field"):
        Variant.from_dict({"head_dim": 64, "dtype": "fp16", "window": 3})
    with pytest.raises(ValueError, match="missing"):
        Variant.from_dict({"head_dim": 64})


@pytest.mark.parametrize(
    "values, error, match",
    [
        ({"block_m": 48}, ValueError, "power of two or a multiple of 64"),
        ({"block_n": 192}, ValueError, "power of two, got 192"),  # only block_m may be 3 x 64 rows
        ({"num_stages": 0}, ValueError, "positive"),
        ({"block_n": "64"}, TypeError, "must be an int"),
    ],
)
def test_config_rejects_bad_core_values(values, error, match):
    base = {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2}
    with pytest.raises(error, match=match):
        TileConfig.from_dict({**base, **values})


@pytest.mark.parametrize(
    "values, match",
    [
        ({"atomic_dq": True}, "unknown knob"),  # a knob of the backward template only
        ({"block_m": 512}, "must be one of"),
        ({"block_m": 192}, "must be one of"),  # a valid TileConfig, but only attn_fwd_sm90 declares 192 rows
        ({"split_masked": 1}, "must be one of"),  # an int where the table declares a bool
    ],
)
def test_knob_table_rejects_what_it_does_not_declare(values, match):
    with pytest.raises(ValueError, match=match):
        table.config(**values)


def test_knob_table_declares_the_core_knobs_and_spans_their_product():
    assert set(CORE_KNOBS) <= set(table.names)
    expected = 1
    for knob in table.knobs:
        expected *= len(knob.choices)
    all_configs = list(table.all_configs())
    assert len(all_configs) == expected == len(set(all_configs))
    assert table.default_config() == table.config()


@pytest.mark.parametrize("template", ["attn_fwd", "attn_bwd"])
def test_config_keys_parse_back_to_their_config(template):
    knobs = knob_table(template)
    for config in itertools.islice(knobs.all_configs(), 0, None, 97):
        assert knobs.parse_key(config.key) == config
    assert knobs.parse_key("m32-n16-w2-s1") == knobs.config(block_m=32, block_n=16, num_warps=2, num_stages=1)


@pytest.mark.parametrize(
    "key, match",
    [("m128-n64", "expected m<block_m>"), ("m128-n64-s3-w8", "expected m<block_m>"), ("m128-n64-w8-s3-bogus=1", "bogus"),
     ("m128-n64-w8-s3-tma=2", "takes 0 or 1"), ("m128-n64-w8-s3-tma", "not knob=value"), ("m96-n64-w8-s3", "power of two"),
     ("m128-n64-w8-s3-num_warps=4", "not knob=value")],
)  # fmt: skip
def test_config_keys_that_name_no_valid_config_are_refused(key, match):
    with pytest.raises(ValueError, match=match):
        table.parse_key(key)


@pytest.mark.parametrize("alignment, n_q, n_k, expected", [("top_left", 5, 9, 0), ("bottom_right", 5, 9, 4), ("bottom_right", 9, 5, -4)])
def test_causal_offset(alignment, n_q, n_k, expected):
    assert causal_offset(alignment, n_q, n_k) == expected


def test_causal_offset_rejects_unknown_alignment():
    with pytest.raises(ValueError, match="causal alignment"):
        causal_offset("center", 1, 1)
