#!/usr/bin/env bash
# All four GPU benchmarks in one go, sized to finish within 8 minutes on one H200 (each command has its
# own time limit, so a slow one cannot eat the others' time). Needs only the working tree and torch,
# transformers, peft, accelerate, pandas, safetensors, tqdm: random-weight models (bench/shapes.py), the
# tokenizer in bench/tokenizer/, no model files, no download.
#
#   bash bench/gpu_all.sh                          # on the GPU machine: --shape 7b --device cuda
#   bash bench/gpu_all.sh --shape tiny --device cpu   # the same commands, tiny, on a CPU (a dry run)
#
# Output: each benchmark's log and bench_gpu.json under $OUT (the device tool's folder) or
# bench/gpu_results/, and a summary of exit codes at the end. Exits 1 if any benchmark failed.
set -u
shape=7b
device=cuda
while [ $# -gt 0 ]; do
  case "$1" in
    --shape) shape=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    *) echo "unknown argument $1 (expected --shape S --device D)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
out=${OUT:-bench/gpu_results}
mkdir -p "$out"
py=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TQDM_DISABLE=1
scale=1  # time limits are the GPU's; a CPU dry run gets 5 times as long
if [ "$device" = cpu ]; then  # the dry run: small sizes
  scale=5
  gpu_args=(--examples 12 --prompts 2 --k 3 --max-new-tokens 4 --batch-size 4)
  proj_args=(--dim 512 --repeats 1)
  dense_args=(--dim 512)
  nice_args=(--prompts 2 --k 2 --max-new-tokens 3)
  dist_args=(--check --examples 16)
else
  gpu_args=(--examples 256 --prompts 16 --k 8 --max-new-tokens 32 --batch-size 16)
  proj_args=(--repeats 3)
  dense_args=()
  nice_args=(--prompts 32 --k 8 --max-new-tokens 32 --repeats 2)
  dist_args=(--device cuda)
fi
"$py" - <<'PY' | tee "$out/environment.txt"
import platform, torch, transformers, peft
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"peft {peft.__version__}; {gpu}")
PY
status=()
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$(($2 * scale)); shift 2
  echo "== $name (at most ${limit} s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$out/$name.log"
  status+=("$name: exit $rc after $((SECONDS - t0)) s")
}
step bench_gpu 160 "$py" bench/bench_gpu.py --shape "$shape" --device "$device" "${gpu_args[@]}" --out "$out/bench_gpu_run"
cp "$out/bench_gpu_run/bench_gpu.json" "$out/" 2>/dev/null
rm -rf "$out/bench_gpu_run"
step bench_projection 60 "$py" bench/bench_projection.py --device "$device" --shape "$shape" --kinds sjlt "${proj_args[@]}"
# the dense option at the shape's D: one timed call after the first (it regenerates most of its matrix per call)
step bench_projection_dense 40 "$py" bench/bench_projection.py --device "$device" --shape "$shape" --kinds rademacher --repeats 1 --compare-max 0 ${dense_args[@]+"${dense_args[@]}"}
step bench_nice 70 "$py" bench/bench_nice.py --shape "$shape" --device "$device" --part rollouts "${nice_args[@]}"
step bench_nice_overhead 30 "$py" bench/bench_nice.py --shape tiny --device "$device" --part overhead --prompts 8 --k 8 --max-new-tokens 32
step bench_distributed 100 "$py" bench/bench_distributed.py --shape tiny "${dist_args[@]}"
echo "== summary"
printf '%s\n' "${status[@]}" | tee "$out/summary.txt"
! grep -qv "exit 0 " "$out/summary.txt"
