#!/usr/bin/env bash
# Every model and every experiment of the paper at toy scale, one command: the toy results (docs/results.md).
#
#   bash scripts/reproduce.sh                       PRESET=tiny on CPU (2 cores: see docs/results.md)
#   PRESET=small DEVICE=cuda bash scripts/reproduce.sh   wider/deeper models, L = 256, more samples (minutes on one GPU)
#   PRESET=ratio bash scripts/reproduce.sh          the speed headline with the paper's cost ratios: a 4 x 128 demasker,
#                                                   an encoder of 0.068 and priors of 0.049 / 0.061 of its parameters
#                                                   (paper: Qwen3-0.6B / LLaDA-8B = 0.074, DiT 409M / 8B = 0.051), so
#                                                   that a prior draw weighs in NFE what it does in the paper; base,
#                                                   AE, the two priors, base-decoding and speed only (64 samples
#                                                   per point: its stage 4 takes about 25 min on 2 cores)
#
# Stages (each reuses a finished run in OUT; delete it to start over):
#   1. dataprep/data.py            stdlib programs, BPE, memmapped tokens (val/test 10% each)
#   2. train_ae.py        base MDM (--no-registers); from its weights, with the same recipe: the encoder-demasker
#                         (Alg. 1), one without latent noise (--latent-cos 1, Fig. 7), the equal-budget base (no
#                         registers: as many demasker updates as the guided one) and CADD (--cadd, docs/beyond.md);
#                         experiments/train_scorer.py, the Gen-PPL / MAUVE reference LM, and eval.py marginal-trap (it trains
#                         its own models) on the core the base MDM leaves free
#   3. train_prior.py     unconditional (Alg. 5), conditional (Alg. 4), unconditional without block offsets, the
#                         conditional prior with a jointly trained h_mu (--train-cond-encoder, docs/conditioning.md);
#                         experiments/train_prompted.py, the prompted prior of App. H on dataprep/prompts.py's pairs;
#                         beside them eval.py base-decoding (it needs only the base MDM and the scorer)
#   4. eval.py            two lanes side by side: speed fig6 fig6-hmu | speed-cache table1 table2 fig8 cadd consistency
#                         consistency-hmu prompt fig11 fig4 fig7 fig9 prdc marginal-trap (speed and speed-cache
#                         sampled and scored with --timing-repeats 0; fig6 takes speed's rows at L = 128 with
#                         --rows-from, the same samples); then alone on the machine, on both cores, the timing passes
#                         (eval.py speed --timing-only: every row of speed and speed-cache timed back to back)
#                         -> OUT/results/*.json, *.png, REPORT.md (an experiment that needs base-decoding's choice
#                         waits for it when another lane runs it). NAME-hmu: the same subcommand with the h_mu
#                         conditional prior (eval.py --name); speed-cache: the base with the approximate key/value
#                         cache (docs/decoding.md)
#   5. evaluation/results_section.py OUT/results/RESULTS.md and docs/results/*.png; RESULTS_PAGE=docs/results.md
#                         also replaces that page's records (between its markers) with it
# Env: AE_FROM_BASE (1 | 0: guided demaskers from scratch), PRESET (tiny | small), DEVICE (cpu | cuda), OUT
#      (runs/PRESET), STAGES (default "1 2 3 4 5"), EVALS (the eval.py subcommands to run), REDO_EVALS (1: rerun
#      evals whose JSON exists), RESULTS_PAGE (the page whose records stage 5 rewrites); AE_STEPS_OVERRIDE (the
#      base MDM's steps), FT_STEPS_OVERRIDE (each fine-tune's; tiny: 1000, half the base's, for the 60-minute budget),
#      PRIOR_STEPS_OVERRIDE, SCORER_STEPS, NUM, SELECT_NUM (base-decoding, 64), FIG11_NUM (64), CADD_NUM (128),
#      PROMPTED_STEPS / PROMPTED_FT_STEPS (the prompted prior's and its demasker fine-tune's, 600 / 300), PROMPT_NUM (48)
#      shrink the budget (a smoke test of the whole chain: all at a few steps / samples); SPEED_NFE (speed's grid),
#      TIMING_THREADS (torch threads of the timing passes; CPU: 2, the whole 2-core machine).
# The tiny preset's evaluation budget: fig6 and speed sweep the guided methods up to NFE 64 (GUIDED_MAX_NFE); speed
# runs every method on a fine NFE grid (SPEED_NFE: 1 2 3 4 6 8 12 16 24 32 64 L, the curves of evaluation/match.py)
# with Fast-dLLM's threshold 0.9 and factor 1.0 (small: thresholds 0.5 0.7 0.9 0.99), then times every row alone on
# the machine; CADD is compared at NFE 8 32 64.
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository root
source scripts/env.sh  # the packages: reuse what is importable, else create or reuse .venv

