"""
Image classification: fine-tune an EVA encoder (IN-21K intermediate at 224, then IN-1K at 336 or 560) and evaluate
it, the way EVA-01's run_class_finetuning.py does: mean pooling -> fc_norm -> linear head, layer-wise lr decay, a
frozen patch embedding, RandAugment, mixup / cutmix, label smoothing, an EMA of the weights.

    python finetune_cls.py config/finetune_cls_tiny.py                                  # CPU demo
    torchrun --nproc_per_node 8 finetune_cls.py config/finetune_in21k.py --init_from=out/pretrain_eva_g/eva_mim.pt
    torchrun --nproc_per_node 8 finetune_cls.py config/finetune_in1k_336.py --init_from=out/finetune_in21k/best.pt
    python finetune_cls.py config/finetune_in1k_336.py --eval_only=True --init_from=CHECKPOINT   # evaluate only
    python finetune_cls.py config/finetune_in1k_336.py --init_from=CHECKPOINT --predict=cat.jpg  # classify images

Expected (EVA paper, Table 3): 89.6 top-1 at 336 px and 89.7 at 560 px on IN-1K val, EMA weights.
Writes out_dir/log.jsonl, out_dir/ckpt/ (DeepSpeed, for resuming), out_dir/last.pt and out_dir/best.pt
({'model': fp32 weights, 'model_ema': EMA weights, ...}; load_pretrained reads them). open_clip (ImageNet's class
names for --predict) is imported where it is used: it takes seconds to import.
"""
import dataclasses
import json
import math
import os
import shutil
import sys
import time

# common first: it sets OpenMP's wait policy, which torch's import fixes
from common import (batch_split, config_error, cut_short, deepspeed_engine, engine_stats, full_state_dict, hms,
                    init_distributed, input_errors, on_gpu, open_log, print0, require_choice, require_files,
                    resolve_dtype, resume, save_checkpoint, stop_signal, write_eval)
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchvision.transforms import v2

from data import (CLIP_MEAN, CLIP_STD, ImageFiles, ResumableSampler, Samples, eval_transform, image_source,
                  imagenet_classes, imagenet_real_labels, imagenet_subset, load_rgb, make_loader, topk_hits,
                  train_batches)
from model import (EVA, SIZES, checkpoint_step, ema_update_, eva_config, load_pretrained, param_groups, read_checkpoint,
                   timm_args, unwrap_state_dict)

# -----------------------------------------------------------------------------
# config: defaults are the IN-1K 336 px recipe (EVA-01's IN-1K fine-tuning script)
# I/O
out_dir = 'out/finetune_cls'  # checkpoints and log.jsonl; a run auto-resumes from here
log_interval = 20  # steps between log lines
eval_only = False  # evaluate init_from (raw and, where the file has one, its EMA) and exit
predict = ''  # image files (joined by ','): print each one's top-5 classes under init_from, and exit
stop_step = 0  # save and exit at this step (e.g. before a job's time limit); 0: run to the end
save_ckpt = True  # checkpoints and last.pt / best.pt at every epoch end (False: none, for benchmarks)
keep_ckpts = 2  # DeepSpeed checkpoints kept in out_dir/ckpt (older ones are deleted)
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
freeze_patch_embed = True  # EVA-01 fine-tuning keeps the patch embedding fixed (see the model section)
grad_checkpointing = False  # recompute blocks in backward: less memory, ~1/3 more compute
compile_blocks = False  # torch.compile each block (fused kernels); the first steps compile
ema_decay = 0.9999  # EMA of the weights, evaluated beside them; 0 disables
# optimization
batch_size = 512  # global batch
micro_batch = 16  # per GPU per forward; gradient accumulation fills the rest
max_steps = 0  # >0: the run's length in optimizer steps instead of epochs (every stage's spelling)
epochs = 10  # over the training set
warmup_epochs = 2.0  # linear warmup from 0
lr = 3e-5  # peak learning rate (before layer decay)
min_lr = 0.0  # end of the cosine decay (EVA-01's IN-1K scripts: 0; its IN-21K script keeps the default 1e-6)
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
peak_tflops = 989.0  # dense fp16 peak per GPU for MFU (H100/H200 SXM: 989)
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
config = {k: globals()[k] for k in _keys}  # noqa: F821 (_keys comes from configurator.py)
eval_only = eval_only or bool(predict)  # predict is an evaluation of a few files
# -----------------------------------------------------------------------------
rank, local_rank, world, device = init_distributed(num_workers)  # torchrun's env, or one process
stop = stop_signal()  # Ctrl-C / SIGTERM: an evaluation stops at its next batch, training at its next log step
cuda = on_gpu(device)  # the GPU's choices: fp16, fused AdamW, ... (also the memory projection's meta device)
if eval_only and not init_from:
    config_error("eval_only and predict need --init_from=CHECKPOINT")
