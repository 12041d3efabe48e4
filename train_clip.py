"""
EVA-CLIP: contrastive image-text training of an EVA image tower, initialised from the MIM model, with OpenAI
CLIP-L's text tower (EVA paper, sec. 2.3.5), and zero-shot evaluation: classification with class-name prompts,
image <-> text retrieval.

    python train_clip.py config/clip_tiny.py                                        # CPU demo, about 3 minutes
    torchrun --nnodes 32 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint $HOST:29500 train_clip.py \\
        config/clip_eva_g.py --init_from=out/pretrain_eva_g/eva_mim.pt \\
        --train_data='/data/laion400m/{00000..41407}.tar' --zeroshot_data=/data/imagenet/val
    python train_clip.py config/clip_eva_g.py --eval_only=True --init_from=out/clip_eva_g/clip.pt \\
        --zeroshot_data=/data/imagenet/val --retrieval_data=/data/coco/val5k.csv       # evaluate a checkpoint

Expected (EVA paper, sec. 2.3.5; EVA-CLIP's model card): EVA-CLIP g/14 after 11B samples of LAION-400M at batch
41k on 256 GPUs reaches 78.5 zero-shot top-1 on IN-1K val. The run resumes from out_dir by itself. Writes
out_dir/log.jsonl, out_dir/ckpt/ (DeepSpeed, for resuming), out_dir/clip.pt (fp32 weights: visual.* with EVA's key
names, text.*, logit_scale; init_from and load_pretrained read it) and, at the end, out_dir/open_clip/, a folder
open_clip loads (README: EVA-CLIP; `python model.py open_clip CLIP.pt DIR` exports any clip.pt).
"""
import math
import os
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

from data import (CLIP_MEAN, CLIP_STD, CaptionFiles, ImageFiles, ResumableSampler, Samples, SyntheticShapes,
                  TarShards, caption_source, eval_transform, image_source, imagenet_classes, load_rgb, make_loader,
                  recall_at_k, topk_hits, train_batches)
from model import (CLIP, SIZES, TEXT_EMBEDDINGS, TEXT_SIZES, clip_loss, eva_config, export_open_clip, load_pretrained,
                   load_text_tower, param_groups, read_checkpoint)

