"""What a kernel variant is and how a kernel is cut into tiles: frozen, validated values with stable keys.

A :class:`Variant` says which attention a model needs (head dim, dtype, causal, dropout); a
:class:`TileConfig` says how one kernel computes it (block sizes, warps, pipelining depth and the
template's own knobs). Each template declares its knobs once, in ``templates/<template>.toml``; that
:class:`KnobTable` is the single source for validation, the tuner's search space, the SRAM model and the CLI.

Runtime properties that do not change the generated code (sequence lengths, batch, the GQA group size,
the causal alignment, the softmax scale, the dropout probability) are kernel arguments, not spec fields.
New mask or score variants (sliding window, soft-capping, ALiBi, ...) are added as a field here with a
neutral default and a block in the template.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Union

import torch

from flashgen.resources import templates_dir

KnobValue = Union[bool, int, str]

HEAD_DIM_MIN = 16
HEAD_DIM_MAX = 256
DTYPES = ("fp16", "bf16", "fp32")
_DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}
CORE_KNOBS = ("block_m", "block_n", "num_warps", "num_stages")
FORWARD = "attn_fwd"  # the templates: templates/<name>.py.j2 with its knob table templates/<name>.toml
FORWARD_SM90 = "attn_fwd_sm90"  # Hopper's own forward (Gluon); runs what its table's [template.supports] says
BACKWARD = "attn_bwd"
BACKWARD_SM90 = "attn_bwd_sm90"  # Hopper's backward: a Gluon dQ kernel, then attn_bwd's dK/dV kernel
BACKWARD_FUSED_SM90 = "attn_bwd_fused_sm90"  # Hopper's backward in one Gluon kernel, dQ summed atomically
BACKWARD_FUSED_TMA_SM90 = "attn_bwd_fused_tma_sm90"  # the same in FA3's layout, dQ summed by TMA reduce-adds
FORWARD_TEMPLATES = (FORWARD, FORWARD_SM90)  # dispatch picks the faster tuned one per shape bucket
BACKWARD_TEMPLATES = (BACKWARD, BACKWARD_SM90, BACKWARD_FUSED_SM90, BACKWARD_FUSED_TMA_SM90)  # likewise
TEMPLATES = (*FORWARD_TEMPLATES, *BACKWARD_TEMPLATES)


def _canonical_json(data: Mapping[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def _short_digest(data: Mapping[str, Any]) -> str:
    return hashlib.sha256(_canonical_json(data).encode()).hexdigest()[:16]


def check_type(owner: str, name: str, value: Any, expected: type) -> None:
    # bool is a subclass of int: an int field must not accept True, a bool field must not accept 1.
    if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(f"{owner}.{name} must be an int, got {value!r}")
    if expected is bool and not isinstance(value, bool):
        raise TypeError(f"{owner}.{name} must be a bool, got {value!r}")
    if expected is str and not isinstance(value, str):
        raise TypeError(f"{owner}.{name} must be a str, got {value!r}")


def next_power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


@dataclass(frozen=True)
class Variant:
    """The attention a kernel computes.

    head_dim: 16..256; a non-power-of-two is padded to the next power of two inside the kernel with masks.
    dtype: "fp16", "bf16" or "fp32" (q, k, v and the output; accumulation is always fp32).
    causal: mask keys after the query (the alignment, top-left or bottom-right, is a runtime argument).
    dropout: compile the Philox dropout path in (the probability is a runtime argument).
    """

    head_dim: int
    dtype: str
    causal: bool = False
    dropout: bool = False

    def __post_init__(self) -> None:
        check_type("Variant", "head_dim", self.head_dim, int)
        check_type("Variant", "dtype", self.dtype, str)
        check_type("Variant", "causal", self.causal, bool)
        check_type("Variant", "dropout", self.dropout, bool)
        if not HEAD_DIM_MIN <= self.head_dim <= HEAD_DIM_MAX:
            raise ValueError(
                f"Variant.head_dim must be in [{HEAD_DIM_MIN}, {HEAD_DIM_MAX}], got {self.head_dim}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"Variant.dtype must be one of {DTYPES}, got {self.dtype!r}")

    @property
    def head_dim_padded(self) -> int:
        return next_power_of_two(self.head_dim)

    @property
    def element_size(self) -> int:
        return _DTYPE_BYTES[self.dtype]

    @property
    def key(self) -> str:
        """Readable and stable: ``d128-bf16-causal-dropout``."""
        parts = [f"d{self.head_dim}", self.dtype]
        if self.causal:
            parts.append("causal")
        if self.dropout:
            parts.append("dropout")
        return "-".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"head_dim": self.head_dim, "dtype": self.dtype, "causal": self.causal, "dropout": self.dropout}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Variant:
        if not isinstance(data, Mapping):
            raise TypeError(f"a variant must be a mapping, got {type(data).__name__}")
        allowed = {"head_dim", "dtype", "causal", "dropout"}
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(f"unknown variant field(s): {sorted(unknown)}; expected {sorted(allowed)}")
        missing = {"head_dim", "dtype"} - set(data)
        if missing:
            raise ValueError(f"variant is missing field(s): {sorted(missing)}")
        return cls(**data)


@dataclass(frozen=True)
class TileConfig:
    """How one kernel is cut up: block sizes, launch knobs and the template's own knobs.

    ``extra`` holds the template-specific knobs as sorted ``(name, value)`` pairs; a mapping is accepted
    and normalised. Which knobs and values are allowed is the template's :class:`KnobTable`'s business
    (:meth:`KnobTable.validate`); this class checks only what holds for every template.
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    extra: tuple[tuple[str, KnobValue], ...] = field(default=())

    def __post_init__(self) -> None:
        for name in CORE_KNOBS:
            value = getattr(self, name)
            check_type("TileConfig", name, value, int)
            if value < 1:
                raise ValueError(f"TileConfig.{name} must be positive, got {value}")
        for name in ("block_m", "block_n", "num_warps"):
            value = getattr(self, name)
            # block_m may also be a multiple of 64: a tile of several 64-row warp groups (attn_fwd_sm90's 192).
            if value & (value - 1) and not (name == "block_m" and value % 64 == 0):
                expected = "a power of two or a multiple of 64" if name == "block_m" else "a power of two"
                raise ValueError(f"TileConfig.{name} must be {expected}, got {value}")
        extra = self.extra.items() if isinstance(self.extra, Mapping) else self.extra
        pairs = []
        for item in extra:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise TypeError(f"TileConfig.extra must hold (name, value) pairs, got {item!r}")
            name, value = item
            if name in CORE_KNOBS:
                raise ValueError(f"TileConfig.extra must not repeat the core knob {name!r}")
            if not isinstance(value, (bool, int, str)):
                raise TypeError(f"TileConfig knob {name!r} must be a bool, int or str, got {value!r}")
            pairs.append((name, value))
        names = [name for name, _ in pairs]
        if len(set(names)) != len(names):
            raise ValueError(f"TileConfig.extra names a knob twice: {names}")
        object.__setattr__(self, "extra", tuple(sorted(pairs)))

    def __getitem__(self, name: str) -> KnobValue:
        if name in CORE_KNOBS:
            return getattr(self, name)
        for knob, value in self.extra:
            if knob == name:
                return value
        raise KeyError(f"this tile config has no knob {name!r}; it has {sorted(self.to_dict())}")

    def to_dict(self) -> dict[str, KnobValue]:
        data: dict[str, KnobValue] = {name: getattr(self, name) for name in CORE_KNOBS}
        data.update(self.extra)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TileConfig:
        if not isinstance(data, Mapping):
            raise TypeError(f"a tile config must be a mapping, got {type(data).__name__}")
        missing = [name for name in CORE_KNOBS if name not in data]
        if missing:
            raise ValueError(f"tile config is missing knob(s): {missing}")
        core = {name: data[name] for name in CORE_KNOBS}
        extra = tuple((name, value) for name, value in data.items() if name not in CORE_KNOBS)
        return cls(**core, extra=extra)

    @property
    def key(self) -> str:
        """Readable and stable: ``m128-n64-w4-s2-split_masked=1``."""
        parts = [f"m{self.block_m}", f"n{self.block_n}", f"w{self.num_warps}", f"s{self.num_stages}"]
        for name, value in self.extra:
            parts.append(f"{name}={int(value) if isinstance(value, bool) else value}")
        return "-".join(parts)

    @property
    def digest(self) -> str:
        return _short_digest(self.to_dict())