require_files(init_from=init_from, objectnet_mapping=objectnet_mapping)
require_choice('model_size', model_size, SIZES)
if val_data_path.startswith('synthetic') and not data_path.startswith('synthetic'):
    print0(f"warning: training on {data_path} but validating on synthetic images: set val_data_path")
dtype, model_dtype = resolve_dtype(dtype, cuda)
config['dtype'] = dtype

with input_errors():  # not a checkpoint: one error line
    init_ckpt = read_checkpoint(init_from) if init_from else {}  # read once: EVA-g's file is GBs
if eval_only:  # evaluate or predict with the checkpoint's own head: its class count, and its class names if saved
    head = unwrap_state_dict(init_ckpt)[0].get('head.weight') if init_from else None
    if head is None:
        config_error(f"{init_from} has no classifier head (head.weight) to evaluate or predict with")
    if head.shape[0] != num_classes:
        print0(f"num_classes {num_classes} -> {head.shape[0]}: the head of {init_from}")
        num_classes = config['num_classes'] = head.shape[0]

# -----------------------------------------------------------------------------
# data: the training source (not for eval_only), whose class folders number every split (a val tree lacking a
# class keeps the labels after it), then the validation set; the training transforms follow the eval_only exit.
# eval_only: the checkpoint's class names number the val folders, where it saved them
classes = imagenet_classes(class_list) if class_list else None
train_src = None
with input_errors():  # no such folder, no images, a class folder the class list lacks: one error line
    if eval_only:
        classes = classes or init_ckpt.get('classes')
    else:
        train_src = image_source(data_path, img_size, synthetic_size, seed, classes)
        classes = classes or getattr(train_src, 'classes', None)
    val_src = None if predict else image_source(val_data_path, img_size, val_size, seed + 1, classes)
class_names = classes or list(getattr(train_src, 'SHAPES', ())[:num_classes]) or None  # saved with the weights
val_set = Samples(val_src, eval_transform(img_size, crop_pct), seed) if val_src else None
micro_batch, grad_accum = batch_split(batch_size, micro_batch, world)
config['micro_batch'] = micro_batch

# -----------------------------------------------------------------------------
# model
torch.manual_seed(seed)
cfg = eva_config(model_size, img_size=img_size, num_classes=num_classes, pooling='mean', drop_path=drop_path,
                 grad_checkpointing=grad_checkpointing)
with torch.device(device):
    model = EVA(cfg)
if init_from:
    with input_errors():  # another model's: one error line
        load_pretrained(model, init_ckpt, name=init_from)
# EVA-01 detaches the patch embedding's output (stop_grad_conv1) and leaves its parameters in the layer-0 optimizer
# groups. DeepSpeed gives a parameter without a gradient a zero one, so there AdamW's moments stay 0 and only the
# decoupled weight decay acts: the kernel shrinks by (1 - lr_0 * wd) a step (the bias has no decay), ~0.23% over the
# 336 px IN-1K recipe (lr_0 = 3e-5 * 0.95^41). Frozen and out of the optimizer, ours stays exactly as pretrained:
# the same training up to that shrink, which we choose not to reproduce.
if freeze_patch_embed:
    model.patch_embed.requires_grad_(False)
if compile_blocks:
    model.compile_blocks()  # each block compiled in place (refused with checkpointing on CUDA)
ema_model = None  # float32, never trained directly; eval_only: the EMA weights init_from holds, if any
ema_sd = init_ckpt.get('model_ema') if eval_only else None
if (ema_decay > 0 and not eval_only) or isinstance(ema_sd, dict):
    ema_model = EVA(cfg).to(device).eval().requires_grad_(False)
    if isinstance(ema_sd, dict):
        with input_errors():
            load_pretrained(ema_model, {'model': ema_sd}, name=f"{init_from}'s model_ema")
    else:
        ema_model.load_state_dict(model.state_dict())
