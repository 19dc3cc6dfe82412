#!/usr/bin/env bash
# A non-editable install works on its own: builds the sdist and, from it, the wheel (python -m
# build), checks that both carry the shipped files as real files (configs, the model, the
# spectra table), installs the wheel into a fresh venv outside the source tree (no system
# site-packages; dependencies from the index, pinned by requirements-lock.txt), and runs the
# installed `sorting` from a folder outside the tree: demo, inspect (its recording and the
# shipped configs), simulate, evaluate.
# A report must not carry the paths of the machine that wrote it.
#   usage: scripts/check_wheel.sh [WORKDIR]     (default: a temp dir, removed afterwards)
# Takes 1-3 minutes (most of it installing the dependencies; pip's cache helps).
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
if [ $# -ge 1 ]; then work="$(mkdir -p "$1" && cd "$1" && pwd)"; else
    work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT; fi
case "$work/" in "$src"/*) echo "check_wheel: WORKDIR must be outside the source tree" >&2; exit 2;; esac
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV
say() { printf '\n== %s\n' "$*"; }
fail() { echo "check_wheel: FAILED: $*" >&2; exit 1; }
t_start=$SECONDS

say "copy of the tree (tracked and new files, symlinks kept) in $work/src"
rm -rf "$work/src" "$work/dist" "$work/venv" "$work/cwd"
mkdir -p "$work/src"
(cd "$src" && git ls-files -z -c -o --exclude-standard \
    | while IFS= read -r -d '' f; do if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi; done \
    | tar --null -T - -cf - | tar -xf - -C "$work/src")
[ -L "$work/src/configs/machine_reference.yaml" ] || fail "configs/machine_reference.yaml is not a symlink in the tree"

say "fresh venv (no system site-packages)"
python3 -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install -q build

say "sdist, then the wheel from the sdist"
t0=$SECONDS
"$py" -m build --outdir "$work/dist" "$work/src" > "$work/build.log" 2>&1 || { tail -30 "$work/build.log"; fail "build"; }
sdist="$(ls "$work"/dist/*.tar.gz)"; wheel="$(ls "$work"/dist/*.whl)"
echo "built $(basename "$sdist") and $(basename "$wheel") in $((SECONDS - t0)) s"

say "both carry the shipped files, as real files with the tree's bytes"
"$py" - "$src" "$sdist" "$wheel" <<'EOF'
import hashlib, sys, tarfile, zipfile
from pathlib import Path
src, sdist, wheel = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
shipped = sorted(p.relative_to(src).as_posix() for p in (src / "sorting" / "data").rglob("*")
                 if p.is_file() and p.suffix in (".yaml", ".onnx"))
shipped.append("sorting/physics/data/tungsten_spectra.csv")
assert any(s.endswith(".onnx") for s in shipped) and sum(s.endswith(".yaml") for s in shipped) >= 4, shipped
digest = {s: hashlib.sha256((src / s).read_bytes()).hexdigest() for s in shipped}
with tarfile.open(sdist) as tf:
    members = {m.name.split("/", 1)[1]: m for m in tf.getmembers() if "/" in m.name}
    links = [n for n, m in members.items() if m.issym() or m.islnk()]
    assert not links, f"sdist holds links: {links}"
    for s in shipped:
        assert s in members, f"sdist lacks {s}"
        assert hashlib.sha256(tf.extractfile(members[s]).read()).hexdigest() == digest[s], f"sdist: {s} differs"
with zipfile.ZipFile(wheel) as zf:
    names = set(zf.namelist())
    for s in shipped:
        assert s in names, f"wheel lacks {s}"
        info = zf.getinfo(s)
        assert (info.external_attr >> 16) & 0o170000 != 0o120000, f"wheel: {s} is a symlink"
        assert hashlib.sha256(zf.read(s)).hexdigest() == digest[s], f"wheel: {s} differs from the tree"
print(f"{len(shipped)} shipped files in sdist and wheel, identical to the tree")
EOF

say "install the wheel (dependencies pinned by requirements-lock.txt)"
t0=$SECONDS
"$py" -m pip install -q -c "$src/requirements-lock.txt" "$wheel"
echo "installed in $((SECONDS - t0)) s"

say "run the installed sorting from $work/cwd"
mkdir -p "$work/cwd" && cd "$work/cwd"
sorting="$work/venv/bin/sorting"
"$py" - "$work/venv" <<'EOF'
import sys
from pathlib import Path
import sorting, sorting.resources as r
venv = Path(sys.argv[1]).resolve()
for p in (Path(sorting.__file__), r.CONFIG_DIR, r.MATERIALS, r.SHIPPED_MODEL, r.SPECTRA_TABLE):
    assert venv in p.resolve().parents, f"{p} is not inside the venv {venv}"
    assert p.exists(), p
print(f"sorting {sorting.__file__}; shipped files in {r.CONFIG_DIR.parent}")
EOF
COLUMNS=1000 "$sorting" demo --help | grep -q "crater_lake.onnx in $work/venv" || fail "demo --help does not name the installed model"
t0=$SECONDS
"$sorting" demo --out demo --seconds 2 --seed 3 > demo.log || { cat demo.log; fail "sorting demo"; }
tail -4 demo.log
[ -s demo/events.jsonl ] && [ -s demo/summary.json ] && [ -s demo/belt.png ] || fail "demo outputs missing"
"$sorting" inspect demo/recording
for c in machine_reference ore_crater_lake sorter_reference materials; do
    "$sorting" inspect "$("$py" -c "import sorting.resources as r; print(r.shipped_config('$c.yaml'))")" | head -1
done
"$sorting" simulate rocks rocks --n 30 --seed 5 --quiet
"$sorting" evaluate rocks --model "$("$py" -c 'import sorting.resources as r; print(r.SHIPPED_MODEL)')" \
    --report report --split all --quiet
if grep -q -e "$work" -e "$src" report/metrics.json; then fail "report/metrics.json holds a path of this machine"; fi
echo "demo, inspect, simulate and evaluate ran in $((SECONDS - t0)) s"
say "check_wheel: OK in $((SECONDS - t_start)) s"
