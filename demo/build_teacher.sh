#!/usr/bin/env bash
# The demo teacher's recipe as the shipped weights were made (`make demo-model`), on 2 cores:
#   1. phases vae and vae_focus at 2 threads, one after the other;
#   2. phases unet + unet_more (1 thread) and, beside them in a second process, phase decoder
#      (1 thread): the decoder needs only vae_focus's output, and neither touches the other's files;
#   3. assemble into --out.
# Each phase runs at the thread count demo/weights/teacher_train.json records for it (float sums, so
# the weights, depend on it; a rebuild still differs from the shipped bits, docs/demo_model.md).
# bench/teacher_cost.py measures this schedule against every phase at 2 threads one after the other.
#   bash demo/build_teacher.sh [demo/train_teacher.py options, e.g. --out demo/weights --work DIR]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-$here/.venv/bin/python}"
teacher() { "$PY" "$here/demo/train_teacher.py" "$@"; }

teacher "$@" --phase vae --threads 2
teacher "$@" --phase vae_focus --threads 2
teacher "$@" --phase decoder --threads 1 &
decoder=$!
status=0
teacher "$@" --phase unet --threads 1 && teacher "$@" --phase unet_more --threads 1 || status=$?
wait "$decoder" || { echo "build_teacher: the decoder phase failed (its log lines say 'decoder')" >&2; status=1; }
if [ "$status" -ne 0 ]; then
  echo "build_teacher: a phase failed. The files of the phases that finished stay in --work: rerun only the" \
       "failed one (demo/train_teacher.py --phase NAME, same options and threads), then --phase assemble" >&2
  exit "$status"
fi
teacher "$@" --phase assemble
