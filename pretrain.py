"""
EVA masked image modeling: a ViT student sees an image with ~40% of its patches replaced by a mask token and
regresses, at the masked positions, the patch features of a frozen OpenAI CLIP ViT-L/14 (EVA paper, sec. 2.1).

    python pretrain.py config/pretrain_tiny.py                        # CPU demo, under a minute
    torchrun --nproc_per_node 8 pretrain.py config/pretrain_eva_g.py  # one node
    torchrun --nnodes 16 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint $HOST:29500 \\
        pretrain.py config/pretrain_eva_g.py                          # the paper's 128 GPUs

Expected: EVA-g on merged-30M for 150 epochs ends near -0.75 training loss and -0.78 validation loss (negative
cosine similarity). A run resumes from the last checkpoint in out_dir by itself, to the same losses.
Writes out_dir/log.jsonl, out_dir/ckpt/<tag>/ (DeepSpeed, all ranks) and out_dir/eva_mim.pt (the encoder with
mask_token and lm_head, official key names: load_pretrained and timm read it).
"""
import dataclasses
import json
import math
import os
import time

# common first: it sets OpenMP's wait policy, which torch's import fixes
from common import (batch_split, config_error, cut_short, deepspeed_engine, engine_stats, full_state_dict, hms,
                    init_distributed, input_errors, on_gpu, open_log, print0, require_choice, require_files,
                    resolve_dtype, resume, save_checkpoint, stop_signal)
import torch
import torch.distributed as dist

from data import (MaskingGenerator, ResumableSampler, Samples, eval_transform, image_source, make_loader,
                  mim_transform, normalize_batch, train_batches)
from model import EVA, CLIPTeacher, SIZES, eva_config, load_pretrained, mim_loss, param_groups, timm_args

# -----------------------------------------------------------------------------
# config: the paper's recipe (EVA paper sec. 2.1, Table 13; EVA-01 pretraining scripts)
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
val_crop_pct = 224 / 256  # validation: shorter side resized to img_size / val_crop_pct, then a center crop (EVA-01)
num_workers = 10  # DataLoader workers per GPU
img_size = 224  # training resolution of student and teacher
crop_scale = (0.2, 1.0)  # RandomResizedCrop scale range
num_mask_patches = 105  # patches masked per image (105 of 256: ~40%)
min_mask_patches = 16  # smallest block of the block-wise masking
# model
model_size = 'eva_g'  # a key of model.SIZES
drop_path = 0.1  # stochastic depth of the last block
init_std = 0.015  # trunc-normal init std of the student (EVA-01's eva_g_patch14 MIM model)
init_trunc = 1.0  # each init draw cut at +-init_trunc std (EVA-01's MIM model: trunc_normal_(a=-std, b=std))
grad_checkpointing = False  # recompute blocks in backward: less memory (EVA-g on 24 GB GPUs), ~1/3 more compute
compile_blocks = False  # torch.compile each block (fused kernels); the first steps compile
teacher_stream = False  # the next micro-batch's copy and teacher forward queued between backward and the optimizer
#   step, on a CUDA stream of their own: the GPU has work while the host runs DeepSpeed's step (bench.py row
#   mim64_teacher_stream; not measured yet)
init_from = ''  # start from an encoder checkpoint (anything load_pretrained reads); '' = random init
teacher_model = 'ViT-L-14'  # open_clip model name; 'tiny' = small random tower of the same class (tests)
teacher_pretrained = 'openai'  # open_clip tag, a local open_clip file, or our clip.pt (its EVA tower; then
#   teacher_model is unused)
# optimization
batch_size = 4096  # global batch (16 nodes x 8 GPUs x 32)
micro_batch = 32  # per GPU per forward; gradient accumulation fills the rest of batch_size
epochs = 150  # over the training set
warmup_epochs = 2.0  # linear warmup from 0
max_steps = 0  # >0: the run's length in optimizer steps instead of epochs (every stage's spelling)
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
rank, local_rank, world, device = init_distributed(num_workers)  # torchrun's env, or one process
stop = stop_signal()  # Ctrl-C / SIGTERM: an evaluation stops at its next batch, training at its next log step
cuda = on_gpu(device)  # the GPU's choices: fp16, fused AdamW, ... (also the memory projection's meta device)
require_files(init_from=init_from)
require_choice('model_size', model_size, SIZES)
if val_data_path.startswith('synthetic') and not data_path.startswith('synthetic'):
    print0(f"warning: training on {data_path} but validating on synthetic images: set val_data_path (or '')")
dtype, model_dtype = resolve_dtype(dtype, cuda)
config['dtype'] = dtype

# derived quantities
micro_batch, grad_accum = batch_split(batch_size, micro_batch, world)
config['micro_batch'] = micro_batch
with input_errors():  # no such folder, no images: one error line
    train_source = image_source(data_path, img_size, synthetic_size, seed, tensors=True)  # uint8 pipeline
steps_per_epoch = len(train_source) // batch_size
if steps_per_epoch == 0:
    config_error(f"{len(train_source)} training images are fewer than one batch of {batch_size}")
