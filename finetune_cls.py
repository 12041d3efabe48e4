"""
Image classification: fine-tune an EVA encoder (IN-21K intermediate at 224, then IN-1K at 336 or 560) and evaluate
it, the way EVA-01's run_class_finetuning.py does: mean pooling -> fc_norm -> linear head, layer-wise lr decay, a
frozen patch embedding, RandAugment, mixup / cutmix, label smoothing, an EMA of the weights.

    python finetune_cls.py config/finetune_cls_tiny.py                                  # CPU demo
    torchrun --nproc_per_node 8 finetune_cls.py config/finetune_in21k.py --init_from=out/pretrain_eva_g/eva_mim.pt
    torchrun --nproc_per_node 8 finetune_cls.py config/finetune_in1k_336.py --init_from=out/finetune_in21k/best.pt
    python finetune_cls.py config/finetune_in1k_336.py --eval_only=True --init_from=CHECKPOINT   # evaluate only

Expected (EVA paper, Table 3): 89.6 top-1 at 336 px and 89.7 at 560 px on IN-1K val, EMA weights.
Writes out_dir/log.jsonl, out_dir/ckpt/ (DeepSpeed, for resuming), out_dir/last.pt and out_dir/best.pt
({'model': fp32 weights, 'model_ema': EMA weights, ...}; load_pretrained reads them).
"""
import json
import math
import os
import shutil
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchvision.transforms import v2

from data import (CLIP_MEAN, CLIP_STD, ImageFiles, ResumableSampler, Samples, eval_transform, image_source,
                  imagenet_classes, imagenet_real_labels, imagenet_subset, make_loader, topk_hits, train_batches)
from model import EVA, ema_update_, eva_config, fuse_zero_grad_checks, load_pretrained, param_groups

# -----------------------------------------------------------------------------
# config: defaults are the IN-1K 336 px recipe (DESIGN.md section 3)
# I/O
out_dir = 'out/finetune_cls'  # checkpoints and log.jsonl; a run auto-resumes from here
log_interval = 20  # steps between log lines
eval_only = False  # evaluate init_from (raw and, where the file has one, its EMA) and exit
stop_step = 0  # save and exit at this step (e.g. before a job's time limit); 0: run to the end
save_ckpt = True  # checkpoints and last.pt / best.pt at every epoch end (False: none, for benchmarks)
wandb_project = ''  # '' disables wandb
wandb_run_name = 'eva-cls'  # wandb run name
# data
data_path = 'synthetic'  # training images: a class-folder tree, a .txt list 'path label', or 'synthetic'
val_data_path = 'synthetic:1'  # validation images, the same formats
num_classes = 1000  # classifier outputs
synthetic_size = 1_281_167  # images in the synthetic training set (ImageNet-1K's count)
val_size = 50_000  # images in the synthetic validation set
num_workers = 10  # DataLoader workers per GPU
img_size = 336  # train and eval resolution (pos_embed is resized on load)
crop_scale = (0.08, 1.0)  # RandomResizedCrop scale range
rand_augment = True  # RandAugment, 2 ops at magnitude 9 (torchvision's; EVA used timm's rand-m9-mstd0.5-inc1)
mixup = 0.0  # mixup alpha (0: off)
cutmix = 0.0  # cutmix alpha (0: off); with both on, one of the two per batch
label_smoothing = 0.3  # on the (mixed) one-hot targets
crop_pct = 1.0  # eval: shorter side resized to img_size / crop_pct, then a center crop
class_list = ''  # '' = sorted class folders (WordNet-id order for ImageNet); 'imagenet-1k' = timm's list
# robustness evaluation of an IN-1K head, at the end of training and with eval_only ('' skips a set)
in_v2_path = ''  # ImageNet-V2 matched-frequency (class folders '0' ... '999')
in_sketch_path = ''  # ImageNet-Sketch (1000 WordNet-id folders)
in_a_path = ''  # ImageNet-A (200 WordNet-id folders; logits restricted to its 200 classes)
in_r_path = ''  # ImageNet-R (200 WordNet-id folders; logits restricted to its 200 classes)
in_real_path = ''  # the IN-1K val images (ILSVRC2012_val_*.JPEG, any layout) scored with the ReaL labels
objectnet_path = ''  # ObjectNet images in class folders (crop the 1-px border beforehand)
objectnet_mapping = ''  # JSON {ObjectNet folder: [IN-1K indices]}, required with objectnet_path
# model
model_size = 'eva_g'  # a key of model.SIZES
init_from = ''  # checkpoint to start from (anything load_pretrained reads); '' = random init
drop_path = 0.4  # stochastic depth of the last block
freeze_patch_embed = True  # EVA-01 fine-tuning keeps the patch embedding fixed
grad_checkpointing = False  # recompute blocks in backward: less memory, ~1/3 more compute
compile_blocks = False  # torch.compile each block (fused kernels); the first steps compile
ema_decay = 0.9999  # EMA of the weights, evaluated beside them; 0 disables
# optimization
batch_size = 512  # global batch
micro_batch = 16  # per GPU per forward; gradient accumulation fills the rest
epochs = 10  # over the training set
warmup_epochs = 2.0  # linear warmup from 0
lr = 3e-5  # peak learning rate (before layer decay)
min_lr = 1e-6  # end of the cosine decay
layer_decay = 0.95  # lr scale per block from the top: layer_decay ** (depth + 1 - layer)
weight_decay = 0.05  # AdamW, not on biases, norms, pos_embed, cls_token
beta1 = 0.9  # AdamW beta1
beta2 = 0.999  # AdamW beta2
eps = 1e-8  # AdamW epsilon
grad_clip = 0.0  # global gradient-norm clip; 0 disables
# system
dtype = 'fp16'  # 'fp16' (dynamic loss scale), 'bf16' or 'fp32'; a CPU cannot run DeepSpeed fp16: fp32 there
zero_stage = 1  # DeepSpeed ZeRO stage
seed = 0  # init, data order and augmentation
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
config = {k: globals()[k] for k in _keys}  # noqa: F821 (_keys comes from configurator.py)
# -----------------------------------------------------------------------------
# distributed setup: torchrun's env, or one process
import deepspeed  # noqa: E402 (after the configurator, so that --help is instant)

