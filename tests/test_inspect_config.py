"""`sorting inspect` of a config YAML: kind, validation by the run's own loader, a summary."""
from __future__ import annotations

import yaml

from sorting.cli import main
from sorting.resources import shipped_config


def _inspect(path, capsys):
    rc = main(["inspect", str(path)])
    out = capsys.readouterr()
    return rc, out.out, out.err.strip().splitlines()


def test_shipped_configs_are_recognised_and_summarised(capsys):
    kinds = {"machine_reference.yaml": "machine YAML", "machine_example_120kv.yaml": "machine YAML",
             "ore_crater_lake.yaml": "ore YAML", "sorter_reference.yaml": "sorter YAML",
             "sorter_example_eject_waste.yaml": "sorter YAML", "materials.yaml": "material library"}
    for name, kind in kinds.items():
        rc, out, err = _inspect(shipped_config(name), capsys)
        assert rc == 0 and not err and kind in out.splitlines()[0], (name, out, err)
    # figures from the YAML itself: row width = valves x pitch, detector width = pixels x pitch
    s = yaml.safe_load(shipped_config("sorter_reference.yaml").read_text())["ejector"]
    _, out, _ = _inspect(shipped_config("sorter_reference.yaml"), capsys)
    width = s['valves'] * s['valve_pitch_mm']
    assert f"{s['valves']} valves at {s['valve_pitch_mm']:g} mm ({width:g} mm of belt" in out
    m = yaml.safe_load(shipped_config("machine_reference.yaml").read_text())
    _, out, _ = _inspect(shipped_config("machine_reference.yaml"), capsys)
    d = m["detector"]
    assert f"{d['pixels']} pixels of {d['pixel_pitch_mm']:g} mm ({d['pixels'] * d['pixel_pitch_mm']:g} mm)" in out
    # one belt line is speed / line rate long
    assert f"({m['belt']['speed_m_s'] * 1000 / m['belt']['line_rate_hz']:.4g} mm per line)" in out


def test_bad_configs_give_one_line_and_exit_2(tmp_path, capsys):
    sorter = yaml.safe_load(shipped_config("sorter_reference.yaml").read_text())
    sorter["ejector"]["valves"] = 0
    (tmp_path / "sorter.yaml").write_text(yaml.safe_dump(sorter))
    machine = yaml.safe_load(shipped_config("machine_reference.yaml").read_text())
    machine["belt"]["material"] = "unobtainium"
    (tmp_path / "machine.yml").write_text(yaml.safe_dump(machine))
    (tmp_path / "other.yaml").write_text("colour: blue\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    expect = {"sorter.yaml": "ejector.valves", "machine.yml": "unobtainium", "other.yaml": "colour",
              "list.yaml": "mapping"}
    for name, needle in expect.items():
        rc, out, err = _inspect(tmp_path / name, capsys)
        assert rc == 2 and len(err) == 1 and str(tmp_path / name) in err[0] and needle in err[0], (name, err)
