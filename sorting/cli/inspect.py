"""`sorting inspect` of a config YAML: which kind it is (machine, ore, sorter, material library),
validated by its loader as a run would load it, and summarized in a few lines."""
from __future__ import annotations

from pathlib import Path

from sorting.errors import InputError


def _kind(data: object, path: Path) -> str:
    if not isinstance(data, dict) or not data:
        raise InputError(path, "not a config: a YAML mapping was expected")
    if "ejector" in data or "sorting" in data:
        return "sorter"
    if "tube" in data or "detector" in data:
        return "machine"
    if "lithotypes" in data or "mineral_sc2o3_ppm" in data:
        return "ore"
    if all(isinstance(v, dict) and "formula" in v for v in data.values()):
        return "materials"
    raise InputError(path, "not a machine (tube, detector, belt), ore (lithotypes), sorter (ejector, sorting) "
                           f"or material library config; its top-level keys: {', '.join(map(str, data))}")


def describe_config(path: Path) -> str:
    """Validate a machine, ore, sorter or material-library YAML and summarize it.

    Machine and ore configs are checked against the shipped material library, as
    ``sorting simulate`` does with its default ``--materials``.
    """
    from sorting.config import load_machine, load_ore, load_sorter, read_yaml
    from sorting.physics import load_materials

    path = Path(path)
    kind = _kind(read_yaml(path), path)
    if kind == "sorter":
        s = load_sorter(path)
        e = s.ejector
        thr = "the model's own" if s.sorting.threshold is None else f"P(sc) >= {s.sorting.threshold:g}"
        return (f"{path}: sorter config\n"
                f"  ejector: {e.valves} valves x {e.valve_pitch_mm:g} mm = {e.valves * e.valve_pitch_mm:g} mm, "
                f"offset {e.offset_mm:g} mm, {e.distance_mm:g} mm after the scan line; response "
                f"{e.response_ms:g} ms, min pulse {e.min_pulse_ms:g} ms, margin {e.margin_mm:g} mm\n"
                f"  sorting: eject {s.sorting.eject}, threshold {thr}")
    if kind == "materials":
        lib = load_materials(path)
        return f"{path}: material library, {len(lib.materials)} materials: {', '.join(lib.materials)}"
    lib = load_materials()
    if kind == "machine":
        m = load_machine(path, lib)
        filters = ", ".join(f"{f.thickness_mm:g} mm {f.material}" for f in m.tube.filters) or "none"
        d = m.detector
        return (f"{path}: machine config {m.name!r}\n"
                f"  tube: {m.tube.kvp:g} kVp, anode {m.tube.anode_angle_deg:g} deg, filters {filters}\n"
                f"  detector: {d.pixels} px x {d.pixel_pitch_mm:g} mm = {m.belt_width_mm:g} mm; "
                f"{d.front.thickness_mm:g} mm {d.front.material} | "
                + "".join(f"{x.thickness_mm:g} mm {x.material} | " for x in d.interlayer)
                + f"{d.back.thickness_mm:g} mm {d.back.material}\n"
                f"  belt: {m.belt.speed_m_s:g} m/s at {m.belt.line_rate_hz:g} lines/s "
                f"({m.line_pitch_mm:.4g} mm a line)")
    o = load_ore(path, lib)
    total = sum(lith.proportion for lith in o.lithotypes)
    liths = ", ".join(f"{lith.name} {100 * lith.proportion / total:.0f} %" for lith in o.lithotypes)
    return (f"{path}: ore config {o.name!r}\n"
            f"  lithotypes (share of rocks): {liths}\n"
            f"  rocks {o.size_min_mm:g}-{o.size_max_mm:g} mm; label cut-off {o.label_cutoff_ppm:g} ppm Sc2O3")
