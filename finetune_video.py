"""
Video action recognition: fine-tune an EVA encoder on clips, the way EVA-01's video code does (EVA paper, section
2.3.2): an intermediate fine-tune on Kinetics-722 (the union of K400 / K600 / K700, 0.63M videos) at 8 frames from
the MIM model, then K400 / K600 / K700 at 16 frames from it. Joint space-time attention over all T x 256 patch
tokens (the image encoder unchanged: each frame patch-embedded alone, the pos_embed grid repeated over the frames),
mean of the patch tokens -> fc_norm -> head; TSN frame sampling, multi-scale crops, mixup / cutmix; evaluation on
4 clips x 3 crops, the softmax of the 12 views summed.

    python finetune_video.py config/finetune_video_tiny.py                                       # CPU demo
    python data.py build_kinetics_lists /data/kinetics lists [--check=True]      # K722 / K400 / K600 / K700 lists
    torchrun --nproc_per_node 8 finetune_video.py config/finetune_k722.py --init_from=out/pretrain_eva_g/eva_mim.pt
    torchrun --nproc_per_node 8 finetune_video.py config/finetune_k400.py --init_from=out/finetune_k722/best.pt
    python finetune_video.py config/finetune_k400.py --eval_only=True --init_from=CHECKPOINT     # 4 x 3 views only

Expected (EVA paper, Table 5; 16 frames, 4 clips x 3 crops): K400 89.7, K600 89.8, K700 82.9 top-1; the K722
model itself 84.9 on K722 val at 8 frames. Writes out_dir/log.jsonl, out_dir/ckpt/ (DeepSpeed, for resuming),
out_dir/last.pt and out_dir/best.pt ({'model', 'model_ema', 'classes', ...}; load_pretrained reads them).
"""
import dataclasses
import math
import os
import shutil
import sys
import time

# common first: it sets OpenMP's wait policy, which torch's import fixes
from common import (batch_split, config_error, cut_short, deepspeed_engine, engine_stats, full_state_dict, hms,
                    init_distributed, input_errors, on_gpu, open_log, print0, require_choice, require_files,
                    resolve_dtype, resume, save_checkpoint, stop_signal, write_eval)
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchvision.transforms import v2

from data import (IMAGENET_MEAN, IMAGENET_STD, ResumableSampler, Samples, VideoClips, VideoFiles, make_loader,
                  normalize_batch, topk_hits, train_batches, write_synthetic_videos)
from model import (EVA, SIZES, checkpoint_step, ema_update_, eva_config, load_pretrained, param_groups, read_checkpoint,
                   timm_args)

