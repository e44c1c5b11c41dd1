#!/usr/bin/env bash
# Every model and every experiment of the paper at toy scale, one command: the README's results table.
#
#   bash reproduce.sh                       PRESET=tiny on CPU (about an hour on 2 cores)
#   PRESET=small DEVICE=cuda bash reproduce.sh   wider/deeper models, L = 256, more samples (minutes on one GPU)
#
# Stages (each reuses a finished run in OUT; delete it to start over):
#   1. data.py            stdlib programs, BPE, memmapped tokens (val/test 10% each: enough held-out programs)
#   2. train_ae.py        base MDM (--no-registers), then from its weights the encoder-demasker (Alg. 1) and one
#                         without latent noise (--latent-cos 1, for Fig. 7); train_scorer.py, the Gen-PPL /
#                         MAUVE reference LM
#   3. train_prior.py     unconditional (Alg. 5), conditional (Alg. 4), unconditional without block offsets
#   4. eval.py            fig4 table1 table2 fig7 fig8 fig6 fig9 prdc fig11 marginal-trap -> OUT/results/*.json,
#                         OUT/results/REPORT.md
# Env: AE_FROM_BASE (1 | 0: guided demaskers from scratch), PRESET (tiny | small), DEVICE (cpu | cuda), OUT (runs/PRESET), STAGES (default "1 2 3 4"),
#      EVALS (the eval.py subcommands to run); AE_STEPS_OVERRIDE, PRIOR_STEPS_OVERRIDE, SCORER_STEPS, NUM
#      shrink the budget (a smoke test of the whole chain: all four at a few steps / samples).
set -euo pipefail
cd "$(dirname "$0")"
source ./env.sh  # the packages: reuse what is importable, else create or reuse .venv

PRESET=${PRESET:-tiny}
DEVICE=${DEVICE:-cpu}
OUT=${OUT:-runs/$PRESET}
STAGES=${STAGES:-1 2 3 4}
EVALS=${EVALS:-fig4 table1 table2 fig7 fig8 fig6 fig9 prdc fig11 marginal-trap}
DATA=$OUT/data
export PYTHONUNBUFFERED=1
case $PRESET in  # AE_STEPS, PRIOR_STEPS, SCORER_STEPS, NUM override the preset's budget (smoke tests)
  tiny)  L=128; VOCAB=2048; AE_STEPS=2000; PRIOR_STEPS=2000; BATCH=32; THREADS=1
         MODEL=(); PRIOR_MODEL=(); SCORER=(--preset tiny); EVAL_NUM=(--num 48) ;;
  small) L=256; VOCAB=4096; AE_STEPS=4000; PRIOR_STEPS=4000; BATCH=64; THREADS=0
         MODEL=(--encoder-width 256 --encoder-layers 4 --demasker-width 256 --demasker-layers 4)
         PRIOR_MODEL=(--hidden-size 256 --depth 4 --num-heads 4); SCORER=(--preset small); EVAL_NUM=(--num 256) ;;
  *) echo "PRESET must be tiny or small"; exit 2 ;;
esac
AE_STEPS=${AE_STEPS_OVERRIDE:-$AE_STEPS}; PRIOR_STEPS=${PRIOR_STEPS_OVERRIDE:-$PRIOR_STEPS}
[[ -n ${SCORER_STEPS:-} ]] && SCORER+=(--steps "$SCORER_STEPS")
[[ -n ${NUM:-} ]] && EVAL_NUM=(--num "$NUM")
mkdir -p "$OUT"
SECONDS=0
stage() { echo; echo "=== [$(printf '%5d' $SECONDS)s] $*"; }
has() { [[ " $STAGES " == *" $1 "* ]]; }

train() {  # train RUN_DIR CHECKPOINT_SUBDIR command...: skip when done, resume when interrupted
  local run=$1 ckpt=$2; shift 2
  if [[ -f $run/.done ]]; then echo "$run: finished earlier, reused"; return; fi
  if [[ -d $run/$ckpt ]]; then "$@" --resume; else "$@"; fi
  touch "$run/.done"
}
once() {  # once RUN_DIR command...: skip when done (a run with no resume: started over when interrupted)
  local run=$1; shift
  if [[ -f $run/.done ]]; then echo "$run: finished earlier, reused"; return; fi
  "$@"; mkdir -p "$run"; touch "$run/.done"
}
background() {  # background LOG command...: run, remember the pid
  local log=$1; shift
  "$@" > "$log" 2>&1 &
  pids+=($!)
}
wait_all() { for pid in "${pids[@]}"; do wait "$pid" || { echo "a background job failed (logs in $OUT)"; exit 1; }; done; pids=(); }
pids=()
log_to() { local log=$1; shift; "$@" > "$log" 2>&1; }

