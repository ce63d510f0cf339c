#!/usr/bin/env bash
# One go on one CUDA GPU, under 8 minutes (issue 20, item 6): the suite's CUDA-marked tests, the
# gradient-pass benchmark on cuda in bf16 and fp16, a default `gradex run` on cuda, and the 2-process
# launch test. Run it from the repository root on a machine with a CUDA build of torch:
#
#     python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]'    # no -c constraints.txt: CUDA torch
#     bash benchmarks/gpu_check.sh [OUT_DIR]
#
# Everything it measures lands in OUT_DIR (default benchmarks/results/gpu-check/): each step's log and
# exit status, benchmarks/gradients.py's JSON per precision, the default run's summary.json.
# It needs the package registry once for the default model and tasks (GRADEX_CACHE holds them after).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/gpu-check}
mkdir -p "$out"
py=${PYTHON:-.venv/bin/python}
export PYTHONUNBUFFERED=1
status=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep its log, note its exit status
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - t0)) s" | tee -a "$out/steps.txt"
    [ "$rc" -eq 0 ] || status=1
}

: >"$out/steps.txt"
"$py" - <<'PY' | tee "$out/machine.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0), "bf16", torch.cuda.is_bf16_supported())
PY
step cuda-tests 150 "$py" -m pytest -q -m cuda tests/
step gradients-bf16 90 "$py" benchmarks/gradients.py --quick --device cuda --precision bf16
step gradients-fp16 90 "$py" benchmarks/gradients.py --quick --device cuda --precision fp16
grep -h '^{' "$out"/gradients-*.log >"$out/gradients.jsonl" 2>/dev/null
# the embedded default, as `gradex run` runs it, placed on the GPU
step default-run 240 "$py" -m gradex.cli run --set runs_dir="$out/runs" --set model.device=cuda
cp "$out/runs/default/summary.json" "$out/default-summary.json" 2>/dev/null
step launch-test 60 "$py" -m pytest -q tests/test_devices.py -k two_process
exit $status
