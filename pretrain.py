"""
EVA masked image modeling: a ViT student sees an image with ~40% of its patches replaced by a mask token and
regresses, at the masked positions, the patch features of a frozen OpenAI CLIP ViT-L/14 (EVA paper, sec. 2.1).

    python pretrain.py config/pretrain_tiny.py                        # CPU demo, about 30 s
    torchrun --nproc_per_node 8 pretrain.py config/pretrain_eva_g.py  # one node
    torchrun --nnodes 16 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint $HOST:29500 \\
        pretrain.py config/pretrain_eva_g.py                          # the paper's 128 GPUs

Expected: EVA-g on merged-30M for 150 epochs ends near -0.75 training loss and -0.78 validation loss (negative
cosine similarity). A run resumes from the last checkpoint in out_dir by itself, to the same losses.
Writes out_dir/log.jsonl, out_dir/ckpt/<tag>/ (DeepSpeed, all ranks) and out_dir/eva_mim.pt (the encoder with
mask_token and lm_head, official key names: load_pretrained and timm read it).
"""
import json
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist

from data import (MaskingGenerator, ResumableSampler, Samples, eval_transform, image_source, make_loader,
                  mim_transform, normalize_batch, train_batches)
from model import EVA, CLIPTeacher, eva_config, fuse_zero_grad_checks, load_pretrained, mim_loss, param_groups

# -----------------------------------------------------------------------------
# config: the paper's recipe (EVA-01 pretraining, DESIGN.md section 3)
# I/O
out_dir = 'out/pretrain'  # checkpoints and log.jsonl; a run auto-resumes from here
log_interval = 10  # steps between log lines
eval_interval = 1000  # steps between validation losses (0: never)
ckpt_interval = 1000  # steps between checkpoints (one is also written at the end); 0: none (benchmarks)
keep_ckpts = 2  # DeepSpeed checkpoints kept in out_dir/ckpt (older ones are deleted)
stop_step = 0  # save and exit at this step (e.g. before a job's time limit); 0: run to the end
log_samples = False  # write the sample indices of every micro-batch to out_dir/samples_rank{r}.jsonl (debugging)
wandb_project = ''  # '' disables wandb
wandb_run_name = 'eva-mim'  # wandb run name
# data
data_path = 'synthetic'  # 'synthetic', a folder tree, a .txt list of paths, or several joined by ','
val_data_path = 'synthetic:1'  # held-out images for the validation loss; '' for none
synthetic_size = 29_600_000  # images in the synthetic dataset (merged-30M has 29.6M)
val_size = 10_000  # images of the synthetic validation set
num_workers = 10  # DataLoader workers per GPU
img_size = 224  # training resolution of student and teacher
crop_scale = (0.2, 1.0)  # RandomResizedCrop scale range
num_mask_patches = 105  # patches masked per image (105 of 256: ~40%)
min_mask_patches = 16  # smallest block of the block-wise masking
# model
model_size = 'eva_g'  # a key of model.SIZES
drop_path = 0.1  # stochastic depth of the last block
init_std = 0.02  # trunc-normal init std of the student
grad_checkpointing = False  # recompute blocks in backward: less memory (EVA-g on 24 GB GPUs), ~1/3 more compute
compile_blocks = False  # torch.compile each block (fused kernels); the first steps compile
init_from = ''  # start from an encoder checkpoint (anything load_pretrained reads); '' = random init
teacher_model = 'ViT-L-14'  # open_clip model name; 'tiny' = small random tower of the same class (tests)
teacher_pretrained = 'openai'  # open_clip tag or a local checkpoint file
# optimization
batch_size = 4096  # global batch (16 nodes x 8 GPUs x 32)
micro_batch = 32  # per GPU per forward; gradient accumulation fills the rest of batch_size
epochs = 150  # over the training set
warmup_epochs = 2.0  # linear warmup from 0
max_steps = 0  # >0: stop the schedule after this many steps instead of epochs (smoke tests)
lr = 1e-3  # peak learning rate
min_lr = 1e-5  # end of the cosine decay
weight_decay = 0.05  # AdamW, not on biases, norms, pos_embed, cls_token
beta1 = 0.9  # AdamW beta1
beta2 = 0.98  # AdamW beta2
eps = 1e-6  # AdamW epsilon
grad_clip = 3.0  # global gradient-norm clip; 0 disables
# system
dtype = 'fp16'  # 'fp16' (dynamic loss scale), 'bf16' or 'fp32'; a CPU cannot run DeepSpeed fp16: fp32 there
zero_stage = 1  # DeepSpeed ZeRO stage
seed = 0  # model init, data order and augmentation
peak_tflops = 989.0  # dense fp16 peak per GPU for MFU (H100/H200 SXM: 989)
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
config = {k: globals()[k] for k in _keys}  # noqa: F821 (_keys comes from configurator.py)
# -----------------------------------------------------------------------------
# distributed setup: torchrun's env, or one process
import deepspeed  # noqa: E402 (after the configurator, so that --help is instant)

