#!/usr/bin/env bash
# Pretrain the Stable Diffusion UNet (frozen VAE and text encoder, randomly initialised UNet).
#
#   sh train.sh                      # a GPU machine: PaddleMIX's recipe (sd-v1); otherwise the demo
#   DRY_RUN=1 sh train.sh            # print the recipe, its settings and the launch command; run nothing
#   FILE_LIST=./processed_data/filelist/custom_dataset.filelist.list sh train.sh   # sd-v1 on your data
#   MAX_STEPS=200 sh train.sh        # any setting below can be overridden from the environment
#   PRESET=long sh train.sh          # demo, 4500 steps instead of 3000 (docs/results.md)
#   sh train.sh --use_ema True       # extra arguments go to train_txt2img_laion400m_trainer.py (they win)
#   GPUS=0,1,2,3,4,5,6,7 sh train.sh # 8 GPUs;  add IPS=10.0.0.1,10.0.0.2 for several machines
#   NPROC=1 sh train.sh              # one CPU process (the demo runs 2, one per core, when it can)
#   ELASTIC=etcd://10.0.0.1:2379 NNODES=1:2 sh train.sh  # on every node: survives losing one (docs/elastic.md)
#
# The demo needs no download: it trains the tiny UNet of the offline kit the repository ships
# (./tiny-sd; KIT_BUILD=1 rebuilds it) on the demo shapes data (./data, PaddleMIX's demo layout, made once).
if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi  # `sh train.sh` (dash) → bash
set -euo pipefail
cd "$(dirname "$0")"

# --- which recipe -------------------------------------------------------------------------------
RECIPE=${RECIPE:-auto}                                   # auto | demo | sd-v1; auto = sd-v1 on a GPU machine, else demo
GPU_COUNT=${GPU_COUNT:-}                                 # GPUs to assume instead of asking paddle ("" = ask), e.g.
                                                         #   DRY_RUN=1 GPU_COUNT=8 on a login node: a GPU job's command
DRY_RUN=${DRY_RUN:-0}                                    # 1: print recipe, settings, launch command; run nothing
KIT_DIR=${KIT_DIR:-./tiny-sd}                            # the offline kit (demo): shipped; built if missing
KIT_BUILD=${KIT_BUILD:-0}                                # 1: rebuild KIT_DIR first (python -m sd.kit; docs/models.md)
PRESET=${PRESET:-}                                       # demo: "" (3000 steps) | long (4500 steps)
# --- data and output ----------------------------------------------------------------------------
FILE_LIST=${FILE_LIST:-./data/filelist/train.filelist.list}  # *.filelist.list to train on (demo: made when missing)
DEMO_IMAGES=${DEMO_IMAGES:-4000}                         # demo images made when FILE_LIST is the missing default
OUTPUT_DIR=${OUTPUT_DIR:-./laion400m_pretrain_output_trainer}  # checkpoints, VisualDL logs (runs/), sample grids (images/)
# --- distribution -------------------------------------------------------------------------------
GPUS=${GPUS:-}                                           # e.g. 0,1,2,3,4,5,6,7: run under paddle.distributed.launch
IPS=${IPS:-}                                             # e.g. 10.0.0.1,10.0.0.2: several machines (with GPUS)
NPROC=${NPROC:-}                                         # CPU data-parallel processes (gloo) when no GPUS;
                                                         #   default 1, the demo 2 on a machine with ≥ 2 cores
ELASTIC=${ELASTIC:-}                                     # etcd://HOST:PORT: elastic launch, survives a lost node
                                                         #   (pip install -r requirements-elastic.txt; docs/elastic.md)
