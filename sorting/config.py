"""Frozen configuration dataclasses, loaded from YAML files (defaults: the shipped ``configs/*.yaml``).

Units live in field names. Every value is validated once here, at the edge: a
missing, unknown, non-finite or out-of-range value raises :class:`InputError`
naming the file and the key.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sorting.errors import InputError
from sorting.resources import CONFIG_DIR


def _pos(**kw: Any) -> Any:
    return field(metadata={"gt": 0.0}, **kw)


def _nonneg(**kw: Any) -> Any:
    return field(metadata={"ge": 0.0}, **kw)


def _frac(**kw: Any) -> Any:
    return field(metadata={"ge": 0.0, "le": 1.0}, **kw)


class Validated:
    """A config checked where it is made: every field against its range (the ``gt``, ``ge``,
    ``le`` of its metadata) and its choices (a ``Literal`` type), whether it comes from a
    YAML file (:func:`build`, which names the file) or from code (``ValueError``)."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        name = type(self).__name__
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            choices = _choices(hints[f.name])
            if choices is not None and value not in choices and value is not None:
                raise ValueError(f"{name}.{f.name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
            meta = f.metadata
            if value is None or not ({"gt", "ge", "le"} & set(meta)):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}.{f.name} must be a finite number, got {value!r}")
            if "gt" in meta and not value > meta["gt"]:
                raise ValueError(f"{name}.{f.name} must be > {meta['gt']:g}, got {value!r}")
            if "ge" in meta and not value >= meta["ge"]:
                raise ValueError(f"{name}.{f.name} must be >= {meta['ge']:g}, got {value!r}")
            if "le" in meta and not value <= meta["le"]:
                raise ValueError(f"{name}.{f.name} must be <= {meta['le']:g}, got {value!r}")


