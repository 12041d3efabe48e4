"""
Tiny MIM pretraining on the synthetic shapes: a 2-block 64-wide EVA against a small randomly initialised
open_clip tower, on a CPU in under a minute.

    python pretrain.py config/pretrain_tiny.py

Expected: the loss (negative cosine similarity to the teacher's patch features) falls from about 0 to about
-0.72 (validation about -0.75) within the run; writes out/pretrain_tiny/eva_mim.pt, which load_pretrained reads.
"""
out_dir = 'out/pretrain_tiny'
keep_ckpts = 1  # demo outputs stay small; the last checkpoint is what a resume needs
log_interval = 20
eval_interval = 100
ckpt_interval = 100
data_path = 'synthetic'
val_data_path = 'synthetic:1'
synthetic_size = 4096
val_size = 256
num_workers = 0
img_size = 32
num_mask_patches = 26  # ~40% of the 8x8 grid, as 105 of 256
min_mask_patches = 4
model_size = 'eva_tiny'
teacher_model = 'tiny'
batch_size = 32
micro_batch = 32
epochs = 2
warmup_epochs = 0.25
lr = 2e-3
min_lr = 1e-5