# -----------------------------------------------------------------------------
# config: defaults are the Kinetics-722 intermediate fine-tuning (EVA-01 video, kinetics722_intermediate_ft.yaml)
# I/O
out_dir = 'out/finetune_video'  # checkpoints and log.jsonl; a run auto-resumes from here
log_interval = 20  # steps between log lines
eval_only = False  # evaluate init_from (4 clips x 3 crops) and exit
stop_step = 0  # save and exit at this step (e.g. before a job's time limit); 0: run to the end
save_ckpt = True  # checkpoints and last.pt / best.pt at every epoch end (False: none, for benchmarks)
keep_ckpts = 2  # DeepSpeed checkpoints kept in out_dir/ckpt (older ones are deleted)
wandb_project = ''  # '' disables wandb
wandb_run_name = 'eva-video'  # wandb run name
# data
data_path = 'synthetic'  # training videos: Kinetics lists 'path label' (',' joins several), class folders, 'synthetic'
val_data_path = 'synthetic'  # validation videos, the same formats ('synthetic': the synthetic set's val list)
data_root = ''  # folder the lists' relative paths are under (EVA-01's DATA.ROOT); '' = each list's own folder
class_names = ''  # class names in label order, a file (build_kinetics_lists writes kXXX_classes.txt): the head's rows
synthetic_dir = 'data/synthetic_video'  # data_path 'synthetic': its mp4 files and lists, written there once
synthetic_size = 1024  # synthetic training videos (and a quarter as many for validation)
num_classes = 722  # classifier outputs
num_frames = 8  # frames per clip (TSN: one from each of num_frames equal segments)
img_size = 224  # frame resolution
num_workers = 16  # DataLoader workers per GPU (decoding and augmentation are the CPU's heaviest work here)
loader_timeout = 600  # seconds for a batch before a worker counts as stuck (decord hangs on some files): an error
test_clips = 4  # final evaluation: clips per video ...
test_crops = 3  # ... x crops along the long side (1: one centre crop)
random_clips = True  # the clips are TSN training draws as EVA-01's test (seeded); False: evenly offset clips
mixup = 0.8  # mixup alpha (0: off)
cutmix = 1.0  # cutmix alpha (0: off); with both on, one of the two per batch
label_smoothing = 0.1  # on the (mixed) one-hot targets
color_jitter = 0.8  # probability of colour jitter for a clip (each frame its own jitter, as the official)
grayscale = 0.2  # probability of turning a clip gray
multiscale_crop = True  # EVA-01's MultiScaleCrop for training (False: the centre crop of evaluation)
# model
model_size = 'eva_g'  # a key of model.SIZES
init_from = ''  # checkpoint to start from (an image or a video model; anything load_pretrained reads); '' = random
head_mapping = ''  # .npy of init_from's head rows for our classes (EVA-01's k722_to_k400_mapping.npy); '' = by name
drop_path = 0.3  # stochastic depth of the last block
head_init_scale = 0.001  # the new head's init, scaled (BEiT / EVA fine-tuning); from scratch 1.0 learns far sooner
grad_checkpointing = True  # recompute blocks in backward: a 1 + 8 x 256-token clip needs it at micro-batch 2
compile_blocks = False  # torch.compile each block (fused kernels); the first steps compile
ema_decay = 0.0  # EMA of the weights, evaluated beside them (EVA-01's video runs used none); 0 disables
# optimization
batch_size = 256  # global batch (clips)
micro_batch = 2  # per GPU per forward; gradient accumulation fills the rest
max_steps = 0  # >0: the run's length in optimizer steps instead of epochs (every stage's spelling)
epochs = 40  # over the training set
warmup_epochs = 5.0  # linear warmup from 0
lr = 8e-6  # peak learning rate (before layer decay)
min_lr = 8e-8  # end of the cosine decay (lr / 100); set it to lr (and warmup 0) for a constant rate
layer_decay = 1.0  # lr scale per block from the top: layer_decay ** (depth + 1 - layer)
weight_decay = 0.05  # AdamW, not on biases, norms, pos_embed, cls_token
beta1 = 0.9  # AdamW beta1
beta2 = 0.98  # AdamW beta2
eps = 1e-6  # AdamW epsilon
grad_clip = 0.0  # global gradient-norm clip; 0 disables
# system
dtype = 'fp16'  # 'fp16' (dynamic loss scale), 'bf16' or 'fp32'; a CPU cannot run DeepSpeed fp16: fp32 there
zero_stage = 1  # DeepSpeed ZeRO stage
seed = 0  # init, data order and augmentation
peak_tflops = 989.0  # dense fp16 peak per GPU for MFU (H100/H200 SXM: 989)
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
config = {k: globals()[k] for k in _keys}  # noqa: F821 (_keys comes from configurator.py)
# -----------------------------------------------------------------------------
rank, local_rank, world, device = init_distributed(num_workers)  # torchrun's env, or one process
stop = stop_signal()  # Ctrl-C / SIGTERM: an evaluation stops at its next batch, training at its next log step
cuda = on_gpu(device)  # the GPU's choices: fp16, fused AdamW, ... (also the memory projection's meta device)
if eval_only and not init_from:
    config_error("eval_only needs --init_from=CHECKPOINT")