init_step = checkpoint_step(init_ckpt) or 0  # what eval_only reports
del init_ckpt, ema_sd  # not kept for the run: GBs of host memory for EVA-g
nets = {'model': model, **({'model_ema': ema_model} if ema_model is not None else {})}  # the engine trains model itself


@torch.no_grad()
def evaluate(net, dataset, classes=None, correct=None):
    """Top-1 / top-5 (%) over a whole set: each rank a disjoint share, nothing padded or dropped. classes:
    indices predictions are restricted to (IN-A, IN-R); correct: index -> list of correct classes (ReaL,
    ObjectNet), instead of the dataset's label. An unreadable image is not scored (its stand-in is the next one)
    but counted."""
    net.eval()
    sampler = ResumableSampler(len(dataset), world, rank, shuffle=False, pad=False)
    stats = torch.zeros(4, dtype=torch.float64)  # (top-1 hits, top-5 hits, images scored, unreadable)
    for batch in make_loader(dataset, sampler, micro_batch, num_workers, cuda):
        if stop():
            break
        dt = next(net.parameters()).dtype
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda and dt == torch.float32):
            logits = net(batch['image'].to(device, dt, non_blocking=True)).float().cpu()
        targets = torch.zeros_like(logits, dtype=torch.bool)
        for row, (i, label, bad) in enumerate(zip(*(batch[k].tolist() for k in ('index', 'label', 'skipped')))):
            if bad:  # an unreadable image's stand-in is not scored
                continue
            if correct is not None:
                targets[row, correct(i)] = True
            elif label >= 0:  # a row without a correct class is not scored
                targets[row, label] = True
        stats += torch.tensor([*topk_hits(logits, targets, 5, classes), (batch['skipped'] > 0).sum()],
                              dtype=torch.float64)
    stats = stats.to(device)
    dist.all_reduce(stats)
    net.train()
    n = max(stats[2].item(), 1)
    return {'top1': 100 * stats[0].item() / n, 'top5': 100 * stats[1].item() / n, 'images': int(stats[2].item()),
            'unreadable': int(stats[3].item())}


def robustness_sets():
    """name -> (dataset, classes, correct) for the variants whose paths are set (an IN-1K head only)."""
    if not any((in_v2_path, in_sketch_path, in_a_path, in_r_path, in_real_path, objectnet_path)):
        return {}
    if num_classes != 1000:
        config_error(f"the robustness sets need an IN-1K head, the model has {num_classes} classes")
    in1k, tf, sets = imagenet_classes('imagenet-1k'), eval_transform(img_size, crop_pct), {}
    for name, path, subset in (('IN-V2', in_v2_path, None), ('IN-Sketch', in_sketch_path, None),
                               ('IN-A', in_a_path, 'a'), ('IN-R', in_r_path, 'r')):
        if path:
            sets[name] = (Samples(ImageFiles(path, in1k), tf, seed), subset and imagenet_subset(subset), None)
    if in_real_path:
        src, real = ImageFiles(in_real_path), imagenet_real_labels()
        missing = [src.name(i) for i in range(len(src)) if os.path.basename(src.name(i)) not in real]
        if missing:
            config_error(f"not ImageNet val files (ILSVRC2012_val_*.JPEG), so no ReaL labels: {missing[:3]}")
        sets['IN-ReaL'] = (Samples(src, tf, seed), None, lambda i: real[os.path.basename(src.name(i))])
    if objectnet_path:  # ObjectNet's 113 classes that overlap IN-1K; predictions among their IN-1K classes
        if not objectnet_mapping:
            config_error("objectnet_path needs objectnet_mapping: JSON {folder: [IN-1K indices]}")
        src, mapping = ImageFiles(objectnet_path), json.load(open(objectnet_mapping))
        classes = sorted({c for v in mapping.values() for c in v})
        sets['ObjectNet'] = (Samples(src, tf, seed), classes,
                             lambda i: mapping.get(src.classes[src.label(i)], []))
    return sets