if 'RANK' not in os.environ:  # plain `python pretrain.py`: a world of one
    os.environ.update(RANK='0', LOCAL_RANK='0', WORLD_SIZE='1', MASTER_ADDR='127.0.0.1')
    os.environ.setdefault('MASTER_PORT', str(29500 + os.getpid() % 1000))
rank, local_rank, world = int(os.environ['RANK']), int(os.environ['LOCAL_RANK']), int(os.environ['WORLD_SIZE'])
cuda = torch.cuda.is_available()
if cuda:
    torch.cuda.set_device(local_rank)
device = torch.device('cuda', local_rank) if cuda else torch.device('cpu')
deepspeed.init_distributed(dist_backend='nccl' if cuda else 'gloo')
master = rank == 0


def print0(*a):
    if master:
        print(*a, flush=True)


if not cuda and dtype == 'fp16':
    print0("no GPU: DeepSpeed runs fp16 only on CUDA, training in fp32 instead")
    dtype = config["dtype"] = "fp32"
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

# derived quantities
assert batch_size % (micro_batch * world) == 0, \
    f"batch_size {batch_size} is not a multiple of micro_batch {micro_batch} x world size {world}"
grad_accum = batch_size // (micro_batch * world)
train_source = image_source(data_path, img_size, synthetic_size, seed, tensors=True)  # uint8 pipeline
steps_per_epoch = len(train_source) // batch_size
assert steps_per_epoch > 0, f"{len(train_source)} training images are fewer than one batch of {batch_size}"
total_steps = max_steps or epochs * steps_per_epoch
warmup_steps = min(round(warmup_epochs * steps_per_epoch), total_steps)
print0(json.dumps(config, indent=1))
print0(f"world {world} x micro-batch {micro_batch} x grad-accum {grad_accum} = global batch {batch_size}; "
       f"{len(train_source):,} images, {steps_per_epoch:,} steps/epoch, {total_steps:,} steps "
       f"({total_steps / steps_per_epoch:.2f} epochs), warmup {warmup_steps:,}; dtype {dtype}, ZeRO-{zero_stage}")

# -----------------------------------------------------------------------------
# data
cfg = eva_config(model_size, img_size=img_size, drop_path=drop_path, grad_checkpointing=grad_checkpointing,
                 pooling='cls', use_mask_token=True, mim_dim=768, init_std=init_std)
mask_gen = MaskingGenerator(cfg.grid, num_mask_patches, min_num_patches=min_mask_patches)
train_set = Samples(train_source, mim_transform(img_size, crop_scale, uint8=True), seed, mask_gen)
sampler = ResumableSampler(len(train_set), world, rank, seed)
val_set = None
if val_data_path:
    val_set = Samples(image_source(val_data_path, img_size, val_size, seed + 1), eval_transform(img_size), seed)


