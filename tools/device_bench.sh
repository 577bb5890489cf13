#!/usr/bin/env bash
# On the lent GPU machine (see ../shared/DEVICE.md): install the wheels torch's image lacks,
# then tools/bench.py, which checks correctness against the reference first and then times
# every mode. Arguments go to bench.py, e.g.  bash tools/device_bench.sh --grid full --hf
# Run it from the repository root (the device's copy of the checkout).
set -o pipefail
# The checkout runs from source there, on PYTHONPATH (no pip install). Installed, the top-level
# passes/ and conf/ are the packages kvc.passes and kvc.conf (pyproject's package-dir); a
# source tree has no such folders inside kvc/, and the package does not look for them. So link
# them in, in the device's throwaway copy of the tree: kvc/passes -> ../passes and
# kvc/conf -> ../conf, unless they exist (-sfn replaces a dangling link). The package's own
# files are not touched; .git/info/exclude lists /kvc/passes and /kvc/conf, so links made
# the same way in a local checkout stay out of git.
for sub in passes conf; do
  [ -e "kvc/$sub" ] || ln -sfn "../$sub" "kvc/$sub" || exit 1
done
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD"
export PYTHONUNBUFFERED=1
out="${OUT:-benchmarks/results}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 tools/bench.py --out "$out" "$@" 2>&1 | tee "$out/log.txt"
