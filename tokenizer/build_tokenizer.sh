#!/usr/bin/env bash
# Train a SentencePiece tokenizer with the project's defaults (see tokenizer/README.md).
#
#   tokenizer/build_tokenizer.sh OUTPUT_PREFIX INPUT [INPUT...]
#
# Settings (environment): VOCAB_SIZE (32000), MODEL_TYPE (bpe | unigram),
# SAMPLE_LINES (2000000 lines sampled for training; 0 = all), JSON_KEY (text),
# ZTT (how to run ztt; default: `ztt` if installed, else `python -m megatron_ztt.cli`).
set -euo pipefail

if [ "$#" -lt 2 ]; then
    echo "usage: $0 OUTPUT_PREFIX INPUT [INPUT...]" >&2
    exit 2
fi
output=$1
shift

if [ -z "${ZTT:-}" ]; then
    if command -v ztt >/dev/null 2>&1; then ZTT=ztt; else ZTT="python -m megatron_ztt.cli"; fi
fi

# shellcheck disable=SC2086  # ZTT may be a command with arguments
exec $ZTT tokenizer train \
    --input "$@" \
    --output "$output" \
    --vocab-size "${VOCAB_SIZE:-32000}" \
    --model-type "${MODEL_TYPE:-bpe}" \
    --input-sentence-size "${SAMPLE_LINES:-2000000}" \
    --json-key "${JSON_KEY:-text}"