def evaluate_all(nets, robust=False):
    """{name: net} -> {name: {set: result}} on the val set and, when robust, the robustness sets; printed as
    one table with the average drop from the IN-1K val top-1 (the paper's summary of robustness). None: cut short."""
    sets = {'val': (val_set, None, None), **(robustness_sets() if robust else {})}
    results = {n: {s: evaluate(net, *args) for s, args in sets.items()} for n, net in nets.items()}
    if cut_short(stop, device):
        return None
    for n, res in results.items():
        extra = [s for s in res if s != 'val']
        if extra:
            res['avg_drop'] = sum(res['val']['top1'] - res[s]['top1'] for s in extra) / len(extra)
        cells = []
        for s, r in res.items():
            if s == 'avg_drop':
                continue
            unreadable = f", {r['unreadable']} unreadable" if r['unreadable'] else ''
            top5 = f"/{r['top5']:.2f}" if num_classes > 5 else ''  # with 5 classes or fewer top-5 is 100
            cells.append(f"{s} {r['top1']:.2f}{top5} ({r['images']:,}{unreadable})")
        if extra:
            cells.append(f"| average drop from val {res['avg_drop']:.2f}")
        print0(f"{n}: " + '  '.join(cells) + f"  [top-1{'/top-5' if num_classes > 5 else ''} (images)]")
    return results


def predict_files(net, paths):
    """Each image's top-5 classes under net (the checkpoint's head): ImageNet's names for 1000 classes (its folders,
    wnids, sort in their order), else the class names the checkpoint saved (or class_list's), else the indices. No val
    set is read."""
    from open_clip import IMAGENET_CLASSNAMES
    names = IMAGENET_CLASSNAMES if num_classes == 1000 else classes or [str(c) for c in range(num_classes)]
    net.eval()
    for path in paths:
        try:
            x = eval_transform(img_size, crop_pct)(load_rgb(path))[None].to(device)
        except Exception as e:  # one line per file that is not an image, and on to the next
            print0(f"{path}: unreadable ({type(e).__name__}: {str(e)[:200]})")
            continue
        with torch.no_grad():
            p = net(x).float().softmax(-1)[0]
        top = p.topk(min(5, num_classes)).indices.tolist()
        print0(f"{path}: " + ', '.join(f"{names[i]} {p[i]:.1%}" for i in top))


# -----------------------------------------------------------------------------
# eval_only: init_from (and the EMA weights its file holds) on the val set and the robustness sets, or predict, then
# exit (no training data, no engine)
if eval_only:
    if predict:
        predict_files(nets.get('model_ema', model), predict.split(','))
    else:
        results = evaluate_all(nets, robust=True)
        if results is None:
            sys.exit(130)  # cut short by Ctrl-C: nothing written
        write_eval(out_dir, {'init_from': init_from, 'step': init_step, **results}, True)
    dist.barrier()
    dist.destroy_process_group()
    sys.exit(0)

# -----------------------------------------------------------------------------
# training data: RandomResizedCrop, flip, RandAugment; mixup / cutmix on the batch
train_tf = [v2.RandomResizedCrop(img_size, scale=crop_scale, interpolation=v2.InterpolationMode.BICUBIC),
            v2.RandomHorizontalFlip()]
if rand_augment:
    train_tf.append(v2.RandAugment(num_ops=2, magnitude=9, interpolation=v2.InterpolationMode.BICUBIC))
train_tf += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(CLIP_MEAN, CLIP_STD)]
train_set = Samples(train_src, v2.Compose(train_tf), seed)
steps_per_epoch = len(train_set) // batch_size
if steps_per_epoch == 0:
    config_error(f"{len(train_set)} training images are fewer than one batch of {batch_size}")
labels = getattr(train_set.source, 'labels', None)  # class folders' or a list's labels (an array)
found = int(labels.max(initial=-1)) + 1 if labels is not None else train_set.source.num_classes  # or the synthetic
if found > num_classes:
    config_error(f"data_path {data_path} has {found} classes, more than the head's num_classes={num_classes}")
if found < num_classes and not class_list:
    print0(f"warning: data_path {data_path} has {found} classes, the head num_classes={num_classes}")
for src in (train_src, val_set.source):  # a list's label outside the head (or none): one line naming file and line
    if isinstance(src, ImageFiles):
        with input_errors():
            src.check_labels(num_classes)
