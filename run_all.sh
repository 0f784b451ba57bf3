#!/usr/bin/env bash
# SAIL end to end: seed DPO (iteration 0), then T rounds of
#   01 generate -> 02 self-reward -> 03 mixup -> 04 DPO,
# then evaluation. Every stage skips what is finished, so rerunning the same command after a
# crash resumes at the first unfinished stage.
#
#   bash run_all.sh toy 2          # the toy world on a CPU: no downloads, minutes
#   bash run_all.sh sd15 3         # the paper's SD1.5 run (CUDA; data from tools/prepare_pickapic.py)
#   bash run_all.sh sdxl 2         # the paper's SDXL run
#   bash run_all.sh tiny-sd15 2    # random-weight tiny models: a smoke test of the plumbing
#   bash run_all.sh sdxl 2 --check # first: a few minutes of every stage on the real models (tools/preflight.py)
#
# Environment variables: each sets one flag; unset, the stage's own default applies (one table for
# all of them, sail/settings.py: `bash run_all.sh --help` lists them, `python 01_generate.py --help` one stage's).
#   N            01 --num-candidates   candidates per prompt
#   PROMPTS      01 --limit            prompts per iteration (default: the whole pool)
#   K            02 --draws            self-reward draws per image (and the drift guard's)
#   PAIRING      02 --pairing          best-worst or random
#   HUMAN_SHARE  03 --human-share      share of human pairs in each mix
#   TRAIN_ARGS="--max-steps 100"       extra flags for 00/04
#   DATA_ARGS="--pool-size 16"         extra flags for python -m toy.data
# and of the run itself:
#   RUN=runs/<preset>   run folder
#   LAUNCH="accelerate launch --num_processes 8"   how GPU stages start (default: python)
#   EVAL=1              evaluate at the end (0: skip); EVAL_BENCHMARK=parti (see 05_eval.py)
#   GUARD=report        with $RUN/val/pairs.jsonl (held-out human pairs): after each iteration the
#                       model's self-reward accuracy on them (tools/drift_guard.py); stop: also end the
#                       loop when it falls below the best so far by more than GUARD_TOLERANCE
#                       (drift_guard --tolerance); off: skip
#   GUARD=spot          before each iteration trains, a human labels SPOT_PAIRS (spot_check --pairs) of its
#                       self pairs on the labelling page (the loop waits; SPOT_ARGS="--host 0.0.0.0 --port 8765";
#                       in runs made by python -m toy.data the toy's human answers); the loop ends when they
#                       agree with the self-reward less often than at iteration 1 by more than SPOT_DROP
#                       (spot_check --drop) (tools/spot_check.py)
set -euo pipefail

KIT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export PYTHONPATH="$KIT${PYTHONPATH:+:$PYTHONPATH}"  # the kit's packages (sail, tools, toy) from any folder
PY=${PYTHON:-python}
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then  # this header, then every stage's settings and defaults
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
  echo
  exec $PY -c 'from sail.settings import describe; print(describe())'
fi
PRESET=${1:?usage: bash run_all.sh PRESET ITERATIONS   (presets: toy sd15 sdxl tiny-sd15 tiny-sdxl; --help: the settings)}
T=${2:?usage: bash run_all.sh PRESET ITERATIONS}
if [[ "${3:-}" == "--check" ]]; then
  exec $PY -m tools.preflight --preset "$PRESET"
fi
LAUNCH=${LAUNCH:-$PY}
RUN=${RUN:-runs/$PRESET}
TRAIN_ARGS=${TRAIN_ARGS:-}
EVAL=${EVAL:-1}
GUARD=${GUARD:-report}
SPOT_ARGS=${SPOT_ARGS:-}
DATA_ARGS=${DATA_ARGS:-}  # extra flags for python -m toy.data (toy and tiny presets)
# a variable that is set passes its flag; unset, the stage's default applies
GENERATE_FLAGS=(${N:+--num-candidates "$N"} ${PROMPTS:+--limit "$PROMPTS"})
REWARD_FLAGS=(${K:+--draws "$K"} ${PAIRING:+--pairing "$PAIRING"})
MIXUP_FLAGS=(${HUMAN_SHARE:+--human-share "$HUMAN_SHARE"})
GUARD_FLAGS=(${GUARD_TOLERANCE:+--tolerance "$GUARD_TOLERANCE"})
SPOT_FLAGS=(${SPOT_PAIRS:+--pairs "$SPOT_PAIRS"} ${SPOT_DROP:+--drop "$SPOT_DROP"})

mkdir -p "$RUN"
log() { echo "[run_all $(date +%H:%M:%S)] $*" | tee -a "$RUN/run_all.log"; }
stage() {  # stage NAME COMMAND...: run one stage, print one summary line
  local name=$1 start=$SECONDS
  shift
  "$@"
  log "$name done in $((SECONDS - start)) s"
}

