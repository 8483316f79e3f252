#!/usr/bin/env bash
# SmolLM2-135M-Instruct on one H200: retrofit heads (examples/smollm2_gpu.py) and bench them, in
# device calls that each stay under 10 minutes. The GGUF (98 MB) travels in two parts of at most
# 50 MB (split -b 50M, in .gguf/, git-ignored), carried by two calls made within the machine's
# 30 s of warmth; /tmp survives between such calls, the repo folder does not.
#
#   bash bench/gpu_smollm2.sh part1                 # carry .gguf/part_aa: copied to /tmp/gguf
#   bash bench/gpu_smollm2.sh train HEADS TOKENS MIN  # carry .gguf/part_ab and .whl (gguf wheel)
#   bash bench/gpu_smollm2.sh bench NAME [ARGS...]     # bench decode with WORK/heads/NAME.safetensors
#
# Work folder /tmp/work (converted model, data, runs, heads); results are copied to $OUT.
set -euo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
WORK=/tmp/work
GGUF=/tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
step=$1; shift
case "$step" in
part1)
    mkdir -p /tmp/gguf && cp .gguf/part_aa /tmp/gguf/
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/gguf-*.whl
    python3 -c "import torch, transformers, accelerate, yaml, jinja2, gguf; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    ;;
train)
    heads=$1 tokens=$2 minutes=$3; shift 3
    if [ ! -f "$GGUF" ]; then
        cat /tmp/gguf/part_aa .gguf/part_ab > "$GGUF"
        echo "$SHA  $GGUF" | sha256sum -c
    fi
    SP=$(python3 -c 'import site; print(site.getsitepackages()[0])')
    python3 examples/smollm2_gpu.py --gguf "$GGUF" --corpus "$SP" --work "$WORK" --heads "$heads" --tokens "$tokens" \
        --max-minutes "$minutes" "$@" 2>&1 | grep -v "de-quantizing\|Loading weights"
    name=$(echo "$heads" | tr ':' '-')
    mkdir -p "$OUT/$name"
    cp "$WORK/$name.json" "$WORK/runs/$name/metrics.jsonl" "$WORK/runs/$name"/*.png "$OUT/$name/" 2>/dev/null || true
    cp "$WORK/heads/$name.safetensors" "$OUT/$name/" 2>/dev/null || true
    ;;
bench)
    name=$1; shift
    mkdir -p "$OUT/bench-$name"
    python3 -m multitoken bench decode --run "$WORK/base" --heads-file "$WORK/heads/$name.safetensors" --data "$WORK/data" \
        --max-seq-len 1024 --batch 1 --temperature 0 --new-tokens 256 --prompt-tokens 128 --no-eager \
        --out "$OUT/bench-$name" "$@" 2>&1 | grep -v "UNEXPECTED\|^Key \|^---\|LOAD REPORT\|^Notes\|can be ignored"
    ;;
esac