if 'RANK' not in os.environ:
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
    dtype = config['dtype'] = 'fp32'
model_dtype = {'fp16': torch.float16, 'bf16': torch.bfloat16, 'fp32': torch.float32}[dtype]

# -----------------------------------------------------------------------------
# data
train_tf = [v2.RandomResizedCrop(img_size, scale=crop_scale, interpolation=v2.InterpolationMode.BICUBIC),
            v2.RandomHorizontalFlip()]
if rand_augment:
    train_tf.append(v2.RandAugment(num_ops=2, magnitude=9, interpolation=v2.InterpolationMode.BICUBIC))
train_tf += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(CLIP_MEAN, CLIP_STD)]
classes = imagenet_classes(class_list) if class_list else None
val_set = Samples(image_source(val_data_path, img_size, val_size, seed + 1, classes),
                  eval_transform(img_size, crop_pct), seed)
if not eval_only:
    assert batch_size % (micro_batch * world) == 0, \
        f"batch_size {batch_size} is not a multiple of micro_batch {micro_batch} x world size {world}"
    grad_accum = batch_size // (micro_batch * world)
    train_set = Samples(image_source(data_path, img_size, synthetic_size, seed, classes), v2.Compose(train_tf), seed)
    steps_per_epoch = len(train_set) // batch_size
    assert steps_per_epoch > 0, f"{len(train_set)} training images are fewer than one batch of {batch_size}"
    total_steps = epochs * steps_per_epoch
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    sampler = ResumableSampler(len(train_set), world, rank, seed)
    print0(json.dumps(config, indent=1))
    print0(f"world {world} x micro-batch {micro_batch} x grad-accum {grad_accum} = global batch {batch_size}; "
           f"{len(train_set):,} train / {len(val_set):,} val images, {steps_per_epoch:,} steps/epoch, "
           f"{total_steps:,} steps, warmup {warmup_steps:,}; dtype {dtype}, ZeRO-{zero_stage}")
mix = None
if mixup > 0 or cutmix > 0:  # timm's Mixup: one of the two per batch when both are on
    mix = v2.RandomChoice([m for m in (v2.MixUp(alpha=mixup, num_classes=num_classes) if mixup > 0 else None,
                                       v2.CutMix(alpha=cutmix, num_classes=num_classes) if cutmix > 0 else None)
                           if m is not None])


# -----------------------------------------------------------------------------
# model


torch.manual_seed(seed)
cfg = eva_config(model_size, img_size=img_size, num_classes=num_classes, pooling='mean', drop_path=drop_path,
                 grad_checkpointing=grad_checkpointing)
with torch.device(device):
    model = EVA(cfg)
