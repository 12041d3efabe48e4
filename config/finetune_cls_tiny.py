"""
Tiny classification on the synthetic shapes (10 classes), from scratch, on a CPU.

    python finetune_cls.py config/finetune_cls_tiny.py

Expected: about 33% top-1 (chance 10%) and 86% top-5 on 500 held-out synthetic images after 640 steps, in
1.5-2.5 minutes on 2 CPU cores; tests/test_finetune_cls.py holds it to > 25%. A 2-block 64-wide ViT from scratch
learns these shapes slowly: this config shows the machinery (layer decay, EMA, exact evaluation), not EVA's accuracy.
"""
out_dir = 'out/finetune_cls_tiny'
keep_ckpts = 1  # demo outputs stay small; the last checkpoint is what a resume needs
log_interval = 20
data_path = 'synthetic'
val_data_path = 'synthetic:1'
num_classes = 10
synthetic_size = 8192
val_size = 500
num_workers = 0
img_size = 32
crop_scale = (0.8, 1.0)
rand_augment = False
mixup = 0.0
cutmix = 0.0
label_smoothing = 0.1
model_size = 'eva_tiny'
drop_path = 0.0
freeze_patch_embed = False
ema_decay = 0.99
batch_size = 64
micro_batch = 64
epochs = 5
warmup_epochs = 0.5
lr = 1e-3
min_lr = 1e-5
layer_decay = 1.0
weight_decay = 0.05
