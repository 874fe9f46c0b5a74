#!/usr/bin/env bash
# The GPU check: run from a clone on a CUDA host with no network, it installs the wheels laid beside the clone whose
# package the host's Python lacks or has at another version, then runs the CUDA tests, the default 100-client run in
# bf16 and in nf4 (QLoRA), bench.train_throughput / bench.eval_throughput / bench.gpu_sizes on CUDA and the central
# task-adapter ceiling, and writes one JSON of figures (gpu_check.json) and one log (gpu_check.log), updated after
# every stage.
#
#   bench/gpu_check.sh [--wheels DIR] [--out DIR] [--stages LIST] [--budget SECONDS]
#
#   --wheels DIR   wheels of what the host may lack (default: ../wheels beside the clone; `python -m
#                  bench.offline_wheels` lays them where PyPI is reachable); NAME.part-* files are joined into NAME
#                  once the join matches NAME.sha256 (a transfer that splits large wheels)
#   --out DIR      where gpu_check.json and gpu_check.log go (default: runs/gpu-check)
#   --stages LIST  comma-separated, in order (default: all but fedavg, what the GPU issue needs first): install,
#                  tests-unit, run-bf16, run-nf4, tests-runs (the CUDA tests without / with Ray and SuperNodes;
#                  `tests`: both), throughput, merge, sizes, ceiling; `fedavg` (bench.task_fedavg: the central curve
#                  beside 20 rounds of the run's FedAvg schedule, then 60 rounds of a quarter of the clients with 4
#                  local epochs of 1024-token steps, then 256 rounds of 5 clients x 1 local epoch with the user's
#                  level in every prompt)
#   --budget S     seconds for the whole check (default 480); a stage gets what is left, and one that cannot start
#                  in time is skipped with that reason
# A stage that cannot run here (no CUDA, no bitsandbytes, no MovieLens) is skipped and the JSON says why.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
WHEELS="$REPO/../wheels" OUT="runs/gpu-check" STAGES="install,tests-unit,run-bf16,run-nf4,tests-runs,throughput,merge,sizes,ceiling" BUDGET=480
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS=$2; shift 2 ;; --out) OUT=$2; shift 2 ;; --stages) STAGES=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT" runs/gpu-check
OUT=$(cd "$OUT" && pwd) WORK="$REPO/runs/gpu-check" VENV="$REPO/.venv-gpu" PY="$REPO/.venv-gpu/bin/python"
LOG="$OUT/gpu_check.log" JSON="$OUT/gpu_check.json" START=$(date +%s)
export PYTHONUNBUFFERED=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 OPPU_CACHE_DIR="${OPPU_CACHE_DIR:-$WORK/cache}"

record() {  # record STAGE STATUS SECONDS [REASON] [FIGURES.json]: merge one stage into gpu_check.json
  python3 - "$JSON" "$@" <<'EOF'
import json, os, sys
path, stage, status, seconds, reason, figures = (sys.argv[1:] + ["", ""])[:6]
data = json.load(open(path)) if os.path.exists(path) else {"stages": {}}
entry = {"status": status, "seconds": float(seconds)}
if reason:
    entry["reason"] = reason
if figures and os.path.exists(figures):
    entry["figures"] = json.load(open(figures))
data["stages"][stage] = entry
json.dump(data, open(path + ".tmp", "w"), indent=1)
os.replace(path + ".tmp", path)
EOF
}

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

run_stage() {  # run_stage NAME SECONDS FIGURES.json COMMAND...: time-limited, logged, recorded
  local name=$1 limit=$2 figures=$3; shift 3
  local remaining; remaining=$(left)
  if [ "$remaining" -lt 20 ]; then record "$name" skipped 0 "budget spent ($BUDGET s)"; return; fi
  [ "$limit" -gt "$remaining" ] && limit=$remaining
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local t0; t0=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" >>"$LOG" 2>&1  # bash -c: stages may be functions
  local status=$?
  local took=$(( $(date +%s) - t0 ))
  case $status in
    0) record "$name" ok "$took" "" "$figures" ;;
    124|137) record "$name" timeout "$took" "stopped at its ${limit}s limit" "$figures" ;;
    *) record "$name" failed "$took" "exit $status; see gpu_check.log" "$figures" ;;
  esac
  echo "=== $name: exit $status after ${took}s" | tee -a "$LOG"
}