PRESET=${PRESET:-tiny}
DEVICE=${DEVICE:-cpu}
OUT=${OUT:-runs/$PRESET}
STAGES=${STAGES:-1 2 3 4 5}
ALL_EVALS="fig4 table1 table2 fig7 fig8 base-decoding fig6 fig6-hmu speed speed-cache fig9 prdc fig11 marginal-trap cadd
           consistency consistency-hmu prompt"
ABLATIONS=1  # the runs that only the ablations and the beyond-the-headline tables need: no latent noise,
             # equal-budget base, CADD, no block offsets, the h_mu conditional prior, the prompted prior
EVAL_PRESET=$PRESET
export PYTHONUNBUFFERED=1
case $PRESET in  # AE_STEPS, PRIOR_STEPS, SCORER_STEPS, NUM override the preset's budget (smoke tests)
  tiny)  L=128; VOCAB=2048; AE_STEPS=2000; FT_STEPS=1000; PRIOR_STEPS=2000; BATCH=32; THREADS=1
         GUIDED_MAX_NFE=64; THRESHOLDS="0.9"; CADD_NFE="8 32 64"
         MODEL=(); PRIOR_MODEL=(); SCORER=(--preset tiny); EVAL_NUM=() ;;
  small) L=256; VOCAB=4096; AE_STEPS=4000; FT_STEPS=4000; PRIOR_STEPS=4000; BATCH=64; THREADS=0
         GUIDED_MAX_NFE=$L; THRESHOLDS="0.5 0.7 0.9 0.99"; CADD_NFE="8 32 $L"
         MODEL=(--encoder-width 256 --encoder-layers 4 --demasker-width 256 --demasker-layers 4)
         PRIOR_MODEL=(--hidden-size 256 --depth 4 --num-heads 4); SCORER=(--preset small); EVAL_NUM=() ;;
  ratio) L=128; VOCAB=2048; AE_STEPS=2000; FT_STEPS=1000; PRIOR_STEPS=2000; BATCH=32; THREADS=1
         GUIDED_MAX_NFE=64; THRESHOLDS="0.9"; CADD_NFE="8 32 64"
         MODEL=(--encoder-width 32 --encoder-layers 2 --demasker-width 128 --demasker-layers 4)
         PRIOR_MODEL=(--hidden-size 40 --depth 2 --num-heads 2); SCORER=(--preset tiny); EVAL_NUM=(--num 64)
         ALL_EVALS="base-decoding speed"; ABLATIONS=0; EVAL_PRESET=tiny ;;
  *) echo "PRESET must be tiny, small or ratio"; exit 2 ;;
