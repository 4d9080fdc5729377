import pytest

from flashgen.device import INTERPRETER, DeviceInfo
from flashgen.defaults import default_config
from flashgen.spec import Variant, knob_table
from flashgen.sram import estimate_shared_bytes, fits, shared_budget

table = knob_table("attn_fwd")
H200 = DeviceInfo("NVIDIA H200", (9, 0), 132, 232448, interpreter=False)


def test_estimate_counts_the_q_tile_and_the_kv_ring():
    variant = Variant(128, "bf16")
    config = table.config(block_m=128, block_n=64, num_stages=2)
    # Q: 128 x 128 x 2 bytes; K and V: 2 stages x 64 x 128 x 2 bytes each. Measured exact on an H200.
    assert estimate_shared_bytes(variant, config) == 128 * 128 * 2 + 2 * 2 * 64 * 128 * 2


@pytest.mark.parametrize("knob, low, high", [("block_m", 64, 128), ("block_n", 32, 64), ("num_stages", 2, 3)])
def test_estimate_grows_with_tiles_and_stages(knob, low, high):
    variant = Variant(64, "fp16")
    assert estimate_shared_bytes(variant, table.config(**{knob: low})) < estimate_shared_bytes(variant, table.config(**{knob: high}))


def test_padded_head_dim_and_wider_dtype_cost_more():
    config = table.default_config()
    assert estimate_shared_bytes(Variant(80, "fp16"), config) == estimate_shared_bytes(Variant(128, "fp16"), config)
    assert estimate_shared_bytes(Variant(64, "fp32"), config) == 2 * estimate_shared_bytes(Variant(64, "fp16"), config)


def test_budget_is_the_lower_of_device_and_user():
    assert shared_budget(H200) == 232448
    assert shared_budget(H200, 100_000) == 100_000
    assert shared_budget(INTERPRETER) is None
    assert shared_budget(INTERPRETER, 50_000) == 50_000
    with pytest.raises(ValueError, match="sram budget"):
        shared_budget(H200, 0)


@pytest.mark.parametrize("variant", [Variant(64, "bf16"), Variant(128, "fp16", causal=True), Variant(256, "fp32"), Variant(192, "bf16")])
@pytest.mark.parametrize("budget", [None, 120_000, 60_000])
def test_default_config_respects_the_budget(variant, budget):
    config = default_config(variant, H200, sram_budget=budget)
    assert fits(variant, config, shared_budget(H200, budget))


def test_default_config_says_when_nothing_fits():
    with pytest.raises(ValueError, match="no forward config"):
        default_config(Variant(256, "fp32"), H200, sram_budget=1000)
