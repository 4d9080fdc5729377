"""Pick the tile configs a call runs with.

For now: the caller's config, else the default heuristic (:mod:`flashgen.defaults`). The tuning database
and the shipped caches come in front of the heuristic with the runtime-dispatch work.
"""

from __future__ import annotations

from dataclasses import replace

from flashgen.defaults import default_backward_config, default_config
from flashgen.device import DeviceInfo
from flashgen.spec import TileConfig, Variant


def forward_config(variant: Variant, device: DeviceInfo, requested: TileConfig | None = None) -> TileConfig:
    return requested if requested is not None else default_config(variant, device)


def backward_config(
    variant: Variant, device: DeviceInfo, requested: TileConfig | None = None, *, deterministic: bool = False
) -> TileConfig:
    """The backward config; with ``deterministic``, a picked config is switched to the separate dQ kernel
    (no atomics). A requested config is used as it is (``flashgen.attention`` refuses an atomic one when
    deterministic gradients are asked for)."""
    if requested is not None:
        return requested
    config = default_backward_config(variant, device)
    return _without_atomics(config) if deterministic else config


def _without_atomics(config: TileConfig) -> TileConfig:
    if not config["atomic_dq"]:
        return config
    return replace(config, extra=tuple((name, False if name == "atomic_dq" else value) for name, value in config.extra))
