#!/usr/bin/env bash
# The next built-in default model (issue 12; docs/default_model.md, "Toward the next model"), end to end. Every
# stage resumes: re-run the script after an interruption and finished stages are skipped, interrupted ones continue
# from their last checkpoint. Runs go to runs/default_v2 and data to data/default_v2 (make them links to folders
# outside the checkout to keep it small). THREADS (default 1) sets the torch threads of each training; the
# tokenizer's decoder stage and the generator are independent once the frozen encoder exists, so run the script
# twice with STAGE=decoder and STAGE=generator on two cores to overlap them (default: everything, in order);
# STAGE=shipped runs only stage 7 from the model that ships in the package (7s below); STAGE=grown runs 7s to
# step 1,000 and then a deeper generator grown from it (8g below); STAGE=mixed runs stage 7m from the shipped model
# and averages it with it (7m below).
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS="${THREADS:-1}"
STAGE="${STAGE:-all}"
export OMP_NUM_THREADS="$THREADS"
C=configs/default_v2
R=runs/default_v2
D=data/default_v2

resume_flag() { [ -d "$1/checkpoints" ] && echo "--resume" || true; }
# the step a run's latest checkpoint holds (0 when it has none)
latest_step() { [ -f "$1/checkpoints/latest" ] && sed 's/^step_0*//; s/^$/0/' "$1/checkpoints/latest" || echo 0; }
tok() { infinitystar train tokenizer "$@" --set train.threads="$THREADS"; }
# the generator's data: images, 17-frame videos, 33-65-frame videos with a caption per 16-frame segment
make_data() {
  [ -f $D/long_videos.jsonl ] ||
    python -m infinitystar.shapes.data $D --n-images 10000 --n-videos 10000 --n-long 2000 --video-format npy
}
# the first frame's coarse steps weighted as in stages 6d and 7
boost4="train.first_frame_scale_boost=[32, 32, 32, 16, 8, 1, 1, 1]"

if [ "$STAGE" = all ] || [ "$STAGE" = tokenizer ]; then
  # 1a. continuous video VAE from scratch, to step 2,200 of its 3,000-step cosine
  [ -d $R/tokenizer_continuous_2/checkpoints ] || [ -d $R/tokenizer_continuous_1/checkpoints/step_00002200 ] ||
    tok $C/tokenizer_continuous_1.yaml --until 2200 $(resume_flag $R/tokenizer_continuous_1)
  # 1b. that checkpoint continued with the edge term on a 6,000-step cosine
  if [ ! -d $R/tokenizer_continuous_2/checkpoints ]; then
    mkdir -p $R/tokenizer_continuous_2/checkpoints
    cp -r $R/tokenizer_continuous_1/checkpoints/step_00002200 $R/tokenizer_continuous_2/checkpoints/
  fi
  [ -f $R/tokenizer_continuous_2/model/model.safetensors ] || tok $C/tokenizer_continuous_2.yaml --resume
  # 1c. fine-tuned with the content margin
  [ -f $R/tokenizer_continuous_3/model/model.safetensors ] ||
    tok $C/tokenizer_continuous_3.yaml $(resume_flag $R/tokenizer_continuous_3)
  # 2a. the bitwise tokenizer inherited from it, nothing frozen, to step 2,000
  [ -d $R/tokenizer_bitwise_2/checkpoints ] || [ -d $R/tokenizer_bitwise_1/checkpoints/step_00002000 ] ||
    tok $C/tokenizer_bitwise_1.yaml --until 2000 $(resume_flag $R/tokenizer_bitwise_1)
  # 2b. continued with coarse-prefix decoding (stochastic depth, "fine") to step 3,000
  if [ ! -d $R/tokenizer_bitwise_2/checkpoints ]; then
    mkdir -p $R/tokenizer_bitwise_2/checkpoints
    cp -r $R/tokenizer_bitwise_1/checkpoints/step_00002000 $R/tokenizer_bitwise_2/checkpoints/
  fi
  # 2c. its step-3,000 encoder side is fixed from here on: the generator's latents come from it
  if [ ! -f $R/tokenizer_frozen_encoder/model.safetensors ]; then
    [ -d $R/tokenizer_bitwise_2/checkpoints/step_00003000 ] || tok $C/tokenizer_bitwise_2.yaml --until 3000 --resume
    mkdir -p $R/tokenizer_frozen_encoder
    cp $R/tokenizer_bitwise_2/checkpoints/step_00003000/{config.json,model.safetensors,pyramid.json} \
       $R/tokenizer_frozen_encoder/
  fi
fi

if [ "$STAGE" = all ] || [ "$STAGE" = decoder ]; then
  # 2d. the decoder keeps learning with the encoder side frozen
  [ -f $R/tokenizer_decoder/model/model.safetensors ] ||
    tok $C/tokenizer_decoder.yaml $(resume_flag $R/tokenizer_decoder)
  # 2e. the same weights used at twice the resolution (16x16 latents). No fine-tuning there: it raised PSNR but lost
  # shapes (docs/default_model_log.md)
  [ -f $R/tokenizer_x2/config.json ] ||
    infinitystar tokenizer derive $R/tokenizer_decoder/model $R/tokenizer_x2 --pixel-repeat 2 --scales 1,2,3,4,6,8,12,16
