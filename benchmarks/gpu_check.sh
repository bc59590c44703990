#!/usr/bin/env bash
# One GPU's figures for the paper's recipes, in about 9 minutes:
#
#   bash benchmarks/gpu_check.sh OUTDIR
#
# 1. base, then big: `experiments.wmt` with the recipe's flagfile, trained on the
#    real German-English corpus (ding_de_en, the only one that needs no download)
#    through the real pipeline: token ids prepared once, packed rows of ROWS x LENGTH
#    (25,600 positions a side at the defaults, about the paper's 25,000 tokens),
#    TRAIN_MINUTES of training, the compilation included. Its log gives steps/s,
#    target tokens/s and MFU against the chip's datasheet bfloat16 peak;
#    metrics.jsonl the real tokens a step.
# 2. the bare compiled step of base at the same shapes on synthetic batches
#    (benchmarks.train_step), so that the loop's share of the step rate shows.
#
# OUTDIR gets check.log (everything), train_step.jsonl, and each run's
# metrics.jsonl and results.json. Each part has its own time limit, so a slow
# one costs its own figures only. Settings by environment: PYTHON (python3),
# PRESETS (base,big), ROWS (200), LENGTH (128), TRAIN_MINUTES (2), and the
# limits RUN_SECONDS (240, each training run: data, vocabulary, TRAIN_MINUTES, the
# final validation) and BARE_SECONDS (120), which keep the whole near 10 minutes.
#
# A machine without network: put wheels of the packages it lacks in ./.whl (they
# are installed under /tmp/site first) and, where /usr/share/trans/de-en is
# missing, the corpus as .whl/de-en.gz (gzip of that file of Debian's trans-de-en).
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 1 ] || { echo "usage: bash benchmarks/gpu_check.sh OUTDIR (one folder for its files)" >&2; exit 1; }
out=$1
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 1
python=${PYTHON:-python3}
rows=${ROWS:-200}
length=${LENGTH:-128}
minutes=${TRAIN_MINUTES:-2}
run_seconds=${RUN_SECONDS:-240}
bare_seconds=${BARE_SECONDS:-120}
IFS=, read -r -a presets <<< "${PRESETS:-base,big}"
scratch=$(mktemp -d /tmp/gpu_check.XXXXXX)
log="$out/check.log"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" > /dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
manual=()
if [ ! -f /usr/share/trans/de-en ] && [ -f .whl/de-en.gz ]; then
  mkdir -p "$scratch/manual" && gunzip -c .whl/de-en.gz > "$scratch/manual/de-en" || exit 1
  manual=(--manual_dir="$scratch/manual")
fi

{
  date -u
  command -v nvidia-smi > /dev/null && nvidia-smi -L
  "$python" -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__, jax.devices())'
} 2>&1 | tee -a "$log"

previous=""
for preset in "${presets[@]}"; do
  workdir="$scratch/$preset"
  mkdir -p "$workdir"
  # One vocabulary for every run: the ids prepared for it are read again, not remade.
  [ -n "$previous" ] && cp "$scratch/$previous/vocab.model" "$workdir/"
  echo "== $preset: experiments.wmt, ${rows} x ${length} packed rows, ${minutes} min" | tee -a "$log"
  timeout --signal=TERM --kill-after=30 "$run_seconds" "$python" -m experiments.wmt \
    --flagfile="experiments/configs/wmt14_ende_$preset.flags" \
    --dataset=ding_de_en --direction=de-en --vocab_size=8000 "${manual[@]}" \
    --data_dir="$scratch/tfds" --workdir="$workdir" \
    --batching=packed --batch_rows="$rows" --row_length="$length" --max_len="$length" \
    --train_minutes="$minutes" --log_every=50 --eval_every=0 --checkpoint_minutes=0 \
    --final_eval_split= 2>&1 | tee -a "$log"
  echo "== $preset: exit ${PIPESTATUS[0]}" | tee -a "$log"
  for name in metrics.jsonl results.json; do
    [ -f "$workdir/$name" ] && cp "$workdir/$name" "$out/${preset}_$name"
  done
  [ -f "$workdir/vocab.model" ] && previous=$preset
done

echo "== the bare step: benchmarks.train_step" | tee -a "$log"
timeout --kill-after=30 "$bare_seconds" "$python" -m benchmarks.train_step \
  --preset="${presets[0]}" --dtype=bfloat16 --rows="$rows" --length="$length" --repeats=20 \
  2> >(tee -a "$log" >&2) | tee -a "$log" "$out/train_step.jsonl"
rm -rf "$scratch"