# -----------------------------------------------------------------------------
# config: EVA-CLIP g/14 (EVA paper sec. 2.3.5; the schedule is ours, see config/clip_eva_g.py)
# I/O
out_dir = 'out/clip'  # checkpoints and log.jsonl; a run auto-resumes from here
log_interval = 20  # steps between log lines
eval_interval = 2000  # steps between zero-shot evaluations and checkpoints (one of each also at the end)
stop_step = 0  # save and exit at this step (e.g. before a job's time limit); 0: run to the end
eval_only = False  # evaluate init_from (a clip.pt or an open_clip EVA-CLIP file) and exit
keep_ckpts = 2  # DeepSpeed checkpoints kept in out_dir/ckpt (older ones are deleted)
wandb_project = ''  # '' disables wandb
wandb_run_name = 'eva-clip'  # wandb run name
# data
train_data = 'synthetic'  # 'synthetic', a .csv/.tsv of image paths and captions, or tar shards (a folder, {a..b})
csv_img_key = 'filepath'  # image-path column of a .csv/.tsv (open_clip's default name)
csv_caption_key = 'title'  # caption column of a .csv/.tsv
csv_separator = ''  # '' = tab for .tsv, comma otherwise
synthetic_size = 400_000_000  # pairs in the synthetic training set (LAION-400M's count)
shuffle_buffer = 5000  # tar shards: samples mixed per DataLoader worker before decoding
num_workers = 10  # DataLoader workers per GPU
img_size = 224  # training and evaluation resolution
crop_scale = (0.9, 1.0)  # RandomResizedCrop scale (open_clip's training default; no flip: captions say left/right)
# zero-shot evaluation
zeroshot_data = 'synthetic:1'  # class-folder images (IN-1K val: 1000 WordNet-id folders) or 'synthetic[:SEED]'; ''
zeroshot_size = 50_000  # images of the synthetic zero-shot set
zeroshot_classnames = 'auto'  # 'imagenet' (open_clip's 1000 names), 'synthetic', 'folders', a .txt (one a line);
#   'auto': synthetic data -> 'synthetic', 1000 WordNet-id folders -> 'imagenet', else 'folders'
zeroshot_templates = 'auto'  # 'openai' (CLIP's 80), 'simple', 'synthetic', a .txt of lines with '{}'; 'auto': by data
retrieval_data = ''  # .csv/.tsv of image-caption pairs (COCO 5k: 5 rows per image) for recall@1/5/10; '' skips
# model
model_size = 'eva_g'  # image tower: a key of model.SIZES
text_size = 'clip_l'  # text tower: a key of model.TEXT_SIZES
embed_dim = 1024  # joint embedding width (image head Linear(D, embed_dim), text projection)
init_from = ''  # image tower: an EVA checkpoint (eva_mim.pt); or a whole CLIP (clip.pt, open_clip EVA-CLIP file)
text_init_from = 'openai'  # text tower: an open_clip tag of text_init_model or a local file; '' = random init
text_init_model = 'ViT-L-14'  # the open_clip model text_init_from belongs to
drop_path = 0.4  # stochastic depth of the image tower's last block
grad_checkpointing = True  # recompute the blocks of both towers in backward (EVA-CLIP trains this way)
# optimization
batch_size = 40_960  # global contrastive batch (256 GPUs x 160)
micro_batch = 160  # per GPU; the contrastive batch is gathered over GPUs (an accumulated micro-batch is its own)
samples_seen = 11_000_000_000  # training length in image-text pairs
max_steps = 0  # >0: the run's length in optimizer steps instead of samples_seen (every stage's spelling)
warmup_steps = 2000  # linear warmup from 0
lr = 4e-4  # image tower peak lr (top block; lower blocks get layer_decay powers), also the temperature's
text_lr = 4e-5  # text tower peak lr (top block)
min_lr_ratio = 0.0  # cosine decays to lr * min_lr_ratio
layer_decay = 0.85  # image tower: lr scale layer_decay ** (depth + 1 - layer)
text_layer_decay = 0.75  # text tower: the same over its blocks
weight_decay = 0.05  # image tower AdamW decay (not on biases, norms, pos_embed, cls_token)
text_weight_decay = 0.05  # text tower AdamW decay (not on biases, norms, embeddings)
beta1 = 0.9  # AdamW beta1
beta2 = 0.98  # AdamW beta2
eps = 1e-6  # AdamW epsilon
grad_clip = 5.0  # global gradient-norm clip; 0 disables
# system
dtype = 'fp16'  # 'fp16' (dynamic loss scale), 'bf16' or 'fp32'; a CPU cannot run DeepSpeed fp16: fp32 there
zero_stage = 1  # DeepSpeed ZeRO stage
seed = 0  # init, data order and augmentation
peak_tflops = 989.0  # dense fp16 peak per GPU for MFU (H100/H200 SXM: 989)
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
config = {k: globals()[k] for k in _keys}  # noqa: F821 (_keys comes from configurator.py)
# -----------------------------------------------------------------------------
import open_clip  # noqa: E402 (after the configurator, so that --help is instant)
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES  # noqa: E402

rank, local_rank, world, device = init_distributed(num_workers)  # torchrun's env, or one process
stop = stop_signal()  # Ctrl-C / SIGTERM: an evaluation stops at its next batch, training at its next log step
cuda = on_gpu(device)  # the GPU's choices: fp16, fused AdamW, ... (also the memory projection's meta device)
if eval_only and not init_from:
    config_error("eval_only needs --init_from=CHECKPOINT (a clip.pt or an open_clip EVA-CLIP file)")
require_files(init_from=init_from)
require_choice('model_size', model_size, SIZES)
if zeroshot_data.startswith('synthetic') and not train_data.startswith('synthetic'):
    print0(f"warning: training on {train_data} but zero-shot evaluation on synthetic images: set zeroshot_data")
dtype, model_dtype = resolve_dtype(dtype, cuda)
config['dtype'] = dtype

# -----------------------------------------------------------------------------
# data
require_choice('text_size', text_size, TEXT_SIZES)
tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=TEXT_SIZES[text_size]['context_length'])


def tokenize(caption):
    """caption -> token ids (context_length,): CLIP's BPE, start/end tokens, zero padding, truncated."""
    return tokenizer(caption)[0]


eval_tf = eval_transform(img_size, 1.0)
micro_batch, grad_accum = batch_split(batch_size, micro_batch, world)
config['micro_batch'] = micro_batch
def synthetic_templates():
    """Prompts in the synthetic captions' grammar, every size, colour and texture: the ensemble that plays the
    part of CLIP's 80 ImageNet prompts for the demo data."""
    S = SyntheticShapes
    return [f"a {size} {colour} {{}} on a {texture} background" for size in ('small', 'large')
            for colour in S.COLOURS for texture in S.TEXTURES]