total_steps = max_steps or epochs * steps_per_epoch
warmup_steps = min(round(warmup_epochs * steps_per_epoch), total_steps)
print0(f"world {world} x micro-batch {micro_batch} x grad-accum {grad_accum} = global batch {batch_size}; "
       f"{len(train_set):,} train / {len(val_set):,} val images, {steps_per_epoch:,} steps/epoch, "
       f"{total_steps:,} steps, warmup {warmup_steps:,}; dtype {dtype}, ZeRO-{zero_stage}")
mixes = []  # timm's Mixup: one of the two per batch when both are on
if mixup > 0:
    mixes.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
if cutmix > 0:
    mixes.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
mix = v2.RandomChoice(mixes) if mixes else None


def soft_cross_entropy(logits, target):
    """Cross-entropy against soft targets (mixed and/or smoothed), in float32."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def get_lr(step):
    """Linear warmup from 0, then cosine to min_lr; each group gets lr * its layer-decay scale."""
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
flops_per_image = model.flops_per_image()

# -----------------------------------------------------------------------------
# training loop: evaluate and checkpoint at the end of every epoch
data = train_batches(train_set, ResumableSampler(len(train_set), world, rank, seed), micro_batch, grad_accum,
                     steps_per_epoch, step, num_workers, cuda)
loss_sum, bad = torch.zeros((), device=device), torch.zeros((), device=device)
t_log, n_logged, t_start, start_step = time.time(), 0, time.time(), step
stopping = False  # a signal (stop, set up at the start): save at the next log step and exit 0
while step < total_steps:
    lr_now = get_lr(step)
    for group in optimizer.param_groups:
        group['lr'] = lr_now * group['lr_scale']
    for _ in range(grad_accum):
        batch = next(data)
        x, y = batch['image'].to(device, non_blocking=True), batch['label'].to(device, non_blocking=True)
        if mix is not None:
            x, target = mix(x, y)  # soft targets (B, num_classes)
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
        img_s = n_logged * batch_size / (time.time() - t_log)
        log({'step': step, 'epoch': round(step / steps_per_epoch, 4), 'loss': stats[0].item() / world, 'lr': lr_now,
             **engine_stats(engine), 'img_s': round(img_s, 1),
             'mfu': round(img_s / world * flops_per_image / (peak_tflops * 1e12), 4) if cuda else None,
             'bad_samples': int(stats[1].item()),
             'eta_h': round((total_steps - step) * (time.time() - t_start) / (step - start_step) / 3600, 4)})
        loss_sum.zero_()
        t_log, n_logged = time.time(), 0
    epoch_end = step % steps_per_epoch == 0 or step == total_steps
    if epoch_end:
        print0(f"epoch {step / steps_per_epoch:.2f}:")
        results = evaluate_all(nets, robust=step == total_steps)
        if results is None:  # cut short by a signal: not reported; save and stop
            stopping, is_best = True, False
        else:
            log({'step': step, 'epoch': step / steps_per_epoch, 'eval': results}, echo=False)
            top = max(r['val']['top1'] for r in results.values())
            is_best = top > best['top1']
            if is_best:
                best = {'top1': top, 'step': step}
    if save_ckpt and epoch_end or step == stop_step or stopping:
        ema_sd = {k: v.cpu() for k, v in ema_model.state_dict().items()} if ema_model is not None else None
        sd = full_state_dict(engine)  # a collective: every rank
        save_checkpoint(engine, out_dir, step, {'config': config, 'best': best, 'ema': ema_sd},
                        {'last.pt': {'model': sd, 'model_ema': ema_sd, 'model_config': dataclasses.asdict(cfg),
                                     'timm_args': timm_args(cfg), 'config': config, 'step': step, 'best': best,
                                     'classes': class_names}},
                        keep_ckpts)
        if epoch_end and is_best and rank == 0:  # best.pt: a copy of last.pt at the best epoch
            shutil.copyfile(os.path.join(out_dir, 'last.pt'), os.path.join(out_dir, 'best.pt.tmp'))
            os.replace(os.path.join(out_dir, 'best.pt.tmp'), os.path.join(out_dir, 'best.pt'))
    if step == stop_step or stopping:
        print0(f"stopped at step {step} ({'signal' if stopping else 'stop_step'}); the same command resumes")
        break
print0(f"best top-1 {best['top1']:.3f} at step {best.get('step')}")
if step > start_step:
    print0(f"{step - start_step} steps in {hms(time.time() - t_start)} (to step {step} of {total_steps})")
dist.barrier()
dist.destroy_process_group()
