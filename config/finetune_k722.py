"""
EVA-g intermediate video fine-tuning on Kinetics-722 at 8 frames, from the MIM model (EVA paper section 2.3.2 and
Table 5; EVA-01 video's kinetics722_intermediate_ft.yaml).

    python data.py build_kinetics_lists /data/kinetics lists     # K722 / K400 / K600 / K700 lists, once
    torchrun --nnodes 16 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint $HOST:29500 finetune_video.py \
        config/finetune_k722.py --init_from=out/pretrain_eva_g/eva_mim.pt

Arithmetic: global batch 256 = 128 GPUs x micro-batch 2 (on 8 GPUs: 2 x 16 accumulation steps). K722 train as
EVA-01 listed it, 629,248 videos -> 2,458 steps per epoch, 40 epochs = 98,320 steps, 5 warmup epochs = 12,290;
cosine from 8e-6 to 8e-8. The official run took ~2.3 days on 128 A100s (26.5 GB per GPU with checkpointing).
Expected: 84.9 top-1 / 96.8 top-5 on K722 val (69,692 videos), 8 frames, 4 clips x 3 crops (one view: 82.8).
Memory per GPU, projected on a CPU at 16 ranks (bench.py --mode=memory, 2026-12-04; allocated / device need):
as shipped (8 frames, micro-batch 2, checkpointing) 5.6 / 7.3 GiB: 24 GB GPUs too (the 26.5 GB above is
EVA-01's code on A100s, not ours, and not yet checked against a GPU run of ours).
"""
out_dir = 'out/finetune_k722'
data_path = 'lists/k722_train.txt'
val_data_path = 'lists/k722_val.txt'
data_root = '/data/kinetics'
class_names = 'lists/k722_classes.txt'
num_classes = 722
num_frames = 8
img_size = 224
mixup = 0.8
cutmix = 1.0
label_smoothing = 0.1
model_size = 'eva_g'
drop_path = 0.3
grad_checkpointing = True
batch_size = 256
micro_batch = 2
epochs = 40
warmup_epochs = 5.0
lr = 8e-6
min_lr = 8e-8
layer_decay = 1.0
weight_decay = 0.05
beta1, beta2, eps = 0.9, 0.98, 1e-6
