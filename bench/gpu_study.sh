#!/usr/bin/env bash
# Issue 24's study (does MTP make the main model better?) on one H200, in device calls that each
# stay under 10 minutes. One call: rebuild the data (every site-packages .py file, bpe:8192; 77 s),
# check its fingerprint against the recorded one, train the runs of one phase that fit in the
# minutes left (finished runs under bench/results/study are skipped), copy the results to $OUT.
#
#   MULTITOKEN_COMMIT=<git hash> bash bench/gpu_study.sh PHASE [MINUTES]
#
# PHASE: phase1-seq-vs-plain, phase2-parallel-weights, phase3-equal-compute-and-bytes, phase4-seeds,
# phase5-large (docs/results.md gives the plan). MINUTES: the whole call, data included (default 9).
# $OUT then holds study-results.tar.gz (bench/results/study/ with the new runs: unpack it there with
# `tar -xzf .../study-results.tar.gz -C bench/results/study` and commit), the phase's table and
# curves (PHASE.md, PHASE.png) and data_sha256.json; $OUT returns files at most two folders down,
# eight at most, hence the archive. Work folder /tmp/study: on a machine still warm from the
# previous call (30 s) the data is reused and a run cut short continues from its checkpoint.
#
# A CPU smoke test of this script: STUDY_CORPUS=DIR STUDY_TOKENIZER=bpe:300 STUDY_RESULTS=/tmp/r
# STUDY_ARGS="--preset tiny --steps 4 --batch-size 2 --seq-len 32 --device cpu" OUT=/tmp/o bash bench/gpu_study.sh ...
set -euo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
phase=$1 minutes=${2:-9}
start=$(date +%s)
WORK=${STUDY_WORK:-/tmp/study}
RESULTS=${STUDY_RESULTS:-bench/results/study}
TOKENIZER=${STUDY_TOKENIZER:-bpe:8192}
[ -n "${MULTITOKEN_COMMIT:-}" ] || echo "note: MULTITOKEN_COMMIT is not set: the results will record no commit"
mkdir -p "$WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
SP=${STUDY_CORPUS:-$(python3 -c 'import site; print(site.getsitepackages()[0])')}

# Data: rebuilt on every fresh machine, so its fingerprint (meta.json data_sha256) is checked
# against the one recorded in $RESULTS/data_sha256.json by the first call (record_fingerprint).
check_data() {  # DATA_DIR KEY
    python3 - "$1" "$2" "$RESULTS/data_sha256.json" <<'PY'
import json, sys
from pathlib import Path
meta = json.loads((Path(sys.argv[1]) / "meta.json").read_text())
key, recorded = sys.argv[2], Path(sys.argv[3])
fp, splits = meta["data_sha256"], {k: v["tokens"] for k, v in meta["splits"].items()}
print(f"data {key}: data_sha256 {fp}, tokens {splits}")
known = json.loads(recorded.read_text()) if recorded.is_file() else {}
if key in known and known[key]["data_sha256"] != fp:
    sys.exit(f"data {key} differs from the recorded one ({known[key]['data_sha256'][:16]} in {recorded}): "
             "the site-packages of this machine changed; do not mix these runs with the stored ones")
if key not in known:
    print(f"data {key}: recorded as the study's data in {recorded} (commit it)")
    known[key] = {"data_sha256": fp, "tokens": splits, "corpus": meta["corpus"], "tokenizer": meta["tokenizer"],
                  "files": {k: v["docs"] for k, v in meta["splits"].items()}}
recorded.write_text(json.dumps(known, indent=2) + "\n")
PY
}
python3 -c "import sys; from multitoken.io import outdir; outdir.claim(sys.argv[1], 'results', '--results')" "$RESULTS"
python3 -m multitoken prepare --corpus "$SP" --glob '**/*.py' --tokenizer "$TOKENIZER" --out "$WORK/data-bpe8k" --quiet | tail -4
check_data "$WORK/data-bpe8k" main
bytes=()
if [ "$phase" = phase3-equal-compute-and-bytes ]; then
    python3 -m multitoken prepare --corpus "$SP" --glob '**/*.py' --tokenizer bytes --out "$WORK/data-bytes" --quiet | tail -4
    check_data "$WORK/data-bytes" bytes
    bytes=(--byte-data "$WORK/data-bytes")
fi

# The phase: whole runs only while the disk is fresh (a half run is lost with the machine), 30 s
# kept for copying the results out.
left=$(python3 -c "print(round($minutes - ($(date +%s) - $start) / 60 - 0.5, 2))")
echo "phase $phase: $left minutes for runs"
status=0
python3 -m multitoken ablate --suite "$phase" --data "$WORK/data-bpe8k" ${bytes[@]+"${bytes[@]}"} --out "$WORK/out-$phase" \
    --results "$RESULTS" --steps 1000 --batch-size 32 --seq-len 1024 --eval-every 100 \
    --chunk-steps 1000 --train-config bench/study_train.toml --no-keep-weights --max-minutes "$left" --whole-runs ${STUDY_ARGS:-} || status=$?
tar -czf "$OUT/study-results.tar.gz" -C "$RESULTS" .
cp "$RESULTS/data_sha256.json" "$OUT/"
cp "$RESULTS/$phase.md" "$RESULTS/$phase.png" "$OUT/" 2>/dev/null || true
echo "stored runs: $(find "$RESULTS" -name ablate_result.json | wc -l); copied to \$OUT after $(( $(date +%s) - start )) s"
exit $status