guard() {  # guard ITER: held-out human pairs scored by iteration ITER's own reward; status 3 means stop
  [[ "$GUARD" != off && -f "$RUN/val/pairs.jsonl" ]] || return 0
  local ckpt draws start=$SECONDS status=0  # called as a condition, where set -e is off: failures are passed on by hand
  ckpt=$(printf "%s/iter_%02d/ckpt" "$RUN" "$1")
  # the draws 02 makes: K, else 02's default
  draws=${K:-$($PY -c 'from sail.settings import setting; print(setting("self_reward", "draws").default)')}
  $PY "$KIT/05_eval.py" --reward-accuracy "$RUN/val/pairs.jsonl" --ckpt "$ckpt" --draws "$draws" --common-draws yes \
    --out "$RUN/eval/guard" || exit $?
  log "iter $1: drift guard scored in $((SECONDS - start)) s"
  $PY -m tools.drift_guard --run "$RUN" --iter "$1" "${GUARD_FLAGS[@]}" $([[ "$GUARD" == stop ]] && echo --stop) \
    || status=$?
  [[ $status == 0 || $status == 3 ]] || exit "$status"
  return "$status"
}

spot() {  # spot ITER: a human labels some of iteration ITER's self pairs before it trains; status 3 means stop
  [[ "$GUARD" == spot ]] || return 0
  local labeller=page status=0 start=$SECONDS
  [[ -f "$RUN/toy_world.data.json" ]] && labeller=toy  # a run python -m toy.data made: the toy's human answers
  $PY -m tools.spot_check --run "$RUN" --iter "$1" "${SPOT_FLAGS[@]}" --labeller "$labeller" $SPOT_ARGS || status=$?
  [[ $status == 0 || $status == 3 ]] || exit "$status"
  log "iter $1: spot check done in $((SECONDS - start)) s"
  return "$status"
}

FLAGS=$(echo "${GENERATE_FLAGS[@]}" "${REWARD_FLAGS[@]}" "${MIXUP_FLAGS[@]}" $TRAIN_ARGS)
log "preset $PRESET, $T iteration(s), run folder $RUN; flags given: ${FLAGS:-none} (others: the stages' defaults)"
if (( T > 2 )); then
  note="note: the toy's runs past 2 iterations are in toy/RESULTS.md"
  [[ "$GUARD" == spot ]] || note+="; GUARD=spot checks the self pairs against a human before each iteration trains \
(README, The guards)"
  log "$note"
fi
if [[ "$PRESET" == toy ]]; then
  stage "toy base model" $PY -m toy.base  # built once, then found in $SAIL_CACHE
fi
if [[ ! -f "$RUN/seed/pairs.jsonl" ]]; then
  case "$PRESET" in
    toy|tiny-*) stage "data (toy world)" $PY -m toy.data --run "$RUN" --preset "$PRESET" --n-pools "$T" $DATA_ARGS ;;
    *) echo "error: $RUN/seed/pairs.jsonl not found. Import the seed set and prompt pools first:" >&2
       echo "  python -m tools.prepare_pickapic --parquet-dir /path/to/pickapic_v2 --run $RUN" >&2
       echo "  or your own pairs: python -m tools.import_pairs --run $RUN --pairs-file my.csv (docs/own_pairs.md)" >&2
       echo "  or label them in the browser: python -m tools.label --run $RUN --prompts FILE --preset $PRESET (docs/labelling.md)" >&2
       exit 2 ;;
  esac
fi
for ((i = 1; i <= T; i++)); do
  pool=$(printf "%s/pools/iter_%02d.jsonl" "$RUN" "$i")
  [[ -f "$pool" ]] || { echo "error: prompt pool $pool not found (need one per iteration)" >&2; exit 2; }
done
$PY -m tools.check_pools "$RUN"

stage "00 seed DPO" $LAUNCH "$KIT/00_seed_dpo.py" --run "$RUN" --preset "$PRESET" $TRAIN_ARGS
guard 0 || true
for ((i = 1; i <= T; i++)); do
  stage "iter $i: 01 generate" $LAUNCH "$KIT/01_generate.py" --run "$RUN" --iter "$i" "${GENERATE_FLAGS[@]}"
  stage "iter $i: 02 self-reward" $LAUNCH "$KIT/02_self_reward.py" --run "$RUN" --iter "$i" "${REWARD_FLAGS[@]}"
  if ! spot "$i"; then
    log "spot check: stopped before iteration $i trains; keep $(printf "%s/iter_%02d/ckpt" "$RUN" $((i - 1))) (eval/spot/spot.json)"
    break
  fi
  stage "iter $i: 03 mixup" $PY "$KIT/03_mixup.py" --run "$RUN" --iter "$i" "${MIXUP_FLAGS[@]}"
  stage "iter $i: 04 DPO" $LAUNCH "$KIT/04_train.py" --run "$RUN" --iter "$i" $TRAIN_ARGS
  if ! guard "$i"; then
    log "drift guard: stopped after iteration $i; best checkpoint in $RUN/eval/guard/guard.json"
    break
  fi
done

if [[ "$EVAL" == 1 ]]; then
  case "$PRESET" in
    toy|tiny-*)
      if [[ -f "$RUN/eval/prompts.jsonl" ]]; then
        stage "oracle report" $PY -m toy.report --run "$RUN"
      else  # a seed set not made by python -m toy.data (tools/label.py, tools/import_pairs.py) brings no evaluation prompts
        log "no $RUN/eval/prompts.jsonl: oracle report skipped"
      fi ;;
    *) stage "05 eval" $PY "$KIT/05_eval.py" --run "$RUN" --benchmark "${EVAL_BENCHMARK:-parti}" ;;
  esac
fi
log "finished: checkpoints in $RUN/iter_*/ckpt"
