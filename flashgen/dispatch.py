"""Pick the tile configs a call runs with.

For now: the caller's config, else the default heuristic (:mod:`flashgen.defaults`). The tuning database
and the shipped caches come in front of the heuristic with the runtime-dispatch work.
"""

from __future__ import annotations

from flashgen.defaults import default_backward_config, default_config
from flashgen.device import DeviceInfo
from flashgen.spec import TileConfig, Variant


def forward_config(variant: Variant, device: DeviceInfo, requested: TileConfig | None = None) -> TileConfig:
    return requested if requested is not None else default_config(variant, device)


def backward_config(variant: Variant, device: DeviceInfo, requested: TileConfig | None = None) -> TileConfig:
    return requested if requested is not None else default_backward_config(variant, device)
