"""
Tiny EVA-CLIP on the synthetic shapes and their captions ('a small red circle on a striped background'): a 2-block
64-wide EVA and a 2-block 64-wide text transformer, both from scratch, on a CPU.

    python train_clip.py config/clip_tiny.py

Expected: the loss falls from ln(64) = 4.16 to 1.55-1.57, and zero-shot classification of 1,000 held-out
synthetic images (10 shapes, prompts in the captions' grammar, chance 10%) reaches 18.6-19.1% top-1, 74-76% top-5,
in about 2.5-4.5 minutes on 2 CPU cores; tests/test_clip.py holds it to > 14% top-1 (4 standard deviations above
chance). Two tiny towers from scratch learn colours and textures before shapes: this config shows the machinery
(gathered InfoNCE, prompt ensembles, export), not EVA-CLIP's accuracy. Writes
out/clip_tiny/clip.pt and out/clip_tiny/open_clip/ (the README shows how open_clip loads it).
"""
out_dir = 'out/clip_tiny'
keep_ckpts = 1  # demo outputs stay small; the last checkpoint is what a resume needs
log_interval = 20
eval_interval = 300
train_data = 'synthetic'
synthetic_size = 16384
num_workers = 0
img_size = 32
crop_scale = (0.8, 1.0)
zeroshot_data = 'synthetic:1'
zeroshot_size = 1000
model_size = 'eva_tiny'
text_size = 'tiny'
embed_dim = 64
text_init_from = ''  # no OpenAI weights offline: both towers start from random
drop_path = 0.0
grad_checkpointing = False
batch_size = 64
micro_batch = 64
samples_seen = 64 * 600
warmup_steps = 50
lr = 2e-3
text_lr = 2e-3
layer_decay = 1.0
text_layer_decay = 1.0
