#!/usr/bin/env bash
# The accelerator run: this project against Keras 3 on its JAX backend, on the GPU or TPU of this
# machine, in one command and under 8 minutes of device time, installs included.
#
#   scripts/accelerator.sh [OUT_DIR] [--dry-run] [--weights FILE] [--data-dir DIR] [--only STEP...]
#
# OUT_DIR defaults to $OUT. The steps, in order, each under a time limit, each writing its own
# files into OUT_DIR before the next starts (a failing step loses nothing before it):
#
#   environment          installs what is missing: the project with Keras (pip install -e ".[keras]"),
#                        and JAX's accelerator build when JAX sees no GPU or TPU (jax[tpu], or
#                        jax[cuda13] / jax[cuda12] as the NVIDIA driver allows, at the installed
#                        JAX's version); writes environment.json and environment.log
#   train                the default 10-epoch run on the shared split (test[:8000] / test[8000:]):
#                        train.log and train/ (history.json, checkpoints, curves.png)
#   bench-MODEL-BATCH    `mnist-flax benchmark` of the pipeline and the notebook model at 224 px,
#                        batch 32 and 256, float32 and bfloat16 (the pipeline model with --resize
#                        host and device), against Keras on JAX on the same device
#                        (--keras-baseline jax): bench-MODEL-BATCH.json and .log
#
# then table.md, everything in markdown (scripts/accelerator_report.py; printed too). Every step
# also leaves STEP.status.json (ok, failed, timed out or skipped; seconds; last line). The whole run
# stops starting steps at MNIST_FLAX_DEADLINE seconds (default 450) and cuts each step at its own
# limit, so it ends within the budget even when a step hangs; what did not run says so in the table.
# `--only STEP...` reruns those steps into the same OUT_DIR (the table then shows all of them).
#
# Weights and data: --weights / MNIST_FLAX_WEIGHTS (default shared/weights/...no_top.h5, shared/
# beside the checkout or inside it; else `imagenet`, Keras' download) and --data-dir /
# MNIST_FLAX_DATA_DIR (default shared/data/mnist, else tfds' download for the run and synthetic
# digits for the benchmark).
#
# --dry-run (or MNIST_FLAX_DRY_RUN=1) runs every step on the CPU at tiny sizes (alpha 0.35, 32 and
# 56 px, batch 2 alone, two steps, random weights, synthetic digits unless --data-dir is given),
# installs nothing and has no deadline: what tests/test_accelerator.py runs, so that the run works
# the first time it meets a device. PYTHON names the interpreter (default: the active virtual environment's, else python3;
# outside a virtual environment, where pip may not install, one is made in .venv-accelerator with
# the system's packages visible).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The shared weights and data: beside the checkout, or inside it (a copy of the working tree).
SHARED=$(cd "$ROOT/.." && pwd)/shared
[ -d "$SHARED" ] || SHARED=$ROOT/shared
IMAGENET_NO_TOP=mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5

OUT_DIR=${OUT:-}
DRY_RUN=${MNIST_FLAX_DRY_RUN:-0}
WEIGHTS=${MNIST_FLAX_WEIGHTS:-}
DATA_DIR=${MNIST_FLAX_DATA_DIR:-}
ONLY=()
STEP=""
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --step) STEP=$2; shift ;; # one step, as the run starts each (below)
    --weights) WEIGHTS=$2; shift ;;
    --data-dir) DATA_DIR=$2; shift ;;
    --only) while [ $# -gt 1 ] && [ "${2#--}" = "$2" ]; do ONLY+=("$2"); shift; done ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "error: unknown option $1 (see $0 --help)" >&2; exit 2 ;;
    *) OUT_DIR=$1 ;;
  esac
  shift
done
if [ -z "$OUT_DIR" ]; then
  echo "error: no output folder: pass OUT_DIR or set OUT (see $0 --help)" >&2
  exit 2
fi
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd) || exit 2