esac
EVALS=$(echo ${EVALS:-$ALL_EVALS})  # one line, single spaces: `wants` matches " name "
SPEED_NFE=${SPEED_NFE:-1 2 3 4 6 8 12 16 24 32 64 $L}
DATA=${DATA:-$OUT/data}  # PRESET=ratio can share tiny's: DATA=runs/tiny/data (same L and vocabulary)
AE_STEPS=${AE_STEPS_OVERRIDE:-$AE_STEPS}; PRIOR_STEPS=${PRIOR_STEPS_OVERRIDE:-$PRIOR_STEPS}
FT_STEPS=${FT_STEPS_OVERRIDE:-${AE_STEPS_OVERRIDE:-$FT_STEPS}}
[[ -n ${SCORER_STEPS:-} ]] && SCORER+=(--steps "$SCORER_STEPS")
[[ -n ${NUM:-} ]] && EVAL_NUM=(--num "$NUM")
mkdir -p "$OUT"
SECONDS=0
stage() { echo; echo "=== [$(printf '%5d' $SECONDS)s] $*"; }
has() { [[ " $STAGES " == *" $1 "* ]]; }

train() {  # train RUN_DIR CHECKPOINT_SUBDIR command...: skip when done, resume when interrupted
  local run=$1 ckpt=$2; shift 2
  if [[ -f $run/.done ]]; then echo "$run: finished earlier, reused"; return; fi
  # a checkpoint: resume; a folder killed before its first save: start over (a writer refuses it otherwise)
  if [[ -d $run/$ckpt ]]; then "$@" --resume; elif [[ -e $run ]]; then "$@" --overwrite; else "$@"; fi
  touch "$run/.done"
}
once() {  # once RUN_DIR command...: skip when done (a run with no resume: started over when interrupted)
  local run=$1; shift
  if [[ -f $run/.done ]]; then echo "$run: finished earlier, reused"; return; fi
  if [[ -e $run ]]; then "$@" --overwrite; else "$@"; fi
  mkdir -p "$run"; touch "$run/.done"
}
background() {  # background LOG command...: run, remember the pid
  local log=$1; shift
  "$@" > "$log" 2>&1 &
  pids+=($!)
}
wait_all() { for pid in "${pids[@]}"; do wait "$pid" || { echo "a background job failed (logs in $OUT)"; exit 1; }; done; pids=(); }
pids=()
log_to() { local log=$1; shift; "$@" > "$log" 2>&1; }

# The evaluations (stage 4; marginal-trap and base-decoding start earlier, on cores that training leaves free)
R=$OUT/results
# the timing passes run alone: on CPU both cores (every row timed with the same threads; the record says how many)
TIMING_THREADS=${TIMING_THREADS:-$([[ $DEVICE == cpu ]] && echo 2 || echo "$THREADS")}
SCORER_RUN=${SCORER_RUN:-$OUT/scorer}  # PRESET=ratio can share tiny's: SCORER_RUN=runs/tiny/scorer
runs=(--ae "$OUT/ae" --base "$OUT/base" --scorer "$SCORER_RUN" --data "$DATA" --out "$R" --preset $EVAL_PRESET
      --device $DEVICE --threads $THREADS "${EVAL_NUM[@]}")  # 1 thread per lane on CPU: 2 each is 3x slower