fi

if [ "$STAGE" = all ] || [ "$STAGE" = generator ]; then
  # 3. the generator's data
  make_data
  # 4. the built-in text encoder's initial weights (trained with the generator)
  [ -f $R/text_encoder_init/config.json ] || python -m infinitystar.text.builtin $R/text_encoder_init
  # 5. latents through the frozen encoder at twice the resolution (16x16 per frame), once (resumable)
  [ -f $R/tokenizer_frozen_encoder_x2/config.json ] ||
    infinitystar tokenizer derive $R/tokenizer_frozen_encoder $R/tokenizer_frozen_encoder_x2 --pixel-repeat 2 \
      --scales 1,2,3,4,6,8,12,16
  # at 33 frames, what stage 6b reads (6a cuts the cached latents to 17)
  infinitystar extract-features --config $C/generator_x2.yaml --set data.max_frames=33
  # 6a. the generator (and the text encoder) on 17-frame clips (one moving clip per video), to step 4,000. The
  # config weights the moving clip's coarse steps up (clip_scale_boost: they decide the motion; docs/default_model_log.md)
  if [ ! -d $R/generator_x2_long/checkpoints ]; then
    [ "$(latest_step $R/generator_x2)" -ge 4000 ] ||
      infinitystar train generator $C/generator_x2.yaml --until 4000 $(resume_flag $R/generator_x2)
  fi
  # 6b. the rest of its schedule on clips of up to 33 frames: a second moving clip after the first (continuation)
  # and, in long videos, under the next segment's caption (prompt switching)
  if [ ! -d $R/generator_x2_long/checkpoints ]; then
    mkdir -p $R/generator_x2_long/checkpoints
    cp -r $R/generator_x2/checkpoints/step_00004000 $R/generator_x2_long/checkpoints/
  fi
  long="--set output_dir=$R/generator_x2_long --set data.max_frames=33"
  [ "$(latest_step $R/generator_x2_long)" -ge 6000 ] ||
    infinitystar train generator $C/generator_x2.yaml --resume $long --until 6000
  # 6c. from step 6,000 the first frame's coarse steps of a video weigh as much as the clip's: the model had placed
  # a video's first frame where the prompted travel does not fit (35 of 40 "quickly" videos), so quick moves came
  # out slow (docs/default_model_log.md)
  [ "$(latest_step $R/generator_x2_long)" -ge 7000 ] ||
    infinitystar train generator $C/generator_x2.yaml --resume $long --until 7000 \
      --set "train.first_frame_scale_boost=[8, 8, 8, 4, 2, 1, 1, 1]"
  # 6d. from step 7,000 four times that: at 8x the start followed the words too slowly on the schedule's low tail
  # (room for the travel in 14 of 40 "quickly" videos at 7,000, from 5 at 6,000)
  # The shipped weights are step 7,300's raw weights (the EMA, a ~1,000-step average, still held 6c's starts), kept
  # aside since the run keeps only its last two checkpoints
  [ "$(latest_step $R/generator_x2_long)" -ge 7300 ] ||
    infinitystar train generator $C/generator_x2.yaml --resume $long --until 7300 --set "$boost4"
  [ -d $R/generator_step_7300 ] || cp -r $R/generator_x2_long/checkpoints/step_00007300 $R/generator_step_7300
  [ "$(latest_step $R/generator_x2_long)" -ge 7600 ] ||
    infinitystar train generator $C/generator_x2.yaml --resume $long --until 7600 --set "$boost4"
  # 7. a second cosine (warm restart) from step 7,600 to 9,600 at a third of the first peak (6d's rate was 1.05e-4
  # there, near its 1e-4 floor), the loss weights of 6d: shape, decided in the last scales, kept improving through
  # 6b-6d (t2i shape 73 % at 4,000, 83 % at 7,300). A long video's first frame now reads every segment's caption,
  # in order: with only the first one, segments began without room for their travel (23 of the 25 failed segments
  # of 64 validation videos at step 7,300)
  infinitystar train generator $C/generator_x2.yaml --resume $long --set "$boost4" --set train.max_steps=9600 \
    --set optim.lr=3e-4 --set optim.start_step=7600 --set data.first_frame_all_captions=true
fi

S=src/infinitystar/weights/default
# 7s's settings on top of the config's (every flag but the run folder, the weights and the step count)
stage7s=(--set tokenizer.path=$S/tokenizer --set data.max_frames=33 --set "$boost4" --set optim.lr=3e-4
         --set data.first_frame_all_captions=true)