NNODES=${NNODES:-1:2}                                    # with ELASTIC: MIN:MAX nodes the job runs on
JOB_ID=${JOB_ID:-sd-pretrain}                            # with ELASTIC: one name per job (etcd prefix /paddle/JOB_ID)
MAX_RESTART=${MAX_RESTART:-3}                            # with ELASTIC: restarts before the launcher gives up
ELASTIC_TIMEOUT=${ELASTIC_TIMEOUT:-30}                   # with ELASTIC: seconds the node count must hold (≥ 10)
NODE_NAME=${NODE_NAME:-$(hostname)}                      # with ELASTIC: this node's launch logs: launch_logs/NODE_NAME
# --- training: default for sd-v1 | demo ---------------------------------------------------------
# PRETRAINED         SD folder or hub name: vae/ text_encoder/ tokenizer/     CompVis/stable-diffusion-v1-4 | KIT_DIR
#                    scheduler/ (a name downloads: docs/models.md)
# UNET_CONFIG        UNet config .json (random init) or a UNet folder         ./unet_config.json | KIT_DIR/unet/config.json
# RESOLUTION         training image side, pixels                              256 | 32
# BATCH_SIZE         images per device per step                               32 | 16
# MAX_STEPS          optimizer steps                                          200000 | 3000 (PRESET=long: 4500)
# LR                 peak learning rate (AdamW)                               1e-4 | 6e-3
# LR_SCHEDULER       constant | linear | cosine | ...                         constant | constant
# WARMUP_STEPS       linear warm-up steps                                     0 | 0
# SAVE_STEPS         checkpoint every N steps                                 10000 | 500
# IMAGE_LOGGING_STEPS  sample grid every N steps (multiple of LOGGING_STEPS)  1000 | 1000
# FIRST_IMAGE_LOGGING_STEP  one more sample grid at this step (0 = none)      0 | 300
# LOGGING_STEPS      log loss, LR, speed every N steps                        10 | 50
# NUM_WORKERS        data loader worker processes (per GPU or process)        2 | 1
# SNR_GAMMA          Min-SNR-γ loss weighting ("" = off)                      off | 5.0
# NOISE_OFFSET       offset-noise scale (0 = off)                             0 | 0.1
# NUM_INFERENCE_STEPS  DDIM steps of the logged samples                       50 | 25
# EMA_DECAY          decay of the UNet's EMA (used when EMA is on)            0.9999 | 0.999
# BF16               bf16 mixed precision (A100/3090-class GPUs)              False | (CPU: no effect)
# FROZEN_INFERENCE   frozen VAE encoder + text encoder via Paddle Inference   False | True
# FLAG_USE_EMA, FLAG_RECOMPUTE, FLAG_XFORMERS, FLAG_FUSED_LINEAR: PaddleMIX's switches (0/1). sd-v1 exports
#   PaddleMIX's values (0, 1, 1, 0) unless set (without a GPU, FLAG_XFORMERS, FLAG_FUSED_LINEAR and BF16 are
#   forced off, said in one line), demo FLAG_USE_EMA=1 (the EMA UNet, unet/*.ema.safetensors, samples
#   better after 1000 steps); a --flag on the command line beats them.
# CPU_THREADS        threads of Paddle's CPU kernels per process (--cpu_threads)  sd-v1 without a GPU: cores per
#                    process | Paddle's (one)
# Also: GRAD_ACCUM (1), WEIGHT_DECAY (0.01), ADAM_BETA2 (0.999: AdamW's second-moment decay), SAVE_TOTAL_LIMIT (20),
#   SEED (23), MODEL_MAX_LENGTH (77), MAX_GRAD_NORM (-1 = no clipping), DISABLE_TQDM (True | False).

if [ -z "$GPU_COUNT" ]; then
  GPU_COUNT=$(python -c "import paddle
print(paddle.device.cuda.device_count() if paddle.is_compiled_with_cuda() else 0)" 2>/dev/null || echo 0)
fi
case "$GPU_COUNT" in
  ''|*[!0-9]*) echo "error: GPU_COUNT=$GPU_COUNT: give a number of GPUs (0 for none)" >&2; exit 2 ;;
esac
case "$RECIPE" in
  auto) if [ "$GPU_COUNT" -gt 0 ]; then RECIPE=sd-v1; else RECIPE=demo; fi ;;
  demo|sd-v1) ;;
  *) echo "error: RECIPE=$RECIPE: unknown; use auto (sd-v1 on a GPU machine, else demo), demo or sd-v1" >&2; exit 2 ;;
esac
if [ "$DRY_RUN" = 1 ]; then echo "recipe: $RECIPE (GPUs: $GPU_COUNT)"; fi

