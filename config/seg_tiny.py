"""
Tiny semantic segmentation on the synthetic scenes (1-4 shapes of 4 kinds per 128 px image on textured backgrounds,
later shapes occluding earlier ones; class 0 the background), from scratch, on a CPU, with the paper's model in
miniature (a 2-block EVA, a ViT-Adapter, Mask2Former): the scenes are real PNGs with label PNGs (written once to
data/synthetic_scenes, shared with det_tiny), through mmseg's pipeline and its sliding-window mIoU.

    python det_seg.py config/seg_tiny.py

Expected: see README (mIoU measured on 2 CPU cores); tests/test_seg.py holds a shortened run above a bar.
"""
task = 'seg'
out_dir = 'out/seg_tiny'
keep_ckpts = 1  # demo outputs stay small
log_interval = 10
eval_interval = 0  # only at the end
save_interval = 1000
train_labels = 'synthetic'
val_labels = 'synthetic'
synthetic_size = 512
num_classes = 5  # the background and 4 shapes
img_size = 128  # the crop (the scenes' own size)
seg_scale = (512, 128)  # the official (3584, 896) scaled to the scenes: 64-256 px short sides in training
test_stride = 64
num_workers = 1
model_size = 'eva_tiny'  # 64 wide, 2 blocks (patch 16: an 8 x 8 token grid)
drop_path = 0.0
grad_checkpointing = False
taps = (0, 0, 1, 1)  # 2 blocks, each ending two of the adapter's intervals (two without a block) / feeding two levels
seg_head = 'mask2former'  # --seg_head=upernet: UperNet (README: all three)
adapter = True  # the ViT-Adapter; --adapter=False: the plain encoder through fpn1-fpn4
adapter_heads = 4
adapter_inplanes = 16
seg_channels = 32  # GroupNorm's 32 groups: a multiple of 32
queries = 20
dec_layers = 3  # one visit to each level
enc_layers = 2
attn_heads = 4
ffn_dim = 128
train_points = 1024  # the 32 x 32 stride-4 mask's pixel count
batch_size = 8
micro_batch = 8
max_steps = 300
schedule = 'poly'
warmup_iters = 50
warmup_factor = 1e-6
lr = 5e-4  # from scratch: far above the fine-tuning 1.5e-5
layer_decay = 1.0
weight_decay = 0.05
dtype = 'fp32'
