#!/usr/bin/env bash
# Same-call A/B on the lent GPU machine: tools/bench.py of two checkouts (commits), alternated
# round by round on one card, so that a version ratio never crosses calls.
#
#   git archive <commit> | tar -x -C .ab/new; the same for .ab/old   # here (.ab is ignored)
#   bash tools/ab_bench.sh .ab/new .ab/old ROUNDS [--gpu-tests] -- <bench.py arguments>
#
# Each version runs as installed: kvc/ with passes/ and conf/ copied inside it (kvc.passes,
# kvc.conf), on PYTHONPATH with the wheels of ../shared/device-wheels (carried as .whl).
# Results: $OUT/<new|old>-<round>/ (bench.py's JSON and log); with --gpu-tests, pytest's
# tests/test_gpu.py of the new checkout first ($OUT/gpu-tests.txt).
set -o pipefail
new="$1"; old="$2"; rounds="$3"; shift 3
gpu_tests=0
if [ "${1:-}" = "--gpu-tests" ]; then gpu_tests=1; shift; fi
[ "${1:-}" = "--" ] && shift
out="${OUT:-/tmp/ab}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1

as_installed() {  # $1: checkout, $2: target folder
  rm -rf "$2" && mkdir -p "$2" && cp -r "$1/kvc" "$2/kvc" && rm -rf "$2/kvc/passes" "$2/kvc/conf" \
    && cp -r "$1/passes" "$2/kvc/passes" && cp -r "$1/conf" "$2/kvc/conf"
}
as_installed "$new" /tmp/new || exit 1
as_installed "$old" /tmp/old || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ "$gpu_tests" = 1 ]; then
  (cd "$new" && PYTHONPATH=/tmp/site:/tmp/new python3 -P -m pytest -q -p no:cacheprovider tests/test_gpu.py) 2>&1 \
    | tee "$out/gpu-tests.txt" | tail -5
fi
first="${AB_FIRST:-new}"  # which version opens round 1; the order alternates every round
for r in $(seq 1 "$rounds"); do
  order="new old"
  if [ $(( r % 2 )) = 1 ] && [ "$first" = old ] || [ $(( r % 2 )) = 0 ] && [ "$first" = new ]; then
    order="old new"
  fi
  for v in $order; do
    dir="$new"; [ "$v" = old ] && dir="$old"
    mkdir -p "$out/$v-$r"
    echo "== round $r: $v"
    (cd "$dir" && PYTHONPATH=/tmp/site:/tmp/$v python3 tools/bench.py --out "$out/$v-$r" "$@") \
      > "$out/$v-$r/stdout.txt" 2>&1
    grep -E "ms/token|^\| " "$out/$v-$r/stdout.txt" | tail -8
  done
done