require_files(init_from=init_from, head_mapping=head_mapping, class_names=class_names)
require_choice('model_size', model_size, SIZES)
if test_crops not in (1, 3):
    config_error(f"test_crops must be 1 or 3, got {test_crops}")
dtype, model_dtype = resolve_dtype(dtype, cuda)
config['dtype'] = dtype

# -----------------------------------------------------------------------------
# validation data (the training data follows the eval_only exit): decord decodes in the DataLoader workers; clips
# arrive as uint8 and are normalised on the device with ImageNet's mean / std (EVA-01 video's img_norm_cfg, not the
# CLIP normalisation of the image stages)
if val_data_path == 'synthetic' or (data_path == 'synthetic' and not eval_only):
    if rank == 0:
        write_synthetic_videos(synthetic_dir, synthetic_size, synthetic_size // 4, num_classes, seed=seed)
    dist.barrier()


def video_files(path, split):
    return VideoFiles(os.path.join(synthetic_dir, f'{split}.txt') if path == 'synthetic' else path, data_root)


with input_errors():
    val_src = video_files(val_data_path, 'val')
if class_names:  # the head's class names, stored in last.pt
    names = [c.rstrip('\n') for c in open(class_names)]
elif val_data_path == 'synthetic':
    names = [c.rstrip('\n') for c in open(os.path.join(synthetic_dir, 'classes.txt'))]
else:
    names = getattr(val_src, 'classes', None)  # class folders, or None (a list)
if names is not None and len(names) != num_classes:
    config_error(f"{len(names)} class names (class_names or the val folders) for num_classes={num_classes}")
with input_errors():  # a label outside the head (or none) in either list: one line naming the file and line
    val_src.check_labels(num_classes)
val_single = Samples(val_src, VideoClips(num_frames, img_size, train=False), seed)  # per epoch: 1 clip, centre
val_views = Samples(val_src, VideoClips(num_frames, img_size, train=False, clips=test_clips, crops=test_crops,
                                        random_clips=random_clips), seed)
micro_batch, grad_accum = batch_split(batch_size, micro_batch, world)
config['micro_batch'] = micro_batch

# -----------------------------------------------------------------------------
# model
torch.manual_seed(seed)
cfg = eva_config(model_size, img_size=img_size, num_frames=num_frames, num_classes=num_classes, pooling='mean',
                 drop_path=drop_path, grad_checkpointing=grad_checkpointing, head_init_scale=head_init_scale)
with torch.device(device):
    model = EVA(cfg)


def head_rows(ckpt):
    """init_from with its classifier cut to our classes, where it has others (K722 -> K400 / K600 / K700, EVA-01's
    init_mode 'eva_k722'): the rows head_mapping lists, or those of our class names among the ones it stores."""
    sd = ckpt.get('model', ckpt)
    if 'head.weight' not in sd or sd['head.weight'].shape[0] == num_classes:
        return ckpt
    if head_mapping:
        rows = np.load(head_mapping).tolist()
    elif ckpt.get('classes') and names:
        missing = [c for c in names if c not in ckpt['classes']]
        if missing:
            config_error(f"{init_from} has no head row for {len(missing)} of our classes, e.g. {missing[:3]}")
        rows = [ckpt['classes'].index(c) for c in names]
    else:
        print0(f"warning: {init_from}'s head has {sd['head.weight'].shape[0]} classes and no class names to match "
               f"ours: the head starts afresh (give head_mapping or class_names)")
        return ckpt
    if len(rows) != num_classes:
        config_error(f"head_mapping {head_mapping} lists {len(rows)} rows for num_classes={num_classes}")
    print0(f"head: {num_classes} of the {sd['head.weight'].shape[0]} rows of {init_from}")
    return {**ckpt, 'model': {**sd, 'head.weight': sd['head.weight'][rows], 'head.bias': sd['head.bias'][rows]}}


with input_errors():  # not a checkpoint, or another model's: one error line
    init_ckpt = read_checkpoint(init_from) if init_from else {}  # read once: EVA-g's file is GBs
    if init_from:  # an image checkpoint's pos_embed is repeated over the frames, a video's interpolated in time
        load_pretrained(model, head_rows(init_ckpt), name=init_from)
if compile_blocks:
    model.compile_blocks()  # each block compiled in place (refused with checkpointing on CUDA)
ema_model = None  # float32, never trained directly; eval_only: the EMA weights init_from holds, if any
ema_sd = init_ckpt.get('model_ema') if eval_only else None
if (ema_decay > 0 and not eval_only) or isinstance(ema_sd, dict):
    ema_model = EVA(cfg).to(device).eval().requires_grad_(False)
    if isinstance(ema_sd, dict):
        with input_errors():
            load_pretrained(ema_model, head_rows({'model': ema_sd, 'classes': init_ckpt.get('classes')}),
                            name=f"{init_from}'s model_ema")
    else:
        ema_model.load_state_dict(model.state_dict())
init_step = checkpoint_step(init_ckpt) or 0  # what eval_only reports
del init_ckpt, ema_sd  # not kept for the run: GBs of host memory for EVA-g
nets = {'model': model, **({'model_ema': ema_model} if ema_model is not None else {})}  # the engine trains model itself


@torch.no_grad()
def evaluate(net, dataset):
    """Top-1 / top-5 (%) of each video's softmax summed over its views (EVA-01 video's validate), over the whole set:
    each rank a disjoint share, nothing padded or dropped. An unreadable video is not scored but counted."""
    net.eval()
    sampler = ResumableSampler(len(dataset), world, rank, shuffle=False, pad=False)
    stats = torch.zeros(4, dtype=torch.float64)  # (top-1 hits, top-5 hits, videos scored, unreadable)
    for batch in make_loader(dataset, sampler, micro_batch, num_workers, cuda, loader_timeout):
        if stop():
            break
        dt, views = next(net.parameters()).dtype, batch['image'].to(device, non_blocking=True)  # (B, V, 3, T, S, S)
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda and dt == torch.float32):
            scores = sum(net(normalize_batch(views[:, v], IMAGENET_MEAN, IMAGENET_STD).to(dt)).float().softmax(-1)
                         for v in range(views.shape[1])).cpu()
        targets = torch.zeros_like(scores, dtype=torch.bool)
        scored = (batch['skipped'] == 0) & (batch['label'] >= 0)
        targets[scored, batch['label'][scored]] = True
        stats += torch.tensor([*topk_hits(scores, targets, 5), (batch['skipped'] > 0).sum()], dtype=torch.float64)
    stats = stats.to(device)
    dist.all_reduce(stats)
    net.train()
    n = max(stats[2].item(), 1)
    return {'top1': 100 * stats[0].item() / n, 'top5': 100 * stats[1].item() / n, 'videos': int(stats[2].item()),
            'unreadable': int(stats[3].item())}