if init_from:
    load_pretrained(model, init_from)
if freeze_patch_embed:
    model.patch_embed.requires_grad_(False)
if compile_blocks:
    model.compile_blocks()  # each block compiled in place (refused with checkpointing on CUDA)
ema_model = None
if ema_decay > 0 and not eval_only:
    ema_model = EVA(cfg).to(device).eval().requires_grad_(False)  # float32, never trained directly
    ema_model.load_state_dict(model.state_dict())


@torch.no_grad()
def evaluate(net, dataset, classes=None, correct=None):
    """Top-1 / top-5 (%) over a whole set: each rank a disjoint share, nothing padded or dropped. classes:
    indices predictions are restricted to (IN-A, IN-R); correct: index -> list of correct classes (ReaL,
    ObjectNet), instead of the dataset's label."""
    net.eval()
    sampler = ResumableSampler(len(dataset), world, rank, shuffle=False, pad=False)
    stats = torch.zeros(3, dtype=torch.float64)  # (top-1 hits, top-5 hits, images scored)
    for x, y, _, idx, _ in make_loader(dataset, sampler, micro_batch, num_workers, cuda):
        dt = next(net.parameters()).dtype
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda and dt == torch.float32):
            logits = net(x.to(device, dt, non_blocking=True)).float().cpu()
        targets = torch.zeros_like(logits, dtype=torch.bool)
        for row, (i, label) in enumerate(zip(idx.tolist(), y.tolist())):
            targets[row, correct(i) if correct is not None else [label] if label >= 0 else []] = True
        stats += torch.tensor(topk_hits(logits, targets, 5, classes), dtype=torch.float64)
    stats = stats.to(device)
    dist.all_reduce(stats)
    net.train()
    n = max(stats[2].item(), 1)
    return {'top1': 100 * stats[0].item() / n, 'top5': 100 * stats[1].item() / n, 'images': int(stats[2].item())}


def robustness_sets():
    """name -> (dataset, classes, correct) for the variants whose paths are set (an IN-1K head only)."""
    if not any((in_v2_path, in_sketch_path, in_a_path, in_r_path, in_real_path, objectnet_path)):
        return {}
    assert num_classes == 1000, f"the robustness sets need an IN-1K head, the model has {num_classes} classes"
    in1k, tf, sets = imagenet_classes('imagenet-1k'), eval_transform(img_size, crop_pct), {}
    for name, path, subset in (('IN-V2', in_v2_path, None), ('IN-Sketch', in_sketch_path, None),
                               ('IN-A', in_a_path, 'a'), ('IN-R', in_r_path, 'r')):
        if path:
            sets[name] = (Samples(ImageFiles(path, in1k), tf, seed), subset and imagenet_subset(subset), None)
    if in_real_path:
        src, real = ImageFiles(in_real_path), imagenet_real_labels()
        missing = [src.name(i) for i in range(len(src)) if os.path.basename(src.name(i)) not in real]
        assert not missing, f"not ImageNet val files (ILSVRC2012_val_*.JPEG), so no ReaL labels: {missing[:3]}"
        sets['IN-ReaL'] = (Samples(src, tf, seed), None, lambda i: real[os.path.basename(src.name(i))])
    if objectnet_path:  # ObjectNet's 113 classes that overlap IN-1K; predictions among their IN-1K classes
        assert objectnet_mapping, "objectnet_path needs objectnet_mapping: JSON {folder: [IN-1K indices]}"
        src, mapping = ImageFiles(objectnet_path), json.load(open(objectnet_mapping))
        classes = sorted({c for v in mapping.values() for c in v})
        sets['ObjectNet'] = (Samples(src, tf, seed), classes,
                             lambda i: mapping.get(src.classes[src.items[i][1]], []))
    return sets


def evaluate_all(nets, robust=False):
    """{name: net} -> {name: {set: result}} on the val set and, when robust, the robustness sets; printed as
    one table with the average drop from the IN-1K val top-1 (the paper's summary of robustness)."""
    sets = {'val': (val_set, None, None), **(robustness_sets() if robust else {})}
    results = {n: {s: evaluate(net, *args) for s, args in sets.items()} for n, net in nets.items()}
    for n, res in results.items():
        extra = [s for s in res if s != 'val']
        if extra:
            res['avg_drop'] = sum(res['val']['top1'] - res[s]['top1'] for s in extra) / len(extra)
        print0(f"{n}: " + '  '.join(f"{s} {r['top1']:.2f}/{r['top5']:.2f} ({r['images']:,})"
                                    for s, r in res.items() if s != 'avg_drop') +
               (f"  | average drop from val {res['avg_drop']:.2f}" if extra else '') + "  [top-1/top-5 (images)]")
    return results


