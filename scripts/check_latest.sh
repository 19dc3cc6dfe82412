#!/usr/bin/env bash
# Does the code still pass its tests on the NEWEST versions pyproject.toml's ranges allow?
# Clones the repository's HEAD (committed work only) into a temp dir, installs it with the
# newest allowed versions into a fresh venv (no constraints file), prints every version that
# differs from requirements-lock.txt, and runs the test suite, stopping at the first failure.
# Exits with pytest's status. Takes several minutes (the suite alone ~3-4 min on 2 cores).
#   bash scripts/check_latest.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python3}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

git clone -q "$root" "$tmp/repo"
echo "testing commit $(git -C "$tmp/repo" rev-parse HEAD) in $tmp/repo"
"$py" -m venv "$tmp/venv"
. "$tmp/venv/bin/activate"
python --version
pip install -q --upgrade --upgrade-strategy eager -e "$tmp/repo[test]"

pip freeze --exclude-editable > "$tmp/latest.txt"
echo "versions that differ from requirements-lock.txt (lock -> newest allowed):"
python - "$tmp/repo/requirements-lock.txt" "$tmp/latest.txt" <<'PY'
import re, sys

def read(path):
    pins = {}
    for line in open(path):
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return pins

lock, latest = read(sys.argv[1]), read(sys.argv[2])
differ = 0
for name in sorted(lock.keys() | latest.keys()):
    old, new = lock.get(name, "(not in lock)"), latest.get(name, "(not installed)")
    if old != new:
        differ += 1
        print(f"  {name}: {old} -> {new}")
print(f"  {differ} differ" if differ else "  none: the lock is the newest allowed set")
PY

cd "$tmp/repo"
status=0
# -q also comes from pyproject.toml's addopts: a second one would hide the summary line
python -m pytest -x || status=$?
echo "check_latest: pytest exited $status"
exit "$status"
