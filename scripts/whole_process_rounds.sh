#!/usr/bin/env bash
# Whole processes, round after round: ours against Keras 3 on TensorFlow and on its JAX backend,
# for docs/benchmarks.md's table "the tutorial's job and the notebook's model, whole processes".
#
#   scripts/whole_process_rounds.sh [OUT_DIR]      (default: a new folder under runs/)
#
# Each round runs, in this order, every job once, each a fresh process timed from start to exit:
#   the tutorial's job (one epoch of 1,024 digits at 224 px, the last 256 test digits as
#   validation): ours' first run (a new --feature-cache folder: features computed), ours' second
#   run (the same folder: features loaded), then scripts/keras_tutorial_job.py on tensorflow
#   and on jax (`model.fit` over the same tf.data images);
#   the notebook's model (one epoch of 512 digits, the same validation digits): ours
#   (`--model notebook`), then Keras on tensorflow and on jax (`model.fit` on x / 255).
# Before the rounds, ours' two jobs run once untimed, so that its compilation cache is warm as after
# any first use (Keras keeps none between processes). Nothing else should run on the machine.
#
# Writes OUT_DIR/rounds.tsv (job, side, round, seconds, exit status), each job's log, and
# OUT_DIR/table.md (every round's seconds and the medians, ours / Keras from the medians), printed.
# Settings (environment): ROUNDS (3), MNIST_FLAX_WEIGHTS, MNIST_FLAX_DATA_DIR (default ../shared),
# IMAGE_SIZE (224), TRAIN_SPLIT ("test[:1024]"), NOTEBOOK_SPLIT ("test[:512]"), TEST_SPLIT
# ("test[9744:]"), KERAS_BACKENDS ("tensorflow jax": the Keras jobs run on these, in this order),
# PYTHON (default python3, or the active virtual environment's).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SHARED=$(cd "$ROOT/.." && pwd)/shared
OUT_DIR=${1:-$ROOT/runs/whole-process-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd) || exit 2
PY=${PYTHON:-python3}
[ -n "${VIRTUAL_ENV:-}" ] && [ -z "${PYTHON:-}" ] && PY=$VIRTUAL_ENV/bin/python

ROUNDS=${ROUNDS:-3}
read -r -a KERAS_BACKENDS <<<"${KERAS_BACKENDS:-tensorflow jax}"
WEIGHTS=${MNIST_FLAX_WEIGHTS:-$SHARED/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5}
DATA_DIR=${MNIST_FLAX_DATA_DIR:-$SHARED/data/mnist}
COMMON=(--weights "$WEIGHTS" --data-dir "$DATA_DIR" --image-size "${IMAGE_SIZE:-224}"
  --test-split "${TEST_SPLIT:-test[9744:]}" --epochs 1)
TUTORIAL=(--train-split "${TRAIN_SPLIT:-test[:1024]}")
NOTEBOOK=(--model notebook --train-split "${NOTEBOOK_SPLIT:-test[:512]}")
for path in "$WEIGHTS" "$DATA_DIR"; do
  [ -e "$path" ] || { echo "error: $path does not exist (set MNIST_FLAX_WEIGHTS / MNIST_FLAX_DATA_DIR)" >&2; exit 2; }
done

ours() { "$PY" -m mnist_flax train "$@" --quiet; }
keras() { "$PY" "$ROOT/scripts/keras_tutorial_job.py" "$@"; }

# job side round command...: runs the command, appends its wall time to rounds.tsv.
timed() {
  local job=$1 side=$2 round=$3 log began status seconds
  shift 3
  log=$OUT_DIR/$job-$side-$round.log
  began=$(date +%s.%N)
  "$@" >"$log" 2>&1
  status=$?
  seconds=$(awk -v began="$began" -v now="$(date +%s.%N)" 'BEGIN { print now - began }')
  printf '%s\t%s\t%s\t%.2f\t%s\n' "$job" "$side" "$round" "$seconds" "$status" >>"$OUT_DIR/rounds.tsv"
  printf '%-9s %-17s round %s: %6.1f s%s\n' "$job" "$side" "$round" "$seconds" \
    "$([ "$status" = 0 ] || echo " (exit status $status, see $log)")"
}

