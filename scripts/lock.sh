#!/usr/bin/env bash
# Regenerate requirements-lock.txt: the exact versions of every third-party package that
# `pip install -e ".[test]"` brings today into a fresh venv (the set the tests are run on).
# Run it with the Python the project is tested on (3.11), then run the tests against the
# new lock (bash .ci/run) before committing it.
#   bash scripts/lock.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python3}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

"$py" -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q -e "$root[test]"
pyver="$("$tmp/venv/bin/python" -c 'import platform; print(platform.python_version())')"
{
    echo "# requirements-lock.txt: the exact third-party versions the test suite is run on"
    echo "# (everything 'pip install -e \".[test]\"' brought into a fresh venv on Python $pyver;"
    echo "# the 'spectra' extra, only needed to regenerate a data table, is left out)."
    echo "# Used as a pip constraints file, as .ci/run does:"
    echo "#     pip install -c requirements-lock.txt -e \".[test]\""
    echo "# Regenerate with 'bash scripts/lock.sh' (do not edit by hand); the ranges a user's"
    echo "# install may pick from are in pyproject.toml, and scripts/check_latest.sh tests the"
    echo "# newest versions they allow."
    "$tmp/venv/bin/pip" freeze --exclude-editable
} > "$tmp/lock.txt"
if grep -qi '^spekpy' "$tmp/lock.txt"; then
    echo "lock.sh: spekpy ended up in the lock; it belongs to the 'spectra' extra only" >&2
    exit 1
fi
mv "$tmp/lock.txt" "$root/requirements-lock.txt"
echo "wrote $root/requirements-lock.txt ($(grep -vc '^#' "$root/requirements-lock.txt") packages, Python $pyver)"
