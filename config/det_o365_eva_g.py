"""
EVA-g detection on Objects365 v1, the intermediate step before COCO and LVIS. EVA-01 released the result
(eva_o365.pth) but not its config; the paper says Objects365 (train and val, about 1.7M images, 365 classes) for
380k steps. Not published, and taken here from the COCO recipe: batch 64, lr 2.5e-5, layer decay 0.9, weight decay
0.1, warmup 500, LSJ at 1280, the lr step at 90% of the run. Boxes only (Objects365 has no masks): the mask head is
added, freshly initialised, when COCO starts from this model.

    torchrun --nnodes 8 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint $HOST:29500 det_seg.py \\
        config/det_o365_eva_g.py --init_from=out/eva_psz16.pt

Objects365 ships COCO-format jsons (zhiyuan_objv2_train.json; v1's objects365_train.json): give its json and image
folder; merge train and val into one json beforehand for EVA's "train + val" run.
Memory per GPU, projected on a CPU at 16 ranks (bench.py --mode=memory, 2026-12-04; allocated / device need):
as shipped (1280, micro-batch 1, checkpointing) at most the COCO recipe's 9.5 / 11.6 GiB (no mask head
here): 24 GB GPUs too.
"""
out_dir = 'out/det_o365'
train_json = 'data/objects365/annotations/objects365_train.json'
train_images = 'data/objects365/train'
val_json = 'data/objects365/annotations/objects365_val.json'
val_images = 'data/objects365/val'
num_classes = 365
masks = False
img_size = 1280
model_size = 'eva_g'
drop_path = 0.6
grad_checkpointing = True
batch_size = 64
micro_batch = 1
max_steps = 380_000
lr_steps = (342_000,)
warmup_iters = 500
lr = 2.5e-5
layer_decay = 0.9
weight_decay = 0.1
eval_interval = 20_000
