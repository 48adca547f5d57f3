#!/usr/bin/env bash
# The main job end to end on the bundled sample corpus (data/sample, 8 public-domain books):
# tokenizer -> .bin/.idx -> train a tiny ZTT on 2 CPU processes -> evaluate -> export to
# Hugging Face -> generate. Run it with `make demo`; everything goes to $WORKDIR.
set -euo pipefail
cd "$(dirname "$0")/.."

WORKDIR=${WORKDIR:-work/demo}
NPROC=${NPROC:-2}
ITERS=${ITERS:-300}
VOCAB=2048
export ZTT_DEVICE=${ZTT_DEVICE:-cpu} DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1

step() { printf '\n==== %s\n' "$*"; }

rm -rf "$WORKDIR/run" "$WORKDIR/hf"  # the demo always trains from scratch
mkdir -p "$WORKDIR/data"

step "1/6 train a SentencePiece tokenizer (BPE, vocab $VOCAB) on data/sample"
ztt tokenizer train --input data/sample --vocab-size "$VOCAB" --output "$WORKDIR/tokenizer"

step "2/6 tokenise the corpus into Megatron .bin/.idx files"
ztt preprocess --input data/sample --tokenizer "$WORKDIR/tokenizer.model" \
    --output-prefix "$WORKDIR/data/sample" --workers 2 --append-eod

step "3/6 train the tiny ZTT (launch/configs/tiny.yaml) on $NPROC CPU processes, $ITERS steps"
PORT=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
torchrun --nproc-per-node "$NPROC" --master-port "$PORT" -m megatron_ztt.train \
    --config launch/configs/tiny.yaml \
    run.dir="$WORKDIR/run" \
    data.blend="[$WORKDIR/data/sample]" \
    data.tokenizer="$WORKDIR/tokenizer.model" \
    model.vocab_size="$VOCAB" \
    train.train_iters="$ITERS"

step "4/6 evaluate the checkpoint: full depth and with early exit"
ztt eval --checkpoint "$WORKDIR/run/checkpoints" --exit-threshold 0.02 0.025 \
    --output "$WORKDIR/eval.json"

step "5/6 export to a Hugging Face model directory"
ztt export-hf --checkpoint "$WORKDIR/run/checkpoints" --output "$WORKDIR/hf" --dtype fp32

step "6/6 generate with transformers (trust_remote_code): sampled, greedy, greedy with early exit"
PROMPT="Alice was beginning to get very tired"
# what a user would run: nucleus sampling with a repetition penalty (a tiny model left to
# itself loops: "the little little little"), seeded so that the demo prints the same text
SAMPLE=(--temperature 0.8 --top-p 0.9 --repetition-penalty 1.3 --seed 0)
generate() {  # LABEL ARGS...: print the prompt, then the continuation ztt generate writes
    local label=$1
    shift
    printf -- '-- %s\nprompt:       %s\ncontinuation: ' "$label" "$PROMPT"
    ztt generate --model "$WORKDIR/hf" --prompt "$PROMPT" --max-new-tokens 60 "$@"
}
generate "sampled (top-p 0.9, temperature 0.8, repetition penalty 1.3, seed 0), full depth" \
    "${SAMPLE[@]}"
generate "greedy (repetition penalty 1.3), full depth" --repetition-penalty 1.3
generate "greedy (repetition penalty 1.3), early exit at 0.02 per token" \
    --repetition-penalty 1.3 --exit-threshold 0.02 --exit-mode token

printf '\nDone. TensorBoard: tensorboard --logdir %s/run/tensorboard\n' "$WORKDIR"
