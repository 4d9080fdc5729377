"""ORM tables of the tuning database. Optuna's own tables (its studies and trials) live in the same
database, created by Optuna; these are flashgen's."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, DateTime, Float, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Meta(Base):
    """Key/value facts about the database itself; ``schema_version`` above all."""

    __tablename__ = "flashgen_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))


class TunedConfigRow(Base):
    """The winning tile config of one (GPU, toolchain, template, shape bucket)."""

    __tablename__ = "flashgen_tuned_configs"
    __table_args__ = (UniqueConstraint("entry_key", "template_digest", "triton_version", name="uq_entry_toolchain"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    entry_key: Mapped[str] = mapped_column(String(256), index=True)
    template: Mapped[str] = mapped_column(String(64))
    template_digest: Mapped[str] = mapped_column(String(64))

    gpu_name: Mapped[str] = mapped_column(String(128))
    gpu_capability: Mapped[str] = mapped_column(String(16))
    sm_count: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_shared_mem: Mapped[int | None] = mapped_column(Integer, nullable=True)
    interpreter: Mapped[bool] = mapped_column(Boolean)

    flashgen_version: Mapped[str] = mapped_column(String(64))
    triton_version: Mapped[str] = mapped_column(String(64))
    torch_version: Mapped[str] = mapped_column(String(64))
    cuda_version: Mapped[str] = mapped_column(String(64))

    bucket_key: Mapped[str] = mapped_column(String(192))
    bucket_json: Mapped[str] = mapped_column(Text)
    config_json: Mapped[str] = mapped_column(Text)

    median_ms: Mapped[float] = mapped_column(Float)
    tflops: Mapped[float] = mapped_column(Float)
    error: Mapped[float] = mapped_column(Float)
    trials: Mapped[int] = mapped_column(Integer)
    trials_to_best: Mapped[int] = mapped_column(Integer)
    tuning_seconds: Mapped[float] = mapped_column(Float)

    source_sha256: Mapped[str] = mapped_column(String(64))
    source_text: Mapped[str] = mapped_column(Text)  # for inspection only; never executed
    created_at: Mapped[datetime] = mapped_column(DateTime)
