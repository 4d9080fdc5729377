"""The tuning database: one session scope, a schema version, SQLite made safe for concurrent tuners.

Any SQLAlchemy URL works; the default is an SQLite file in the user data directory (``FLASHGEN_DB``
overrides it). On SQLite every connection gets WAL journaling and a busy timeout, so two tuners writing
one file wait for each other instead of failing. Driver errors leave this module as :class:`StoreError`.

What is stored is data: configs, numbers and, for inspection, the generated source. Nothing read from a
database is executed; kernels are always regenerated from flashgen's templates.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import create_engine, event, inspect, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from flashgen.db.models import Base, Meta, TunedConfigRow
from flashgen.device import DeviceInfo
from flashgen.entries import TunedEntry
from flashgen.resources import default_database_url
from flashgen.shapes import ShapeBucket
from flashgen.spec import TileConfig

SCHEMA_VERSION = 1
SQLITE_BUSY_TIMEOUT_MS = 60_000

# Migrations from version N to N + 1, run in order inside one transaction. None exist yet: version 1 is
# the first schema. A database newer than this code is refused rather than guessed at.
MIGRATIONS: dict[int, Any] = {}


class StoreError(RuntimeError):
    """The tuning database could not be opened, read or written; the message says which and why."""


def default_url() -> str:
    """``FLASHGEN_DB`` if set, else an SQLite file in the user data directory (whose folder is created)."""
    return default_database_url(create_folder=True)


def _row_from_entry(entry: TunedEntry) -> TunedConfigRow:
    device = entry.device
    return TunedConfigRow(
        entry_key=entry.key,
        template=entry.template,
        template_digest=entry.template_digest,
        gpu_name=device.name,
        gpu_capability="" if device.capability is None else f"{device.capability[0]}.{device.capability[1]}",
        sm_count=device.sm_count,
        max_shared_mem=device.max_shared_mem,
        interpreter=device.interpreter,
        flashgen_version=entry.toolchain["flashgen"],
        triton_version=entry.toolchain["triton"],
        torch_version=entry.toolchain["torch"],
        cuda_version=entry.toolchain["cuda"],
        bucket_key=entry.bucket.key,
        bucket_json=json.dumps(entry.bucket.to_dict(), sort_keys=True),
        config_json=json.dumps(entry.config.to_dict(), sort_keys=True),
        median_ms=entry.median_ms,
        tflops=entry.tflops,
        error=entry.error,
        trials=entry.trials,
        trials_to_best=entry.trials_to_best,
        tuning_seconds=entry.tuning_seconds,
        source_sha256=entry.source_sha256,
        source_text=entry.source_text,
        created_at=entry.created_at,
    )


def _entry_from_row(row: TunedConfigRow) -> TunedEntry:
    capability = None
    if row.gpu_capability:
        major, minor = row.gpu_capability.split(".")
        capability = (int(major), int(minor))
    device = DeviceInfo(row.gpu_name, capability, row.sm_count, row.max_shared_mem, row.interpreter)
    toolchain = {"flashgen": row.flashgen_version, "triton": row.triton_version,
                 "torch": row.torch_version, "cuda": row.cuda_version}  # fmt: skip
    return TunedEntry(
        template=row.template,
        template_digest=row.template_digest,
        device=device,
        toolchain=toolchain,
        bucket=ShapeBucket.from_dict(json.loads(row.bucket_json)),
        config=TileConfig.from_dict(json.loads(row.config_json)),
        median_ms=row.median_ms,
        tflops=row.tflops,
        error=row.error,
        trials=row.trials,
        trials_to_best=row.trials_to_best,
        tuning_seconds=row.tuning_seconds,
        source_sha256=row.source_sha256,
        source_text=row.source_text,
        created_at=row.created_at,
        id=row.id,
    )


def _sqlite_pragmas(busy_timeout_ms: int, readonly: bool):
    def set_pragmas(dbapi_connection, _record) -> None:
        cursor = dbapi_connection.cursor()
        if not readonly:  # switching to WAL writes to the file
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        cursor.close()

    return set_pragmas


def _make_engine(url: str, busy_timeout_ms: int, readonly: bool) -> Engine:
    if url.startswith("sqlite"):
        in_memory = url in ("sqlite://", "sqlite:///:memory:")
        kwargs: dict[str, Any] = {"connect_args": {"timeout": busy_timeout_ms / 1000}}
        if in_memory:  # one shared connection, or every connection would see its own empty database
            kwargs.update(poolclass=StaticPool, connect_args={"check_same_thread": False})
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas(busy_timeout_ms, readonly))
        return engine
    return create_engine(url, pool_pre_ping=True)


class TuningStore:
    """flashgen's tables in the database at ``url`` (default: :func:`default_url`).

    readonly: never create or migrate tables (a database without flashgen's tables is a StoreError); what
    dispatch uses, with a short ``busy_timeout_ms`` so that a locked database delays a model by at most that.
    """

    def __init__(self, url: str | None = None, *, readonly: bool = False, busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS) -> None:
        self.url = url or default_url()
        self.readonly = readonly
        try:
            self.engine = _make_engine(self.url, busy_timeout_ms, readonly)
        except (SQLAlchemyError, ValueError, ImportError) as exc:
            raise StoreError(f"cannot open tuning database {self.url!r}: {exc}") from exc
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._prepare_schema()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """The one session scope: commit on success, roll back on error, driver errors as StoreError."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except SQLAlchemyError as exc:
            session.rollback()
            raise StoreError(f"tuning database {self.url!r}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def _prepare_schema(self) -> None:
        try:
            has_meta = inspect(self.engine).has_table(Meta.__tablename__)
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot open tuning database {self.url!r}: {str(exc).splitlines()[0]}") from exc
        if not has_meta and self.readonly:
            raise StoreError(f"{self.url!r} has no flashgen tables (not a flashgen tuning database, or an empty one)")
        if not has_meta:
            try:
                Base.metadata.create_all(self.engine)
            except SQLAlchemyError as exc:
                raise StoreError(f"cannot create tables in {self.url!r}: {str(exc).splitlines()[0]}") from exc
        with self.session() as session:
            meta = session.get(Meta, "schema_version")
            if meta is None and self.readonly:
                raise StoreError(f"{self.url!r} has no schema version: not a flashgen tuning database")
            if meta is None:
                session.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
                return
            try:
                version = int(meta.value)
            except ValueError:
                raise StoreError(f"{self.url!r} has a schema_version of {meta.value!r}: not a flashgen database") from None
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.url!r} has schema version {version}, newer than this flashgen's ({SCHEMA_VERSION}): "
                    "upgrade flashgen or use another database"
                )
            if version < SCHEMA_VERSION and self.readonly:
                raise StoreError(f"{self.url!r} has schema version {version}: run any flashgen command on it to migrate")
            while version < SCHEMA_VERSION:
                MIGRATIONS[version](session)
                version += 1
                meta.value = str(version)

    @property
    def schema_version(self) -> int:
        with self.session() as session:
            return int(session.get(Meta, "schema_version").value)

    def put(self, entry: TunedEntry, *, replace: bool = False) -> bool:
        """Store ``entry`` unless an entry for the same key and toolchain is faster (the same config at the
        same time is replaced: its counts are newer); with ``replace``, whatever is stored for the key gives way
        (a final round's time supersedes a search's). Returns whether it was written. Safe against a
        concurrent writer of the same key."""
        for _ in range(3):
            try:
                with self.session() as session:
                    existing = session.scalars(
                        select(TunedConfigRow).where(
                            TunedConfigRow.entry_key == entry.key,
                            TunedConfigRow.template_digest == entry.template_digest,
                            TunedConfigRow.triton_version == entry.toolchain["triton"],
                        )
                    ).one_or_none()
                    if existing is not None:
                        same = existing.config_json == json.dumps(entry.config.to_dict(), sort_keys=True)
                        faster = existing.median_ms < entry.median_ms
                        if (faster or (existing.median_ms == entry.median_ms and not same)) and not replace:
                            return False
                        session.delete(existing)
                        session.flush()
                    session.add(_row_from_entry(entry))
                return True
            except StoreError as exc:
                if not isinstance(exc.__cause__, IntegrityError):
                    raise  # another writer inserted the same key between our read and write: look again
        raise StoreError(f"could not store {entry.key}: the entry kept changing under a concurrent writer")

    def entries(self) -> list[TunedEntry]:
        with self.session() as session:
            rows = session.scalars(select(TunedConfigRow).order_by(TunedConfigRow.entry_key, TunedConfigRow.id))
            return [_entry_from_row(row) for row in rows]

    def find(self, key: str) -> list[TunedEntry]:
        """Entries whose key, or id, is ``key``."""
        with self.session() as session:
            query = select(TunedConfigRow).where(TunedConfigRow.entry_key == key)
            if key.isdigit():
                query = select(TunedConfigRow).where(TunedConfigRow.id == int(key))
            return [_entry_from_row(row) for row in session.scalars(query)]

    def delete(self, ids: list[int]) -> int:
        with self.session() as session:
            rows = session.scalars(select(TunedConfigRow).where(TunedConfigRow.id.in_(ids))).all()
            for row in rows:
                session.delete(row)
            return len(rows)

    def optuna_storage(self):
        """Optuna's RDB storage on the same database, so studies resume and optuna-dashboard can show them."""
        import optuna

        if self.url in ("sqlite://", "sqlite:///:memory:"):
            return optuna.storages.InMemoryStorage()
        engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}} if self.url.startswith("sqlite") else {}
        # Two tuners starting together both create Optuna's tables and the second fails on a unique
        # constraint (seen in tests/test_cli_tune.py); by the next try the tables are there.
        for attempt in range(5):
            try:
                return optuna.storages.RDBStorage(self.url, engine_kwargs=engine_kwargs)
            except SQLAlchemyError as exc:
                if attempt == 4:
                    raise StoreError(f"cannot open Optuna's tables in {self.url!r}: {str(exc).splitlines()[0]}") from exc
                time.sleep(0.2 * (attempt + 1))
