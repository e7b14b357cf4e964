#!/usr/bin/env bash
# Grow the committed corpus, then retrain the eagle drafter from it, on a machine with a CUDA GPU:
# one prepared run of about 10 minutes. Run it from the repository root with the package
# installed (`make .venv/.installed`, or `pip install -e .` over a CUDA build of torch):
#
#   bash scripts/gpu_grow_and_train.sh                 # the defaults below
#   NEW_PROMPTS=12000 TRAIN_SECONDS=420 bash scripts/gpu_grow_and_train.sh
#
# Every knob is an environment variable. The prompts come from `blockdraft prompts` over the
# licensed training sources (SOURCE); prompts already in the corpus are skipped, so runs on
# fresh machines add new answers only. Measured on one H100: distillation at batch 512-768 made
# ~1,500 answers a minute; features and training take the rest of the budget.
#
# Afterwards, on the CPU that serves: `blockdraft corpus info --corpus corpus/smollm2-135m`,
# `blockdraft bench --per-category 2 --methods ar,eagle,eagle-ctx --eagle runs/eagle-gpu --out DIR`
# against the shipped drafter; commit the new shards (never rewrite committed ones) and, if it
# drafts better, copy runs/eagle-gpu into src/blockdraft/assets/eagle/smollm2-135m.
set -euo pipefail

SOURCE=${SOURCE:-../shared/data/train_prompts}   # a folder of licensed prompt sources
PROMPTS=${PROMPTS:-runs/train_prompts.jsonl}     # made from SOURCE when missing
CORPUS=${CORPUS:-corpus/smollm2-135m}
DISTILL_OUT=${DISTILL_OUT:-runs/distill}         # the run's own resumable answers
NEW_PROMPTS=${NEW_PROMPTS:-6000}                 # about 4 minutes on an H100
BATCH=${BATCH:-512}
SHARD_RECORDS=${SHARD_RECORDS:-1000}
DRAFTER=${DRAFTER:-runs/eagle-gpu}
INIT=${INIT:-src/blockdraft/assets/eagle/smollm2-135m}  # resume from the shipped weights
MAX_RECORDS=${MAX_RECORDS:-100000}
EPOCHS=${EPOCHS:-2}
TRAIN_SECONDS=${TRAIN_SECONDS:-240}
DEVICE=${DEVICE:-cuda}

[ -s "$PROMPTS" ] || blockdraft prompts --source "$SOURCE" --out "$PROMPTS"
# float32 greedy answers, as every committed shard: the corpus refuses other settings in one line
blockdraft distill --device "$DEVICE" --prompts "$PROMPTS" --out "$DISTILL_OUT" --dtype float32 \
    --max-new-tokens 256 --batch-size "$BATCH" --limit "$NEW_PROMPTS" --corpus "$CORPUS" --shard-records "$SHARD_RECORDS"
blockdraft train-eagle --device "$DEVICE" --corpus "$CORPUS" --out "$DRAFTER" --init "$INIT" \
    --max-records "$MAX_RECORDS" --epochs "$EPOCHS" --unroll 5 --max-seconds "$TRAIN_SECONDS"
blockdraft corpus info --corpus "$CORPUS"
