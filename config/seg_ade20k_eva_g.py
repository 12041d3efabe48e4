"""
EVA-g semantic segmentation on ADE20K from the COCO-Stuff model, EVA-01's recipe (seg/configs/ade20k/
eva_mask2former_896_20k_coco164k2ade20k_ss.py): 896 crops, AdamW lr 2.5e-5 with layer decay 0.95, poly decay after a
500-step warmup, batch 64, 20k steps; single-scale sliding windows, or 7 scales with flips (_ms.py).

    torchrun --nproc_per_node 8 det_seg.py config/seg_ade20k_eva_g.py --init_from=out/seg_cocostuff/last.pt
    torchrun --nproc_per_node 8 det_seg.py config/seg_ade20k_eva_g.py --eval_only=True \\
        --init_from=out/seg_ade20k/last.pt --test_flip=True \\
        --test_ratios='(0.5714, 0.7143, 0.8571, 1.0, 1.1429, 1.2857, 1.4286)'            # EVA-01's multi-scale test

Data (mmseg's layout): data/ade/ADEChallengeData2016/images/{training,validation}/*.jpg and
annotations/{training,validation}/*.png (0 = 'other', ignored: reduce_zero_label).
Expected: the paper's 61.5 single-scale / 62.3 multi-scale mIoU (Table 8) are EVA-01's Mask2Former head (as here) on
a ViT-Adapter, which is not built yet: here Mask2Former reads the plain encoder through fpn1-fpn4, a setting EVA-01
published no number for (EVA-02-L, plain, with UperNet at 512: 59.8 / 60.4, EVA-02's seg README).
"""
task = 'seg'
out_dir = 'out/seg_ade20k'
train_images = 'data/ade/ADEChallengeData2016/images/training'
train_labels = 'data/ade/ADEChallengeData2016/annotations/training'
val_images = 'data/ade/ADEChallengeData2016/images/validation'
val_labels = 'data/ade/ADEChallengeData2016/annotations/validation'
label_map = 'reduce_zero_label'
num_classes = 150
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
batch_size = 64
micro_batch = 1
max_iters = 20_000
schedule = 'poly'
warmup_iters = 500
warmup_factor = 1e-6
lr = 2.5e-5
layer_decay = 0.95
weight_decay = 0.05
eval_interval = 4000
save_interval = 2000
