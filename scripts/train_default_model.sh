#!/usr/bin/env bash
# The built-in default model, end to end (docs/default_model.md). Every stage resumes: re-run the script after an
# interruption and finished stages are skipped, interrupted ones continue from their last checkpoint.
# THREADS (default 2) sets the torch threads of the trainings; PRECISION (default fp32, as the shipped model was
# trained; auto: bf16 autocast where the CPU or GPU has it) their precision.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS="${THREADS:-2}"
PRECISION="${PRECISION:-fp32}"
export OMP_NUM_THREADS="$THREADS"

resume_flag() { [ -d "$1/checkpoints" ] && echo "--resume" || true; }

# 1. tokenizer, stage 1: a continuous video VAE on Shapes World (rendered on the fly, train split)
[ -f runs/default/tokenizer_continuous/model/model.safetensors ] ||
  infinitystar train tokenizer configs/default_tokenizer_continuous.yaml --set train.threads="$THREADS" \
    --precision "$PRECISION" $(resume_flag runs/default/tokenizer_continuous)

# 2. tokenizer, stage 2: the bitwise tokenizer inherited from it (knowledge inheritance); the encoder side is
#    frozen, so its first checkpoint already fixes the codes the generator learns (kept as tokenizer_frozen_encoder)
BITWISE=(infinitystar train tokenizer configs/default_tokenizer_bitwise.yaml --set train.threads="$THREADS"
         --precision "$PRECISION" --set init=runs/default/tokenizer_continuous/model)
if [ ! -f runs/default/tokenizer_frozen_encoder/model.safetensors ]; then
  "${BITWISE[@]}" --until 1 $(resume_flag runs/default/tokenizer_bitwise)
  mkdir -p runs/default/tokenizer_frozen_encoder
  cp runs/default/tokenizer_bitwise/checkpoints/step_00000001/{config.json,model.safetensors,pyramid.json} \
     runs/default/tokenizer_frozen_encoder/
fi
#    the decoder's fine-tuning (independent of steps 3-6: run it on another core to save time)
[ -f runs/default/tokenizer_bitwise/model/model.safetensors ] || "${BITWISE[@]}" --resume

# 3. the generator's data: images, 17/33-frame videos, 33-65-frame videos with a caption per 16-frame segment
[ -f data/default/long_videos.jsonl ] ||
  python -m infinitystar.shapes.data data/default --n-images 4000 --n-videos 4000 --n-long 1000 --video-format npy

# 4. the built-in text encoder's initial weights (trained with the generator in step 6)
[ -f runs/default/text_encoder_init/config.json ] || python -m infinitystar.text.builtin runs/default/text_encoder_init

# 5. latents, once (resumable)
infinitystar extract-features --config configs/default_model.yaml

# 6. the generator (and the text encoder)
infinitystar train generator configs/default_model.yaml --precision "$PRECISION" $(resume_flag runs/default/generator)

# 7. the model folder that `InfinityStarPipeline.from_pretrained()` loads by default (EMA weights)
infinitystar export runs/default/generator src/infinitystar/weights/default \
  --tokenizer runs/default/tokenizer_bitwise/model --defaults "$(cat configs/default_model_defaults.json)"
