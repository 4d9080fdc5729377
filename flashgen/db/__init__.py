"""The tuning database (SQLAlchemy): ``models`` holds the ORM tables only, ``store`` everything else."""

from flashgen.db.store import SCHEMA_VERSION, StoreError, TunedEntry, TuningStore, default_url

__all__ = ["SCHEMA_VERSION", "StoreError", "TunedEntry", "TuningStore", "default_url"]