def evaluate_all(nets, dataset):
    """{name: net} -> {name: result}, printed on one line. None: cut short by a signal."""
    views = f"{dataset.transform.clips} clip(s) x {dataset.transform.crops} crop(s)"
    results = {n: evaluate(net, dataset) for n, net in nets.items()}
    if cut_short(stop, device):
        return None
    cells = []
    for n, r in results.items():
        unreadable = f", {r['unreadable']} unreadable" if r['unreadable'] else ''
        top5 = f"/{r['top5']:.2f}" if num_classes > 5 else ''  # with 5 classes or fewer top-5 is 100
        cells.append(f"{n} {r['top1']:.2f}{top5} ({r['videos']:,} videos{unreadable})")
    print0(f"{views}: " + '  '.join(cells) + f"  [top-1{'/top-5' if num_classes > 5 else ''}]")
    return results


def evaluate_views(step):
    """The paper's protocol: every view (test_clips x test_crops) of every video -> out_dir/eval.json. A run cut
    short by a signal writes nothing and exits 130."""
    results = evaluate_all(nets, val_views)
    if results is None:
        sys.exit(130)
    write_eval(out_dir, {'init_from': init_from, 'step': step, 'views': [test_clips, test_crops], **results}, eval_only)


# -----------------------------------------------------------------------------
# eval_only: init_from (and the EMA weights its file holds) on every view of the val set, then exit (no training
# data, no engine)
if eval_only:
    evaluate_views(init_step)
    dist.barrier()
    dist.destroy_process_group()
    sys.exit(0)