if eval_only:
    assert init_from, "eval_only needs --init_from=CHECKPOINT"
    nets = {'model': model.eval()}
    ckpt = torch.load(init_from, map_location='cpu', weights_only=False)
    if isinstance(ckpt, dict) and isinstance(ckpt.get('model_ema'), dict):  # our last.pt / best.pt
        nets['model_ema'] = EVA(cfg).to(device)
        load_pretrained(nets['model_ema'], {'model': ckpt['model_ema']})
    results = evaluate_all(nets, robust=True)
    if master:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, 'eval.json'), 'w') as f:
            json.dump({'init_from': init_from, **results}, f, indent=1)
    dist.destroy_process_group()
    raise SystemExit(0)

# -----------------------------------------------------------------------------
# engine
groups = param_groups(model, weight_decay, layer_decay)
optimizer = torch.optim.AdamW(groups, lr=lr, betas=(beta1, beta2), eps=eps, **({'fused': True} if cuda else {}))
ds_config = {
    'train_batch_size': batch_size,
    'train_micro_batch_size_per_gpu': micro_batch,
    'gradient_accumulation_steps': grad_accum,
    'gradient_clipping': grad_clip,
    'zero_optimization': {'stage': zero_stage, 'contiguous_gradients': True, 'overlap_comm': cuda},
    'fp16': {'enabled': dtype == 'fp16', 'loss_scale': 0, 'initial_scale_power': 16, 'loss_scale_window': 500,
             'hysteresis': 2, 'min_loss_scale': 1},
    'bf16': {'enabled': dtype == 'bf16'},
    'steps_per_print': 1 << 30,
}
engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
fuse_zero_grad_checks(optimizer)  # DeepSpeed's per-tensor inf/NaN and norm loops as one kernel each


def get_lr(step):
    """Linear warmup from 0, then cosine to min_lr; each group gets lr * its layer-decay scale."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def soft_cross_entropy(logits, target):
    """Cross-entropy against soft targets (mixed and/or smoothed), in float32."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()

# -----------------------------------------------------------------------------
# checkpoints (as pretrain.py): DeepSpeed's + RNG per rank + EMA in the client state; last.pt / best.pt


ckpt_dir = os.path.join(out_dir, 'ckpt')


def atomic_save(obj, path):
    torch.save(obj, path + '.tmp')
    os.replace(path + '.tmp', path)


def save_checkpoint(step, best):
    from deepspeed.utils import safe_get_full_fp32_param
    tag = f'step{step}'
    ema_sd = {k: v.cpu() for k, v in ema_model.state_dict().items()} if ema_model is not None else None
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state={'step': step, 'config': config, 'best': best,
                                                            'ema': ema_sd}, save_latest=False)
    atomic_save({'torch': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state() if cuda else None},
                os.path.join(ckpt_dir, tag, f'rng_rank{rank}.pt'))
    sd = {}  # fp32 master weights: gathered by every rank (a collective), kept by rank 0, which writes them
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p) if p.requires_grad else None  # frozen: not in the optimizer
        if master:
            sd[name] = (full if full is not None else p.detach().float()).cpu().clone()
    dist.barrier()
    if master:
        atomic_save({'model': sd, 'model_ema': ema_sd, 'config': config, 'step': step, 'best': best},
                    os.path.join(out_dir, 'last.pt'))
        with open(os.path.join(ckpt_dir, 'latest.tmp'), 'w') as f:
            f.write(tag)
        os.replace(os.path.join(ckpt_dir, 'latest.tmp'), os.path.join(ckpt_dir, 'latest'))
        for d in os.listdir(ckpt_dir):
            if d.startswith('step') and d != tag:
                shutil.rmtree(os.path.join(ckpt_dir, d), ignore_errors=True)
    dist.barrier()


step, best = 0, {'top1': -1.0}
latest = os.path.join(ckpt_dir, 'latest')
if os.path.exists(latest):
    tag = open(latest).read().strip()
    _, client = engine.load_checkpoint(ckpt_dir, tag=tag)
    step, best = client['step'], client['best']
    if ema_model is not None:
        ema_model.load_state_dict(client['ema'])
    rng = torch.load(os.path.join(ckpt_dir, tag, f'rng_rank{rank}.pt'), weights_only=False)
    torch.set_rng_state(rng['torch'])
    if cuda and rng['cuda'] is not None:
        torch.cuda.set_rng_state(rng['cuda'])
    print0(f"resumed from {ckpt_dir}/{tag} at step {step}")
