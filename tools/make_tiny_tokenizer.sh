#!/bin/sh
# make_tiny_tokenizer.sh -- train the tiny SentencePiece tokenizer that lathe ships with its
# embedded default model (models/tiny/tokenizer.model) and that every test fixture copies.
#
# What it does: concatenates the frozen text in tools/tiny-corpus/ (English prose, code, numbers,
# a little multilingual text and emoji, a few chat turns, and copies of the project's own design
# notes) and runs Debian's `spm_train` (package `sentencepiece`) with Gemma 3's tokenizer settings
# as far as SentencePiece allows: BPE, byte_fallback, split_digits, identity normaliser, no
# extra-whitespace removal, no dummy prefix, whitespace-only pieces allowed, Gemma's special ids
# pad=0 <pad>, eos=1 <eos>, bos=2 <bos>, unk=3 <unk>, then user-defined pieces from id 4.
# What it owns: models/tiny/tokenizer.model (and a throw-away .vocab in a temp dir).
# What it must not touch: anything else. The model weights (models/tiny/*.safetensors) are made by
# tests/fixtures/make_fixtures.py and depend on this tokenizer's size: regenerate both together.
#
# Usage: tools/make_tiny_tokenizer.sh [OUT_DIR]     (default OUT_DIR: models/tiny)
# Deterministic for a given spm_train version (single thread, fixed seed); made with 0.1.97.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/.." && pwd)
out=${1:-$top/models/tiny}
vocab=${TINY_VOCAB:-4096}

command -v spm_train >/dev/null 2>&1 || {
    echo "make_tiny_tokenizer.sh: spm_train not found (apt-get install sentencepiece)" >&2
    exit 1
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM

# Fixed file order, so the corpus (and the result) never depends on the locale or the filesystem.
for f in prose.txt code.txt multilingual.txt chat.txt \
         docs-design.txt docs-device.txt docs-jupyter.txt docs-reference.txt docs-style-anchors.txt; do
    cat "$here/tiny-corpus/$f"
    printf '\n'
done >"$tmp/corpus.txt"

# User-defined pieces: always one piece when they occur in text (SentencePiece matches them before
# BPE). Order gives the ids: <mask>=4, [multimodal]=5 (as in Gemma 3), then <start_of_turn>=6,
# <end_of_turn>=7, <start_of_image>=8, <end_of_image>=9, "\n"=10, "\n\n"=11 (Gemma 3 uses 105,
# 106, 255999, 256000, 107, 108; lathe looks special tokens up by piece, not by id).
nl='
'
uds="<mask>,[multimodal],<start_of_turn>,<end_of_turn>,<start_of_image>,<end_of_image>,${nl},${nl}${nl}"

mkdir -p "$out"
# Relative paths from inside $tmp: spm_train stores them in the model's trainer_spec, and a
# random temp-dir name there would make the file differ from run to run.
(cd "$tmp" && spm_train \
    --input=corpus.txt \
    --model_prefix=tiny \
    --model_type=bpe \
    --vocab_size="$vocab" \
    --character_coverage=0.9999 \
    --byte_fallback=true \
    --split_digits=true \
    --split_by_unicode_script=true \
    --split_by_whitespace=true \
    --allow_whitespace_only_pieces=true \
    --normalization_rule_name=identity \
    --remove_extra_whitespaces=false \
    --add_dummy_prefix=false \
    --pad_id=0 --pad_piece='<pad>' \
    --eos_id=1 --eos_piece='<eos>' \
    --bos_id=2 --bos_piece='<bos>' \
    --unk_id=3 --unk_piece='<unk>' \
    --user_defined_symbols="$uds" \
    --max_sentence_length=16384 \
    --num_threads=1 \
    --random_seed=1234 \
    --minloglevel=1) >"$tmp/log" 2>&1 || { cat "$tmp/log" >&2; exit 1; }

cp "$tmp/tiny.model" "$out/tokenizer.model"
echo "wrote $out/tokenizer.model ($(wc -c <"$out/tokenizer.model") bytes, vocab $vocab)"