prepare() {  # prepare WHAT COMMAND...: a one-off step before training; with DRY_RUN=1 only named
  if [ "$DRY_RUN" = 1 ]; then echo "prepare: $1"; else echo "== $1"; "${@:2}"; fi
}
make_demo_data() {  # the demo shapes in PaddleMIX's demo layout: ./data/filelist/train.filelist.list
  python -m sd.data.demo_data --output_dir ./data/demo_raw --num_images "$DEMO_IMAGES" --size 64 --seed 0
  python create_pretraining_data.py --input_path ./data/demo_raw/demo.jsonl --output_path ./data \
    --output_name laion400m_en --per_part_file_num 1000 --save_gzip_file --overwrite
  echo "data/filelist/laion400m_en.filelist" > ./data/filelist/train.filelist.list
}

cores=$(python -c "import os; print(len(os.sched_getaffinity(0)))")  # not nproc: it obeys OMP_NUM_THREADS
if [ "$RECIPE" = sd-v1 ]; then
  # PaddleMIX's single-GPU recipe (section 4.2): 256 px, batch 32 per GPU, 200 000 steps.
  if [ ! -f "$FILE_LIST" ]; then
    echo "error: FILE_LIST=$FILE_LIST: no such file; RECIPE=sd-v1 trains on your data: make it with" \
      "python create_pretraining_data.py --input_path DATA.jsonl --output_path DIR --save_gzip_file (docs/data.md)," \
      "then FILE_LIST=DIR/filelist/custom_dataset.filelist.list" >&2
    exit 2
  fi
  PRETRAINED=${PRETRAINED:-CompVis/stable-diffusion-v1-4}
  UNET_CONFIG=${UNET_CONFIG:-./unet_config.json}
  RESOLUTION=${RESOLUTION:-256}; BATCH_SIZE=${BATCH_SIZE:-32}; MAX_STEPS=${MAX_STEPS:-200000}
  LR=${LR:-1e-4}; SAVE_STEPS=${SAVE_STEPS:-10000}; IMAGE_LOGGING_STEPS=${IMAGE_LOGGING_STEPS:-1000}
  FIRST_IMAGE_LOGGING_STEP=${FIRST_IMAGE_LOGGING_STEP:-0}; FROZEN_INFERENCE=${FROZEN_INFERENCE:-False}
  # PaddleMIX uses 4 loader workers; 2 feed a GPU with 2× headroom: ≥ 219 samples per CPU-second each at 256 px,
  # 150 needed (docs/performance.md, "Loader workers per GPU")
  LOGGING_STEPS=${LOGGING_STEPS:-10}; NUM_WORKERS=${NUM_WORKERS:-2}
  SNR_GAMMA=${SNR_GAMMA:-}; NOISE_OFFSET=${NOISE_OFFSET:-0}; NUM_INFERENCE_STEPS=${NUM_INFERENCE_STEPS:-50}
  DISABLE_TQDM=${DISABLE_TQDM:-True}; EMA_DECAY=${EMA_DECAY:-0.9999}
  export FLAG_USE_EMA=${FLAG_USE_EMA:-0} FLAG_RECOMPUTE=${FLAG_RECOMPUTE:-1} FLAG_XFORMERS=${FLAG_XFORMERS:-1}
  export FLAG_FUSED_LINEAR=${FLAG_FUSED_LINEAR:-0}
  if [ "$GPU_COUNT" -gt 0 ]; then
    export FLAGS_conv_workspace_size_limit=${FLAGS_conv_workspace_size_limit:-4096}  # cuDNN workspace, MB
  else
    # The trainer would switch these off too (sd_args.finalize), one warning each: one line here instead.
    off=""
    case "${FLAG_XFORMERS,,}" in
      1|true|yes|on) off+=", FLAG_XFORMERS (memory-efficient attention)"; FLAG_XFORMERS=0 ;;
    esac
    case "${FLAG_FUSED_LINEAR,,}" in 1|true|yes|on) off+=", FLAG_FUSED_LINEAR"; FLAG_FUSED_LINEAR=0 ;; esac
    case "${BF16:-False}" in [Tt]rue|1) off+=", BF16 (training in fp32)"; BF16=False ;; esac
    if [ -n "$off" ]; then echo "== RECIPE=sd-v1 without a GPU: GPU-only settings forced off: ${off#, }" >&2; fi
    # Paddle's CPU kernels run one thread per process unless told: the processes share the cores (one process,
    # 2 threads: a real-size step 1.3-1.5× faster, docs/performance.md)
    CPU_THREADS=${CPU_THREADS:-$(( cores / ${NPROC:-1} > 1 ? cores / ${NPROC:-1} : 1 ))}
  fi
