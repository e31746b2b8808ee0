#!/bin/bash
# The GPU checks, in one command on a machine with a CUDA GPU and PyTorch (docs/benchmarks.md,
# "GPU"): the GPU-vs-CPU unit tests, `rayscreen demo` (train, infer and profile on the GPU,
# bf16 autocast in training), inference throughput (benchmarks/infer.py --gpu) and the WSCNN
# reproduction's `paper` preset, max pooling, at the paper's rate and at 1e-3.
#
#     bash benchmarks/gpu_check.sh OUT_DIR [SECONDS]
#
# SECONDS (default 540) bounds the whole script: the paper runs get what the rest leaves and
# are cut there (their per-epoch lines stay in the log). Logs, the paper run's summary and its
# saliency figure land in OUT_DIR.
#
# A machine whose Python has PyTorch but not rayscreen's other packages (a CUDA image without
# Ray, zarr or dask) gets them from a wheelhouse in ./.whl, built where pip can reach the
# registry by benchmarks/gpu_wheels.sh; they are unpacked into /tmp/site, not installed.
set -u -o pipefail  # a test failure seen through `| tail` still fails the pipe
out=${1:?usage: gpu_check.sh OUT_DIR [SECONDS]}
budget=${2:-540}
start=$(date +%s)
left() { echo $((budget - ($(date +%s) - start))); }
mkdir -p "$out"
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 PYTHONDONTWRITEBYTECODE=1
PY=${PYTHON:-python3}
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
echo "== $(($(date +%s) - start)) s: packages"
nvidia-smi -L
$PY -c "import torch, torchvision, ray, zarr, dask, xarray, pandas, numpy
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO GPU')
print('torchvision', torchvision.__version__, 'ray', ray.__version__, 'zarr', zarr.__version__, 'dask', dask.__version__,
      'xarray', xarray.__version__, 'pandas', pandas.__version__, 'numpy', numpy.__version__)" || exit 1

# the paper preset's data (CPU, one process) while the GPU checks run
$PY benchmarks/wscnn_sim.py --preset paper --out /tmp/wscnn_paper --data-only > "$out/wscnn_data.log" 2>&1 &
data_pid=$!

echo "== $(($(date +%s) - start)) s: GPU-vs-CPU unit tests"
timeout 180 $PY -m pytest -q -p no:cacheprovider tests/unit/test_cuda.py tests/unit/test_saliency.py::test_saliency_on_gpu \
  2>&1 | tail -15
echo "GPU tests rc $?"

echo "== $(($(date +%s) - start)) s: rayscreen demo (train, infer, profile on the GPU)"
rm -rf /tmp/demo_gpu
timeout 240 $PY -m rayscreen.cli demo --out /tmp/demo_gpu > "$out/demo.log" 2>&1
echo "demo rc $?"
grep -E "GPU|on CPU|done in|hits|QC|NSC|wall" "$out/demo.log" | grep -v "^\s*$" | tail -30

echo "== $(($(date +%s) - start)) s: inference throughput on the GPU (run_infer vs the Predictor there)"
timeout 180 $PY benchmarks/infer.py --preset gpu --gpu --repeats 2 > "$out/infer_gpu.log" 2>&1
echo "infer gpu rc $?"
grep -E "^inference|round|best of|steady /" "$out/infer_gpu.log" | tail -8

echo "== $(($(date +%s) - start)) s: waiting for the paper data"
wait $data_pid || echo "paper data generation failed (rc $?): the runs below draw it again, inside their time"
tail -2 "$out/wscnn_data.log"
# one paper-preset run of max pooling, named NAME, on the data drawn above (a run directory of
# its own: a changed setting is another run), cut at what the budget leaves
paper_run() {
  local name=$1; shift
  local t=$(( $(left) - 20 ))
  echo "== $(($(date +%s) - start)) s: wscnn_sim --preset paper --models max $* (cut at ${t} s)"
  [ "$t" -gt 60 ] || return 0
  mkdir -p "/tmp/$name"
  if [ "$name" != wscnn_paper ]; then ln -sfn /tmp/wscnn_paper/data "/tmp/$name/data"; fi
  timeout "$t" $PY benchmarks/wscnn_sim.py --preset paper --out "/tmp/$name" --models max "$@" \
    > "$out/$name.log" 2>&1
  echo "$name rc $?"
  grep -E "epoch|wscnn_sim|WSCNN|\|" "$out/$name.log" | tail -25
  cp "/tmp/$name/wscnn_sim.json" "$out/$name.json" 2>/dev/null
  cp "/tmp/$name/runs/max/train/metrics.csv" "$out/${name}_metrics.csv" 2>/dev/null
}
paper_run wscnn_paper --figure "$out/wscnn_paper_saliency.png"
# the rate the small preset adopted (session 19: the paper's 1e-4 with the plateau rule did not converge)
paper_run wscnn_paper_lr3 --set lr=0.001 --set schedule=none
echo "== $(($(date +%s) - start)) s: done"
