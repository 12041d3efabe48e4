"""
EVA-g detection and instance segmentation on COCO, EVA-01's recipe (det/projects/ViTDet/configs/COCO/
cascade_mask_rcnn_vitdet_eva.py): ViTDet + Cascade Mask R-CNN at 1280 with large-scale jitter, from the Objects365
model (or, without one, the patch-16 MIM encoder), 45k steps of 64 images on 64 GPUs (EVA-01: 8 nodes x 8).

    torchrun --nnodes 8 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint $HOST:29500 det_seg.py \\
        config/det_coco_eva_g.py --init_from=out/det_o365/last.pt
    python det_seg.py config/det_coco_eva_g.py --eval_only=True --init_from=out/det_coco/last.pt --test_size=1536 \\
        --rel_pos_interp=beit --soft_nms=0.6 --score_thresh=0.0 --maskness=0.5

Expected (EVA-01 det/README.md, 1536 px, soft-NMS, maskness): 64.2 box AP / 55.0 mask AP on COCO val2017 (the
released det and seg models; the paper's Table 6: 64.5 / 55.0 with test-time augmentation).
Memory per GPU, projected on a CPU at 16 ranks (bench.py --mode=memory, 2026-12-04; allocated / device need):
as shipped (1280, micro-batch 1, checkpointing; 50 objects an image, every proposal kept) 9.5 / 11.6
GiB: 24 GB GPUs too.
"""
out_dir = 'out/det_coco'
train_json = 'data/coco/annotations/instances_train2017.json'
train_images = 'data/coco/train2017'
val_json = 'data/coco/annotations/instances_val2017.json'
val_images = 'data/coco/val2017'
num_classes = 80
img_size = 1280
model_size = 'eva_g'
drop_path = 0.6
grad_checkpointing = True
window = 16
global_blocks = (3, 7, 11, 15, 19, 23, 27, 31, 35, 39)
batch_size = 64
micro_batch = 1
max_steps = 45_000
lr_steps = (40_000, 44_999)  # EVA-01's milestones [40000, max_iter - 1]: the last iteration runs at x0.01
warmup_iters = 500
lr = 2.5e-5
layer_decay = 0.9
weight_decay = 0.1
eval_interval = 5000