# ------------------------------------------------------------------------------------------------
# What runs, at which sizes.

if [ "$DRY_RUN" = 1 ]; then
  export JAX_PLATFORMS=cpu
  DEADLINE=${MNIST_FLAX_DEADLINE:-100000}
  DEFAULT_STEP_LIMIT=600
  BATCHES=(2)
  WEIGHTS=none
  DATA_DIR=${DATA_DIR:-$OUT_DIR/dry-run-data}
  SIZES=(--alpha 0.35)
  PIPELINE_SIZE=32 NOTEBOOK_SIZE=56
  PROTOCOL=(--steps 2 --repeats 1 --warmup 1 --pipeline-batches 2)
  TRAIN=(--alpha 0.35 --image-size 32 --batch-size 4 --epochs 2
    --train-split "test[:48]" --test-split "test[48:64]")
else
  DEADLINE=${MNIST_FLAX_DEADLINE:-450}
  DEFAULT_STEP_LIMIT=120
  BATCHES=(32 256)
  if [ -z "$WEIGHTS" ]; then
    WEIGHTS=imagenet
    [ -f "$SHARED/weights/$IMAGENET_NO_TOP" ] && WEIGHTS=$SHARED/weights/$IMAGENET_NO_TOP
  fi
  [ -z "$DATA_DIR" ] && [ -d "$SHARED/data/mnist" ] && DATA_DIR=$SHARED/data/mnist
  SIZES=()
  PIPELINE_SIZE=224 NOTEBOOK_SIZE=224
  PROTOCOL=(--steps 10 --repeats 3 --warmup 2 --pipeline-batches 10)
  TRAIN=(--train-split "test[:8000]" --test-split "test[8000:]")
fi
DATA=()
[ -n "$DATA_DIR" ] && DATA=(--data-dir "$DATA_DIR")
# Seconds a step may take at most, and what the table needs at the end.
ENVIRONMENT_LIMIT=${MNIST_FLAX_ENVIRONMENT_LIMIT:-200}
STEP_LIMIT=${MNIST_FLAX_STEP_LIMIT:-$DEFAULT_STEP_LIMIT}
TABLE_RESERVE=10

STEPS=(environment train)
for batch in "${BATCHES[@]}"; do STEPS+=("bench-pipeline-$batch" "bench-notebook-$batch"); done

if [ -z "$STEP" ]; then
  # One persistent compilation cache for the run, fresh, so that a program compiled twice in a
  # process (the benchmark compiles its step once to time the compilation) compiles once.
  JAX_COMPILATION_CACHE_DIR=$(mktemp -d "${TMPDIR:-/tmp}/mnist_flax_accelerator_jax.XXXXXX")
  export JAX_COMPILATION_CACHE_DIR
  export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
  trap 'rm -rf "$JAX_COMPILATION_CACHE_DIR"' EXIT
fi

if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -n "${VIRTUAL_ENV:-}" ]; then
  PY=$VIRTUAL_ENV/bin/python
else
  PY=python3
  # A system Python may refuse pip (PEP 668): then a virtual environment that sees its packages.
  if [ "$DRY_RUN" != 1 ] && "$PY" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'; then
    "$PY" -m venv --system-site-packages "$ROOT/.venv-accelerator" &&
      PY=$ROOT/.venv-accelerator/bin/python
  fi
fi
export ROOT OUT_DIR DRY_RUN

# ------------------------------------------------------------------------------------------------
# The steps.