@dataclass(frozen=True)
class Knob:
    """One tunable of a template: the values it may take and the one used when nothing is tuned."""

    name: str
    kind: str  # "constexpr": rendered into the source; "launch": passed to the kernel launch
    choices: tuple[KnobValue, ...]
    default: KnobValue
    help: str
    # Other knobs' values that this knob's other-than-default values need: (knob, allowed values) pairs.
    requires: tuple[tuple[str, tuple[KnobValue, ...]], ...] = ()


@dataclass(frozen=True)
class Support:
    """What a template's kernels can run (``[template.supports]`` in its table); None: no restriction."""

    head_dims: tuple[int, ...] | None = None
    dtypes: tuple[str, ...] | None = None
    dropout: bool = True
    capabilities: tuple[tuple[int, int], ...] | None = None  # CUDA compute capabilities (major, minor)
    # Whether its gradients are bit-reproducible: false where dQ is summed with atomic adds whatever the config.
    deterministic: bool = True

    def refusal(self, variant: Variant, capability: tuple[int, int] | None) -> str | None:
        """Why the template cannot run ``variant`` on a device of ``capability`` (None: the interpreter),
        or None when it can."""
        if self.head_dims is not None and variant.head_dim not in self.head_dims:
            return f"head_dim {variant.head_dim} (it runs {list(self.head_dims)})"
        if self.dtypes is not None and variant.dtype not in self.dtypes:
            return f"dtype {variant.dtype} (it runs {list(self.dtypes)})"
        if variant.dropout and not self.dropout:
            return "dropout"
        if self.capabilities is not None and capability not in self.capabilities:
            where = "Triton's interpreter" if capability is None else f"compute capability {capability}"
            return f"{where} (it runs on {[tuple(c) for c in self.capabilities]})"
        return None