else
  # demo, the embedded CPU default: the offline kit and the demo shapes, ≈ 10 minutes of training on 2 idle cores.
  # Paddle's CPU kernels use about one core per process, so the default trains 2 data-parallel
  # processes, one per core: twice the images in the same time (docs/ablation.md). NPROC=1 for one
  # process. A high LR and small batches (more updates per image) are what learn shape within the 10 minutes
  # (docs/ablation.md: the LR series; docs/results.md: batch 16).
  NPROC=${NPROC:-$(( cores >= 2 ? 2 : 1 ))}
  PRETRAINED=${PRETRAINED:-$KIT_DIR}
  UNET_CONFIG=${UNET_CONFIG:-$PRETRAINED/unet/config.json}
  case "$PRESET" in
    "") DEFAULT_STEPS=3000 ;;
    long) DEFAULT_STEPS=4500 ;;  # a margin over the default's figures (docs/results.md)
    *) echo "PRESET=$PRESET: unknown (use long, or leave it unset)" >&2; exit 2 ;;
  esac
  RESOLUTION=${RESOLUTION:-32}; BATCH_SIZE=${BATCH_SIZE:-16}; MAX_STEPS=${MAX_STEPS:-$DEFAULT_STEPS}
  LR=${LR:-6e-3}; SAVE_STEPS=${SAVE_STEPS:-500}; IMAGE_LOGGING_STEPS=${IMAGE_LOGGING_STEPS:-1000}
  # a first grid about a minute into training on 2 idle cores (≈ 4.7 steps/s: 65 s measured)
  FIRST_IMAGE_LOGGING_STEP=${FIRST_IMAGE_LOGGING_STEP:-300}
  # the frozen encoders through Paddle Inference: a faster step (docs/performance.md); outputs ≈ 1e-6 from eager
  FROZEN_INFERENCE=${FROZEN_INFERENCE:-True}
  LOGGING_STEPS=${LOGGING_STEPS:-50}; NUM_WORKERS=${NUM_WORKERS:-1}
  SNR_GAMMA=${SNR_GAMMA-5.0}; NOISE_OFFSET=${NOISE_OFFSET:-0.1}; NUM_INFERENCE_STEPS=${NUM_INFERENCE_STEPS:-25}
  export FLAG_USE_EMA=${FLAG_USE_EMA:-1}; EMA_DECAY=${EMA_DECAY:-0.999}  # with the EMA warm-up min(decay, (1+n)/(10+n)) the decay is 0.997 at step 3000 (≈ the last 330 steps)
  if [ "$PRETRAINED" = "$KIT_DIR" ] && { [ "$KIT_BUILD" = 1 ] || [ ! -f "$KIT_DIR/model_index.json" ]; }; then
    prepare "building the offline kit in $KIT_DIR" python -m sd.kit --output_dir "$KIT_DIR"
  fi
  if [ "$PRETRAINED" = "$KIT_DIR" ] && [ ! -f "$KIT_DIR/unet/diffusion_paddle_model.safetensors" ]; then
    # not shipped: a function of unet/config.json and the seed (seconds)
    prepare "writing the kit's untrained UNet weights ($KIT_DIR/unet)" python -m sd.kit --unet_init "$KIT_DIR"
  fi
  if [ ! -f "$FILE_LIST" ] && [ "$FILE_LIST" = ./data/filelist/train.filelist.list ]; then
    prepare "making the demo shapes dataset in ./data (once)" make_demo_data
  fi
fi

