#!/usr/bin/env bash
# `make gpu-check`: the one-command check on one CUDA GPU (docs/gpu.md). With the image's
# python3 (CUDA torch; not .venv, which is Python 3.11 with CPU torch) and the wheels of
# `make gpu-wheels` carried in .whl/, under 9 minutes in all:
#   install   .whl/*.whl into $SITE, offline
#   preflight versions, device, imports, the wheels' requirements
#   data      the demo corpus, made once for every test worker
#   bench-*   `mm1 benchmark` of the MM1-3B proxy, one run per layer spec (te where TE imports),
#             and of the MoE proxy with the fast spec (and te)
#   plan      `mm1 plan --json` of the same proxy, its memory estimate against the benchmark's
#   pytest    tests/test_gpu.py, and tests/test_grouped_experts.py's `gpu` case (bf16 experts)
# then gpu-report.json (and a short table). A failing part does not stop the later ones; the
# exit code is 1 if any part failed, 2 without CUDA, 3 without .whl/.
# The benchmark runs before the tests: its figures are bounded (two short runs) while the
# tests take what is left of the budget, up to their own limit.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
PY=${GPU_PYTHON:-python3}

# Nothing is installed and no network is touched before this answer.
reason=$("$PY" -c '
try:
    import torch
except Exception as e:
    print(f"no torch ({type(e).__name__})")
else:
    print("" if torch.cuda.is_available() else "torch.cuda.is_available() is False")
' 2>/dev/null) || reason="no working $PY"
if [[ -n $reason ]]; then
    echo "gpu-check: no CUDA device here ($reason under $PY); run it on a GPU machine: make gpu-wheels here, then carry .whl and run make gpu-check there (docs/gpu.md)"
    exit 2
fi
shopt -s nullglob
wheels=(.whl/*.whl)
if (( ${#wheels[@]} == 0 )); then
    echo "gpu-check: .whl/ is missing or empty: run make gpu-wheels on a machine with pip, then carry .whl (docs/gpu.md)"
    exit 3
fi

TOTAL_S=${GPU_CHECK_BUDGET:-470}  # + the CUDA check, the report and one kill grace: under 9 minutes
RESERVE_S=15                      # kept back for the report
MIN_PART_S=20                     # a part with less than this left is skipped, not started
START=$(date +%s)
DEADLINE=$((START + TOTAL_S))
DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
# Only a copy of the tree travels to the device machine, without .git: pass MM1_COMMIT.
COMMIT=${MM1_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo "unknown (set MM1_COMMIT)")}
SITE=${GPU_CHECK_SITE:-/tmp/site}
LOG=$ROOT/runs/gpu-check
DATA=/tmp/mm1-gpu-check-data
rm -rf "$LOG" "$DATA" "$ROOT/gpu-report.json"
mkdir -p "$LOG"
: > "$LOG/parts.tsv"

# The device tool returns at most 8 files under $OUT: the report, the logs read most, and
# everything else in one archive, refreshed after every part (a killed run keeps the rest).
publish() {
    [[ -n ${OUT:-} ]] || return 0
    mkdir -p "$OUT"
    local f
    [[ -f $ROOT/gpu-report.json ]] && cp "$ROOT/gpu-report.json" "$OUT/"
    for f in pytest.log pytest.xml bench-local.log bench-fast.log bench-moe-fast.log; do [[ -f $LOG/$f ]] && cp "$LOG/$f" "$OUT/"; done
    tar -czf "$OUT/gpu-logs.tar.gz" -C "$ROOT/runs" gpu-check 2>/dev/null
}

# part NAME CAP_S CMD...: CMD's stdout and stderr in $LOG/NAME.log, under min(CAP_S, time left).
part() {
    local name=$1 cap=$2; shift 2
    local left=$((DEADLINE - $(date +%s) - RESERVE_S))
    ((left < 0)) && left=0
    local limit=$((cap < left ? cap : left)) rc status t0 secs
    if ((limit < MIN_PART_S)); then
        echo "gpu-check: $name skipped: ${left}s left of the ${TOTAL_S}s budget"
        printf '%s\tskipped\t\t0\t%s\n' "$name" "$limit" >> "$LOG/parts.tsv"
        return
    fi
    printf 'gpu-check: %-10s (limit %3ds) %s\n' "$name" "$limit" "$*"
    t0=$(date +%s.%N)
    # -k: torchrun passes SIGTERM on to its workers and waits for them.
    timeout -k 30 "$limit" "$@" > "$LOG/$name.log" 2>&1
    rc=$?
    secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    case $rc in
        0) status=passed ;;
        124 | 137) status=timeout ;;
        *) status=failed ;;
    esac
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$secs" "$limit" >> "$LOG/parts.tsv"
    echo "gpu-check: $name $status (exit $rc) in ${secs}s"
    if [[ $status != passed ]]; then
        tail -n 25 "$LOG/$name.log" | sed 's/^/    /'
    fi
    publish
}

export PYTHONUNBUFFERED=1
part install 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
# The package imports from the checkout (no `mm1` console script there: python3 -m megatron_mm1.cli).
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
part preflight 90 "$PY" tools/gpu_report.py preflight --wheels .whl --out "$LOG/preflight.json"
part data 60 "$PY" -m megatron_mm1.cli data demo --out "$DATA"
[[ -f $DATA/manifest.json ]] && export MM1_GPU_DATA=$DATA

# The MM1-3B proxy on one GPU: 4 LLM layers, the whole ViT-H/14, 16 images per 4096-token
# sequence, bf16, micro-batch 1 and 4 micro-batches per step (no pipeline: the optimizer step
# is a small share). One run per spec, so that one failing (the local spec's attention keeps
# [heads, s, s] scores and may not fit an 80 GB card) leaves the other's figures.
PROXY=(--set model.llm.num_layers=4 --set training.micro_batch_size=1 --set training.global_batch_size=4
       --set training.bf16=true)
BENCH=(-m megatron_mm1.cli benchmark --config mm1-3b "${PROXY[@]}" --images-per-seq 16 --steps 5 --warmup 2 --json)
# The MoE proxy: one GPU's share of MM1-3B-MoE-64e at EP8, its 8 experts of 64 with top-2
# routing (the same expert work per GPU), 4 LLM layers (2 of them MoE), with the fast spec's
# grouped GEMMs (and TE's); `local`'s SequentialMLP is the reference, not a speed path.
MOE_PROXY=(--set model.moe.num_experts=8 --set parallel.tensor_model_parallel_size=1
           --set parallel.sequence_parallel=false --set parallel.expert_model_parallel_size=1
           --set parallel.expert_tensor_parallel_size=1)
BENCH_MOE=(-m megatron_mm1.cli benchmark --config mm1-3b-moe-64e "${PROXY[@]}" "${MOE_PROXY[@]}" --images-per-seq 16
           --steps 5 --warmup 2 --json)
part bench-local 100 "$PY" "${BENCH[@]}" --specs local
part bench-fast 100 "$PY" "${BENCH[@]}" --specs fast
part bench-moe-fast 100 "$PY" "${BENCH_MOE[@]}" --specs fast
# Transformer Engine's layers where TE imports; otherwise the report says why there are no figures.
te_missing=$("$PY" -c 'from megatron_mm1.models.te_spec import unavailable; print(unavailable() or "none")' 2>/dev/null \
             | tail -n 1)
if [[ $te_missing == none ]]; then
    part bench-te 100 "$PY" "${BENCH[@]}" --specs te
    part bench-moe-te 100 "$PY" "${BENCH_MOE[@]}" --specs te
else
    for f in bench-te bench-moe-te; do echo "not run: ${te_missing:-te_spec did not answer}" > "$LOG/$f.log"; done
fi

# The planner's estimate for the same proxy (arithmetic, no GPU); the GPU type only decides "fits".
GPU_TYPE=$("$PY" -c 'import torch; from megatron_mm1.planner import gpu_type
p = torch.cuda.get_device_properties(0); print(gpu_type(p.name, p.total_memory / 2**30) or "h200-141gb")' 2>/dev/null)
GPU_TYPE=${GPU_TYPE:-h200-141gb}
plan_sets=()
for ((i = 1; i < ${#PROXY[@]}; i += 2)); do plan_sets+=(--set "${PROXY[i]}"); done
part plan 60 "$PY" tools/gpu_report.py plan --logs "$LOG" --config mm1-3b --gpu-type "$GPU_TYPE" --images-per-seq 16 "${plan_sets[@]}"

# Four workers: the tests are mostly process start-up, and one GPU holds many tiny runs.
xdist=()
"$PY" -c 'import xdist' 2>/dev/null && xdist=(-n 4 --dist loadgroup)
part pytest 240 "$PY" -m pytest -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_grouped_experts.py "${xdist[@]}" -rA \
    --junitxml="$LOG/pytest.xml"

"$PY" tools/gpu_report.py assemble --logs "$LOG" --out "$ROOT/gpu-report.json" --commit "$COMMIT" \
    --date "$DATE" --budget "$TOTAL_S" --bench-command "python3 ${BENCH[*]} --specs local|fast|te; python3 ${BENCH_MOE[*]} --specs fast|te"
report_rc=$?  # 0 only when every part passed and no test was skipped
publish
echo "gpu-check: $(( $(date +%s) - START ))s in all; report $ROOT/gpu-report.json${OUT:+, copied to $OUT/}"
if ((report_rc != 0)) || cut -f2 "$LOG/parts.tsv" | grep -qv '^passed$'; then
    exit 1
fi
exit 0
