"""Where the files that ship with flashgen live, in a checkout, an editable install and a wheel alike.

A wheel carries ``templates/`` and ``tuning_db/`` inside the package (``flashgen/templates``); a checkout
and an editable install keep them at the top of the repository, beside the package.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def _find(name: str) -> Path:
    for candidate in (_PACKAGE_DIR / name, _PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"flashgen's {name}/ folder is missing: looked in {_PACKAGE_DIR / name} and {_PACKAGE_DIR.parent / name}"
    )


@cache
def templates_dir() -> Path:
    return _find("templates")


@cache
def tuning_db_dir() -> Path:
    """The shipped pretuned caches (``tuning_db/*.json``)."""
    return _find("tuning_db")


def default_database_url(*, create_folder: bool = False) -> str:
    """``FLASHGEN_DB`` if set, else an SQLite file in the user data directory."""
    configured = os.environ.get("FLASHGEN_DB")
    if configured:
        return configured
    import platformdirs

    folder = Path(platformdirs.user_data_dir("flashgen"))
    if create_folder:
        folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'tuning.sqlite3'}"
