"""
Tiny detection and instance segmentation on synthetic scenes (1-4 shapes of 4 kinds per 128 px image, later shapes
occluding earlier ones), from scratch, on a CPU: the scenes are real PNGs + a COCO json (written once to
data/synthetic_scenes), evaluated by COCOeval.

    python det_seg.py config/det_tiny.py

Expected: see README (box and mask AP measured on 2 CPU cores); tests/test_det.py holds a shortened run above a bar.
"""
out_dir = 'out/det_tiny'
keep_ckpts = 1  # demo outputs stay small
log_interval = 10
eval_interval = 0  # only at the end
save_interval = 1000
train_json = 'synthetic'
val_json = 'synthetic'
synthetic_size = 512
num_classes = 4
img_size = 128
lsj_scale = (0.5, 1.5)  # a narrower jitter than the official 0.1-2.0: 128 px scenes shrunk 10x keep nothing
num_workers = 1
model_size = 'eva_tiny'  # 64 wide, 2 blocks (patch 16 here: an 8 x 8 token grid)
drop_path = 0.0
grad_checkpointing = False
window = 4  # 2 x 2 windows in block 0, global attention in block 1
global_blocks = (1,)
pyramid_dim = 32  # (64 trains 1.6x slower on a CPU: ROIAlign's backward into the maps dominates)
anchor_sizes = (16, 32, 64, 128, 256)  # the official 32-512 scaled to the small image
rpn_batch = 64
rpn_pre_nms = (300, 300)
rpn_post_nms = 100
roi_batch = 64
head_dim = 32
fc_dim = 128
canonical_box = 56  # the official 224 scaled: boxes of 14-112 px spread over p2 ... p4
batch_size = 8
micro_batch = 8
max_steps = 300
lr_steps = (250,)
warmup_iters = 50
lr = 5e-4  # from scratch: far above the fine-tuning 2.5e-5
layer_decay = 1.0
weight_decay = 0.05
dtype = 'fp32'