def zeroshot_setup():
    """-> (dataset, class names, templates) for zero-shot classification, or None."""
    if not zeroshot_data:
        return None
    synthetic = zeroshot_data.startswith('synthetic')
    if not synthetic and not os.path.isdir(zeroshot_data):
        raise OSError(f"zeroshot_data: no such folder: {zeroshot_data}")
    classnames, template_set = zeroshot_classnames, zeroshot_templates
    if classnames == 'auto':
        folders = [] if synthetic else sorted(d.name for d in os.scandir(zeroshot_data) if d.is_dir())
        in1k = len(folders) == 1000 and all(f[0] == 'n' and f[1:].isdigit() for f in folders)
        if synthetic:
            classnames = 'synthetic'
        else:
            classnames = 'imagenet' if in1k else 'folders'
    if template_set == 'auto':
        template_set = 'synthetic' if synthetic else 'openai'
    in1k = classnames == 'imagenet'
    source = image_source(zeroshot_data, img_size, zeroshot_size, seed + 1, imagenet_classes() if in1k else None)
    if in1k:
        names = list(open_clip.IMAGENET_CLASSNAMES)
    elif classnames == 'synthetic':
        names = list(SyntheticShapes.SHAPES[:getattr(source, 'num_classes', 10)])
    elif classnames == 'folders':
        names = [c.replace('_', ' ') for c in source.classes]
    else:
        names = [line.strip() for line in open(classnames) if line.strip()]
    if isinstance(source, ImageFiles) and not in1k and len(names) != len(source.classes):
        raise ValueError(f"{classnames}: {len(names)} class names for {len(source.classes)} class folders "
                         f"in {zeroshot_data}")
    templates = {'openai': OPENAI_IMAGENET_TEMPLATES, 'simple': SIMPLE_IMAGENET_TEMPLATES,
                 'synthetic': None}.get(template_set, 'file')
    if templates is None:
        templates = synthetic_templates()
    elif templates == 'file':
        templates = [line.strip() for line in open(template_set) if '{}' in line]
        if not templates:
            raise ValueError(f"{template_set}: no template lines with '{{}}'")
    print0(f"zero-shot: {len(source):,} images of {len(names)} classes ({classnames}), {len(templates)} prompts each")
    return Samples(source, eval_tf, seed), names, templates


def retrieval_setup():
    """-> (image paths, captions, caption -> image index) from a pairs file; rows whose image file is missing or
    whose caption is empty are left out (named), so that every caption keeps its own image."""
    if not retrieval_data:
        return None
    pairs = CaptionFiles(retrieval_data, csv_img_key, csv_caption_key, csv_separator)
    images, captions, owner, dropped = {}, [], [], []
    for i in range(len(pairs)):
        path, caption = pairs.image(i), pairs.captions[i]
        if not caption.strip() or not os.path.isfile(path):
            dropped.append(pairs.name(i))
            continue
        owner.append(images.setdefault(path, len(images)))
        captions.append(caption)
    if dropped:
        print0(f"retrieval: left out {len(dropped)} rows with a missing image or an empty caption, e.g. {dropped[0]}")
    return list(images), captions, torch.tensor(owner)


with input_errors():  # no such file or folder, a CSV without the columns: one error line
    zeroshot_set, retrieval_set = zeroshot_setup(), retrieval_setup()

# -----------------------------------------------------------------------------
# model
torch.manual_seed(seed)
vision_cfg = eva_config(model_size, img_size=img_size, pooling='cls', num_classes=embed_dim, drop_path=drop_path,
                        grad_checkpointing=grad_checkpointing)
with torch.device(device):
    model = CLIP(vision_cfg, TEXT_SIZES[text_size], embed_dim)
model.set_grad_checkpointing(grad_checkpointing)


def load_clip(path):
    """A whole CLIP (our clip.pt; open_clip's EVA-CLIP layout visual.trunk.* + text.*), or else an image-tower
    checkpoint (any EVA file load_pretrained reads). Returns True for a whole CLIP."""
    ckpt = read_checkpoint(path)
    sd = ckpt['model'] if isinstance(ckpt, dict) and isinstance(ckpt.get('model'), dict) else ckpt
    text_sd = {k[len('text.'):]: v for k, v in sd.items() if k.startswith('text.')}
    if not text_sd:
        load_pretrained(model.visual, ckpt, name=path)  # head (the projection) newly initialised
        return False
    load_pretrained(model.visual, sd, allowed_missing=())
    model.text.load_state_dict(text_sd)  # strict: a text tower of another shape names its keys
    model.logit_scale.data.copy_(sd['logit_scale'].reshape(1))
    print0(f"loaded the whole CLIP from {path}")
    return True