if has 1; then
  stage "1. data ($DATA)"
  python data.py --out "$DATA" --seq-len $L --vocab-size $VOCAB --val-fraction 0.1 --test-fraction 0.1
fi

if has 2; then
  stage "2. base MDM; from it the encoder-demasker, one without latent noise, the equal-budget base ($AE_STEPS steps each); scorer"
  ae=(--preset tiny --data "$DATA" --seq-len $L --device $DEVICE --threads $THREADS --max-steps $AE_STEPS
      --global-batch-size $BATCH --micro-batch-size $BATCH --eval-interval $AE_STEPS --save-interval 500
      "${MODEL[@]}")
  background "$OUT/scorer.log" once "$OUT/scorer" python train_scorer.py --data "$DATA" --out "$OUT/scorer" \
    --device $DEVICE "${SCORER[@]}"
  log_to "$OUT/base.log" train "$OUT/base" checkpoint python train_ae.py "${ae[@]}" --out-dir "$OUT/base" --no-registers
  # As in the paper (guided LLaDA fine-tuned from LLaDA-8B-Base), the guided demaskers start from the base
  # MDM's weights (AE_FROM_BASE=0: from scratch, side by side with the base). The equal-budget base continues
  # the base MDM with the guided fine-tune's recipe (same steps, warm-up and decay, no registers): it has seen
  # as many demasker updates as the guided demasker (issue 12: the paper's protocol and an equal budget).
  [[ ${AE_FROM_BASE:-1} == 1 ]] && ae+=(--demasker-init "$OUT/base/checkpoint")
  background "$OUT/base_equal.log" train "$OUT/base_equal" checkpoint python train_ae.py "${ae[@]}" \
    --out-dir "$OUT/base_equal" --no-registers $([[ ${AE_FROM_BASE:-1} == 1 ]] || echo --max-steps $((2 * AE_STEPS)))
  background "$OUT/ae_no_noise.log" train "$OUT/ae_no_noise" checkpoint python train_ae.py "${ae[@]}" \
    --out-dir "$OUT/ae_no_noise" --latent-cos 1
  log_to "$OUT/ae.log" train "$OUT/ae" checkpoint python train_ae.py "${ae[@]}" --out-dir "$OUT/ae"
  wait_all
  grep '"type": "val"' "$OUT/ae/log.jsonl" | tail -n 1 | cut -c1-300
fi

if has 3; then
  stage "3. priors: unconditional, conditional, unconditional without block offsets ($PRIOR_STEPS steps each)"
  prior=(--preset tiny --ae "$OUT/ae" --data "$DATA" --max-steps $PRIOR_STEPS --device $DEVICE --threads $THREADS
         --quiet "${PRIOR_MODEL[@]}")
  background "$OUT/prior.log" train "$OUT/prior" train_state python train_prior.py "${prior[@]}" --out-dir "$OUT/prior"
  background "$OUT/prior_no_offsets.log" train "$OUT/prior_no_offsets" train_state python train_prior.py "${prior[@]}" \
    --out-dir "$OUT/prior_no_offsets" --no-block-offsets
  log_to "$OUT/cprior.log" train "$OUT/cprior" train_state python train_prior.py "${prior[@]}" --out-dir "$OUT/cprior" --conditional
  wait_all
fi

if has 4; then
  runs=(--ae "$OUT/ae" --ae-no-noise "$OUT/ae_no_noise" --base "$OUT/base" --prior "$OUT/prior"
        --cond-prior "$OUT/cprior" --prior-no-offsets "$OUT/prior_no_offsets" --scorer "$OUT/scorer"
        --data "$DATA" --out "$OUT/results" --preset $PRESET --device $DEVICE "${EVAL_NUM[@]}")
  for experiment in $EVALS; do
    stage "4. eval.py $experiment"
    python eval.py "$experiment" "${runs[@]}"
  done
fi
stage "done: $OUT/results/REPORT.md"