# -----------------------------------------------------------------------------
# training data: TSN clips, multi-scale crops, colour jitter, grayscale; mixup / cutmix on the batch
train_tf = VideoClips(num_frames, img_size, color_jitter=color_jitter, grayscale=grayscale, multiscale=multiscale_crop)
with input_errors():
    train_src = video_files(data_path, 'train')
    train_src.check_labels(num_classes)
train_set = Samples(train_src, train_tf, seed)
steps_per_epoch = len(train_set) // batch_size
if steps_per_epoch == 0:
    config_error(f"{len(train_set)} training videos are fewer than one batch of {batch_size}")
total_steps = max_steps or epochs * steps_per_epoch
warmup_steps = min(round(warmup_epochs * steps_per_epoch), total_steps)
print0(f"world {world} x micro-batch {micro_batch} x grad-accum {grad_accum} = global batch {batch_size}; "
       f"{len(train_set):,} train / {len(val_src):,} val videos, {num_frames} frames x {img_size} px, "
       f"{steps_per_epoch:,} steps/epoch, {total_steps:,} steps, warmup {warmup_steps:,}; dtype {dtype}, "
       f"ZeRO-{zero_stage}")
mixes = []  # one of the two per batch (EVA-01's CutmixMixupBlending, switch prob 0.5)
if mixup > 0:
    mixes.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
if cutmix > 0:
    mixes.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
mix = v2.RandomChoice(mixes) if mixes else None


def soft_cross_entropy(logits, target):
    """Cross-entropy against soft targets (mixed and/or smoothed), in float32."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def get_lr(step):
    """Linear warmup from 0, then cosine to min_lr (constant when min_lr = lr); each group gets lr x its scale."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


# -----------------------------------------------------------------------------
# engine, resume, log
optimizer = torch.optim.AdamW(param_groups(model, weight_decay, layer_decay), lr=lr, betas=(beta1, beta2), eps=eps,
                              **({'fused': True} if cuda else {}))
engine, optimizer = deepspeed_engine(model, optimizer, batch_size, micro_batch, grad_clip, zero_stage, dtype)
step, client = resume(engine, out_dir, seed, config)  # 1. out_dir's latest checkpoint wins; 2. else init_from
best = client['best'] if step else {'top1': -1.0}
if step and ema_model is not None:
    ema_model.load_state_dict(client['ema'])
log = open_log(out_dir, {'config': config, 'world': world, 'grad_accum': grad_accum, 'start_step': step,
                         'steps_per_epoch': steps_per_epoch, 'total_steps': total_steps}, wandb_project, wandb_run_name)
flops_per_clip = model.flops_per_image()

# -----------------------------------------------------------------------------
# training loop: a single-view evaluation and a checkpoint at the end of every epoch, all the views at the end
data = train_batches(train_set, ResumableSampler(len(train_set), world, rank, seed), micro_batch, grad_accum,
                     steps_per_epoch, step, num_workers, cuda, loader_timeout)