total_steps = max_steps or epochs * steps_per_epoch
warmup_steps = min(round(warmup_epochs * steps_per_epoch), total_steps)
print0(f"world {world} x micro-batch {micro_batch} x grad-accum {grad_accum} = global batch {batch_size}; "
       f"{len(train_source):,} images, {steps_per_epoch:,} steps/epoch, {total_steps:,} steps "
       f"({total_steps / steps_per_epoch:.2f} epochs), warmup {warmup_steps:,}; dtype {dtype}, ZeRO-{zero_stage}")

# -----------------------------------------------------------------------------
# teacher: built first, its feature width is the student's lm_head output (768 for OpenAI's CLIP-L/14)
if local_rank != 0:
    dist.barrier()  # each node's first rank fills open_clip's download cache first; the others then read it
torch.manual_seed(seed)  # a random teacher ('tiny', the demo's) is the same on every rank, on resume and in plot.py
with input_errors():  # an unknown open_clip model or tag, a missing file, a failed download (offline): one line
    teacher = CLIPTeacher(teacher_model, teacher_pretrained, img_size, eva_config(model_size).patch_size).to(device)
if local_rank == 0:
    dist.barrier()
if cuda:
    teacher.half()  # the teacher only infers: fp16 halves its time and memory

# -----------------------------------------------------------------------------
# data
cfg = eva_config(model_size, img_size=img_size, drop_path=drop_path, grad_checkpointing=grad_checkpointing,
                 pooling='cls', use_mask_token=True, mim_dim=teacher.out_dim, init_std=init_std, init_trunc=init_trunc)
mask_gen = MaskingGenerator(cfg.grid, num_mask_patches, min_num_patches=min_mask_patches)
train_set = Samples(train_source, mim_transform(img_size, crop_scale, uint8=True), seed, mask_gen)
sampler = ResumableSampler(len(train_set), world, rank, seed)
val_set = None
if val_data_path:
    with input_errors():
        val_source = image_source(val_data_path, img_size, val_size, seed + 1)
    val_set = Samples(val_source, eval_transform(img_size, val_crop_pct), seed)
# validation: the flat patch indices 0, 2, 4, ... masked in every image (EVA-01's evaluate_pt: on a 16-wide grid,
# every other column, 128 of 256 patches), the same mask for every image, so the loss compares across runs
val_mask = torch.arange(cfg.num_patches) % 2 == 0

# -----------------------------------------------------------------------------
# model, engine
torch.manual_seed(seed)  # the same init on every rank (DeepSpeed also broadcasts rank 0's weights)
with torch.device(device):  # initialising 1B parameters on the GPU takes seconds, on the CPU a minute
    model = EVA(cfg)
if init_from:
    with input_errors():  # not a checkpoint, or another model's: one error line
        load_pretrained(model, init_from)
if compile_blocks:
    model.compile_blocks()  # each block compiled in place (refused with checkpointing on CUDA)
print0(f"student {model_size}: {sum(p.numel() for p in model.parameters()):,} parameters; teacher "
       f"{teacher.description}, {teacher.out_dim}-d features")
with torch.no_grad():
    n_teacher = teacher(torch.zeros(1, 3, img_size, img_size, device=device)).shape
if n_teacher[1] != cfg.num_patches:
    config_error(f"the teacher gives {n_teacher[1]} patch tokens at {img_size} px, the student {cfg.num_patches}: "
                 f"choose a teacher with the student's patch grid")

optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(beta1, beta2), eps=eps,
                              **({'fused': True} if cuda else {}))
engine, optimizer = deepspeed_engine(model, optimizer, batch_size, micro_batch, grad_clip, zero_stage, dtype)
flops_per_image = model.flops_per_image(num_masked=num_mask_patches) + teacher.flops_per_image