step_environment() {
  local installed=() backend accelerator jax_version driver extra
  if ! "$PY" -c "import mnist_flax, keras" 2>/dev/null; then
    installed+=("the project with Keras: $PY -m pip install -e $ROOT[keras]")
    [ "$DRY_RUN" = 1 ] || "$PY" -m pip install -q -e "$ROOT[keras]" || return 2
  fi
  backend=$("$PY" -c "import jax; print(jax.default_backend())" 2>/dev/null || echo none)
  accelerator=none
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    accelerator=gpu
  elif compgen -G "/dev/accel*" >/dev/null || compgen -G "/dev/vfio/[0-9]*" >/dev/null ||
    [ -n "${TPU_ACCELERATOR_TYPE:-}${COLAB_TPU_ADDR:-}" ]; then
    accelerator=tpu
  fi
  echo "JAX sees: $backend; this machine has: $accelerator"
  if [ "$backend" != gpu ] && [ "$backend" != tpu ] && [ "$accelerator" != none ]; then
    jax_version=$("$PY" -c "import importlib.metadata as m; print(m.version('jax'))")
    extra=tpu
    if [ "$accelerator" = gpu ]; then
      # JAX's CUDA 13 wheels need an NVIDIA driver >= 580, its CUDA 12 ones >= 525.
      driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n 1)
      extra=cuda12
      [ "${driver%%.*}" -ge 580 ] 2>/dev/null && extra=cuda13
      echo "NVIDIA driver $driver"
    fi
    installed+=("JAX's accelerator build: $PY -m pip install jax[$extra]==$jax_version")
    if [ "$DRY_RUN" != 1 ]; then
      "$PY" -m pip install -q "jax[$extra]==$jax_version" || return 2
      backend=$("$PY" -c "import jax; print(jax.default_backend())")
    fi
  fi
  printf '%s\n' "${installed[@]}" >"$OUT_DIR/environment.installed"
  "$PY" - <<'EOF' || return 2
import datetime, importlib.metadata, json, os, pathlib, platform, subprocess
import jax

out = pathlib.Path(os.environ["OUT_DIR"])
devices = jax.devices()
def version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
commit = subprocess.run(["git", "-C", os.environ["ROOT"], "rev-parse", "--short", "HEAD"],
                        capture_output=True, text=True).stdout.strip() or None
installed = (out / "environment.installed").read_text().splitlines()
environment = {
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "commit": commit,
    "dry_run": os.environ["DRY_RUN"] == "1",
    "platform": jax.default_backend(),
    "device": devices[0].device_kind,
    "device_count": len(devices),
    "jax": jax.__version__,
    "jaxlib": version("jaxlib"),
    "flax": version("flax"),
    "keras": version("keras"),
    "tensorflow": version("tensorflow-cpu") or version("tensorflow"),
    "python": platform.python_version(),
    "cpu_count": os.cpu_count(),
    "machine": platform.processor() or platform.machine(),
    # In a dry run: what a real run would install here.
    "installed": [item for item in installed if item],
}
(out / "environment.json").write_text(json.dumps(environment, indent=2) + "\n")
print(json.dumps(environment, indent=2))
print(f"jax {jax.__version__} on {jax.default_backend()}: {len(devices)} x {devices[0].device_kind}")
EOF
  rm -f "$OUT_DIR/environment.installed"
  if [ "$DRY_RUN" != 1 ] && [ "$backend" != gpu ] && [ "$backend" != tpu ]; then
    echo "error: JAX sees no GPU or TPU here (its backend: $backend); nothing to measure"
    return 3
  fi
}

# The dry run's data (unless --data-dir names some): 64 random digits as IDX test files.
dry_run_data() {
  [ "$DATA_DIR" = "$OUT_DIR/dry-run-data" ] && [ ! -d "$DATA_DIR" ] || return 0
  TF_CPP_MIN_LOG_LEVEL=2 TF_ENABLE_ONEDNN_OPTS=0 "$PY" -c "import sys, numpy as np; from mnist_flax import input_pipeline
rng = np.random.default_rng(0)
images = rng.integers(0, 256, (64, 28, 28), dtype=np.uint8)
input_pipeline.write_idx_split(sys.argv[1], 't10k', images, rng.integers(0, 10, 64).astype(np.uint8))" \
    "$DATA_DIR"
}