priors=(--prior "$OUT/prior" --cond-prior "$OUT/cprior")
declare -A subcommand=([fig6-hmu]=fig6 [consistency-hmu]=consistency [speed-cache]=speed)  # else the name itself
declare -A extra=(  # flags given later than runs / priors replace theirs (argparse: the last one wins)
  [fig7]="--ae-no-noise $OUT/ae_no_noise"
  [marginal-trap]="--trap-conditionings frozen hmu xt"  # every conditioning the paper names (docs/conditioning.md)
  [base-decoding]="--num ${SELECT_NUM:-64}"
  [fig6]="--base-decoding $R/base-decoding.json --base-equal $OUT/base_equal --guided-max-nfe $GUIDED_MAX_NFE"
  [speed]="--base-decoding $R/base-decoding.json --length $L --nfe $SPEED_NFE --thresholds $THRESHOLDS --guided-max-nfe $GUIDED_MAX_NFE"
  [fig11]="--prior-no-offsets $OUT/prior_no_offsets --num ${FIG11_NUM:-64}"
  [cadd]="--cadd-run $OUT/cadd --base-decoding $R/base-decoding.json --lengths $L --nfe $CADD_NFE --num ${CADD_NUM:-128} --cadd-trap"
  # h_phi against h_mu (docs/conditioning.md): ConWithinDisc with the jointly trained conditioning encoder beside
  # fig6's base (same seed: the same base rows) at L, and its consistency beside the h_phi prior's
  [fig6-hmu]="--cond-prior $OUT/cprior_mu --methods conwithindisc --base-decoding $R/base-decoding.json --lengths $L --guided-max-nfe $GUIDED_MAX_NFE"
  [consistency-hmu]="--cond-prior $OUT/cprior_mu"
  # App. H (docs/beyond.md): prompts with the prompted prior and its fine-tuned demasker; infilling with cprior
  [prompt]="--ae $OUT/prompted/ae --prompted-prior $OUT/prompted --pairs $OUT/pairs --length $L --nfe 8 32 --num ${PROMPT_NUM:-48}"
  # the approximate key/value cache: the base at NFE = L in blocks of 32, without / with the prefix and dual caches
  # (beside the reference, the base's chosen setting at NFE = L; no adaptive rows: speed has them)
  [speed-cache]="--base-decoding $R/base-decoding.json --length $L --nfe $L --thresholds --factors --methods --caches prefix dual"
)
wants() { [[ " $EVALS " == *" $1 "* ]]; }
evaluate() {  # evaluate LANE_NAME experiments...: one after the other, each logged; skip those already written;
  local lane=$1 failed=(); shift  # a failed experiment is reported and the lane goes on (non-zero at its end)
  mkdir -p "$R"
  for experiment in "$@"; do
    wants "$experiment" || continue
    local command=${subcommand[$experiment]:-$experiment}
    if [[ -f $R/$experiment.json && -z ${REDO_EVALS:-} ]]; then echo "$experiment: $R/$experiment.json exists, reused"; continue; fi
    local quality_only=()  # speed's rows are sampled here, beside the other lane; timed later, alone (time_alone)
    [[ $command == speed ]] && quality_only=(--timing-repeats 0)
    # fig6 at L takes the rows speed sampled there (eval.py fig6 --rows-from: the same samples, not drawn again);
    # scripts/reproduce.sh runs speed before fig6 in one lane
    [[ $command == fig6 && -f $R/speed.json && ! -f $R/speed.failed ]] && quality_only=(--rows-from "$R/speed.json")
    if [[ $command == fig6 || $command == speed || $command == cadd ]] && wants base-decoding; then  # its choice
      until [[ -f $R/base-decoding.json || -f $R/base-decoding.failed ]]; do sleep 5; done
    fi
    stage "$lane eval.py $experiment"
    rm -f "$R/$experiment.failed"
    # shellcheck disable=SC2086
    python eval.py "$command" --name "$experiment" ${REDO_EVALS:+--overwrite} "${runs[@]}" "${priors[@]}" ${extra[$experiment]:-} \
      "${quality_only[@]}" > "$OUT/eval_$experiment.log" 2>&1 \
      || { echo "eval.py $experiment failed: $OUT/eval_$experiment.log"; tail -n 5 "$OUT/eval_$experiment.log"
           touch "$R/$experiment.failed"; failed+=("$experiment"); continue; }
    grep -v '^\s*$' "$OUT/eval_$experiment.log" | tail -n 1
  done
  [[ ${#failed[@]} == 0 ]] || { echo "lane $lane: failed: ${failed[*]}"; return 1; }
}
early() { evaluate "$@" || echo "stage 4 runs it again"; }  # an evaluation started beside training never stops it
timed() { python -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))["results"].get("timing") else 1)' "$1"; }
time_alone() {  # time_alone speed records...: the timing pass of each (eval.py speed --timing-only), one after the
  local failed=()  # other, alone on the machine: every row of a record timed back to back (experiments/eval_timing.py)
  for experiment in "$@"; do
    wants "$experiment" && [[ -f $R/$experiment.json ]] || continue
    if timed "$R/$experiment.json" && [[ -z ${REDO_EVALS:-} ]]; then echo "$experiment: timed earlier, reused"; continue; fi
    stage "4.c eval.py $experiment --timing-only"
    # shellcheck disable=SC2086
    python eval.py speed --name "$experiment" --timing-only "${runs[@]}" "${priors[@]}" ${extra[$experiment]:-} \
      --threads "$TIMING_THREADS" > "$OUT/time_$experiment.log" 2>&1 \
      || { echo "eval.py $experiment --timing-only failed: $OUT/time_$experiment.log"; tail -n 5 "$OUT/time_$experiment.log"
           failed+=("$experiment"); continue; }
    grep -v '^\s*$' "$OUT/time_$experiment.log" | tail -n 1
  done
  [[ ${#failed[@]} == 0 ]] || { echo "timing: failed: ${failed[*]}"; return 1; }
}

if has 1; then
  stage "1. data ($DATA)"
  python -m dataprep.data --out "$DATA" --seq-len $L --vocab-size $VOCAB --val-fraction 0.1 --test-fraction 0.1
fi

if has 2; then
  stage "2. base MDM ($AE_STEPS steps); from it the encoder-demasker, one without latent noise, the equal-budget base, CADD ($FT_STEPS steps each); scorer"
  ae=(--preset tiny --data "$DATA" --seq-len $L --device $DEVICE --threads $THREADS --max-steps $AE_STEPS
      --global-batch-size $BATCH --micro-batch-size $BATCH --eval-interval $AE_STEPS --save-interval 500
      "${MODEL[@]}")
  background "$OUT/scorer.log" once "$SCORER_RUN" python -m experiments.train_scorer --data "$DATA" --out "$SCORER_RUN" \
    --device $DEVICE --threads $THREADS "${SCORER[@]}"
  has 4 && wants marginal-trap && background "$OUT/lane_trap.log" early 2.trap marginal-trap  # its own models
  # App. H's prompt/answer pairs (stage 3's prompted prior) on the same free core
  [[ $ABLATIONS == 1 && ! -f $OUT/pairs/test.jsonl ]] && background "$OUT/pairs.log" python -m dataprep.prompts --out "$OUT/pairs"
  log_to "$OUT/base.log" train "$OUT/base" checkpoint python train_ae.py "${ae[@]}" --out-dir "$OUT/base" --no-registers
  # As in the paper (guided LLaDA fine-tuned from LLaDA-8B-Base), the guided demaskers start from the base
  # MDM's weights (AE_FROM_BASE=0: from scratch, side by side with the base). The equal-budget base continues
  # the base MDM with the guided fine-tune's recipe (same steps, warm-up and decay, no registers): it has seen
  # as many demasker updates as the guided demasker (docs/results.md: the paper's protocol and an equal budget).
  [[ ${AE_FROM_BASE:-1} == 1 ]] && ae+=(--demasker-init "$OUT/base/checkpoint" --max-steps $FT_STEPS --eval-interval $FT_STEPS)
  if [[ $ABLATIONS == 1 ]]; then
  background "$OUT/base_equal.log" train "$OUT/base_equal" checkpoint python train_ae.py "${ae[@]}" \
    --out-dir "$OUT/base_equal" --no-registers $([[ ${AE_FROM_BASE:-1} == 1 ]] || echo --max-steps $((AE_STEPS + FT_STEPS)))
  background "$OUT/ae_no_noise.log" train "$OUT/ae_no_noise" checkpoint python train_ae.py "${ae[@]}" \
    --out-dir "$OUT/ae_no_noise" --latent-cos 1
  # CADD (docs/beyond.md): the same budget and start, per-token continuous latents at [M] instead of registers
  background "$OUT/cadd.log" train "$OUT/cadd" checkpoint python train_ae.py "${ae[@]}" \
    --out-dir "$OUT/cadd" --no-registers --cadd $([[ ${AE_FROM_BASE:-1} == 1 ]] || echo --max-steps $((AE_STEPS + FT_STEPS)))
  fi
  log_to "$OUT/ae.log" train "$OUT/ae" checkpoint python train_ae.py "${ae[@]}" --out-dir "$OUT/ae"
  wait_all
  grep '"type": "val"' "$OUT/ae/log.jsonl" | tail -n 1 | cut -c1-300
fi

if has 3; then
  stage "3. priors: unconditional, conditional, unconditional without block offsets, conditional with h_mu ($PRIOR_STEPS steps each); the prompted prior"
  prior=(--preset tiny --ae "$OUT/ae" --data "$DATA" --max-steps $PRIOR_STEPS --device $DEVICE --threads $THREADS
         --quiet "${PRIOR_MODEL[@]}")
  background "$OUT/prior.log" train "$OUT/prior" train_state python train_prior.py "${prior[@]}" --out-dir "$OUT/prior"
  [[ $ABLATIONS == 1 ]] && background "$OUT/prior_no_offsets.log" train "$OUT/prior_no_offsets" train_state \
    python train_prior.py "${prior[@]}" --out-dir "$OUT/prior_no_offsets" --no-block-offsets
  has 4 && wants base-decoding && background "$OUT/lane_select.log" early 3.select base-decoding  # base + scorer only
  background "$OUT/cprior.log" train "$OUT/cprior" train_state python train_prior.py "${prior[@]}" --out-dir "$OUT/cprior" \
    --conditional
  if [[ $ABLATIONS == 1 ]]; then
    # App. H: prompt/answer pairs of the corpus (signature + docstring -> body), the prompted prior (Eq. 12) and
    # the guided demasker fine-tuned on prompt + masked answer (docs/beyond.md)
    [[ -f $OUT/pairs/test.jsonl ]] || log_to "$OUT/pairs.log" python -m dataprep.prompts --out "$OUT/pairs"
    background "$OUT/prompted.log" train "$OUT/prompted" train_state python -m experiments.train_prompted --ae "$OUT/ae" \
      --pairs "$OUT/pairs" --out-dir "$OUT/prompted" --seq-len $L --steps ${PROMPTED_STEPS:-600} \
      --demasker-steps ${PROMPTED_FT_STEPS:-300} --device $DEVICE --threads $THREADS --log-interval 100
    # ConWithinDisc's conditioning encoder trained with the prior (Sec. 4.3.2 comment iii; docs/conditioning.md)
    background "$OUT/cprior_mu.log" train "$OUT/cprior_mu" train_state python train_prior.py "${prior[@]}" \
      --out-dir "$OUT/cprior_mu" --conditional --train-cond-encoder
  fi
  wait_all
fi

if has 4; then
  # Two lanes side by side, one thread each, balanced by the measured time of each experiment (tiny, 2 cores);
  # speed's rows are sampled and scored in the lanes, then timed alone on the machine
  rm -f "$R"/*.failed
  background "$OUT/lane_generation.log" evaluate 4.a base-decoding speed fig6 fig6-hmu
  log_to "$OUT/lane_other.log" evaluate 4.b speed-cache table1 table2 fig8 cadd consistency consistency-hmu prompt fig11 \
    fig4 fig7 fig9 prdc marginal-trap
  wait_all
  log_to "$OUT/lane_timing.log" time_alone speed speed-cache
  cat "$OUT"/lane_*.log
fi

if has 5; then
  stage "5. the results page's records from the eval records (docs/results/*.png)"
  python -m evaluation.results_section --results "$OUT/results" --docs docs/results \
    ${RESULTS_PAGE:+--page "$RESULTS_PAGE"} \
    --header "Made by \`bash scripts/reproduce.sh\` (PRESET=$PRESET) on $(nproc) CPU cores; this invocation (stages $STAGES) took $((SECONDS / 60)) min."
fi
stage "done: $OUT/results/REPORT.md"
