#!/usr/bin/env bash
# Continue training the toy teacher on a lent GPU in ONE device call, and bring its EMA weights back.
#
# The toy teacher needs ~10k+ steps at batch 256 (teachers/toyworld/README.md): CPU hours, GPU minutes. This script
# trains from the shipped weights (teachers/toyworld/pipeline) for $MINUTES minutes of wall clock with the same
# recipe as the CPU runs (flow matching on freshly rendered clips, no pool: the GPU encodes a batch in milliseconds),
# checkpointing every $CKPT steps; when the time is up it exports the last checkpoint's EMA weights and copies them,
# that checkpoint (to resume from) and the loss logs to $OUT (the device tool brings $OUT back).
#
# Once, on the development machine, in the repo root (the GPU image has torch, accelerate, peft, transformers and
# safetensors, but not diffusers):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl \
#       diffusers==0.42.1
# Then one device call, carry [".whl"], timeout_s 600:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site || exit; bash teachers/toyworld/train_gpu.sh
# and back here, with <files_at> the folder the tool names:
#   cp <files_at>/{diffusion_pytorch_model.safetensors,config.json} teachers/toyworld/pipeline/transformer/
#
# Its measured rate is in docs/results/toyworld_teacher.md. Extra arguments are recipe overrides: to continue on the same warm machine, rerun it with train.resume_from_checkpoint=latest.
#
# Check it on the CPU first, tiny (it writes to a temporary OUT):
#   MINUTES=0.5 BATCH=4 WORKERS=0 CKPT=2 PYTHON=.venv/bin/python bash teachers/toyworld/train_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
MINUTES=${MINUTES:-7}
BATCH=${BATCH:-256}
LR=${LR:-1e-3}
WORKERS=${WORKERS:-12}
CKPT=${CKPT:-250}
OUT=${OUT:-$(mktemp -d)}
RUN=${RUN_DIR:-/tmp/toy_teacher_gpu}
ARGS=(output_dir="$RUN" teacher.pretrained=teachers/toyworld/pipeline student.init=teachers/toyworld/pipeline
      train.batch_size="$BATCH" train.learning_rate="$LR" train.toyworld_pool=0
      train.dataloader_num_workers="$WORKERS" train.checkpointing_steps="$CKPT" train.checkpoints_total_limit=1)

ARGS+=("$@")
"$PY" -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'cuda', \
torch.cuda.is_available())" || { echo "train_gpu.sh: diffusers is missing: install the carried wheels (see above)"; exit 1; }
start=$(date +%s)
# the time budget: `timeout` stops training; what counts is the last checkpoint it wrote
timeout --signal=TERM "$(awk "BEGIN {print int($MINUTES * 60)}")" "$PY" -m distill train recipes/toyworld_teacher.yaml \
    "${ARGS[@]}" || [ $? -eq 124 ]
last=$(ls -d "$RUN"/students/teacher/checkpoint-* 2>/dev/null | sed 's/.*checkpoint-//' | sort -n | tail -1)
[ -n "$last" ] || { echo "train_gpu.sh: no checkpoint within $MINUTES min (lower CKPT)"; exit 1; }
echo "train_gpu.sh: $last steps x $BATCH clips in $(( $(date +%s) - start )) s"
# the EMA weights of the last checkpoint; the checkpoint itself comes back too, so a CPU run can resume from it
"$PY" -m distill export recipes/toyworld_teacher.yaml "${ARGS[@]}" export.checkpoint=latest
mkdir -p "$OUT/ckpt"
cp "$RUN"/students/teacher/export/pipeline/transformer/{diffusion_pytorch_model.safetensors,config.json} "$OUT/"
cp "$RUN/students/teacher/checkpoint-$last"/* "$OUT/ckpt/"
tar -czf "$OUT/logs.tgz" -C "$RUN/students/teacher" logs
echo "train_gpu.sh: steps=$last batch=$BATCH lr=$LR -> $OUT/diffusion_pytorch_model.safetensors (EMA), $OUT/ckpt"
