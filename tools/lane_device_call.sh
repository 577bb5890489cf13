#!/usr/bin/env bash
# Device calls for the CPU attention lane (issue 17), each part in its own
# timeout, output under $OUT as it goes. From the repository root on the device, after the
# wheels are installed and kvc is on PYTHONPATH (../shared/DEVICE.md):
#   bash tools/lane_device_call.sh check   # ~4 min: the lazy-load probe, GPU tests, both points under a watchdog
#   bash tools/lane_device_call.sh bench   # <= 9.5 min: the three points of issue 17, with and without the lane
#   bash tools/lane_device_call.sh final   # ~8 min: the GPU tests of the profiler, flags and the guard; each
#                                          # point off and auto at the profiler's rate, guarded (32 steps a
#                                          # timing: the guard's rounds) and with the lane at every step;
#                                          # POINTS="name:b:s ..." picks points, NO_TESTS=1 skips the tests,
#                                          # GUARD=on times the guarded rows only
#   bash tools/lane_device_call.sh variance # ~6 min: OPT 0.25 and llama-3-8b 0.4, where the steps' time goes,
#                                          # with OpenMP's threads spinning (the default) and passive
#   bash tools/lane_device_call.sh threads # ~5 min: llama-3-8b's lane at 14, 12, 10 and 8 threads
out="${OUT:-/tmp/out}"; mkdir -p "$out"
date -u | tee -a "$out/call.txt"
if [ "$1" = check ]; then
  echo "== does a module load deadlock a poll with a worker that calls CUDA? (session 11's stall)" | tee -a "$out/call.txt"
  timeout 90 python3 -P tools/lane_lazy_load_probe.py --timeout 5 2>&1 | tail -8 | tee -a "$out/call.txt"
  echo "== GPU tests (the lane's, the flags')" | tee -a "$out/call.txt"
  timeout 240 python3 -P -X faulthandler -m pytest -q -p no:cacheprovider tests/test_gpu.py \
    -k "flag or poll or module or stall or slow_cpu or failing_cpu or cpu_lane or profiler_measures" 2>&1 \
    | tail -25 | tee -a "$out/call.txt"
  for point in opt-6.7b:32:1024:0.3 llama-3-8b:32:2048:0.4; do
    IFS=: read -r name b s f <<< "$point"
    echo "== probe $name pipelined $f (OPT 0.3: the row that stalled in session 11)" | tee -a "$out/call.txt"
    timeout 150 python3 -P tools/lane_hang_diag.py "$name:$b:$s" pipelined "$f" 120 2>&1 \
      | grep -v "site-packages\|importlib\|frozen" | tail -40 | tee -a "$out/call.txt"
  done
elif [ "$1" = bench ]; then
  # one process per point (a stall costs its point only), each row under a watchdog that
  # prints every thread's stack
  for point in opt-6.7b:32:1024 llama-3-8b:32:2048 llama-2-7b:32:2048; do
    timeout 190 python3 -P tools/cpu_lane_bench.py --points "$point" --fractions 0.3 --dtypes float16 \
      --threads 14 --steps 8 --repeats 2 --auto-modes pipelined --row-timeout 100 --out "$out/${point%%:*}" 2>&1 \
      | grep -v "^kernel" | tee -a "$out/bench.txt" | grep "^step\|^Timeout\|^row" | cut -c1-260 | tee -a "$out/call.txt"
  done
elif [ "$1" = final ]; then
  # the build that lands: the profiler's test, then each point with auto planned with the
  # profiler's rate (what a user's `kvc profile` gives), under the guard and not
  [ -n "$NO_TESTS" ] || timeout 120 python3 -P -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "profiler_measures or flag or guard" 2>&1 \
    | tail -4 | tee -a "$out/call.txt"
  for point in ${POINTS:-opt-6.7b:32:1024 llama-3-8b:32:2048 llama-2-7b:32:2048}; do
    t=200; [ "${point%%:*}" = llama-2-7b ] && t=340  # its full_offload steps alone take 45 s
    timeout $t python3 -P tools/cpu_lane_bench.py --points "$point" --fractions "" --dtypes float16 \
      --threads 14 --steps 32 --repeats 2 --auto-modes pipelined --auto-rates profile --guard "${GUARD:-on,off}" \
      --row-timeout 100 --out "$out/${point%%:*}" 2>&1 \
      | grep -v "^kernel" | tee -a "$out/bench.txt" | grep "^step\|^Timeout\|^row\|^profile" | cut -c1-260 | tee -a "$out/call.txt"
  done
elif [ "$1" = variance ]; then
  # one split compiled twice, timed three times each: the kernel's rate in the steps, the GPU's
  # waits at the merges and the worker's waits for the GPU (why OPT's steps move, session 12)
  # and again with OpenMP's threads sleeping at once after each parallel region instead of
  # spinning (OMP_WAIT_POLICY=passive): the host thread's team and the worker's share 16 cores
  for policy in "" PASSIVE; do
    for pt in opt-6.7b:32:1024:0.25 llama-3-8b:32:2048:0.4; do
      IFS=: read -r n b s f <<< "$pt"
      echo "== $n $f OMP_WAIT_POLICY=${policy:-(unset)}" | tee -a "$out/call.txt"
      env ${policy:+OMP_WAIT_POLICY=$policy} timeout 120 python3 -P tools/lane_variance_probe.py --point "$n:$b:$s" \
        --fraction "$f" --compiles 1 --rounds 3 2>&1 | grep -v Warning | tail -4 | tee -a "$out/call.txt"
    done
  done
elif [ "$1" = threads ]; then
  timeout 570 python3 -P tools/cpu_lane_bench.py --points llama-3-8b:32:2048 --fractions 0.4 --dtypes float16 \
    --threads 14,12,10,8 --sweep-threads --steps 8 --repeats 2 --auto-modes "" --row-timeout 100 --out "$out/threads" 2>&1 \
    | grep -v "^kernel" | tee -a "$out/bench.txt" | grep "^step\|^Timeout\|^row" | cut -c1-260 | tee -a "$out/call.txt"
else
  echo "usage: bash tools/lane_device_call.sh check|bench|final|variance|threads" >&2; exit 2
fi
