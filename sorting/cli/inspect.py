"""`sorting inspect PATH`: validate any file the project reads and summarize it.

Data (datasets, recordings, calibration folders, TIFFs) are described by
:func:`sorting.io.describe`; a model (``.onnx``) is loaded as ``run`` and ``predict`` load it
(a model built on other features is refused); a YAML file is recognized by its top-level keys
as a sorter, machine, ore or material library and loaded as the verbs that use it load it.
"""
from __future__ import annotations

from pathlib import Path

from sorting.errors import InputError

YAML_SUFFIXES = (".yaml", ".yml")


def describe_model(path: Path) -> str:
    """Validate a model file (as ``load_model``) and summarize its metadata."""
    from sorting.cli.batch import cv_lines
    from sorting.stages.inference import load_model

    model = load_model(path)
    meta = model.meta
    m = meta.get("training_metrics") or {}
    lines = [f"{path}: {meta.get('format', 'sorting model')}, {path.stat().st_size / 1024:.0f} KiB, "
             f"estimator {meta.get('estimator', m.get('estimator', 'unknown'))}",
             f"  features: version {model.feature_version}, {model.n_features} names "
             f"({', '.join(model.feature_names[:4])}, ...); the pipeline computes the same",
             f"  operating point: {meta.get('decision', 'sc where score >= threshold')}, threshold "
             f"{model.threshold:.4f}"
             + (f", chosen for {100 * meta['target_recovery']:.0f} % Sc recovery in cross-validation"
                if meta.get("target_recovery") is not None else "")]
    if m:
        lines.append(f"  trained on {m.get('n_train')} rocks ({m.get('n_sc')} sc), "
                     f"{m.get('targets', 'hard')} targets"
                     + (f" around the {m['label_cutoff_ppm']:.0f} ppm Sc2O3 label cut-off"
                        if m.get("label_cutoff_ppm") else ""))
        if "cv_auc" in m and "cv_folds" in m:
            lines.extend("  " + line for line in cv_lines(m, model.threshold))
    else:
        lines.append("  training metrics: none recorded")
    lines.append(f"  parent model: {meta['parent']}" if meta.get("parent") else "  parent model: none")
    prov = [f"training data {meta['training_fingerprint']}" if meta.get("training_fingerprint") else None,
            f"created {meta['created_utc']}" if meta.get("created_utc") else None,
            ", ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items()) or None]
    if any(prov):
        lines.append("  " + "; ".join(p for p in prov if p))
    return "\n".join(lines)


def yaml_kind(data, path: Path) -> str:
    """``sorter``, ``machine``, ``ore`` or ``materials``, from the top-level keys."""
    if not isinstance(data, dict) or not data:
        raise InputError(path, "is empty or not a mapping: not a sorter, machine, ore or materials YAML")
    keys = set(data)
    if keys <= {"ejector", "sorting"}:
        return "sorter"
    if keys & {"tube", "detector", "belt"}:
        return "machine"
    if keys & {"lithotypes", "mineral_sc2o3_ppm"}:
        return "ore"
    if all(isinstance(v, dict) and "formula" in v for v in data.values()):
        return "materials"
    raise InputError(path, f"top-level keys {', '.join(sorted(map(str, keys)))}: not a sorter (ejector, sorting), "
                           "machine (tube, detector, belt), ore (lithotypes, mineral_sc2o3_ppm) or materials "
                           "(name: {formula, density_g_cm3}) YAML")


def _layer(layer) -> str:
    return f"{layer.material} {layer.thickness_mm:g} mm"


def describe_yaml(path: Path) -> str:
    """Recognize and validate a sorter, machine, ore or materials YAML, and summarize it."""
    from sorting.config import load_machine, load_ore, load_sorter, read_yaml
    from sorting.physics import load_materials

    kind = yaml_kind(read_yaml(path), path)
    if kind == "sorter":
        cfg = load_sorter(path)
        e, s = cfg.ejector, cfg.sorting
        thr = "the model's operating point" if s.threshold is None else f"P(sc) >= {s.threshold:g}"
        return "\n".join([
            f"{path}: sorter YAML, valid",
            f"  ejector: {e.valves} valves at {e.valve_pitch_mm:g} mm ({e.valves * e.valve_pitch_mm:g} mm of belt from "
            f"{e.offset_mm:g} mm), {e.distance_mm:g} mm after the scan line",
            f"  timing: response {e.response_ms:g} ms, minimum pulse {e.min_pulse_ms:g} ms, margin {e.margin_mm:g} mm",
            f"  sorting: the jets blow out {s.eject}; threshold {thr}"])
    lib = load_materials(None)  # the shipped library: what `simulate` uses unless told otherwise
    if kind == "machine":
        cfg = load_machine(path, lib)
        t, d, b = cfg.tube, cfg.detector, cfg.belt
        filters = ", ".join(_layer(f) for f in t.filters) or "none"
        return "\n".join([
            f"{path}: machine YAML {cfg.name!r}, valid (materials checked against {Path(lib.source).name})",
            f"  tube: {t.kvp:g} kVp, anode {t.anode_angle_deg:g} deg, filters {filters}",
            f"  detector: {d.pixels} pixels of {d.pixel_pitch_mm:g} mm ({cfg.belt_width_mm:g} mm); front "
            f"{_layer(d.front)}, back {_layer(d.back)}; air level {d.air_level_adu[0]:g} / {d.air_level_adu[1]:g} ADU",
            f"  belt: {b.speed_m_s:g} m/s, {b.line_rate_hz:g} lines/s ({cfg.line_pitch_mm:.3g} mm per line), "
            f"{_layer(b)}"])
    if kind == "ore":
        cfg = load_ore(path, lib)
        total = sum(lith.proportion for lith in cfg.lithotypes)
        liths = ", ".join(f"{lith.name} {100 * lith.proportion / total:.0f} %" for lith in cfg.lithotypes)
        return "\n".join([
            f"{path}: ore YAML {cfg.name!r}, valid (minerals checked against {Path(lib.source).name})",
            f"  lithotypes (share of rocks): {liths}",
            f"  {len(cfg.mineral_sc2o3_ppm)} minerals; label cut-off {cfg.label_cutoff_ppm:g} ppm Sc2O3 "
            f"(a rock at or above it is sc); rock sizes {cfg.size_min_mm:g}-{cfg.size_max_mm:g} mm"])
    lib = load_materials(path)
    names = list(lib.materials)
    return "\n".join([f"{path}: material library, valid: {len(names)} materials",
                      "  " + ", ".join(names)])


def describe_any(path: Path) -> str:
    """What ``sorting inspect`` prints for ``path``."""
    from sorting.io import describe

    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".onnx":
        return describe_model(path)
    if path.is_file() and path.suffix.lower() in YAML_SUFFIXES:
        return describe_yaml(path)
    return describe(path)