skip_unless() {  # skip_unless NAME PYTHON-CONDITION REASON: true (0) when the stage may run
  if "$PY" -c "import sys; sys.exit(0 if ($2) else 1)" 2>/dev/null; then return 0; fi
  record "$1" skipped 0 "$3"; echo "=== $1: skipped ($3)" | tee -a "$LOG"; return 1
}

install_missing() {  # a venv over the host's Python; a wheel goes in where its package is missing or at another version
  # (the folder says what the run needs: bench.offline_wheels lays what the host lacks or has at a refused version)
  # --without-pip: a venv of Python < 3.12 would bring its own old pip and setuptools, hiding the host's (building the
  # clone needs setuptools >= 77); the host's pip installs into the venv
  [ -x "$PY" ] || python3 -m venv --system-site-packages --without-pip "$VENV" || return 1
  # the host's packages stay visible, also where its python3 is itself a venv's (--system-site-packages misses them)
  python3 -c "import site; print('\n'.join(site.getsitepackages()))" > \
    "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/host-site-packages.pth"
  "$PY" -m pip --version >/dev/null 2>&1 || "$PY" -m ensurepip --default-pip || return 1  # a host venv without pip (uv)
  if [ -d "$WHEELS" ]; then
    for sum in "$WHEELS"/*.sha256; do  # NAME.sha256 beside NAME.part-*: joined once every part is there
      [ -e "$sum" ] || continue
      local whole=${sum%.sha256}
      [ -e "$whole" ] && continue
      cat "$whole".part-* > "$whole.tmp"
      if [ "$(sha256sum < "$whole.tmp" | cut -d' ' -f1)" = "$(cat "$sum")" ]; then mv "$whole.tmp" "$whole"
      else rm -f "$whole.tmp"; echo "$(basename "$whole"): parts incomplete, not installed yet"; fi
    done
    local missing
    missing=$("$PY" - "$WHEELS" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from packaging.version import Version
for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    name, wanted = wheel.name.split("-")[:2]
    try:
        have = Version(version(name))
    except PackageNotFoundError:
        have = None
    if have != Version(wanted):
        print(wheel)
EOF
)
    [ -z "$missing" ] || "$PY" -m pip install -q --no-index --no-deps --no-compile $missing || return 1
  fi
  "$PY" -c "import oppu_fl" 2>/dev/null || "$PY" -m pip show -q oppu-fl >/dev/null 2>&1 ||
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . || return 1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import torch, transformers, peft, flwr; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'peft', peft.__version__, 'flwr', flwr.__version__)"
}

gpu_sampler() {  # gpu_sampler FILE: per-process GPU memory once a second until killed
  while true; do
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits 2>/dev/null | sed "s/^/$(date +%s), /"
    sleep 1
  done > "$1"
}

run_default() {  # run_default NAME FLAGS...: the default 100-client run, with GPU memory per client sampled
  local name=$1; shift
  gpu_sampler "$WORK/$name-gpu.csv" & local sampler=$!
  "$PY" -m bench.end_to_end --num-clients 100 --run-dir "$WORK/$name" --out "$WORK/$name.json" -- "$@"
  local status=$?
  kill $sampler 2>/dev/null
  [ $status -eq 0 ] && { "$PY" -m simulation.privacy_audit "$WORK/$name" > "$WORK/$name-audit.txt" 2>&1; status=$?; }
  "$PY" - "$WORK/$name-gpu.csv" "$WORK/$name.json" <<'EOF'
import collections, json, os, sys
rows = [line.split(",") for line in open(sys.argv[1]) if line.count(",") == 2]
per_second = collections.defaultdict(list)
for t, pid, mib in rows:
    per_second[t].append(float(mib))
path = sys.argv[2]
data = json.load(open(path)) if os.path.exists(path) else {}
data["audit"] = open(sys.argv[2].replace(".json", "-audit.txt")).read()[-2000:] if os.path.exists(sys.argv[2].replace(".json", "-audit.txt")) else None
data["gpu"] = {"max_processes_at_once": max(map(len, per_second.values()), default=0),
               "max_client_mib": max((m for v in per_second.values() for m in v), default=0),
               "max_total_mib": max(map(sum, per_second.values()), default=0)}
json.dump(data, open(path, "w"), indent=1)
EOF
  return $status
}

export -f install_missing gpu_sampler run_default
export PY VENV WHEELS WORK
IFS=, read -ra WANTED <<< "$STAGES"
for stage in "${WANTED[@]}"; do
  case $stage in
    install) run_stage install 300 "" install_missing ;;
    tests|tests-unit|tests-runs)
      selection=""; [ "$stage" = tests-unit ] && selection="-k not simulation and not supernodes"
      [ "$stage" = tests-runs ] && selection="-k simulation or supernodes"
      skip_unless "$stage" "__import__('torch').cuda.is_available()" "no CUDA GPU visible" &&
        run_stage "$stage" 400 "" "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py ${selection:+"$selection"} ;;
    sizes)
      skip_unless sizes "__import__('torch').cuda.is_available()" "no CUDA GPU visible" &&
        run_stage sizes 240 "$WORK/sizes.json" "$PY" -m bench.gpu_sizes --model "" --out "$WORK/sizes.json" ;;
    merge)
      skip_unless merge "__import__('torch').cuda.is_available() and __import__('importlib').util.find_spec('bitsandbytes')" \
        "needs CUDA and bitsandbytes (pip install -e '.[gpu]')" &&
        run_stage merge 120 "$WORK/merge.json" "$PY" -m bench.gpu_sizes --sizes "" --out "$WORK/merge.json" ;;
    throughput)
      skip_unless throughput "__import__('torch').cuda.is_available()" "no CUDA GPU visible" && {
        run_stage train-throughput 120 "$WORK/train.json" "$PY" -m bench.train_throughput --device cuda --users 4 \
          --batch-tokens 128,512,2048 --out "$WORK/train.json"
        run_stage eval-throughput 120 "$WORK/eval.json" "$PY" -m bench.eval_throughput --device cuda --out "$WORK/eval.json"
      } ;;
    ceiling)
      skip_unless ceiling "__import__('torch').cuda.is_available()" "no CUDA GPU visible" &&
        run_stage ceiling 300 "$WORK/ceiling.json" "$PY" -m bench.task_ceiling --device cuda --batch-tokens 1024 \
          --epochs 6 --eval-every 1000 --personalize --out "$WORK/ceiling.json" ;;
    fedavg)
      skip_unless fedavg "__import__('torch').cuda.is_available()" "no CUDA GPU visible" && {
        run_stage fedavg 300 "$WORK/fedavg.json" "$PY" -m bench.task_fedavg --device cuda --rounds 20 \
          --out "$WORK/fedavg.json"
        # pooled 2-example steps learn no movies either (docs/quality.md): local steps of a client's whole ratings
        run_stage fedavg-large 300 "$WORK/fedavg-large.json" "$PY" -m bench.task_fedavg --device cuda --modes federated \
          --batch-tokens 1024 --local-epochs 4 --fraction-train 0.25 --rounds 60 --out "$WORK/fedavg-large.json"
        # the user's level in every prompt, and many short rounds of a few clients: on 2 cores this schedule's base
        # reached the central curve's at 473 k tokens (docs/quality.md); its curve beyond that
        run_stage fedavg-level 300 "$WORK/fedavg-level.json" "$PY" -m bench.task_fedavg --device cuda --level-prompt \
          --modes federated --batch-tokens 1024 --local-epochs 1 --fraction-train 0.0625 --rounds 256 --score-every 16 \
          --out "$WORK/fedavg-level.json"
      } ;;
    run-bf16)
      skip_unless run-bf16 "__import__('torch').cuda.is_available()" "no CUDA GPU visible" &&
        run_stage run-bf16 420 "$WORK/run-bf16.json" run_default run-bf16 --device cuda ;;
    run-nf4)
      skip_unless run-nf4 "__import__('torch').cuda.is_available() and __import__('importlib').util.find_spec('bitsandbytes')" \
        "needs CUDA and bitsandbytes (pip install -e '.[gpu]')" &&
        run_stage run-nf4 420 "$WORK/run-nf4.json" run_default run-nf4 --device cuda --quantize nf4 ;;
    *) echo "gpu_check.sh: unknown stage $stage" >&2; record "$stage" skipped 0 "unknown stage" ;;
  esac
done
python3 -c "import json; d = json.load(open('$JSON')); print({k: v['status'] for k, v in d['stages'].items()})" | tee -a "$LOG"