else:
    torch.manual_seed(seed + rank)

os.makedirs(out_dir, exist_ok=True)
if master:
    log_file = open(os.path.join(out_dir, 'log.jsonl'), 'a')
    log_file.write(json.dumps({'config': config, 'world': world, 'grad_accum': grad_accum, 'start_step': step,
                               'steps_per_epoch': steps_per_epoch, 'total_steps': total_steps}) + '\n')
    wandb = None
    if wandb_project:
        import wandb
        wandb.init(project=wandb_project, name=wandb_run_name, config=config, resume='allow')


def log(row):
    if master:
        log_file.write(json.dumps(row) + '\n')
        log_file.flush()
        if wandb is not None:
            wandb.log(row, step=row['step'])


# -----------------------------------------------------------------------------
# training loop: evaluate and checkpoint at the end of every epoch
engine.train()
data = train_batches(train_set, sampler, micro_batch, grad_accum, steps_per_epoch, step, num_workers, cuda)
loss_sum, bad = torch.zeros((), device=device), torch.zeros((), device=device)
t_log, n_logged = time.time(), 0
while step < total_steps:
    lr_now = get_lr(step)
    for group in optimizer.param_groups:
        group['lr'] = lr_now * group['lr_scale']
    for _ in range(grad_accum):
        x, y, _, _, skipped = next(data)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if mix is not None:
            x, target = mix(x, y)  # soft targets (B, num_classes)
        else:
            target = F.one_hot(y, num_classes).float()
        target = target * (1 - label_smoothing) + label_smoothing / num_classes
        loss = soft_cross_entropy(engine(x.to(model_dtype)), target)
        engine.backward(loss)
        engine.step()
        loss_sum += loss.detach()
        bad += skipped.sum()
    step += 1
    n_logged += 1
    if ema_model is not None:
        ema_update_(ema_model, engine.module, ema_decay)
    if step % log_interval == 0 or step == total_steps:
        stats = torch.stack((loss_sum / (n_logged * grad_accum), bad))
        dist.all_reduce(stats)
        img_s = n_logged * batch_size / (time.time() - t_log)
        row = {'step': step, 'epoch': round(step / steps_per_epoch, 4), 'loss': stats[0].item() / world,
               'lr': lr_now, 'loss_scale': optimizer.cur_scale if dtype == 'fp16' else None,
               'skipped': engine.skipped_steps, 'img_s': round(img_s, 1), 'bad_samples': int(stats[1].item()),
               'mem_gb': round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}
        log(row)
        print0(f"step {step}/{total_steps} ep {row['epoch']:.2f} | loss {row['loss']:.4f} | lr {lr_now:.2e} | "
               f"skipped {row['skipped']} | {img_s:.1f} img/s | mem {row['mem_gb']} GiB | bad {row['bad_samples']}")
        loss_sum.zero_()
        t_log, n_logged = time.time(), 0
    if step % steps_per_epoch == 0 or step == total_steps:
        print0(f"epoch {step / steps_per_epoch:.2f}:")
        nets = {'model': engine.module, **({'model_ema': ema_model} if ema_model is not None else {})}
        results = evaluate_all(nets, robust=step == total_steps)
        top = max(r['val']['top1'] for r in results.values())
        log({'step': step, 'epoch': step / steps_per_epoch, 'eval': results})
        is_best = top > best['top1']
        if is_best:
            best = {'top1': top, 'step': step}
        if save_ckpt:
            save_checkpoint(step, best)
        if is_best and master and save_ckpt:  # best.pt: a copy of last.pt at the best epoch
            shutil.copyfile(os.path.join(out_dir, 'last.pt'), os.path.join(out_dir, 'best.pt.tmp'))
            os.replace(os.path.join(out_dir, 'best.pt.tmp'), os.path.join(out_dir, 'best.pt'))
    elif step == stop_step:
        save_checkpoint(step, best)
    if step == stop_step:
        print0(f"stopping at step {step} (stop_step); rerun the same command to resume")
        break
print0(f"best top-1 {best['top1']:.3f} at step {best.get('step')}")
dist.barrier()
dist.destroy_process_group()