LOG_DIR=$OUTPUT_DIR/launch_logs
if [ -n "$ELASTIC" ]; then
  case "$ELASTIC" in etcd://*) ;; *) echo "error: ELASTIC=$ELASTIC: give the etcd server as etcd://HOST:PORT" >&2; exit 2 ;; esac
  if [ -n "$IPS" ]; then echo "error: ELASTIC and IPS exclude each other: the nodes meet in etcd" >&2; exit 2; fi
  LOG_DIR=$OUTPUT_DIR/launch_logs/$NODE_NAME
  devices=$([ -n "$GPUS" ] && echo "--gpus $GPUS" || echo "--nproc_per_node ${NPROC:-1}")
  LAUNCH="python -u -m paddle.distributed.launch --master $ELASTIC --nnodes $NNODES $devices --job_id $JOB_ID
    --elastic_level 1 --max_restart $MAX_RESTART --elastic_timeout $ELASTIC_TIMEOUT --log_dir $LOG_DIR"
elif [ -n "$GPUS" ]; then
  LAUNCH="python -u -m paddle.distributed.launch --gpus $GPUS ${IPS:+--ips $IPS} --log_dir $LOG_DIR"
elif [ "${NPROC:-1}" -gt 1 ]; then  # the CPU build takes --nproc_per_node, not --gpus/--devices
  LAUNCH="python -u -m paddle.distributed.launch --nproc_per_node $NPROC --log_dir $LOG_DIR"
else
  LAUNCH="python -u"
fi

# shellcheck disable=SC2206  # LAUNCH is a word list on purpose
COMMAND=($LAUNCH train_txt2img_laion400m_trainer.py
  --do_train
  --output_dir "$OUTPUT_DIR"
  --pretrained_model_name_or_path "$PRETRAINED"
  --unet_name_or_path "$UNET_CONFIG"
  --file_list "$FILE_LIST"
  --resolution "$RESOLUTION"
  --per_device_train_batch_size "$BATCH_SIZE"
  --gradient_accumulation_steps "${GRAD_ACCUM:-1}"
  --learning_rate "$LR"
  --weight_decay "${WEIGHT_DECAY:-0.01}"
  --max_steps "$MAX_STEPS"
  --lr_scheduler_type "${LR_SCHEDULER:-constant}"
  --adam_beta2 "${ADAM_BETA2:-0.999}"
  --warmup_steps "${WARMUP_STEPS:-0}"
  --image_logging_steps "$IMAGE_LOGGING_STEPS"
  --first_image_logging_step "$FIRST_IMAGE_LOGGING_STEP"
  --frozen_inference "$FROZEN_INFERENCE"
  --logging_steps "$LOGGING_STEPS"
  --save_steps "$SAVE_STEPS"
  --save_total_limit "${SAVE_TOTAL_LIMIT:-20}"
  --seed "${SEED:-23}"
  --dataloader_num_workers "$NUM_WORKERS"
  --model_max_length "${MODEL_MAX_LENGTH:-77}"
  --max_grad_norm "${MAX_GRAD_NORM:--1}"
  --disable_tqdm "${DISABLE_TQDM:-False}"
  --bf16 "${BF16:-False}"
  --noise_offset "$NOISE_OFFSET"
  ${SNR_GAMMA:+--snr_gamma "$SNR_GAMMA"}
  --num_inference_steps "$NUM_INFERENCE_STEPS"
  --ema_decay "$EMA_DECAY"
  ${CPU_THREADS:+--cpu_threads "$CPU_THREADS"}
  "$@")

if [ "$DRY_RUN" = 1 ]; then
  switches="FLAG_USE_EMA FLAG_RECOMPUTE FLAG_XFORMERS FLAG_FUSED_LINEAR FLAGS_conv_workspace_size_limit"
  echo "environment:$(for v in $switches; do if [ -n "${!v+x}" ]; then printf ' %s=%q' "$v" "${!v}"; fi; done)"
  echo "command:$(printf ' %q' "${COMMAND[@]}")"
  exit 0
fi
set +e
"${COMMAND[@]}"
rc=$?
if [ "$rc" -ne 0 ] && [ -d "$LOG_DIR" ] && [ "$LAUNCH" != "python -u" ]; then
  # The launcher reports whichever rank it saw fail first, often a peer that aborted because another
  # rank was gone; each rank that failed by itself logged "rank N failed: <cause>".
  echo "== training failed (exit $rc); ranks that failed by themselves:" >&2
  grep -h "^rank [0-9]* failed: " "$LOG_DIR"/workerlog.* >&2 \
    || echo "   none logged a cause (killed?); see $LOG_DIR/workerlog.*" >&2
fi
exit "$rc"