@dataclass(frozen=True)
class KnobTable:
    """The knobs a template declares, read from ``templates/<template>.toml``."""

    template: str
    source: str
    description: str
    knobs: tuple[Knob, ...]
    supports: Support = Support()
    uses: tuple[str, ...] = ()  # other templates whose kernels this one's launches run too

    def __getitem__(self, name: str) -> Knob:
        for knob in self.knobs:
            if knob.name == name:
                return knob
        raise KeyError(f"template {self.template!r} has no knob {name!r}; it has {list(self.names)}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(knob.name for knob in self.knobs)

    def refusal(self, variant: Variant, device) -> str | None:
        """Why this template cannot run ``variant`` on ``device`` (a :class:`flashgen.device.DeviceInfo`), or
        None when it can."""
        return self.supports.refusal(variant, None if device.interpreter else device.capability)

    def validate(self, config: TileConfig) -> TileConfig:
        """Return ``config`` if every knob is declared here and has an allowed value; else ValueError."""
        values = config.to_dict()
        unknown = sorted(set(values) - set(self.names))
        if unknown:
            raise ValueError(f"unknown knob(s) {unknown} for template {self.template!r}; it has {list(self.names)}")
        missing = [name for name in self.names if name not in values]
        if missing:
            raise ValueError(f"tile config for template {self.template!r} is missing knob(s) {missing}")
        for knob in self.knobs:
            value = values[knob.name]
            if type(value) is not type(knob.default) or value not in knob.choices:
                raise ValueError(
                    f"knob {knob.name!r} of template {self.template!r} must be one of {list(knob.choices)}, "
                    f"got {value!r}"
                )
        unmet = self._unmet_requirement(values)
        if unmet is not None:
            knob, other, allowed = unmet
            raise ValueError(f"knob {knob!r}={values[knob]!r} of template {self.template!r} needs {other} in "
                             f"{list(allowed)}, got {values[other]!r}")  # fmt: skip
        return config

    def _unmet_requirement(self, values: Mapping[str, KnobValue]) -> tuple[str, str, tuple[KnobValue, ...]] | None:
        """The first (knob, other knob, values it needs) whose ``requires`` ``values`` break, or None."""
        for knob in self.knobs:
            if values[knob.name] != knob.default:
                for other, allowed in knob.requires:
                    if values[other] not in allowed:
                        return knob.name, other, allowed
        return None

    def config(self, **values: KnobValue) -> TileConfig:
        """A validated tile config: the given knobs, the defaults for the rest."""
        merged = {knob.name: knob.default for knob in self.knobs}
        unknown = sorted(set(values) - set(merged))
        if unknown:
            raise ValueError(f"unknown knob(s) {unknown} for template {self.template!r}; it has {list(self.names)}")
        merged.update(values)
        return self.validate(TileConfig.from_dict(merged))

    def parse_key(self, key: str) -> TileConfig:
        """The validated config a :attr:`TileConfig.key` names (``m128-n64-w8-s3-tma=1``); knobs the key
        leaves out take their defaults. ValueError saying what was expected otherwise."""
        parts = key.strip().split("-")
        core = dict(zip(("block_m", "block_n", "num_warps", "num_stages"), parts[:4]))
        prefixes = {"block_m": "m", "block_n": "n", "num_warps": "w", "num_stages": "s"}
        values: dict[str, KnobValue] = {}
        expected = f"expected m<block_m>-n<block_n>-w<warps>-s<stages>[-knob=value...], got {key!r}"
        for name, prefix in prefixes.items():
            text = core.get(name, "")
            if not (text.startswith(prefix) and text[1:].isdigit()):
                raise ValueError(f"config key: {expected}")
            values[name] = int(text[1:])
        for part in parts[4:]:
            name, sep, text = part.partition("=")
            if not sep or name not in self.names or name in values:
                raise ValueError(f"config key: {part!r} is not knob=value with a knob of {self.template!r}: {list(self.names)}")
            default = self[name].default
            if isinstance(default, bool):
                if text not in ("0", "1", "true", "false"):
                    raise ValueError(f"config key: knob {name!r} takes 0 or 1, got {text!r}")
                values[name] = text in ("1", "true")
            else:
                try:
                    values[name] = type(default)(text)
                except ValueError:
                    raise ValueError(f"config key: knob {name!r} takes {list(self[name].choices)}, got {text!r}") from None
        return self.config(**values)

    def default_config(self) -> TileConfig:
        return self.config()

    def all_configs(self) -> Iterator[TileConfig]:
        """Every valid combination of the declared choices (before any SRAM pruning)."""
        for combo in itertools.product(*(knob.choices for knob in self.knobs)):
            values = dict(zip(self.names, combo))
            if self._unmet_requirement(values) is None:
                yield TileConfig.from_dict(values)

    def constexprs(self, config: TileConfig) -> dict[str, KnobValue]:
        """The knobs rendered into the source, upper-cased as the template names them."""
        return {knob.name.upper(): config[knob.name] for knob in self.knobs if knob.kind == "constexpr"}


def _parse_knob(template: str, name: str, raw: Mapping[str, Any]) -> Knob:
    where = f"templates/{template}.toml, knob {name!r}"
    kind = raw.get("kind")
    if kind not in ("constexpr", "launch"):
        raise ValueError(f"{where}: kind must be 'constexpr' or 'launch', got {kind!r}")
    choices = raw.get("choices")
    if not isinstance(choices, list) or not choices:
        raise ValueError(f"{where}: choices must be a non-empty list")
    default = raw.get("default")
    if default not in choices:
        raise ValueError(f"{where}: default {default!r} is not among the choices {choices}")
    if len({type(choice) for choice in choices}) != 1:
        raise ValueError(f"{where}: choices must all have one type, got {choices}")
    requires = raw.get("requires", {})
    if not isinstance(requires, dict) or not all(isinstance(v, list) and v for v in requires.values()):
        raise ValueError(f"{where}: requires must map other knobs to non-empty lists of their values")
    return Knob(name=name, kind=kind, choices=tuple(choices), default=default, help=str(raw.get("help", "")),
                requires=tuple((other, tuple(allowed)) for other, allowed in sorted(requires.items())))  # fmt: skip


@cache
def knob_table(template: str) -> KnobTable:
    """The knob table that ``templates/<template>.toml`` declares."""
    path = templates_dir() / f"{template}.toml"
    if not path.is_file():
        raise ValueError(f"no template named {template!r}: {path} does not exist")
    raw = tomllib.loads(path.read_text())
    head = raw.get("template", {})
    knobs = tuple(_parse_knob(template, name, spec) for name, spec in raw.get("knobs", {}).items())
    missing = [name for name in CORE_KNOBS if name not in {knob.name for knob in knobs}]
    if missing:
        raise ValueError(f"templates/{template}.toml must declare the core knobs; missing {missing}")
    for knob in knobs:
        for other, allowed in knob.requires:
            known = next((k for k in knobs if k.name == other), None)
            if known is None or other == knob.name or not set(allowed) <= set(known.choices):
                raise ValueError(f"templates/{template}.toml, knob {knob.name!r}: requires {other}={list(allowed)}, "
                                 "which is not another knob and some of its choices")  # fmt: skip
    uses = head.get("uses", [])
    if not isinstance(uses, list) or not all(isinstance(u, str) and u != template for u in uses):
        raise ValueError(f"templates/{template}.toml: [template] uses must be a list of other templates' names")
    return KnobTable(
        template=template,
        source=head["source"],
        description=head.get("description", ""),
        knobs=knobs,
        supports=_parse_support(template, head.get("supports", {})),
        uses=tuple(uses),
    )


def _parse_support(template: str, raw: Mapping[str, Any]) -> Support:
    where = f"templates/{template}.toml, [template.supports]"
    unknown = set(raw) - {"head_dims", "dtypes", "dropout", "deterministic", "capabilities"}
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}")
    capabilities = raw.get("capabilities")
    if capabilities is not None and not all(isinstance(c, list) and len(c) == 2 for c in capabilities):
        raise ValueError(f"{where}: capabilities must be [major, minor] pairs, got {capabilities}")
    return Support(
        head_dims=tuple(raw["head_dims"]) if "head_dims" in raw else None,
        dtypes=tuple(raw["dtypes"]) if "dtypes" in raw else None,
        dropout=bool(raw.get("dropout", True)),
        deterministic=bool(raw.get("deterministic", True)),
        capabilities=tuple(tuple(c) for c in capabilities) if capabilities is not None else None,
    )


