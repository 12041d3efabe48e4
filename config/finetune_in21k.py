"""
EVA-g intermediate fine-tuning on ImageNet-21K at 224 px (EVA paper sec. 3.1 / Table 14; EVA-01 scripts).

    torchrun --nnodes 8 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint $HOST:29500 finetune_cls.py \
        config/finetune_in21k.py --init_from=out/pretrain_eva_g/eva_mim.pt \
        --data_path=/data/imagenet21k/train --val_data_path=/data/imagenet21k/val_holdout

Arithmetic: global batch 4096 = 64 GPUs x micro-batch 64 (on 8 GPUs: micro 32 x 16 accumulation steps).
IN-21K (fall11, 21,841 classes, ~14.2M images) -> ~3,466 steps per epoch, 60 epochs ~208k steps, 15 warmup epochs.
The class index is the sorted WordNet id of the class folder (the order of released 21K heads).
Expected: no number is reported for this stage in the paper; its output initialises the IN-1K fine-tunes, which
reach 89.6 (336 px) and 89.7 (560 px) top-1.
Memory per GPU, projected on a CPU at 16 ranks (bench.py --mode=memory, 2026-12-04; allocated / device need):
as shipped (micro-batch 64, no checkpointing) 34.3 / 38.8 GiB: 40 GB A100s (the paper's), with
little to spare; on 24 GB GPUs add --grad_checkpointing=True: 8.8 / 10.8 GiB.
"""
out_dir = 'out/finetune_in21k'
data_path = '/data/imagenet21k/train'  # class folders or a .txt 'path label' list: yours with --data_path
val_data_path = '/data/imagenet21k/val_holdout'
num_classes = 21841
img_size = 224
crop_scale = (0.5, 1.0)
rand_augment = True
mixup = 0.0
cutmix = 1.0
label_smoothing = 0.1
model_size = 'eva_g'
drop_path = 0.4
freeze_patch_embed = True
ema_decay = 0.0
batch_size = 4096
micro_batch = 64
epochs = 60
warmup_epochs = 15.0
lr = 1e-4
min_lr = 1e-6  # EVA-01's default (its IN-21K script sets none)
layer_decay = 0.85
weight_decay = 0.05
beta1 = 0.9
beta2 = 0.98
eps = 1e-6
dtype = 'fp16'