with input_errors():  # not a checkpoint, or another model's: one error line
    whole = load_clip(init_from) if init_from else False
if not whole and text_init_from and not eval_only:
    if local_rank != 0:
        dist.barrier()  # each node's first rank fills open_clip's download cache first; the others then read it
    with input_errors():  # an unknown open_clip model or tag, a missing file, a failed download (offline): one line
        load_text_tower(model.text, text_init_model, text_init_from)
    if local_rank == 0:
        dist.barrier()
if eval_only and not whole:
    config_error(f"eval_only needs a whole CLIP checkpoint (clip.pt, an open_clip EVA-CLIP file); {init_from} is an "
                 f"image tower")


@torch.no_grad()
def encode_texts(net, texts, batch=256):
    out = [net.encode_text(torch.stack([tokenize(t) for t in texts[i:i + batch]]).to(device)).float()
           for i in range(0, len(texts), batch)]
    return torch.cat(out)


@torch.no_grad()
def zeroshot_eval(net):
    """Top-1 / top-5 (%) of zero-shot classification: the class embedding is the normalised mean of its prompts'
    embeddings (CLIP's prompt ensembling); images split exactly across ranks."""
    dataset, names, templates = zeroshot_set
    fill = [(lambda c, t=t: t(c)) if callable(t) else (lambda c, t=t: t.format(c)) for t in templates]
    weights = encode_texts(net, [f(c) for c in names for f in fill]).view(len(names), len(fill), -1)
    weights = F.normalize(F.normalize(weights, dim=-1).mean(1), dim=-1)  # (C, E)
    sampler = ResumableSampler(len(dataset), world, rank, shuffle=False, pad=False)
    stats = torch.zeros(3, dtype=torch.float64)  # (top-1 hits, top-5 hits, images)
    for batch in make_loader(dataset, sampler, micro_batch, num_workers, cuda):
        if stop():
            break
        logits = (net.encode_image(batch['image'].to(device, model_dtype)).float() @ weights.T).cpu()
        y = batch['label']
        scored = (y >= 0) & (batch['skipped'] == 0)  # an unreadable image's stand-in (the next one) is not scored
        targets = F.one_hot(y.clamp(min=0), len(names)).bool() & scored[:, None]
        stats += torch.tensor(topk_hits(logits, targets, 5), dtype=torch.float64)
    stats = stats.to(device)
    dist.all_reduce(stats)
    n = max(stats[2].item(), 1)
    return {'top1': 100 * stats[0].item() / n, 'top5': 100 * stats[1].item() / n, 'images': int(stats[2].item())}


@torch.no_grad()
def retrieval_eval(net):
    """Image -> text and text -> image recall@1/5/10 (%) over the whole pairs file (COCO / Flickr protocol: an
    image is found by any of its captions' images, a caption must find its own image)."""
    paths, captions, owner = retrieval_set

    def encode_images(part):
        return net.encode_image(torch.stack([eval_tf(load_rgb(p)) for p in part]).to(device, model_dtype))

    feats = []
    for items, encode in ((paths, encode_images), (captions, lambda part: encode_texts(net, part))):
        full = torch.zeros(len(items), embed_dim, device=device)
        mine = list(range(rank, len(items), world))  # each rank a share, summed into the full matrix
        for i in range(0, len(mine), micro_batch):
            if stop():
                break
            idx = mine[i:i + micro_batch]
            full[idx] = encode([items[j] for j in idx]).float()
        dist.all_reduce(full)
        feats.append(full.cpu())
    img, txt = feats
    positives = owner[:, None] == torch.arange(len(paths))[None]  # (captions, images)
    t2i = recall_at_k(txt @ img.T, positives)
    i2t = recall_at_k(img @ txt.T, positives.T)
    return {'images': len(paths), 'captions': len(captions),
            **{f'i2t_r{k}': v for k, v in i2t.items()}, **{f't2i_r{k}': v for k, v in t2i.items()}}