def _choices(tp: Any) -> tuple | None:
    """The allowed values of a ``Literal`` (or optional ``Literal``) type; None for other types."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = inner[0] if len(inner) == 1 else tp
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


# ---------------------------------------------------------------- machine
@dataclass(frozen=True)
class Layer(Validated):
    material: str
    thickness_mm: float = _nonneg()


@dataclass(frozen=True)
class TubeConfig(Validated):
    kvp: float = _pos()
    anode_angle_deg: float = _pos(default=12.0)
    filters: tuple[Layer, ...] = ()


@dataclass(frozen=True)
class DetectorConfig(Validated):
    pixels: int = _pos()
    pixel_pitch_mm: float = _pos()
    front: Layer = None  # type: ignore[assignment]
    interlayer: tuple[Layer, ...] = ()
    back: Layer = None  # type: ignore[assignment]
    # mean reading of the air (empty belt) per channel, low then high; sets the conversion gain
    air_level_adu: tuple[float, float] = (30000.0, 40000.0)
    dark_offset_adu: float = _nonneg(default=1000.0)
    dark_spread_adu: float = _nonneg(default=40.0)
    read_noise_adu: float = _nonneg(default=3.0)
    gain_nonuniformity: float = _frac(default=0.03)
    dead_pixels: int = _nonneg(default=3)
    energy_bin_kev: float = _pos(default=2.0)


@dataclass(frozen=True)
class BeltConfig(Validated):
    speed_m_s: float = _pos()
    line_rate_hz: float = _pos()
    material: str = "rubber"
    thickness_mm: float = _nonneg(default=4.0)


@dataclass(frozen=True)
class MachineConfig(Validated):
    name: str
    tube: TubeConfig
    detector: DetectorConfig
    belt: BeltConfig
    # photons reaching one pixel per line through the empty belt (all energies)
    flux_photons_per_px_line: float = _pos(default=5000.0)

    @property
    def line_pitch_mm(self) -> float:
        return self.belt.speed_m_s * 1000.0 / self.belt.line_rate_hz

    @property
    def belt_width_mm(self) -> float:
        return self.detector.pixels * self.detector.pixel_pitch_mm


# ---------------------------------------------------------------- ore
@dataclass(frozen=True)
class MineralRange(Validated):
    """Modal proportion range of one mineral in a lithotype, in volume percent."""

    min_pct: float = _nonneg()
    max_pct: float = _nonneg()


@dataclass(frozen=True)
class Lithotype(Validated):
    name: str
    proportion: float = _nonneg()
    minerals: dict[str, MineralRange] = field(default_factory=dict)
    # minerals that occur as disseminated grains (hot spots) rather than in the matrix texture
    grain_minerals: tuple[str, ...] = ()
    description: str = ""


@dataclass(frozen=True)
class OreConfig(Validated):
    name: str
    lithotypes: tuple[Lithotype, ...]
    # Sc2O3 carried by each mineral, ppm (g/t of that mineral)
    mineral_sc2o3_ppm: dict[str, float]
    # log-normal spread of a mineral's Sc content from rock to rock
    sc_variability: float = _nonneg(default=0.2)
    label_cutoff_ppm: float = _pos(default=150.0)
    size_min_mm: float = _pos(default=10.0)
    size_max_mm: float = _pos(default=100.0)
    grain_size_mm: float = _pos(default=2.0)
    texture_strength: float = _nonneg(default=0.5)
    oxide_grain_size_mm: float = _pos(default=1.5)


# ---------------------------------------------------------------- sorter
#: the largest rock the sorter takes (mm, its longest dimension): the top size of the feed
#: the reference sorter is built for (the twin's ore: 10-100 mm); sets the default air cap
TOP_SIZE_MM = 100.0


def default_max_valves(valve_pitch_mm: float, margin_mm: float, valves: int, top_size_mm: float = TOP_SIZE_MM) -> int:
    """The most valves one rock of the top size can need: its width plus the margin on both
    sides, in valve pitches, rounded up, plus one for a rock whose span does not start on a
    valve's edge (a span of ``s`` pitches overlaps at most ``ceil(s) + 1`` valves); at most
    the whole row."""
    span = (top_size_mm + 2.0 * margin_mm) / valve_pitch_mm
    return int(min(math.ceil(span - 1e-9) + 1, valves))


@dataclass(frozen=True)
class EjectorConfig(Validated):
    distance_mm: float = _pos(default=300.0)
    valve_pitch_mm: float = _pos(default=12.5)
    valves: int = _pos(default=80)
    offset_mm: float = 0.0
    response_ms: float = _nonneg(default=3.0)
    min_pulse_ms: float = _nonneg(default=5.0)
    margin_mm: float = _nonneg(default=5.0)
    #: hard cap on the valves of one eject; an eject that needs more passes instead.
    #: None (or absent from the YAML): :func:`default_max_valves` for a rock of TOP_SIZE_MM
    max_valves: int | None = field(default=None, metadata={"optional": True})

    def __post_init__(self) -> None:
        super().__post_init__()  # the ranges of every field first
        if self.max_valves is None:
            object.__setattr__(self, "max_valves", default_max_valves(self.valve_pitch_mm, self.margin_mm, self.valves))
            return
        # above the row's size it caps nothing (no eject has more valves than the row): allowed
        if isinstance(self.max_valves, bool) or not isinstance(self.max_valves, int) or self.max_valves < 1:
            raise ValueError(f"max_valves must be an integer >= 1, got {self.max_valves!r}")


@dataclass(frozen=True)
class SortingConfig(Validated):
    eject: Literal["sc", "waste"] = "sc"
    threshold: float | None = field(default=None, metadata={"ge": 0.0, "le": 1.0})
    #: what happens to tramp metal (steel the detector cannot see through): "eject" or "pass",
    #: whatever the model would say. None (or absent from the YAML): the waste's way, i.e.
    #: "pass" when the jets blow out the ore (eject: sc), "eject" when they blow out the waste
    tramp: Literal["eject", "pass"] | None = field(default=None, metadata={"optional": True})

    def __post_init__(self) -> None:
        super().__post_init__()  # eject and tramp among their choices, the threshold in [0, 1]
        if self.tramp is None:
            object.__setattr__(self, "tramp", "pass" if self.eject == "sc" else "eject")


@dataclass(frozen=True)
class SorterConfig(Validated):
    ejector: EjectorConfig = field(default_factory=EjectorConfig)
    sorting: SortingConfig = field(default_factory=SortingConfig)


# ---------------------------------------------------------------- loading
def _fail(where: str, key: str, problem: str) -> typing.NoReturn:
    raise InputError(where, f"{key}: {problem}" if key else problem)


def _convert(tp: Any, value: Any, where: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where, key)
    if value is None:
        _fail(where, key, "is missing (null)")
    if origin is Literal:
        if value not in args:
            _fail(where, key, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            _fail(where, key, f"must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, where, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            _fail(where, key, f"must have {len(args)} entries, got {len(value)}")
        return tuple(_convert(a, v, where, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            _fail(where, key, f"must be a mapping, got {value!r}")
        return {str(k): _convert(args[1], v, where, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            _fail(where, key, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            _fail(where, key, f"must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(where, key, f"must be a number, got {value!r}")
        if not math.isfinite(value):
            _fail(where, key, f"must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(where, key, f"must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r}")


def build(cls: type, data: Any, where: str = "<config>", key: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys, types and ranges."""
    prefix = f"{key}." if key else ""
    if not isinstance(data, dict):
        _fail(where, key, f"must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        _fail(where, prefix + unknown[0], f"unknown key (known: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            if has_default and (f.default is not None or f.metadata.get("optional")):
                continue
            _fail(where, prefix + name, "is missing")
        value = _convert(hints[name], data[name], where, prefix + name)
        meta = f.metadata
        if value is not None and meta:
            if "gt" in meta and not value > meta["gt"]:
                _fail(where, prefix + name, f"must be > {meta['gt']:g}, got {value!r}")
            if "ge" in meta and not value >= meta["ge"]:
                _fail(where, prefix + name, f"must be >= {meta['ge']:g}, got {value!r}")
            if "le" in meta and not value <= meta["le"]:
                _fail(where, prefix + name, f"must be <= {meta['le']:g}, got {value!r}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a check of the class's own __post_init__ (ranges were checked above)
        _fail(where, key, str(exc))


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except OSError as exc:
        raise InputError(path, f"cannot read ({exc.strerror})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        at = f" at line {line + 1}" if line is not None else ""
        raise InputError(path, f"not valid YAML{at}") from None


def load(cls: type, path: str | Path) -> Any:
    return build(cls, read_yaml(path), str(path))


def _resolve(path: str | Path | None, default_name: str) -> Path:
    if path is None:
        return CONFIG_DIR / default_name
    return Path(path)


#: largest raw reading of the 16-bit detector
_FULL_SCALE_ADU = 65535.0


def _check_materials(path: Path, used: list[tuple[str, str]], library: Any) -> None:
    """Every ``(key, material)`` must be in ``library`` (a MaterialLibrary): the error names
    the config that asks for it, not the library."""
    for key, name in used:
        if name.lower() not in library.materials:
            raise InputError(path, f"{key}: unknown material {name!r} (not in {Path(library.source).name}; "
                                   f"known: {', '.join(library.materials)})")


def load_machine(path: str | Path | None = None, library: Any = None) -> MachineConfig:
    """The machine config at ``path``; with ``library`` (a MaterialLibrary), its materials are checked too."""
    from sorting.physics.spectra import tube_spectrum

    path = _resolve(path, "machine_reference.yaml")
    cfg = load(MachineConfig, path)
    if cfg.tube.kvp <= 20:
        raise InputError(path, f"tube.kvp: {cfg.tube.kvp:g} kVp is too low for transmission sorting")
    try:  # the shipped spectrum table bounds kVp and anode angle
        tube_spectrum(cfg.tube.kvp, cfg.tube.anode_angle_deg)
    except InputError as exc:
        raise InputError(path, str(exc)) from None
    det = cfg.detector
    if det.front is None or det.back is None:
        raise InputError(path, "detector.front and detector.back layers are required")
    for c, level in enumerate(det.air_level_adu):
        # the air reading sits on the dark offset and must stay clear of 16-bit saturation
        if not 0 < level or det.dark_offset_adu + level >= _FULL_SCALE_ADU:
            raise InputError(path, f"detector.air_level_adu[{c}]: {level:g} must be > 0 and, on top of "
                                   f"dark_offset_adu {det.dark_offset_adu:g}, below {_FULL_SCALE_ADU:g}")
    if library is not None:
        _check_materials(path, [(f"tube.filters[{i}].material", f.material) for i, f in enumerate(cfg.tube.filters)]
                         + [("detector.front.material", det.front.material),
                            ("detector.back.material", det.back.material)]
                         + [(f"detector.interlayer[{i}].material", layer.material)
                            for i, layer in enumerate(det.interlayer)]
                         + [("belt.material", cfg.belt.material)], library)
    return cfg


def load_ore(path: str | Path | None = None, library: Any = None) -> OreConfig:
    """The ore config at ``path``; with ``library`` (a MaterialLibrary), its minerals are checked too."""
    path = _resolve(path, "ore_crater_lake.yaml")
    cfg = load(OreConfig, path)
    for name, ppm in cfg.mineral_sc2o3_ppm.items():
        if ppm < 0:
            raise InputError(path, f"mineral_sc2o3_ppm.{name}: must be >= 0, got {ppm:g}")
    if not cfg.lithotypes:
        raise InputError(path, "lithotypes: at least one lithotype is required")
    if sum(lith.proportion for lith in cfg.lithotypes) <= 0:
        raise InputError(path, "lithotypes: proportions sum to zero")
    if cfg.size_min_mm >= cfg.size_max_mm:
        raise InputError(path, "size_min_mm must be below size_max_mm")
    for lith in cfg.lithotypes:
        for name, rng in lith.minerals.items():
            if rng.min_pct > rng.max_pct:
                raise InputError(path, f"lithotypes.{lith.name}.minerals.{name}: min_pct above max_pct")
            if name not in cfg.mineral_sc2o3_ppm:
                raise InputError(path, f"mineral_sc2o3_ppm: no Sc2O3 content for {name!r}")
        if sum(r.max_pct for r in lith.minerals.values()) < 100 - 1e-9:
            raise InputError(path, f"lithotypes.{lith.name}: mineral maxima sum below 100%")
        if sum(r.min_pct for r in lith.minerals.values()) > 100 + 1e-9:
            raise InputError(path, f"lithotypes.{lith.name}: mineral minima sum above 100%")
    if library is not None:
        _check_materials(path, [(f"lithotypes.{lith.name}.minerals", m)
                                for lith in cfg.lithotypes for m in lith.minerals], library)
    return cfg


def load_sorter(path: str | Path | None = None) -> SorterConfig:
    """The sorter config at ``path``, every key stated: valve geometry, timing and the class to
    eject belong to the sorter at hand, so none falls back silently to the reference sorter's."""
    path = _resolve(path, "sorter_reference.yaml")
    data = read_yaml(path)
    cfg = build(SorterConfig, data, str(path))
    for section in dataclasses.fields(SorterConfig):
        if section.name not in data:
            _fail(str(path), section.name, "is missing (a sorter YAML states every key of the format)")
        for f in dataclasses.fields(getattr(cfg, section.name)):
            if f.name not in data[section.name] and not f.metadata.get("optional"):
                _fail(str(path), f"{section.name}.{f.name}", "is missing (a sorter YAML states every key of "
                                                              "the format)")
    return cfg
