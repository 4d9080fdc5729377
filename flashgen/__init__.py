"""flashgen: FlashAttention kernels generated from Jinja templates into Triton, tuned on your GPU."""

from flashgen.ops import attention
from flashgen.spec import KnobTable, TileConfig, Variant, knob_table

__all__ = ["KnobTable", "TileConfig", "Variant", "attention", "knob_table"]