def evaluate(net):
    """Zero-shot classification and retrieval, printed; None when a signal cut them short."""
    was_training = net.training
    net.eval()
    res = {}
    if zeroshot_set is not None:
        res['zeroshot'] = zeroshot_eval(net)
    if retrieval_set is not None:
        res['retrieval'] = retrieval_eval(net)
    net.train(was_training)
    if cut_short(stop, device):
        return None
    if 'zeroshot' in res:
        r = res['zeroshot']
        print0(f"zero-shot {zeroshot_data}: top-1 {r['top1']:.2f}  top-5 {r['top5']:.2f}  ({r['images']:,} images)")
    if 'retrieval' in res:
        r = res['retrieval']
        print0(f"retrieval {retrieval_data} ({r['images']:,} images, {r['captions']:,} captions): "
               f"image->text R@1/5/10 {r['i2t_r1']:.2f}/{r['i2t_r5']:.2f}/{r['i2t_r10']:.2f}  "
               f"text->image {r['t2i_r1']:.2f}/{r['t2i_r5']:.2f}/{r['t2i_r10']:.2f}")
    return res


# -----------------------------------------------------------------------------
# eval_only: init_from (a whole CLIP) on zero-shot classification and retrieval, then exit (no training data, no engine)
if eval_only:
    model.to(model_dtype if cuda else torch.float32)
    results = evaluate(model)
    if results is None:
        sys.exit(130)  # cut short by Ctrl-C: nothing written
    write_eval(out_dir, {'init_from': init_from, **results}, True)
    dist.barrier()
    dist.destroy_process_group()
    sys.exit(0)

# -----------------------------------------------------------------------------
# training data: image-text pairs (synthetic, a .csv / .tsv, or tar shards streamed), RandomResizedCrop, CLIP's BPE
if grad_accum != 1:  # accumulation would split the contrastive batch into smaller ones: a different loss
    print0(f"note: gradient accumulation {grad_accum}: each micro-batch of {micro_batch * world} pairs is its "
           f"own contrastive batch (the paper's is the whole {batch_size})")
train_tf = v2.Compose([v2.RandomResizedCrop(img_size, scale=crop_scale, interpolation=v2.InterpolationMode.BICUBIC),
                       v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(CLIP_MEAN, CLIP_STD)])
streamed = not (train_data.startswith('synthetic') or train_data.endswith(('.csv', '.tsv')))
with input_errors():  # no such file or shard, a CSV without the columns: one error line
    if streamed:
        train_set = TarShards(train_data, train_tf, tokenize, seed, rank, world, shuffle_buffer)
        steps_per_epoch = 0  # a stream has no epochs
        data_desc = f"{len(train_set.shards):,} tar shards"
    else:
        train_set = Samples(caption_source(train_data, img_size, synthetic_size, seed, csv_img_key, csv_caption_key,
                                           csv_separator), train_tf, seed, text_transform=tokenize)
        steps_per_epoch = len(train_set) // batch_size
        if steps_per_epoch == 0:
            config_error(f"{len(train_set)} training pairs are fewer than one batch of {batch_size}")
        data_desc = f"{len(train_set):,} pairs ({steps_per_epoch:,} steps/epoch)"
total_steps = max_steps or samples_seen // batch_size
warmup_steps = min(warmup_steps, total_steps)
print0(f"world {world} x micro-batch {micro_batch} x grad-accum {grad_accum} = global batch {batch_size}; "
       f"{data_desc}; {total_steps:,} steps = {total_steps * batch_size:,} samples seen, warmup {warmup_steps:,}; "
       f"dtype {dtype}, ZeRO-{zero_stage}")


def get_lr(step):
    """Factor of each group's peak lr: linear warmup from 0, then cosine to min_lr_ratio."""
    if step < warmup_steps:
        return step / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return min_lr_ratio + 0.5 * (1 - min_lr_ratio) * (1 + math.cos(math.pi * progress))


def micro_batches():
    """Training micro-batches from the position of `step` on: exactly resumable for map-style data; tar shards
    restart their stream with a seed that includes the step (TarShards)."""
    if streamed:
        train_set.start_step = step
        return iter(torch.utils.data.DataLoader(train_set, micro_batch, num_workers=num_workers, pin_memory=cuda,
                                                prefetch_factor=4 if num_workers else None))
    return train_batches(train_set, ResumableSampler(len(train_set), world, rank, seed), micro_batch, grad_accum,
                         steps_per_epoch, step, num_workers, cuda)


# -----------------------------------------------------------------------------
# engine, resume, log: image tower, text tower and temperature each with their own lr, decay and layer decay
# (EVA-CLIP)
groups = [dict(g, peak_lr=lr * g['lr_scale']) for g in param_groups(model.visual, weight_decay, layer_decay)]
# the text tower's own layer ids: its token and position embeddings at layer 0 (and not decayed), resblock i at i + 1
text_groups = param_groups(model.text, text_weight_decay, text_layer_decay, blocks='transformer.resblocks.',
                           layer0=TEXT_EMBEDDINGS, no_decay=TEXT_EMBEDDINGS)