echo "warming ours' compilation cache (untimed)"
ours "${COMMON[@]}" "${TUTORIAL[@]}" --workdir "$OUT_DIR/warm-tutorial" \
  --feature-cache "$OUT_DIR/features-warm" >"$OUT_DIR/warm-tutorial.log" 2>&1
ours "${COMMON[@]}" "${NOTEBOOK[@]}" --workdir "$OUT_DIR/warm-notebook" >"$OUT_DIR/warm-notebook.log" 2>&1

printf 'job\tside\tround\tseconds\texit_status\n' >"$OUT_DIR/rounds.tsv"
for round in $(seq 1 "$ROUNDS"); do
  features=$OUT_DIR/features-$round  # new each round: the first run computes, the second loads
  timed tutorial ours-first "$round" ours "${COMMON[@]}" "${TUTORIAL[@]}" \
    --workdir "$OUT_DIR/tutorial-first-$round" --feature-cache "$features"
  timed tutorial ours-second "$round" ours "${COMMON[@]}" "${TUTORIAL[@]}" \
    --workdir "$OUT_DIR/tutorial-second-$round" --feature-cache "$features"
  for backend in "${KERAS_BACKENDS[@]}"; do
    timed tutorial "keras-$backend" "$round" keras --backend "$backend" "${COMMON[@]}" "${TUTORIAL[@]}"
  done
  timed notebook ours "$round" ours "${COMMON[@]}" "${NOTEBOOK[@]}" --workdir "$OUT_DIR/notebook-$round"
  for backend in "${KERAS_BACKENDS[@]}"; do
    timed notebook "keras-$backend" "$round" keras --backend "$backend" "${COMMON[@]}" "${NOTEBOOK[@]}"
  done
done

"$PY" - "$OUT_DIR" "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)" <<'EOF'
import csv, os, pathlib, platform, statistics, sys

out, commit = pathlib.Path(sys.argv[1]), sys.argv[2]
times = {}
for row in csv.DictReader((out / "rounds.tsv").open(), delimiter="\t"):
    ok = row["exit_status"] == "0"
    times.setdefault((row["job"], row["side"]), []).append(float(row["seconds"]) if ok else None)

def cell(job, side):
    seconds = times.get((job, side))
    if not seconds:
        return "", None
    done = [s for s in seconds if s is not None]
    median = statistics.median(done) if done else None
    rounds = ", ".join("failed" if s is None else f"{s:.1f}" for s in seconds)
    return f"{rounds} s" + (f" (median {median:.1f})" if median is not None else ""), median

def ratio(ours, theirs):
    return f"{theirs / ours:.2f}x" if ours and theirs else ""

cpu = platform.processor()
if os.path.exists("/proc/cpuinfo"):
    names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
             if line.startswith("model name")]
    cpu = names[0] if names else cpu
lines = [
    f"{os.cpu_count()} CPUs ({cpu}), commit {commit}, {len(next(iter(times.values())))} rounds; "
    "whole processes in seconds, every round, then the median; ours / Keras is Keras' median "
    "time over ours' (above 1: ours is faster)",
    "",
    "| job | ours | Keras, TensorFlow | Keras, JAX backend | ours / Keras-TF | ours / Keras-JAX |",
    "| --- | --- | --- | --- | --- | --- |",
]
for label, job, side in (
    ("tutorial, first run (features computed)", "tutorial", "ours-first"),
    ("tutorial, second run (features on disk)", "tutorial", "ours-second"),
    ("notebook model", "notebook", "ours"),
):
    ours, ours_median = cell(job, side)
    tf, tf_median = cell(job, "keras-tensorflow")
    jx, jax_median = cell(job, "keras-jax")
    if side == "ours-second":  # the same Keras job as the first run's row: shown once
        tf = jx = ""
    lines.append(f"| {label} | {ours} | {tf} | {jx} | {ratio(ours_median, tf_median)} | "
                 f"{ratio(ours_median, jax_median)} |")
text = "\n".join(lines) + "\n"
(out / "table.md").write_text(text)
print(text)
EOF
