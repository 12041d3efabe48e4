"""
EVA-g/14 MIM pretraining, the paper's recipe (EVA paper sec. 2.1 and Table 13; EVA-01 pretraining scripts).

    torchrun --nnodes 16 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint $HOST:29500 \
        pretrain.py config/pretrain_eva_g.py \
        --data_path=/data/in21k,/data/cc12m,/data/cc3m,/data/coco,/data/o365,/data/ade20k \
        --val_data_path=/data/imagenet/val

Arithmetic: 16 nodes x 8 GPUs x micro-batch 32 = global batch 4096, no gradient accumulation (on one node of 8
GPUs the same global batch takes 16 accumulation steps). merged-30M = 29.6M images -> 7,226 steps per epoch;
150 epochs = 1,083,900 steps, warmup 2 epochs = 14,452 steps; ~4.4B images seen in all.
Expected: training loss about -0.75 and validation loss (every other patch masked) about -0.78 at the end.
Memory per GPU, projected on a CPU at 16 ranks (bench.py --mode=memory, 2026-12-04; allocated / device need):
as shipped (no checkpointing, micro-batch 32) 20.1 / 23.3 GiB: 40 GB A100s, the paper's; on 24 GB GPUs add
--grad_checkpointing=True: 6.9 / 8.7 GiB (22% slower on an H200).
"""
out_dir = 'out/pretrain_eva_g'
data_path = 'merged-30M: set --data_path to the six roots joined by commas'
val_data_path = ''
num_workers = 10
img_size = 224
crop_scale = (0.2, 1.0)
num_mask_patches = 105
min_mask_patches = 16
model_size = 'eva_g'
drop_path = 0.1
init_std = 0.015  # EVA-01's eva_g_patch14 MIM model
init_trunc = 1.0  # its trunc_normal_(a=-std, b=std): each draw cut at +-1 std
teacher_model = 'ViT-L-14'
teacher_pretrained = 'openai'
batch_size = 4096
micro_batch = 32
epochs = 150
warmup_epochs = 2.0
lr = 1e-3
min_lr = 1e-5
weight_decay = 0.05
beta1 = 0.9
beta2 = 0.98
eps = 1e-6
grad_clip = 3.0
dtype = 'fp16'
zero_stage = 1
eval_interval = 5000
ckpt_interval = 2000
