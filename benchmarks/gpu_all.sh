#!/usr/bin/env bash
# Every GPU measurement of benchmarks/ in one go, for a session lent an H100 / H200 (about 8 min of the 15 min lease;
# the device tool's `run` allows 10 min per command). JSON lines go to stdout and to $OUT/gpu_all.jsonl; the
# RESULTS.md rows to $OUT/RESULTS.md when $OUT is set (copy them into benchmarks/RESULTS.md), else to
# benchmarks/RESULTS.md. Order: the cheapest and most wanted figures first, so a timeout still returns them.
#   1. streaming.py --size 1.3b --profile    (student KV-cache streaming vs bidirectional teacher, 14 chunks)
#   1b. streaming.py --size 5b               (the same for Wan2.2-TI2V-5B at 1280x704, 121 frames)
#   2. attention_mask.py --attention          (causal training mask at 480p/720p: dense SDPA vs flex_attention block
#                                             mask, bytes, one attention layer's fwd+bwd time and peak memory)
#   3. train_step.py --size 1.3b             (Self-Forcing step, checkpointing on, 8-bit AdamW on/off; peak memory
#                                             against the dry run's memory plan of the same roles)
#   4. streaming.py --size 1.3b --compile    (the same with diffusers' compile_repeated_blocks; compiles take minutes)
# Not here: generate.py at the 1.3B shape. It reads the toy recipe's 32x32x9 shape and needs a text encoder (UMT5-XXL,
# 11 GB in bf16 even with random weights), so it is not cheap; it would need --recipe / --height flags first.
#
# The device image has torch, accelerate, peft, transformers, pyarrow, pyyaml, tqdm, but not diffusers. Carry wheels.
# Once, on the development machine, in the repo root (network needed; versions = the project's .venv):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl \
#       diffusers==0.42.1
#   # students/streaming.py imports synth_data.generate -> synth_data.dataset -> av + datasets at import time, so until
#   # that import is made lazy, streaming.py also needs (av is ~40 MB: the whole tree must stay under 64 MiB):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 av==18.1.0
#   # 8-bit AdamW needs bitsandbytes built for the image's CUDA (torch 2.11+cu130); its wheel (~60-70 MB) does not fit
#   # beside the others: carry it in a second call on its own, or its variants report "unavailable".
# Then ONE device call, carry [".whl"], timeout_s 600:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#       && export PYTHONPATH=/tmp/site || exit; bash benchmarks/gpu_all.sh
# Check the script itself on a CPU first (tiny shapes, no GPU, no nvidia-smi; the slow test suite runs it):
#   bash benchmarks/gpu_all.sh --size tiny
set -u
SIZE=1.3b
if [ "${1:-}" = "--size" ]; then SIZE=${2:?--size needs tiny or 1.3b}; fi
case "$SIZE" in tiny|1.3b) ;; *) echo "gpu_all.sh: --size must be tiny or 1.3b, got $SIZE"; exit 2 ;; esac
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
if [ -n "${OUT:-}" ]; then
    RESULTS="$OUT/RESULTS.md"
    JSONL="$OUT/gpu_all.jsonl"
elif [ "$SIZE" = tiny ]; then  # a check of the script: keep its rows out of benchmarks/RESULTS.md
    RESULTS=$(mktemp)
    JSONL=/dev/null
else
    RESULTS=benchmarks/RESULTS.md
    JSONL=/dev/null
fi

if [ "$SIZE" = 1.3b ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || exit 1
    CHUNKS=14
else
    CHUNKS=4
fi
"$PY" -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, \
'cuda', torch.cuda.is_available())" || { echo "gpu_all.sh: diffusers is missing: install the carried wheels (see the top of this file)"; exit 1; }
"$PY" -c "import students.streaming" 2>/dev/null \
    || echo "gpu_all.sh: students.streaming does not import (av / datasets missing?): streaming.py will fail; see the top of this file"
"$PY" -c "import bitsandbytes" 2>/dev/null || echo "gpu_all.sh: no bitsandbytes: the 8-bit AdamW variants report unavailable"

failed=0
bench() {  # bench SECONDS -m MODULE ARGS...: one benchmark under a time limit; its JSON line also goes to $JSONL
    local limit=$1
    shift
    echo "== $* (limit ${limit}s)" >&2
    local log
    log=$(mktemp)
    timeout "$limit" "$PY" "$@" --results "$RESULTS" >"$log"
    local rc=$?
    if [ "$rc" -eq 0 ] && [ -s "$log" ]; then
        tail -n 1 "$log" | tee -a "$JSONL"
    else
        echo "gpu_all.sh: $* failed (exit $rc; 124 = over its time limit)" >&2
        failed=1
    fi
    rm -f "$log"
}

bench 180 -m benchmarks.streaming --size "$SIZE" --chunks "$CHUNKS" --steps 4 --warmup 1 --profile
if [ "$SIZE" = 1.3b ]; then  # Wan2.2-TI2V-5B at 1280x704, its 31 latent frames (121 pixel frames)
    bench 150 -m benchmarks.streaming --size 5b --chunks 11 --steps 4 --warmup 1
else
    bench 60 -m benchmarks.streaming --size 5b --tiny-shape --chunks 3 --steps 2 --warmup 1
fi
if [ "$SIZE" = 1.3b ]; then
    bench 150 -m benchmarks.attention_mask --attention
else
    bench 60 -m benchmarks.attention_mask --shape tiny --attention
fi
bench 180 -m benchmarks.train_step --size "$SIZE" --checkpointing on --optimizer both --steps 2 --warmup 1
bench 240 -m benchmarks.streaming --size "$SIZE" --chunks "$CHUNKS" --steps 4 --warmup 1 --compile
exit $failed