groups += [dict(g, peak_lr=text_lr * g['lr_scale']) for g in text_groups]
groups.append(dict(params=[model.logit_scale], weight_decay=0.0, peak_lr=lr))
optimizer = torch.optim.AdamW(groups, lr=lr, betas=(beta1, beta2), eps=eps, **({'fused': True} if cuda else {}))
engine, optimizer = deepspeed_engine(model, optimizer, batch_size, micro_batch, grad_clip, zero_stage, dtype)
step, _ = resume(engine, out_dir, seed, config)  # 1. out_dir's latest checkpoint wins; 2. else init_from
log = open_log(out_dir, {'config': config, 'world': world, 'grad_accum': grad_accum, 'start_step': step,
                         'total_steps': total_steps}, wandb_project, wandb_run_name)
flops_per_pair = model.flops_per_pair()


def clip_file(step):
    """clip.pt's dict: the fp32 weights (gathered by every rank: a collective), the towers' shapes; rank 0 only."""
    sd = full_state_dict(engine)
    return {'model': sd, **model.describe(), 'config': config, 'step': step} if rank == 0 else None


# -----------------------------------------------------------------------------
# training loop
data = micro_batches()
loss_sum, bad = torch.zeros((), device=device), torch.zeros((), device=device)
t_log, n_logged, t_start, start_step, state = time.time(), 0, time.time(), step, None
stopping = False  # a signal (stop, set up at the start): save at the next log step and exit 0
while step < total_steps:
    factor = get_lr(step)
    for group in optimizer.param_groups:
        group['lr'] = group['peak_lr'] * factor
    for _ in range(grad_accum):
        batch = next(data)
        image_features, text_features, scale = engine(batch['image'].to(device, model_dtype, non_blocking=True),
                                                      batch['text'].to(device, non_blocking=True))
        loss = clip_loss(image_features, text_features, scale.float(), rank, world)
        engine.backward(loss)
        engine.step()
        loss_sum += loss.detach()
        bad += batch['skipped'].sum()
    step += 1
    n_logged += 1
    if step % log_interval == 0 or step == total_steps:
        stats = torch.stack((loss_sum / (n_logged * grad_accum), bad, torch.tensor(stop(), device=device)))
        dist.all_reduce(stats)
        stopping = stats[2].item() > 0
        samples_s = n_logged * batch_size / (time.time() - t_log)
        log({'step': step, 'epoch': round(step / steps_per_epoch, 4) if steps_per_epoch else None,
             'loss': stats[0].item() / world, 'lr': lr * factor, **engine_stats(engine),
             'samples_s': round(samples_s, 1),
             'mfu': round(samples_s / world * flops_per_pair / (peak_tflops * 1e12), 4) if cuda else None,
             'bad_samples': int(stats[1].item()),
             'eta_h': round((total_steps - step) * (time.time() - t_start) / (step - start_step) / 3600, 4),
             'samples': step * batch_size, 'text_lr': text_lr * factor, 'logit_scale': scale.item()})
        loss_sum.zero_()
        t_log, n_logged = time.time(), 0
    if step % eval_interval == 0 or step == total_steps:
        results = evaluate(engine.module)
        if results is None:  # cut short by a signal: not reported; save and stop
            stopping = True
        else:
            log({'step': step, 'eval': results}, echo=False)
    if step % eval_interval == 0 or step == total_steps or step == stop_step or stopping:
        state = clip_file(step)
        save_checkpoint(engine, out_dir, step, {'config': config}, {'clip.pt': state}, keep_ckpts)
    if step == stop_step or stopping:
        print0(f"stopped at step {step} ({'signal' if stopping else 'stop_step'}); the same command resumes")
        break
if step == total_steps and rank == 0:
    state = state or torch.load(os.path.join(out_dir, 'clip.pt'), weights_only=False)
    export_open_clip(state, os.path.join(out_dir, 'open_clip'))
    print0(f"open_clip export: {out_dir}/open_clip (open_clip.create_model_and_transforms('local-dir:...'))")
if step > start_step:
    print0(f"{step - start_step} steps in {hms(time.time() - t_start)} (to step {step} of {total_steps})")
dist.barrier()
dist.destroy_process_group()
