#!/usr/bin/env bash
# On the lent GPU machine (see ../shared/DEVICE.md): install the wheels torch's image lacks,
# then tools/bench.py, which checks correctness against the reference first and then times
# every mode. Arguments go to bench.py, e.g.  bash tools/device_bench.sh --grid full --hf
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
# the package as installed: passes/ and conf/ live inside it as kvc.passes and kvc.conf
rm -rf /tmp/src && mkdir -p /tmp/src && cp -r kvc /tmp/src/kvc && cp -r passes /tmp/src/kvc/passes \
  && cp -r conf /tmp/src/kvc/conf || exit 1
export PYTHONPATH=/tmp/site:/tmp/src
export PYTHONUNBUFFERED=1
out="${OUT:-benchmarks/results}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 tools/bench.py --out "$out" "$@" 2>&1 | tee "$out/log.txt"
