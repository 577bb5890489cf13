#!/usr/bin/env bash
# One device call for the CPU lane's flag poll (branch lane-gpu-poll), risky parts last and each
# in its own timeout, output under $OUT as it goes. From the repository root on the device,
# after the wheels are installed and kvc is on PYTHONPATH (../shared/DEVICE.md).
out="${OUT:-/tmp/out}"; mkdir -p "$out"
date -u | tee "$out/call.txt"
echo "== GPU tests (the lane's, the flag poll's)" | tee -a "$out/call.txt"
timeout 200 python3 -P -X faulthandler -m pytest -q -p no:cacheprovider tests/test_gpu.py \
  -k "flag or slow_cpu or failing_cpu or cpu_lane or profiler_measures" 2>&1 | tail -25 | tee -a "$out/call.txt"
for point in llama-3-8b:32:2048:0.4 opt-6.7b:32:1024:0.25; do
  IFS=: read -r name b s f <<< "$point"
  echo "== probe $name pipelined $f" | tee -a "$out/call.txt"
  timeout 120 python3 -P tools/lane_hang_diag.py "$name:$b:$s" pipelined "$f" 100 2>&1 \
    | grep -v "site-packages\|importlib\|frozen" | tail -40 | tee -a "$out/call.txt"
done
echo "== bench" | tee -a "$out/call.txt"
timeout 420 python3 -P tools/cpu_lane_bench.py --points llama-3-8b:32:2048,opt-6.7b:32:1024 \
  --fractions 0.25,0.4 --dtypes float16 --threads 14 --steps 8 --repeats 2 --out "$out" 2>&1 \
  | grep -v "^kernel" | tee "$out/bench.txt" | grep "^step" | cut -c1-220 | tee -a "$out/call.txt"