step_train() {
  local features status
  rm -rf "$OUT_DIR/train"
  dry_run_data || return 2
  # A first run: its features computed, not found on disk from an earlier run.
  features=$(mktemp -d "${TMPDIR:-/tmp}/mnist_flax_accelerator_features.XXXXXX")
  "$PY" -m mnist_flax train --weights "$WEIGHTS" "${DATA[@]}" "${TRAIN[@]}" --quiet \
    --workdir "$OUT_DIR/train" --feature-cache "$features"
  status=$?
  rm -rf "$features"
  return $status
}

# bench-MODEL-BATCH
step_bench() {
  local model=$1 batch=$2 size=$PIPELINE_SIZE sweep=(--resize host device)
  if [ "$model" = notebook ]; then size=$NOTEBOOK_SIZE sweep=(); fi
  local split=()
  [ -n "$DATA_DIR" ] && split=(--split test)
  rm -f "$OUT_DIR/bench-$model-$batch.json"
  dry_run_data || return 2
  "$PY" -m mnist_flax benchmark --model "$model" --batch-size "$batch" --image-size "$size" \
    "${SIZES[@]}" --dtype float32 bfloat16 "${sweep[@]}" --keras-baseline jax \
    --weights "$WEIGHTS" "${DATA[@]}" "${split[@]}" "${PROTOCOL[@]}" \
    --json "$OUT_DIR/bench-$model-$batch.json"
}

run_step() {
  case $1 in
    environment) step_environment ;;
    train) step_train ;;
    bench-*) local rest=${1#bench-}; step_bench "${rest%-*}" "${rest##*-}" ;;
    *) echo "error: no step $1" >&2; return 2 ;;
  esac
}

if [ -n "$STEP" ]; then
  run_step "$STEP"
  exit $?
fi

# ------------------------------------------------------------------------------------------------
# The run: every step in turn, each under its limit, then the table.

record() { "$PY" "$ROOT/scripts/accelerator_report.py" status "$OUT_DIR" "$@"; }

for step in "${ONLY[@]}"; do
  case " ${STEPS[*]} " in
    *" $step "*) ;;
    *) echo "error: --only $step: the steps are ${STEPS[*]}" >&2; exit 2 ;;
  esac
done
START=$SECONDS
failed=0
environment_ok=1
for step in "${STEPS[@]}"; do
  if [ ${#ONLY[@]} -gt 0 ] && [[ " ${ONLY[*]} " != *" $step "* ]]; then continue; fi
  rm -f "$OUT_DIR/$step.log" "$OUT_DIR/$step.status.json"
  left=$((DEADLINE - (SECONDS - START) - TABLE_RESERVE))
  limit=$STEP_LIMIT
  [ "$step" = environment ] && limit=$ENVIRONMENT_LIMIT
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$environment_ok" != 1 ]; then
    record "$step" -1 0 "skipped: the environment step failed"
    continue
  fi
  if [ "$limit" -lt 20 ]; then
    record "$step" -1 0 "skipped: the run's ${DEADLINE} s deadline"
    continue
  fi
  echo "== $step (at most $limit s) =="
  began=$SECONDS
  # A fresh shell a step, with this run's settings; `timeout` ends its whole process group.
  timeout --kill-after=10 "$limit" env PYTHON="$PY" MNIST_FLAX_DRY_RUN="$DRY_RUN" \
    MNIST_FLAX_WEIGHTS="$WEIGHTS" MNIST_FLAX_DATA_DIR="$DATA_DIR" \
    bash "$0" "$OUT_DIR" --step "$step" 2>&1 | tee "$OUT_DIR/$step.log"
  status=${PIPESTATUS[0]}
  record "$step" "$status" $((SECONDS - began)) "$step"
  echo "== $step: exit status $status after $((SECONDS - began)) s =="
  if [ "$status" != 0 ]; then
    failed=1
    [ "$step" = environment ] && environment_ok=0
  fi
done
"$PY" "$ROOT/scripts/accelerator_report.py" table "$OUT_DIR" "${STEPS[@]}"
exit $failed
