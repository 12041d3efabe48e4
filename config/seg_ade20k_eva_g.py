"""
EVA-g semantic segmentation on ADE20K from the COCO-Stuff model, EVA-01's recipe (seg/configs/ade20k/
eva_mask2former_896_20k_coco164k2ade20k_ss.py): 896 crops, AdamW lr 2.5e-5 with layer decay 0.95, poly decay after a
500-step warmup, batch 64, 20k steps; single-scale sliding windows, or 7 scales with flips (_ms.py).

    torchrun --nproc_per_node 8 det_seg.py config/seg_ade20k_eva_g.py --init_from=out/seg_cocostuff/last.pt
    torchrun --nproc_per_node 8 det_seg.py config/seg_ade20k_eva_g.py --eval_only=True \\
        --init_from=out/seg_ade20k/last.pt --test_flip=True \\
        --test_ratios='(0.5714286, 0.7142858, 0.8571429, 1.0, 1.1428572, 1.2857143, 1.4285715)'  # 512/896 ... 1280/896

Data (mmseg's layout): data/ade/ADEChallengeData2016/images/{training,validation}/*.jpg and
annotations/{training,validation}/*.png (0 = 'other', ignored: reduce_zero_label).
Model: as config/seg_cocostuff_eva_g.py (ViT-Adapter + Mask2Former); the COCO-Stuff model's classifier (171 + 1)
starts afresh for 150 + 1 classes.
Expected: 61.5 mIoU single-scale / 62.3 multi-scale (the paper's Table 8; EVA-01 seg/README.md's single-scale
evaluation of the released model: mIoU 61.47, aAcc 87.15, mAcc 75.75).
Memory per GPU, projected on a CPU at 16 ranks (bench.py --mode=memory, 2026-12-04; allocated / device need):
as shipped (896, micro-batch 1, checkpointing: the backbone, the adapter and the pixel decoder's layers) 11.5 /
13.8 GiB: 24 GB GPUs too; at --micro_batch=2 15.8 / 18.5 GiB.
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
adapter = True
adapter_heads = 16
adapter_inplanes = 64
batch_size = 64
micro_batch = 1
max_steps = 20_000
schedule = 'poly'
warmup_iters = 500
warmup_factor = 1e-6
lr = 2.5e-5
layer_decay = 0.95
weight_decay = 0.05
eval_interval = 4000
save_interval = 2000
