#!/usr/bin/env bash
# Fetch bench/device-wheels.txt into .whl/ (ignored by git) for the GPU machine, which has no network:
# wheels for CPython 3.12 on manylinux x86_64, and the sdists the list marks "# sdist". Prints the total size
# of what the device call ships (the working tree's git-visible files plus .whl/), which must stay under 64 MiB.
#
#   bash bench/fetch-wheels.sh        (or: make wheels)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PLATFORMS=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
           --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux1_x86_64)
mkdir -p .whl
while read -r line; do
    spec=${line%%#*}
    spec=${spec//[[:space:]]/}
    [ -n "$spec" ] || continue
    if [[ $line == *"# sdist"* ]]; then
        $PY -m pip download -q --no-deps --no-binary=:all: -d .whl "$spec"
    else
        $PY -m pip download -q --no-deps --only-binary=:all: "${PLATFORMS[@]}" -d .whl "$spec"
    fi
done <bench/device-wheels.txt
# Only one version of each package may be there: two stop the install on the machine.
names=$(ls .whl | sed -E 's/^([A-Za-z0-9_.]+)-[0-9].*/\1/' | tr 'A-Z-' 'a-z_' | sort)
dups=$(uniq -d <<<"$names")
[ -z "$dups" ] || { echo "error: .whl/ holds several versions of: $dups (remove the old ones)" >&2; exit 1; }
whl=$(du -sk .whl | cut -f1)
tree=$(git ls-files -co --exclude-standard -z | xargs -0 du -ck 2>/dev/null | tail -1 | cut -f1)
echo "wheels: $((whl / 1024)) MiB in .whl/; with the working tree: $(((whl + tree) / 1024)) MiB (limit 64 MiB)"
