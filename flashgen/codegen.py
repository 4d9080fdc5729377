"""Render a (template, variant, tile config) into Triton source, hash it, write it and import it.

One Jinja environment (StrictUndefined: a missing value is an error, never an empty string). Rendering is
deterministic. The rendered module is written under a readable name plus its content hash into the kernel
cache directory (``FLASHGEN_CACHE_DIR``, else the user cache directory) with a temp file and a rename, and
imported from that file, since Triton reads a kernel's source from its file. Because the name carries the
content hash, two processes that write the same kernel write the same bytes: the rename makes the race
harmless and no lock is needed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import jinja2
import jinja2.meta

from flashgen.device import import_triton
from flashgen.resources import templates_dir
from flashgen.spec import BACKWARD, FORWARD, KnobTable, TileConfig, Variant, knob_table

__all__ = ["BACKWARD", "FORWARD", "KernelSource", "cache_dir", "kernel_module", "load", "render", "template_digest", "write"]


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )


def _jinja_files(source: str) -> list[str]:
    """``source`` and every Jinja file it imports or includes, transitively, sorted."""
    environment, seen, pending = _environment(), set(), [source]
    while pending:
        name = pending.pop()
        if name not in seen:
            seen.add(name)
            parsed = environment.parse((templates_dir() / name).read_text())
            pending.extend(ref for ref in jinja2.meta.find_referenced_templates(parsed) if ref is not None)
    return sorted(seen)


@cache
def template_digest(template: str) -> str:
    """Hash of everything that renders ``template``: its knob table, its Jinja source and the Jinja files
    that source imports, and the same of each template its table ``uses`` (so editing one template leaves the
    digests of the templates that do not run its kernels, and the tuned entries checked against them, as they
    are)."""
    digest = hashlib.sha256()
    folder = templates_dir()
    table = knob_table(template)
    names = [f"{template}.toml", *_jinja_files(table.source)]
    for used in table.uses:  # the templates whose kernels this one runs too (after its own files)
        names += [n for n in (f"{used}.toml", *_jinja_files(knob_table(used).source)) if n not in names]
    for name in names:
        digest.update(name.encode() + b"\0" + (folder / name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class KernelSource:
    """Rendered Triton source and what it was rendered from."""

    template: str
    variant: Variant
    config: TileConfig
    text: str

    @property
    def digest(self) -> str:
        """sha256 of the source text: what a database entry's stored hash is checked against."""
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def module_name(self) -> str:
        readable = f"{self.template}__{self.variant.key}__{self.config.key}"
        return "flashgen_" + re.sub(r"[^0-9A-Za-z_]", "_", readable) + "__" + self.digest[:12]


def render(template: str, variant: Variant, config: TileConfig) -> KernelSource:
    """Render ``template`` for ``variant`` with ``config`` (validated against the template's knob table)."""
    table: KnobTable = knob_table(template)
    table.validate(config)
    context: dict[str, Any] = {
        "template": template,
        "template_digest": template_digest(template),
        "variant": variant,
        "config": config,
        "padded": variant.head_dim != variant.head_dim_padded,
        **table.constexprs(config),
    }
    text = _environment().get_template(table.source).render(**context)
    return KernelSource(template=template, variant=variant, config=config, text=text)


def cache_dir() -> Path:
    """Where rendered kernels are written: ``FLASHGEN_CACHE_DIR``, else the user cache directory."""
    configured = os.environ.get("FLASHGEN_CACHE_DIR")
    if configured:
        return Path(configured).expanduser() / "kernels"
    import platformdirs

    return Path(platformdirs.user_cache_dir("flashgen")) / "kernels"


def write(source: KernelSource, folder: Path | None = None) -> Path:
    """Write ``source`` to ``<folder>/<module_name>.py`` unless an identical file is already there."""
    folder = folder or cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{source.module_name}.py"
    data = source.text.encode()
    if path.is_file() and path.read_bytes() == data:
        return path
    handle, tmp = tempfile.mkstemp(dir=folder, prefix=f".{source.module_name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


_modules: dict[str, ModuleType] = {}


def load(source: KernelSource) -> ModuleType:
    """Import the module of ``source`` (written first if needed); memoised per source hash."""
    module = _modules.get(source.digest)
    if module is not None:
        return module
    import_triton()  # before any @triton.jit runs: it decides between compiled and interpreted kernels
    path = write(source)
    spec = importlib.util.spec_from_file_location(source.module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[source.module_name] = module
    spec.loader.exec_module(module)
    _modules[source.digest] = module
    return module


@cache
def kernel_module(template: str, variant: Variant, config: TileConfig) -> ModuleType:
    """Render, write and import in one step; memoised, so repeated calls are a dictionary lookup."""
    return load(render(template, variant, config))