loss_sum, bad = torch.zeros((), device=device), torch.zeros((), device=device)
t_log, n_logged, t_start, start_step = time.time(), 0, time.time(), step
stopping = False  # a signal (stop, set up at the start): save at the next log step and exit 0
while step < total_steps:
    lr_now = get_lr(step)
    for group in optimizer.param_groups:
        group['lr'] = lr_now * group['lr_scale']
    for _ in range(grad_accum):
        batch = next(data)
        x = normalize_batch(batch['image'].to(device, non_blocking=True), IMAGENET_MEAN, IMAGENET_STD)  # (B,3,T,S,S)
        y = batch['label'].to(device, non_blocking=True)
        if mix is not None:  # torchvision's MixUp / CutMix take (B, C, H, W): frames as channels, one box for all
            x, target = mix(x.flatten(1, 2), y)
            x = x.unflatten(1, (3, num_frames))
        else:
            target = F.one_hot(y, num_classes).float()
        target = target * (1 - label_smoothing) + label_smoothing / num_classes
        loss = soft_cross_entropy(engine(x.to(model_dtype)), target)
        engine.backward(loss)
        engine.step()
        loss_sum += loss.detach()
        bad += batch['skipped'].sum()
    step += 1
    n_logged += 1
    if ema_model is not None:
        ema_update_(ema_model, engine.module, ema_decay)
    if step % log_interval == 0 or step == total_steps:
        stats = torch.stack((loss_sum / (n_logged * grad_accum), bad, torch.tensor(stop(), device=device)))
        dist.all_reduce(stats)
        stopping = stats[2].item() > 0
        clips_s = n_logged * batch_size / (time.time() - t_log)
        log({'step': step, 'epoch': round(step / steps_per_epoch, 4), 'loss': stats[0].item() / world, 'lr': lr_now,
             **engine_stats(engine), 'samples_s': round(clips_s, 2),
             'mfu': round(clips_s / world * flops_per_clip / (peak_tflops * 1e12), 4) if cuda else None,
             'bad_samples': int(stats[1].item()),
             'eta_h': round((total_steps - step) * (time.time() - t_start) / (step - start_step) / 3600, 4)})
        loss_sum.zero_()
        t_log, n_logged = time.time(), 0
    epoch_end = step % steps_per_epoch == 0 or step == total_steps
    if epoch_end:
        print0(f"epoch {step / steps_per_epoch:.2f}:")
        results = evaluate_all(nets, val_single)
        if results is None:  # cut short by a signal: not reported; save and stop
            stopping, is_best = True, False
        else:
            log({'step': step, 'epoch': step / steps_per_epoch, 'eval': results}, echo=False)
            top = max(r['top1'] for r in results.values())
            is_best = top > best['top1']
            if is_best:
                best = {'top1': top, 'step': step}
    if save_ckpt and epoch_end or step == stop_step or stopping:
        ema_sd = {k: v.cpu() for k, v in ema_model.state_dict().items()} if ema_model is not None else None
        sd = full_state_dict(engine)  # a collective: every rank
        save_checkpoint(engine, out_dir, step, {'config': config, 'best': best, 'ema': ema_sd},
                        {'last.pt': {'model': sd, 'model_ema': ema_sd, 'model_config': dataclasses.asdict(cfg),
                                     'timm_args': timm_args(cfg), 'classes': names, 'config': config, 'step': step,
                                     'best': best}}, keep_ckpts)
        if epoch_end and is_best and rank == 0:  # best.pt: a copy of last.pt at the best epoch
            shutil.copyfile(os.path.join(out_dir, 'last.pt'), os.path.join(out_dir, 'best.pt.tmp'))
            os.replace(os.path.join(out_dir, 'best.pt.tmp'), os.path.join(out_dir, 'best.pt'))
    if step == stop_step or stopping:
        print0(f"stopped at step {step} ({'signal' if stopping else 'stop_step'}); the same command resumes")
        break
if step == total_steps and step > start_step:
    evaluate_views(step)
print0(f"best single-view top-1 {best['top1']:.3f} at step {best.get('step')}")
if step > start_step:
    print0(f"{step - start_step} steps in {hms(time.time() - t_start)} (to step {step} of {total_steps})")
dist.barrier()
dist.destroy_process_group()
