"""
EVA-g on Kinetics-700 at 16 frames from the Kinetics-722 model (EVA paper Table 5; EVA-01 video's
kinetics700_ft.yaml): a constant lr of 1e-6 with layer decay 0.95, drop path 0.2, no mixup, 2 epoch(s).

    torchrun --nnodes 16 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint $HOST:29500 finetune_video.py \
        config/finetune_k700.py --init_from=out/finetune_k722/best.pt
    python finetune_video.py config/finetune_k700.py --eval_only=True --init_from=out/finetune_k700/best.pt

The K722 head's rows are picked for the 700 classes by name (class_names; or head_mapping= EVA-01's
k722_to_k700_mapping.npy, which build_kinetics_lists also writes); pos_embed goes from 8 to 16 frames by trilinear
interpolation on load. Global batch 256 = 128 GPUs x 2 or 256 x 1 (EVA-01's logs: micro-batch 1, 2 accumulation steps).
Expected: 82.9 top-1 / 96.1 top-5 (a third epoch gave 82.7 in the official log) on the 33,914 K700 val videos,
16 frames x 4 clips x 3 crops; the 4 clips are random TSN draws as EVA-01's test (seeded here), so reruns of the
official protocol differ by ~0.2.
Memory per GPU, projected on a CPU at 16 ranks (bench.py --mode=memory, 2026-12-04; allocated / device need):
as shipped (16 frames, micro-batch 2, checkpointing) 6.3 / 8.1 GiB: 24 GB GPUs too.
"""
out_dir = 'out/finetune_k700'
data_path = 'lists/k700_train.txt'
val_data_path = 'lists/k700_val.txt'
data_root = '/data/kinetics'
class_names = 'lists/k700_classes.txt'
num_classes = 700
num_frames = 16
img_size = 224
mixup = 0.0
cutmix = 0.0
label_smoothing = 0.1
model_size = 'eva_g'
drop_path = 0.2
grad_checkpointing = True
batch_size = 256
micro_batch = 2
epochs = 2
warmup_epochs = 0.0
lr = 1e-6
min_lr = 1e-6  # constant
layer_decay = 0.95
weight_decay = 0.05
beta1, beta2, eps = 0.9, 0.98, 1e-6