if [ "$STAGE" = shipped ] || [ "$STAGE" = grown ]; then
  # 7s. stage 7 from the weights that ship in the package, for a machine without the runs of 1-6 (a new machine:
  # rebuilding them is ~20 h of two cores). The shipped transformer and text encoder are step 7,300's raw weights;
  # the optimizer starts fresh (a 50-step warm-up). The shipped tokenizer's encoder side is the frozen encoder
  # (2d trained only the decoder), so its latents are the ones the generator learned from; samples not in the latent
  # cache are encoded as they are drawn (~30 % of a step) and written to it
  make_data
  seven=(infinitystar train generator $C/generator_x2.yaml --set output_dir=$R/generator_stage7s
         --set "model={init_from: $S/transformer}" --set text_encoder.path=$S/text_encoder
         --set train.max_steps=2000)
  if [ "$STAGE" = shipped ]; then
    "${seven[@]}" $(resume_flag $R/generator_stage7s) "${stage7s[@]}"
  elif [ ! -d $R/generator_stage7s_step1000 ]; then
    [ "$(latest_step $R/generator_stage7s)" -ge 1000 ] ||
      "${seven[@]}" $(resume_flag $R/generator_stage7s) "${stage7s[@]}" --until 1000
    [ -d $R/generator_stage7s/checkpoints/step_00001000 ] || {
      echo "error: 7s is past step 1,000 and no longer keeps it; copy it to $R/generator_stage7s_step1000" >&2; exit 1; }
    cp -r $R/generator_stage7s/checkpoints/step_00001000 $R/generator_stage7s_step1000
  fi
fi

if [ "$STAGE" = grown ]; then
  # 8g. is the generator's capacity what holds shape back? Text-to-image shape stayed at 78-79 % (validation
  # prompts) from step 7,300 through 7s's steps 300 and 800, while long videos gained. The transformer of 7s's
  # step 1,000 grown from 4 blocks to 6 (`infinitystar grow`: the new blocks start as the identity, so training
  # starts from that checkpoint's loss), trained with 7s's settings and a fresh optimizer on a 2,000-step cosine;
  # judged against 7s's steps 800 and 1,000 on the validation prompts (docs/default_model_log.md, stage 8g)
  G=$R/stage7s_step1000_model
  [ -d $G ] || infinitystar export --raw $R/generator_stage7s_step1000 $G --tokenizer $S/tokenizer
  [ -d $R/transformer_depth6_init ] || infinitystar grow $G/transformer $R/transformer_depth6_init --depth 6
  infinitystar train generator $C/generator_x2.yaml $(resume_flag $R/generator_stage8g) \
    --set output_dir=$R/generator_stage8g --set "model={init_from: $R/transformer_depth6_init}" \
    --set text_encoder.path=$G/text_encoder --set train.max_steps=2000 "${stage7s[@]}"
fi

if [ "$STAGE" = mixed ]; then
  # 7m. the shipped weights fine-tuned on the mixed data with images drawn three times as often (a manifest listed
  # three times is drawn three times as often: ~71 % of the samples are images), micro-batch 16, 7s's settings. It
  # ran to step 500 of a 1,500-step cosine, which was then shortened to 1,000 steps to fit a sitting; this repeats
  # both parts. Its videos gained (text-to-video speed 89 -> 95-98 %, prompt switching) and its text-to-image lost at
  # seed 0, so it did not ship; the half-and-half weight average with the shipped model, written last, is the
  # candidate to measure (docs/default_model_log.md, stage 7m)
  make_data
  mixed=(infinitystar train generator $C/generator_x2.yaml --set output_dir=$R/generator_stage7m
         --set "model={init_from: $S/transformer}" --set text_encoder.path=$S/text_encoder "${stage7s[@]}"
         --set train.micro_batch=16 --set checkpoint.keep_last=10
         --set "data.manifests=[$D/images.jsonl, $D/images.jsonl, $D/images.jsonl, $D/videos.jsonl,
                                $D/long_videos.jsonl]")
  [ "$(latest_step $R/generator_stage7m)" -ge 500 ] ||
    "${mixed[@]}" $(resume_flag $R/generator_stage7m) --set train.max_steps=1500 --until 500
  [ "$(latest_step $R/generator_stage7m)" -ge 1000 ] || "${mixed[@]}" --resume --set train.max_steps=1000
  M=$R/stage7m_step1000_model
  [ -d $M ] || infinitystar export --raw $R/generator_stage7m/checkpoints/step_00001000 $M --tokenizer $S/tokenizer \
    --defaults "$(cat $C/defaults.json)"
  [ -d $R/stage7m_average_model ] || infinitystar average $S $M --out $R/stage7m_average_model
fi

if [ "$STAGE" = all ]; then
  # 8. the model folder (step 7,300's raw weights) with the tokenizer of 2e
  infinitystar export --raw $R/generator_step_7300 "${OUT:-$R/export}" --tokenizer $R/tokenizer_x2 \
    --defaults "$(cat $C/defaults.json)"
fi
