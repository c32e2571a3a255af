"""A run's config: one typed, frozen record of what a run folder holds and how to rebuild it.

``RunConfig(kind, data, model, training, extra, facts)`` is written as nested JSON (``config.json``, version
:data:`CONFIG_VERSION`) and read back exactly (``RunConfig.from_json(c.to_json()) == c``). ``kind`` is one of
:data:`KINDS`; it picks the model section's class and the extra section's (the mask of a masked VAE, M2's
labels). Reading checks every field (a missing, unknown or wrongly typed one is a one-line
:class:`PyrovaeError` naming it) and converts the flat version-1 configs of earlier releases.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import PyrovaeError

CONFIG_VERSION = 2  # bump when a field is added, renamed or changes meaning (and convert the old version on read)
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit


def _check(valid: Any) -> dict[str, Any]:
    return {"valid": valid}


@dataclass(frozen=True)
class DataConfig:
    """Which images, and how their pixels are handled and split."""

    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    root: str | None = None
    download: bool = False
    binarize: str = "dynamic"
    dequantize: bool = False
    allow_nonbinary: bool = False
    val_size: int | None = field(default=None, metadata=_check(lambda v: v >= 0))  # None: data.default_val_size
    train_size: int | None = field(default=None, metadata=_check(lambda v: v >= 2))


@dataclass(frozen=True)
class ModelConfig:
    """A VAE: decoder likelihood and network architecture (a preset with overrides)."""

    likelihood: str = "bernoulli"
    sigma: float | None = field(default=None, metadata=_check(lambda v: v > 0))
    arch: str = "iwae"
    z_dim: int | None = field(default=None, metadata=_check(lambda v: v >= 1))
    hidden: tuple[int, ...] | None = field(default=None, metadata=_check(lambda v: len(v) > 0 and min(v) >= 1))
    activation: str | None = None
    autocast: str | None = None


@dataclass(frozen=True)
class MixtureConfig:
    """A mixture (``pyrovae compare``'s baseline): ``k`` components of a ``family``, its covariance."""

    k: int = field(default=10, metadata=_check(lambda v: v >= 1))
    family: str = "gaussian"
    covariance: str = "diag"


@dataclass(frozen=True)
class M2Config:
    """M2 (Kingma et al. 2014): the decoder likelihood, one hidden-size list for its three MLPs, α = alpha_scale · N."""

    likelihood: str = "bernoulli"
    hidden: tuple[int, ...] = field(default=(500,), metadata=_check(lambda v: len(v) > 0 and min(v) >= 1))
    z_dim: int = field(default=50, metadata=_check(lambda v: v >= 1))
    alpha_scale: float = field(default=1.0, metadata=_check(lambda v: v >= 0))
    classes: int = field(default=10, metadata=_check(lambda v: v >= 2))


@dataclass(frozen=True)
class TrainingConfig:
    """The optimisation: estimator, epochs, minibatches, Adam's learning rate and its schedule, seed, device."""

    elbo: str = "meanfield"
    particles: int | None = field(default=None, metadata=_check(lambda v: v >= 1))
    alpha: float | None = None
    epochs: int = field(default=10, metadata=_check(lambda v: v >= 1))
    batch_size: int = field(default=100, metadata=_check(lambda v: v >= 1))
    lr: float = field(default=1e-3, metadata=_check(lambda v: v > 0))
    clip_norm: float | None = field(default=None, metadata=_check(lambda v: v > 0))
    lr_schedule: str = "none"
    lr_gamma: float = field(default=0.95, metadata=_check(lambda v: v > 0))
    warmup_epochs: float = field(default=0.0, metadata=_check(lambda v: v >= 0))
    seed: int = field(default=0, metadata=_check(lambda v: 0 <= v <= MAX_SEED))
    device: str = "auto"


@dataclass(frozen=True)
class MaskConfig:
    """The masks a masked VAE trains on: a mask kind and the share of pixels it hides."""

    mask: str = "mix"
    rate: float = field(default=0.5, metadata=_check(lambda v: 0 <= v <= 1))


@dataclass(frozen=True)
class LabelsConfig:
    """M2's labelled examples: how many (balanced per class), and how many of them per step."""

    labels: int = field(default=100, metadata=_check(lambda v: v >= 1))
    labelled_batch: int = field(default=50, metadata=_check(lambda v: v >= 1))


# kind: (the model section's class, the extra section's class or None)
KINDS: dict[str, tuple[type, type | None]] = {
    "vae": (ModelConfig, None),
    "masked": (ModelConfig, MaskConfig),
    "gmm": (MixtureConfig, None),
    "semisupervised": (M2Config, LabelsConfig),
}
SECTIONS = ("data", "model", "training", "extra")


@dataclass(frozen=True)
class RunConfig:
    """Everything needed to rebuild a run: its kind, data, model and training settings, the kind's extra section.

    ``facts`` records what the run found (data source, sizes, library versions): written, never used to rebuild.
    """

    kind: str = "vae"
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = field(default_factory=ModelConfig)  # KINDS[kind][0]
    training: TrainingConfig = field(default_factory=TrainingConfig)
    extra: Any = None  # KINDS[kind][1], or None
    facts: dict[str, Any] = field(default_factory=dict, hash=False)  # compared, but no part of the hash
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PyrovaeError(f"unknown run kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        model_cls, extra_cls = KINDS[self.kind]
        if not isinstance(self.model, model_cls):
            raise PyrovaeError(f"a {self.kind} run's model section is a {model_cls.__name__}")
        if (extra_cls is None) != (self.extra is None) or extra_cls and not isinstance(self.extra, extra_cls):
            wanted = extra_cls.__name__ if extra_cls else "nothing"
            raise PyrovaeError(f"a {self.kind} run's extra section is {wanted}")

    def replace(self, **sections: Any) -> RunConfig:
        """A copy with whole sections replaced, or fields within them: ``replace(training={"epochs": 5})``."""
        changes = {}
        for name, value in sections.items():
            if isinstance(value, dict) and name in SECTIONS:
                value = dataclasses.replace(getattr(self, name), **value)
            changes[name] = value
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The nested, JSON-ready form (tuples as lists)."""
        out: dict[str, Any] = {"version": self.version, "kind": self.kind}
        for name in SECTIONS:
            section = getattr(self, name)
            if section is not None:
                out[name] = {f.name: _plain(getattr(section, f.name)) for f in dataclasses.fields(section)}
        out["facts"] = _plain(self.facts)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, raw: Any, where: str = "the config") -> RunConfig:
        """Check and build; a version-1 (flat) config of an earlier release is converted first."""
        if not isinstance(raw, dict):
            raise PyrovaeError(f"{where} is not a run config: it holds a JSON {type(raw).__name__}, not an object")
        if "version" not in raw and "config_version" in raw:
            return from_v1(raw, where)
        version = raw.get("version", "none")
        if version != CONFIG_VERSION:
            raise PyrovaeError(
                f"{where} has config version {version!r}; this pyrovae reads versions 1 and {CONFIG_VERSION} "
                "(retrain the run, or read it with the pyrovae that wrote it)"
            )
        kind = raw.get("kind")
        if kind not in KINDS:
            raise PyrovaeError(f"{where}: field 'kind' is {kind!r}, expected one of {', '.join(KINDS)}")
        model_cls, extra_cls = KINDS[kind]
        classes = {"data": DataConfig, "model": model_cls, "training": TrainingConfig, "extra": extra_cls}
        unknown = sorted(set(raw) - {"version", "kind", "facts", *(k for k, c in classes.items() if c)})
        if unknown:
            raise PyrovaeError(f"{where} has an unknown field {unknown[0]!r}; a {kind} run has {', '.join(classes)}")
        sections = {}
        for name, section_cls in classes.items():
            if section_cls is not None:
                if name not in raw:
                    raise PyrovaeError(f"{where} lacks the field {name!r}: a run's config must be complete")
                sections[name] = _section(section_cls, raw[name], name, where)
        facts = raw.get("facts", {})
        if not isinstance(facts, dict):
            raise PyrovaeError(f"{where}: field 'facts' is {facts!r}, expected an object")
        return cls(kind=kind, facts=facts, version=version, **sections)

    @classmethod
    def from_json(cls, text: str, where: str = "the config") -> RunConfig:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PyrovaeError(f"{where} is not valid JSON: {exc}") from None
        return cls.from_dict(raw, where)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


_TYPES = {"str": (str,), "bool": (bool,), "int": (int,), "float": (int, float)}


def _section(cls: type, raw: Any, name: str, where: str) -> Any:
    """One section, every field checked against its annotation and its ``valid`` test."""
    if not isinstance(raw, dict):
        raise PyrovaeError(f"{where}: field {name!r} is {raw!r}, expected an object")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise PyrovaeError(f"{where} has an unknown field '{name}.{unknown[0]}'; {name} has {', '.join(fields)}")
    values = {}
    for key, f in fields.items():
        if key not in raw:
            raise PyrovaeError(f"{where} lacks the field '{name}.{key}': a run's config must be complete")
        values[key] = _value(f, raw[key], f"{name}.{key}", where)
    return cls(**values)


def _value(f: dataclasses.Field, value: Any, path: str, where: str) -> Any:
    annotation = str(f.type)
    nullable = annotation.endswith("| None")
    base = annotation.removesuffix(" | None")
    if value is None and nullable:
        return None
    valid = f.metadata.get("valid")
    if base == "tuple[int, ...]":
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        expected = "list of int"
        value = tuple(value) if ok else value
    else:
        types = _TYPES[base]
        ok = isinstance(value, types) and (bool in types or not isinstance(value, bool))
        expected = "/".join(t.__name__ for t in types)
        if ok and base == "float":
            value = float(value)
    if not ok or (valid is not None and not valid(value)):
        expected += " or null" if nullable else ""
        raise PyrovaeError(f"{where}: field {path!r} is {value!r}, expected a valid {expected}")
    return value


def parse_hidden(hidden: str | tuple[int, ...] | None) -> tuple[int, ...] | None:
    """Hidden sizes as a tuple, from the command line's ``"400,200"`` form too."""
    if isinstance(hidden, str):
        return tuple(int(h) for h in hidden.split(","))
    return tuple(hidden) if hidden is not None else None


# the flat option names of ``pyrovae train`` (the field names of the data, model and training sections)
OPTIONS: dict[str, str] = {
    f.name: section
    for section, cls in (("data", DataConfig), ("model", ModelConfig), ("training", TrainingConfig))
    for f in dataclasses.fields(cls)
}


def flat_options(cfg: RunConfig) -> dict[str, Any]:
    """A VAE run's data, model and training fields in one flat dict, by option name."""
    return {name: getattr(getattr(cfg, section), name) for name, section in OPTIONS.items()}


def with_options(cfg: RunConfig, options: dict[str, Any], where: str = "the options") -> RunConfig:
    """``cfg`` with fields set by option name (``hidden`` may be ``"400,200"``), checked as a saved config is."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise PyrovaeError(f"unknown option {unknown[0]!r}; a run's options are {', '.join(OPTIONS)}")
    sections: dict[str, dict[str, Any]] = {}
    for name, value in options.items():
        sections.setdefault(OPTIONS[name], {})[name] = parse_hidden(value) if name == "hidden" else value
    return RunConfig.from_dict(cfg.replace(**sections).to_dict(), where)


# ------------------------------------------------------------------------------------ version 1 (flat)
_STR, _BOOL, _INT, _NUM = (str,), (bool,), (int,), (int, float)
# the flat fields of a version-1 config: accepted types, whether null is allowed, and a check of the value
V1_FIELDS: dict[str, tuple[tuple[type, ...], bool, Any]] = {
    "dataset": (_STR, False, None),
    "data_dir": (_STR, True, None),
    "root": (_STR, True, None),
    "download": (_BOOL, False, None),
    "likelihood": (_STR, False, None),
    "sigma": (_NUM, True, lambda v: v > 0),
    "allow_nonbinary": (_BOOL, False, None),
    "binarize": (_STR, False, None),
    "dequantize": (_BOOL, False, None),
    "arch": (_STR, False, None),
    "z_dim": (_INT, True, lambda v: v >= 1),
    "hidden": (_STR, True, lambda v: re.fullmatch(r"[1-9]\d*(,[1-9]\d*)*", v) is not None),
    "activation": (_STR, True, None),
    "elbo": (_STR, False, None),
    "particles": (_INT, True, lambda v: v >= 1),
    "alpha": (_NUM, True, None),
    "epochs": (_INT, False, lambda v: v >= 1),
    "batch_size": (_INT, False, lambda v: v >= 1),
    "lr": (_NUM, False, lambda v: v > 0),
    "clip_norm": (_NUM, True, lambda v: v > 0),
    "lr_schedule": (_STR, False, None),
    "lr_gamma": (_NUM, False, lambda v: v > 0),
    "warmup_epochs": (_NUM, False, lambda v: v >= 0),
    "val_size": (_INT, True, lambda v: v >= 0),
    "train_size": (_INT, True, lambda v: v >= 2),
    "device": (_STR, False, None),
    "seed": (_INT, False, lambda v: 0 <= v <= MAX_SEED),
    "autocast": (_STR, True, None),
}


def check_v1(cfg: dict[str, Any], where: str) -> None:
    """Refuse a version-1 config with a missing or wrongly typed field, as that release did (one line naming it)."""
    for key, (types, nullable, valid) in V1_FIELDS.items():
        if key not in cfg:
            raise PyrovaeError(f"{where} lacks the field {key!r}: a run's config must be complete")
        value = cfg[key]
        if value is None and nullable:
            continue
        typed = isinstance(value, types) and (bool in types or not isinstance(value, bool))
        if not typed or (valid is not None and not valid(value)):
            expected = "/".join(t.__name__ for t in types) + (" or null" if nullable else "")
            raise PyrovaeError(f"{where}: field {key!r} is {value!r}, expected a valid {expected}")


def _pick(cls: type, flat: dict[str, Any], **renamed: Any) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in flat.items() if k in names}, **renamed)


def from_v1(cfg: dict[str, Any], where: str = "the config") -> RunConfig:
    """A version-1 config (flat ``pyrovae train`` options, ``masked``/``mask``/``mask_rate`` for train-masked)
    as a :class:`RunConfig`; what it recorded beyond the options goes to ``facts``."""
    if cfg.get("config_version") != 1:
        found = cfg.get("config_version", "none")
        raise PyrovaeError(f"{where} has config_version {found!r}; this pyrovae reads versions 1 and {CONFIG_VERSION}")
    check_v1(cfg, where)
    flat = {k: float(v) if V1_FIELDS[k][0] is _NUM and v is not None else v for k, v in cfg.items() if k in V1_FIELDS}
    hidden = parse_hidden(flat.pop("hidden"))
    masked = bool(cfg.get("masked"))
    extra = None
    if masked:
        extra = MaskConfig(mask=cfg.get("mask", "mix"), rate=float(cfg.get("mask_rate", 0.5)))
    known = {*V1_FIELDS, "config_version", "masked", "mask", "mask_rate"}
    return RunConfig(
        kind="masked" if masked else "vae",
        data=_pick(DataConfig, flat),
        model=_pick(ModelConfig, flat, hidden=hidden),
        training=_pick(TrainingConfig, flat),
        extra=extra,
        facts={k: v for k, v in cfg.items() if k not in known},
    )


__all__ = [
    "CONFIG_VERSION",
    "KINDS",
    "DataConfig",
    "LabelsConfig",
    "M2Config",
    "MaskConfig",
    "MixtureConfig",
    "ModelConfig",
    "RunConfig",
    "TrainingConfig",
    "OPTIONS",
    "flat_options",
    "from_v1",
    "parse_hidden",
    "with_options",
]
