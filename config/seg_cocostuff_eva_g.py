"""
EVA-g semantic segmentation on COCO-Stuff-164K, EVA-01's recipe (seg/configs/coco_stuff164k/
eva_mask2former_896_60k_cocostuff164k_ss.py): the patch-16 encoder at 896 crops, mmseg's pipeline, AdamW lr 1.5e-5
with layer decay 0.95, poly decay after a 1,500-step warmup, batch 32, 60k steps, sliding windows of 896 at stride 512.

    python model.py psz14to16 out/pretrain_eva_g/eva_mim.pt out/eva_psz16.pt
    torchrun --nproc_per_node 8 det_seg.py config/seg_cocostuff_eva_g.py --init_from=out/eva_psz16.pt

Data (mmseg's layout): data/coco_stuff164k/images/{train2017,val2017}/*.jpg and annotations/{train2017,val2017}/*.png,
the raw stuffthingmaps (ids 0-181, mapped here to the 171 train ids; mmseg-converted '_labelTrainIds.png' files:
--label_suffix=_labelTrainIds.png --label_map='').
Model (EVA-01's): the encoder with a ViT-Adapter (interactions after blocks 9, 19, 29, 39; 16 deformable heads, 4
points, value ratio 0.5, ConvFFN ratio 0.25, stem 64) under Mask2Former (200 queries, 8 decoder layers, 6 deformable
pixel-decoder layers, 1024 channels). --adapter=False: the plain encoder through BEiT's fpn1-fpn4; --seg_head=upernet.
Expected: 53.4 mIoU (the paper's Table 8; EVA-01 seg/README.md: mIoU 53.36, aAcc 74.08, mAcc 66.09).
Memory per GPU, projected on a CPU at 16 ranks (bench.py --mode=memory, 2026-12-04; allocated / device need):
as the ADE20K recipe (896, micro-batch 1, checkpointing): 11.5 / 13.8 GiB, 24 GB GPUs too.
"""
task = 'seg'
out_dir = 'out/seg_cocostuff'
train_images = 'data/coco_stuff164k/images/train2017'
train_labels = 'data/coco_stuff164k/annotations/train2017'
val_images = 'data/coco_stuff164k/images/val2017'
val_labels = 'data/coco_stuff164k/annotations/val2017'
label_map = 'cocostuff'
num_classes = 171
img_size = 896
seg_scale = (3584, 896)
test_stride = 512
model_size = 'eva_g'
drop_path = 0.5
grad_checkpointing = True
taps = (9, 19, 29, 39)
seg_head = 'mask2former'
seg_channels = 1024
queries = 200
dec_layers = 8
enc_layers = 6
attn_heads = 32
ffn_dim = 4096
train_points = 12544
adapter = True
adapter_heads = 16
adapter_inplanes = 64
batch_size = 32
micro_batch = 1
max_steps = 60_000
schedule = 'poly'
warmup_iters = 1500
warmup_factor = 1e-6
lr = 1.5e-5
layer_decay = 0.95
weight_decay = 0.05
eval_interval = 8000
save_interval = 2000