def get_lr(step):
    """Linear warmup from 0, then cosine to min_lr (BEiT/EVA's per-step cosine_scheduler)."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate():
    """Validation loss: the mean over images of the negative cosine similarity at the val_mask positions (an
    unreadable image's stand-in, the next one, left out); None when a signal cut it short."""
    engine.eval()
    sampler = ResumableSampler(len(val_set), world, rank, shuffle=False, pad=False)  # each image once
    total = torch.zeros(2, device=device, dtype=torch.float64)  # (sum of per-image losses, images)
    for batch in make_loader(val_set, sampler, micro_batch, num_workers, cuda):
        if stop():
            break
        x = batch['image'].to(device, non_blocking=True)
        mask = val_mask.to(device).expand(x.shape[0], -1)
        pred = engine(x.to(model_dtype), mask)
        cos = torch.nn.functional.cosine_similarity(pred.float(), teacher(x)[mask].float(), dim=-1)
        ok = (batch['skipped'] == 0).to(device)
        total += torch.stack((-(cos.view(x.shape[0], -1).mean(1) * ok).sum().double(), ok.sum().double()))
    engine.train()
    if cut_short(stop, device):
        return None
    dist.all_reduce(total)
    return (total[0] / total[1]).item()


# -----------------------------------------------------------------------------
# resume, log
step, _ = resume(engine, out_dir, seed, config)  # 1. out_dir's checkpoint wins; 2. else init_from; 3. random
log = open_log(out_dir, {'config': config, 'world': world, 'grad_accum': grad_accum, 'start_step': step,
                         'steps_per_epoch': steps_per_epoch, 'total_steps': total_steps}, wandb_project, wandb_run_name)
samples_file = open(os.path.join(out_dir, f'samples_rank{rank}.jsonl'), 'a') if log_samples else None

side = torch.cuda.Stream() if teacher_stream and cuda else None  # teacher_stream's own CUDA stream


def prepare(batch):
    """A micro-batch on the device, normalised, and its teacher targets (no grad): queued on `side` if there is one
    (it first waits for what the default stream has queued, the backward), else in order."""
    if side is not None:
        side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # (None: a no-op)
        x = normalize_batch(batch['image'].to(device, non_blocking=True))  # uint8 -> normalised float32
        mask = batch['mask'].to(device, non_blocking=True)  # (B, N) bool
        return batch, x, mask, teacher(x)  # (B, N, 768)


def ready(prepared):
    """prepare's tensors, usable on the default stream: it waits for `side` here, when they are used, not when
    they were queued, and the allocator keeps their memory until the default stream is done with them."""
    if side is not None:
        torch.cuda.current_stream().wait_stream(side)
        for t in prepared[1:]:
            t.record_stream(torch.cuda.current_stream())
    return prepared


# -----------------------------------------------------------------------------
# training loop
engine.train()
data = train_batches(train_set, sampler, micro_batch, grad_accum, steps_per_epoch, step, num_workers, cuda)
loss_sum, bad = torch.zeros((), device=device), torch.zeros((), device=device)
pending = None  # teacher_stream: the next micro-batch, prepared before this one's optimizer step
t_log, n_logged, t_start, start_step = time.time(), 0, time.time(), step
stopping = False  # a signal (stop, set up at the start): save at the next log step and exit 0
while step < total_steps:
    lr_now = get_lr(step)
    for group in optimizer.param_groups:
        group['lr'] = lr_now * group['lr_scale']
    for _ in range(grad_accum):
        batch, x, mask, target = ready(pending if pending else prepare(next(data)))
        if samples_file:
            samples_file.write(json.dumps({'step': step, 'indices': batch['index'].tolist()}) + '\n')
        pred = engine(x.to(model_dtype), mask)  # (M, 768) at the masked positions
        loss = mim_loss(pred, target, mask)
        engine.backward(loss)
        pending = prepare(next(data)) if teacher_stream else None  # (the data are endless: one more at the end)
        engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
        loss_sum += loss.detach()
        bad += batch['skipped'].sum()
    step += 1
    n_logged += 1

    if step % log_interval == 0 or step == total_steps:
        stats = torch.stack((loss_sum / (n_logged * grad_accum), bad, torch.tensor(stop(), device=device)))
        dist.all_reduce(stats)
        stopping = stats[2].item() > 0
        img_s = n_logged * batch_size / (time.time() - t_log)
        log({'step': step, 'epoch': round(step / steps_per_epoch, 4), 'loss': stats[0].item() / world, 'lr': lr_now,
             **engine_stats(engine), 'img_s': round(img_s, 1),
             'mfu': round(img_s / world * flops_per_image / (peak_tflops * 1e12), 4) if cuda else None,
             'bad_samples': int(stats[1].item()),
             'eta_h': round((total_steps - step) * (time.time() - t_start) / (step - start_step) / 3600, 4)})
        loss_sum.zero_()
        t_log, n_logged = time.time(), 0
    if val_set is not None and eval_interval and (step % eval_interval == 0 or step == total_steps):
        val_loss = evaluate()
        if val_loss is None:  # cut short by a signal: not reported; save and stop
            stopping = True
        else:
            log({'step': step, 'val_loss': val_loss})
    if ckpt_interval and (step % ckpt_interval == 0 or step == total_steps) or step == stop_step or stopping:
        epoch, within = divmod(step, steps_per_epoch)  # the data position, for the reader (resume derives it)
        position = {'epoch': epoch, 'samples_into_epoch': within * batch_size, 'images_seen': step * batch_size}
        sd = full_state_dict(engine)  # a collective: every rank
        export = {'model': sd, 'model_config': dataclasses.asdict(cfg), 'timm_args': timm_args(cfg), 'config': config,
                  'step': step}  # the encoder: load_pretrained, or timm.models.eva.Eva(**timm_args)
        save_checkpoint(engine, out_dir, step, {'config': config, 'data': position}, {'eva_mim.pt': export}, keep_ckpts)
    if step == stop_step or stopping:
        print0(f"stopped at step {step} ({'signal' if stopping else 'stop_step'}); the same command resumes")
        break

if samples_file:
    samples_file.close()
if step > start_step:
    print0(f"{step - start_step} steps in {hms(time.time() - t_start)} (to step {step} of {total_steps})")
dist.barrier()
dist.destroy_process_group()