# validation: every other patch masked, in a checkerboard (EVA reports the val loss this way)
val_mask = torch.from_numpy(np.indices((cfg.grid, cfg.grid)).sum(0) % 2 == 0).flatten()

# -----------------------------------------------------------------------------
# model, teacher, engine
torch.manual_seed(seed)  # the same init on every rank (DeepSpeed also broadcasts rank 0's weights)
with torch.device(device):  # initialising 1B parameters on the GPU takes seconds, on the CPU a minute
    model = EVA(cfg)
if init_from:
    load_pretrained(model, init_from)
if compile_blocks:
    model.compile_blocks()  # each block compiled in place (refused with checkpointing on CUDA)
if local_rank != 0:
    dist.barrier()  # each node's first rank fills open_clip's download cache first; the others then read it
teacher = CLIPTeacher(teacher_model, teacher_pretrained, img_size, cfg.patch_size).to(device)
if local_rank == 0:
    dist.barrier()
if cuda:
    teacher.half()  # the teacher only infers: fp16 halves its time and memory
print0(f"student {model_size}: {sum(p.numel() for p in model.parameters()):,} parameters; teacher "
       f"{teacher_model} ({'random init' if teacher_model == 'tiny' or not teacher_pretrained else teacher_pretrained})")
with torch.no_grad():
    n_teacher = teacher(torch.zeros(1, 3, img_size, img_size, device=device)).shape
assert n_teacher[1:] == (cfg.num_patches, 768), f"teacher gives {tuple(n_teacher)} tokens, the student wants " \
    f"({cfg.num_patches}, 768): choose a teacher with the student's patch grid"

optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(beta1, beta2), eps=eps,
                              **({'fused': True} if cuda else {}))
ds_config = {
    'train_batch_size': batch_size,
    'train_micro_batch_size_per_gpu': micro_batch,
    'gradient_accumulation_steps': grad_accum,
    'gradient_clipping': grad_clip,
    'zero_optimization': {'stage': zero_stage, 'contiguous_gradients': True, 'overlap_comm': cuda,
                          'reduce_bucket_size': 5e8, 'allgather_bucket_size': 5e8},
    # EVA-01's DeepSpeed fp16 settings: dynamic scale from 2^16, halved after 2 overflows, raised after 500
    'fp16': {'enabled': dtype == 'fp16', 'loss_scale': 0, 'initial_scale_power': 16, 'loss_scale_window': 500,
             'hysteresis': 2, 'min_loss_scale': 1},
    'bf16': {'enabled': dtype == 'bf16'},
    'steps_per_print': 1 << 30,
    'wall_clock_breakdown': False,
}
engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
fuse_zero_grad_checks(optimizer)  # DeepSpeed's per-tensor inf/NaN and norm loops as one kernel each
model_dtype = {'fp16': torch.float16, 'bf16': torch.bfloat16, 'fp32': torch.float32}[dtype]
flops_per_image = model.flops_per_image(num_masked=num_mask_patches) + teacher.flops_per_image


