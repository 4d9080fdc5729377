"""flashgen: FlashAttention kernels generated from Jinja templates into Triton, tuned on your GPU."""

from flashgen.dispatch import FlashgenWarning
from flashgen.ops import Explanation, UnsupportedError, attention, explain, reload
from flashgen.spec import KnobTable, TileConfig, Variant, knob_table

__all__ = ["Explanation", "FlashgenWarning", "KnobTable", "TileConfig", "UnsupportedError", "Variant", "attention",
           "explain", "knob_table", "reload"]  # fmt: skip
