"""A tuned winner as a value: what the database stores, a cache file carries and dispatch looks up.

Kept apart from the database code so that reading shipped caches at run time needs no SQLAlchemy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

from flashgen.device import DeviceInfo
from flashgen.shapes import ShapeBucket
from flashgen.spec import TileConfig


@dataclass(frozen=True)
class TunedEntry:
    """One tuned winner: where it was measured, what it is, how fast and how right it was."""

    template: str
    template_digest: str
    device: DeviceInfo
    toolchain: dict[str, str]  # flashgen, triton, torch, cuda versions
    bucket: ShapeBucket
    config: TileConfig
    median_ms: float
    tflops: float
    error: float  # relative error against the float64 reference on the check inputs
    trials: int
    trials_to_best: int
    tuning_seconds: float
    source_sha256: str
    source_text: str = field(default="", repr=False)
    created_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc).replace(tzinfo=None))
    id: int | None = None

    @property
    def key(self) -> str:
        """``<device>/<template>/<bucket>``: what dispatch looks an entry up by."""
        return f"{self.device.key}/{self.template}/{self.bucket.key}"

    def is_stale(self, template_digest: str, triton_version: str) -> bool:
        """Made by other templates or another Triton than these: reported, never used."""
        return self.template_digest != template_digest or self.toolchain.get("triton") != triton_version