def get_lr(step):
    """Linear warmup from 0, then cosine to min_lr (BEiT/EVA's per-step cosine_scheduler)."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))

# -----------------------------------------------------------------------------
# checkpoints: DeepSpeed's (all ranks) + per-rank RNG states + one encoder file; 'latest' is written last and
# atomically, so a crash mid-save leaves the previous checkpoint as the one a restart resumes from
ckpt_dir = os.path.join(out_dir, 'ckpt')


def atomic_save(obj, path):
    torch.save(obj, path + '.tmp')
    os.replace(path + '.tmp', path)


def full_state_dict():
    """The full-precision weights: ZeRO keeps fp32 master copies partitioned over ranks, so every rank takes
    part in gathering them (a collective); only rank 0, which writes the file, keeps a host copy."""
    from deepspeed.utils import safe_get_full_fp32_param
    sd = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)  # None without ZeRO: then the module's weights are the master copy
        if master:
            sd[name] = (full if full is not None else p.detach().float()).cpu().clone()
    return sd


def save_checkpoint(step):
    tag = f'step{step}'
    # the data position follows from the step (each epoch's order is seeded); it is stored for the reader
    epoch, within = divmod(step, steps_per_epoch)
    position = {'epoch': epoch, 'samples_into_epoch': within * batch_size, 'images_seen': step * batch_size}
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state={'step': step, 'config': config, 'data': position},
                           save_latest=False)
    rng = {'torch': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state() if cuda else None,
           'numpy': np.random.get_state()}
    atomic_save(rng, os.path.join(ckpt_dir, tag, f'rng_rank{rank}.pt'))
    sd = full_state_dict()
    # ZeRO-1 keeps a full copy of the working weights on every rank: check that they agree
    checksum = sum(p.detach().double().sum() for p in engine.module.parameters()).reshape(1)
    sums = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(sums, checksum)
    in_sync = all(float(s) == float(sums[0]) for s in sums)
    dist.barrier()
    if master:
        atomic_save({'model': sd, 'config': config, 'step': step}, os.path.join(out_dir, 'eva_mim.pt'))
        with open(os.path.join(ckpt_dir, 'latest.tmp'), 'w') as f:
            f.write(tag)
        os.replace(os.path.join(ckpt_dir, 'latest.tmp'), os.path.join(ckpt_dir, 'latest'))
        old = sorted((d for d in os.listdir(ckpt_dir) if d.startswith('step') and d != tag),
                     key=lambda d: int(d[4:]))
        for d in old[:max(len(old) - keep_ckpts + 1, 0)]:
            shutil.rmtree(os.path.join(ckpt_dir, d), ignore_errors=True)
    print0(f"saved checkpoint {tag} and {out_dir}/eva_mim.pt; weights identical on all {world} ranks: {in_sync}")
    assert in_sync, f"rank weights diverged: checksums {[float(s) for s in sums]}"
    dist.barrier()


step = 0
latest = os.path.join(ckpt_dir, 'latest')
if os.path.exists(latest):
    tag = open(latest).read().strip()
    _, client = engine.load_checkpoint(ckpt_dir, tag=tag)
    step = client['step']
    rng = torch.load(os.path.join(ckpt_dir, tag, f'rng_rank{rank}.pt'), weights_only=False)
    torch.set_rng_state(rng['torch'])
    np.random.set_state(rng['numpy'])
    if cuda and rng['cuda'] is not None:
        torch.cuda.set_rng_state(rng['cuda'])
    print0(f"resumed from {ckpt_dir}/{tag} at step {step}")
else:
    torch.manual_seed(seed + rank)  # drop path draws differ across ranks, as their data do

# -----------------------------------------------------------------------------
# logging
os.makedirs(out_dir, exist_ok=True)  # on every rank: each may write its own files here
if master:
    log_file = open(os.path.join(out_dir, 'log.jsonl'), 'a')
    log_file.write(json.dumps({'config': config, 'world': world, 'grad_accum': grad_accum, 'start_step': step,
                               'steps_per_epoch': steps_per_epoch, 'total_steps': total_steps}) + '\n')
    wandb = None
    if wandb_project:
        import wandb
        wandb.init(project=wandb_project, name=wandb_run_name, config=config, resume='allow')
samples_file = open(os.path.join(out_dir, f'samples_rank{rank}.jsonl'), 'a') if log_samples else None


def log(row):
    if master:
        log_file.write(json.dumps(row) + '\n')
        log_file.flush()
        if wandb is not None:
            wandb.log(row, step=row['step'])


@torch.no_grad()
def evaluate():
    engine.eval()
    sampler = ResumableSampler(len(val_set), world, rank, shuffle=False, pad=False)  # each image once
    total = torch.zeros(2, device=device, dtype=torch.float64)  # (sum of per-image losses, images)
    for x, _, _, _, _ in make_loader(val_set, sampler, micro_batch, num_workers, cuda):
        x = x.to(device, non_blocking=True)
        mask = val_mask.to(device).expand(x.shape[0], -1)
        pred = engine(x.to(model_dtype), mask)
        target = teacher(x)
        cos = torch.nn.functional.cosine_similarity(pred.float(), target[mask].float(), dim=-1)
        total += torch.stack((-cos.sum().double() / int(val_mask.sum()), torch.tensor(x.shape[0], device=device)))
    dist.all_reduce(total)
    engine.train()
    return (total[0] / total[1]).item()


# -----------------------------------------------------------------------------
# training loop
engine.train()
data = train_batches(train_set, sampler, micro_batch, grad_accum, steps_per_epoch, step, num_workers, cuda)
loss_sum = torch.zeros((), device=device)
bad_samples = torch.zeros((), device=device)
t_log, steps_logged, t_start, start_step = time.time(), 0, time.time(), step
while step < total_steps:
    lr_now = get_lr(step)
    for group in optimizer.param_groups:
        group['lr'] = lr_now * group['lr_scale']
    for _ in range(grad_accum):
        x, _, mask, idx, skipped = next(data)
        if samples_file:
            samples_file.write(json.dumps({'step': step, 'indices': idx.tolist()}) + '\n')
        x = normalize_batch(x.to(device, non_blocking=True))  # uint8 from the loader -> normalised float32
        mask = mask.to(device, non_blocking=True).flatten(1)  # (B, N) bool
        target = teacher(x)  # (B, N, 768), no grad
        pred = engine(x.to(model_dtype), mask)  # (M, 768) at the masked positions
        loss = mim_loss(pred, target, mask)
        engine.backward(loss)
        engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
        loss_sum += loss.detach()
        bad_samples += skipped.sum()
    step += 1
    steps_logged += 1

    if step % log_interval == 0 or step == total_steps:
        stats = torch.stack((loss_sum / (steps_logged * grad_accum), bad_samples))
        dist.all_reduce(stats)
        dt = time.time() - t_log
        img_s = steps_logged * batch_size / dt
        grad_norm = engine.get_global_grad_norm()
        row = {'step': step, 'epoch': round(step / steps_per_epoch, 4), 'loss': stats[0].item() / world,
               'lr': lr_now, 'loss_scale': optimizer.cur_scale if dtype == 'fp16' else None,
               'grad_norm': float(grad_norm) if grad_norm is not None else None, 'skipped': engine.skipped_steps,
               'img_s': round(img_s, 1), 'mfu': round(img_s / world * flops_per_image / (peak_tflops * 1e12), 4),
               'bad_samples': int(stats[1].item()),
               'mem_gb': round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
               'eta_h': round((total_steps - step) * (time.time() - t_start) / (step - start_step) / 3600, 2)}
        log(row)
        print0(f"step {step}/{total_steps} ep {row['epoch']:.2f} | loss {row['loss']:.4f} | lr {lr_now:.2e} | "
               f"scale {row['loss_scale']} | gnorm {row['grad_norm'] or 0:.3f} | skipped {row['skipped']} | "
               f"{img_s:.1f} img/s | mfu {100 * row['mfu']:.1f}% | mem {row['mem_gb']} GiB | bad {row['bad_samples']} | "
               f"eta {row['eta_h']:.2f} h")
        loss_sum.zero_()
        t_log, steps_logged = time.time(), 0
    if val_set is not None and eval_interval and (step % eval_interval == 0 or step == total_steps):
        val_loss = evaluate()
        log({'step': step, 'val_loss': val_loss})
        print0(f"step {step}: val loss {val_loss:.4f}")
    if ckpt_interval and (step % ckpt_interval == 0 or step == total_steps) or step == stop_step:
        save_checkpoint(step)
    if step == stop_step:
        print0(f"stopping at step {step} (stop_step); rerun the same command to resume")
        break

if samples_file:
    samples_file.close()
dist.barrier()
dist.destroy_process_group()
