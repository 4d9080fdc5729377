import pytest

from flashgen.shapes import PRESETS, ShapeBucket, grid_buckets, preset_buckets
from flashgen.spec import Variant

V = Variant(128, "bf16", causal=True)


@pytest.mark.parametrize(
    "shape, expected",
    [
        (dict(batch=4, heads_q=16, heads_kv=16, n_q=4096, n_k=4096), (4096, 4096, 64, 1)),
        (dict(batch=3, heads_q=32, heads_kv=8, n_q=1000, n_k=3000), (1024, 4096, 128, 4)),
        (dict(batch=1, heads_q=8, heads_kv=1, n_q=1, n_k=77), (16, 128, 8, 8)),  # decode
        (dict(batch=64, heads_q=128, heads_kv=128, n_q=10**6, n_k=10**6), (131072, 131072, 4096, 1)),  # capped
    ],
)
def test_bucket_rule(shape, expected):
    bucket = ShapeBucket.of(V, **shape)
    assert (bucket.n_q, bucket.n_k, bucket.batch_heads, bucket.group) == expected


def test_shapes_in_one_bucket_share_it_and_the_representative_is_its_corner():
    a = ShapeBucket.of(V, batch=2, heads_q=16, heads_kv=4, n_q=1500, n_k=1800)
    b = ShapeBucket.of(V, batch=1, heads_q=32, heads_kv=8, n_q=2048, n_k=1025)
    assert a == b and a.key == "d128-bf16-causal/q2048-k2048-bh32-g4"
    batch, heads_q, heads_kv, n_q, n_k = a.representative()
    assert (batch * heads_q, heads_q // heads_kv, n_q, n_k) == (32, 4, 2048, 2048)
    assert ShapeBucket.of(V, batch=batch, heads_q=heads_q, heads_kv=heads_kv, n_q=n_q, n_k=n_k) == a


def test_round_trip_and_validation():
    bucket = ShapeBucket.of(V, batch=2, heads_q=8, heads_kv=2, n_q=100, n_k=200)
    assert ShapeBucket.from_dict(bucket.to_dict()) == bucket
    with pytest.raises(ValueError, match="power of two"):
        ShapeBucket(V, n_q=100, n_k=128, batch_heads=8)
    with pytest.raises(ValueError, match="exactly the fields"):
        ShapeBucket.from_dict({**bucket.to_dict(), "extra": 1})
    with pytest.raises(TypeError, match="must be an int"):
        ShapeBucket(V, n_q=128, n_k=128, batch_heads=8.0)


def test_llm_preset_is_the_documented_grid():
    buckets = preset_buckets("llm")
    spec = PRESETS["llm"]
    assert len(buckets) == len(spec["head_dims"]) * len(spec["dtypes"]) * len(spec["causal"]) * len(spec["seqlens"]) == 48
    assert {b.variant.head_dim for b in buckets} == {64, 128}
    assert {b.n_q for b in buckets} == {512, 1024, 2048, 4096, 8192, 16384}
    # batch * seqlen = 16k tokens, heads * head_dim = 2048
    assert all(b.batch_heads * b.n_q == 16384 * 2048 // b.variant.head_dim for b in buckets)
    with pytest.raises(ValueError, match="unknown preset"):
        preset_buckets("huge")


def test_grid_deduplicates():
    assert len(grid_buckets(head_dims=[64, 64], dtypes=["fp16"], causal=[False], seqlens=[512, 512])) == 1
