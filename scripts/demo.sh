#!/usr/bin/env bash
# `make demo`: the diffquant command line end to end on the pipeline shipped with diffquant.
# generate (quantized on load) -> quantize (save a pre-quantized copy) -> inspect -> reload and
# generate again (no configuration) -> compare two schemes against the unquantized pipeline.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-.venv/bin}
DQ="$BIN/diffquant"
OUT=out/demo
PROMPT="a red circle above a blue square"
STEPS=${STEPS:-4}
# MODEL=dir runs the demo on another pipeline; by default diffquant's shipped one is used.
MODEL=${MODEL:-$("$BIN/python" -c 'from diffquant import default_pipeline_path; print(default_pipeline_path())')}
mkdir -p "$OUT"

step() { printf '\n==> %s\n' "$*"; }

step "generate with the transformer quantized to int8 on load (torchao:int8wo)"
"$DQ" generate --model "$MODEL" --prompt "$PROMPT" --quantize torchao:int8wo --steps "$STEPS" --seed 0 \
    --out "$OUT/generate-int8wo.png"

step "save a pre-quantized copy of the pipeline"
"$DQ" quantize "$MODEL" "$OUT/pipe-int8wo" --quantize torchao:int8wo --overwrite

step "inspect the saved copy"
"$DQ" inspect "$OUT/pipe-int8wo"

step "reload the saved copy (no --quantize: its config.json says how) and generate again"
"$DQ" generate --model "$OUT/pipe-int8wo" --prompt "$PROMPT" --steps "$STEPS" --seed 0 \
    --out "$OUT/reloaded-int8wo.png"

step "compare the unquantized pipeline with two schemes (same seed; each in its own process)"
"$DQ" compare --model "$MODEL" --prompt "$PROMPT" --steps "$STEPS" --seed 0 \
    --quantize torchao:int8wo --quantize gguf:q4_0 --out "$OUT/compare.png"

step "images"
for f in "$OUT"/*.png; do echo "  $f"; done
echo "  (the saved pipeline is $OUT/pipe-int8wo)"