def forward_template_of(config: TileConfig) -> str:
    """The forward template whose knob table ``config`` belongs to (each declares its own knobs, so at most
    one accepts it); ValueError naming each table's complaint otherwise."""
    return _template_of(config, FORWARD_TEMPLATES, "forward")


def backward_template_of(config: TileConfig) -> str:
    """The backward template whose knob table ``config`` belongs to; see :func:`forward_template_of`."""
    return _template_of(config, BACKWARD_TEMPLATES, "backward")


@cache  # once per config: attention_backward asks on every call
def _template_of(config: TileConfig, templates: tuple[str, ...], direction: str) -> str:
    complaints = []
    for template in templates:
        try:
            knob_table(template).validate(config)
        except ValueError as exc:
            complaints.append(str(exc))
        else:
            return template
    raise ValueError(f"config {config.key} is not a config of a {direction} template: " + "; ".join(complaints))


CAUSAL_ALIGNMENTS = ("top_left", "bottom_right")


def causal_offset(alignment: str, n_q: int, n_k: int) -> int:
    """The diagonal of the causal mask: query row i sees key j iff ``j <= i + causal_offset``.

    "top_left" (SDPA's ``is_causal``) puts the diagonal at the top-left corner: offset 0.
    "bottom_right" (FlashAttention's convention, what KV-cache decoding needs) aligns the last query with
    the last key: offset ``n_k - n_q``; with ``n_q > n_k`` the first rows then see no key at all.
    """
    if alignment == "top_left":
        return 0
    if alignment == "bottom_right":
        return n_k - n_q
    raise ValueError(f"causal alignment must be one of {CAUSAL_ALIGNMENTS}, got {alignment!r}")
