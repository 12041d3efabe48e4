"""
Object detection, instance and semantic segmentation with an EVA backbone (EVA paper, section 4.4), two tasks of one
stage: they share the setup, the schedule, the engine and the loop; each has its own settings, data, model and
evaluation, in its own block below.

task='det', the way EVA-01's det code does it: the encoder as a plain ViTDet backbone (patch 16, window attention in
all blocks but every 4th, decomposed relative position, a simple feature pyramid) under a Cascade Mask R-CNN, trained
with large-scale jitter at 1280; COCO and LVIS v1 (from an Objects365 model), Objects365 itself, any COCO-format json.
Modules: det_model.py.
task='seg': EVA-01's ViT-Adapter + Mask2Former (or the encoder tapped at four depths through BEiT's simple pyramid,
under Mask2Former or UperNet, BEiT's and EVA-02's head), mmseg's pipeline and sliding-window mIoU; ADE20K,
COCO-Stuff-164K, any folder of images and label PNGs. Modules: seg_model.py.

    python det_seg.py config/det_tiny.py                                             # CPU demo (synthetic scenes)
    python det_seg.py config/seg_tiny.py                                             # CPU demo, semantic segmentation
    python model.py psz14to16 out/pretrain_eva_g/eva_mim.pt out/eva_psz16.pt         # the backbone at patch 16
    torchrun --nproc_per_node 8 det_seg.py config/det_o365_eva_g.py --init_from=out/eva_psz16.pt
    torchrun --nproc_per_node 8 det_seg.py config/det_coco_eva_g.py --init_from=out/det_o365/last.pt
    torchrun --nproc_per_node 8 det_seg.py config/det_lvis_eva_g.py --init_from=out/det_o365/last.pt
    python det_seg.py config/det_coco_eva_g.py --eval_only=True --init_from=eva_coco_det.pth --test_size=1536 \\
        --rel_pos_interp=beit --soft_nms=0.6 --score_thresh=0.0 --maskness=0.5        # EVA-01's released evaluation

Expected for detection (EVA paper Tables 6-7, EVA-01 det/README.md): COCO val2017 64.2 box AP (det model) / 55.0 mask
AP (seg model) at 1536 with soft-NMS and maskness (the paper's 64.5 uses test-time tricks the README leaves out); LVIS
v1 val 62.2 box / 55.0 mask AP. Segmentation: config/seg_ade20k_eva_g.py and config/seg_cocostuff_eva_g.py say theirs.
Writes out_dir/log.jsonl, out_dir/ckpt/ (DeepSpeed), out_dir/last.pt ({'model', 'model_config', 'classes', ...}:
init_from reads it) and out_dir/eval.json.
"""
import dataclasses
import functools
import json
import os
import sys
import time

# common first: it sets OpenMP's wait policy, which torch's import fixes
from common import (batch_split, config_error, cut_short, deepspeed_engine, engine_stats, full_state_dict, hms,
                    init_distributed, input_errors, on_gpu, open_log, print0, require_choice, require_files,
                    resolve_dtype, resume, save_checkpoint, stop_signal, write_eval)
import numpy as np
import torch
import torch.distributed as dist
from faster_coco_eval import COCO, COCOeval_faster
from faster_coco_eval.core import mask as mask_util
from torchvision.models.detection.roi_heads import paste_masks_in_image

from data import (IMAGENET_MEAN, IMAGENET_STD, CocoDetection, LargeScaleJitter, ResumableSampler, Samples, SegAugment,
                  SegFiles, collate_detection, make_loader, normalize_batch, seg_test_size, train_batches,
                  write_synthetic_scenes)
from det_model import LAYER_DECAY as DET_LAYER_DECAY
from det_model import CascadeMaskRCNN, DetConfig, load_detector
from model import SIZES, checkpoint_step, eva_config, param_groups, read_checkpoint
from seg_model import LAYER_DECAY as SEG_LAYER_DECAY
from seg_model import Segmenter, SegConfig, confusion, load_segmenter, resize, seg_metrics, slide_inference

# -----------------------------------------------------------------------------
# config, both tasks: defaults are EVA-01's COCO detection recipe
# (det/projects/ViTDet/configs/COCO/cascade_mask_rcnn_vitdet_eva.py)
# I/O
out_dir = 'out/det_coco'  # checkpoints and log.jsonl; a run auto-resumes from here
log_interval = 20  # steps between log lines
eval_interval = 5000  # steps between evaluations (and at the end); 0: only at the end
eval_only = False  # evaluate init_from and exit
stop_step = 0  # save and exit at this step (e.g. before a job's time limit); 0: run to the end
save_interval = 1000  # steps between checkpoints (and at the end and at each evaluation)
keep_ckpts = 2  # DeepSpeed checkpoints kept in out_dir/ckpt (older ones are deleted)
wandb_project = ''  # '' disables wandb
wandb_run_name = 'eva-det'  # wandb run name
# data
task = 'det'  # 'det': boxes and instance masks (the det keys below); 'seg': semantic segmentation (the seg keys)
train_images = 'data/coco/train2017'  # training images (det: the folder the json's file_name entries are under)
val_images = 'data/coco/val2017'  # validation images
synthetic_dir = 'data/synthetic_scenes'  # 'synthetic' data: its PNGs, jsons and label PNGs, written there once
synthetic_size = 512  # synthetic training scenes (and an eighth as many for validation)
num_classes = 80  # classes (COCO 80, LVIS 1203, Objects365 365; seg: ADE20K 150, COCO-Stuff 171)
img_size = 1280  # the square the model trains on: det: LSJ's crop and padding (and its relative positions' grid);
#   seg: the crop, the encoder's grid and the sliding window at test (EVA-01: 896)
num_workers = 8  # DataLoader workers per GPU
# model
model_size = 'eva_g'  # a key of model.SIZES
patch_size = 16  # the encoder's patch (EVA-01 fine-tunes the psz14to16 export; det's pyramid needs 16)
init_from = ''  # an encoder (psz14to16 output) or a whole detector / segmenter (last.pt, EVA-01's released files)
drop_path = 0.6  # stochastic depth of the last block
grad_checkpointing = True  # recompute blocks in backward: EVA-g at 1280 needs it
# optimization
batch_size = 64  # global batch (images)
micro_batch = 1  # per GPU per forward; gradient accumulation fills the rest
max_steps = 45_000  # optimizer steps (detectron2 and mmseg: max_iter, max_iters)
schedule = 'step'  # 'step': x0.1 at each of lr_steps (detectron2's); 'poly': linear decay to 0 (mmseg's poly, power 1)
lr_steps = (40_000, 44_999)  # the lr drops x0.1 at each (0-based step index, as detectron2's milestones)
warmup_iters = 500  # linear warmup ...
warmup_factor = 0.001  # ... from lr x this
lr = 2.5e-5  # peak learning rate (before layer decay)
layer_decay = 0.9  # lr scale per block from the top: layer_decay ** (depth + 1 - layer)
weight_decay = 0.1  # AdamW (det: on every parameter, as EVA-01's config; seg: not on biases and norms)
beta1 = 0.9  # AdamW beta1
beta2 = 0.999  # AdamW beta2
eps = 1e-8  # AdamW epsilon
grad_clip = 0.0  # global gradient-norm clip; 0 disables (EVA-01 used none)
# system
dtype = 'fp16'  # 'fp16' (dynamic loss scale), 'bf16' or 'fp32'; a CPU cannot run DeepSpeed fp16: fp32 there
zero_stage = 1  # DeepSpeed ZeRO stage
seed = 0  # init, data order and augmentation
# -----------------------------------------------------------------------------
# config, task='det' (det_model.DetConfig's fields are the model keys here, by the same names)
# data
train_json = 'data/coco/annotations/instances_train2017.json'  # COCO-format instances; 'synthetic': scenes
val_json = 'data/coco/annotations/instances_val2017.json'  # evaluated with COCOeval; 'synthetic': scenes
test_size = 0  # longest side at test (0: img_size; EVA-01's released COCO / LVIS numbers: 1536)
lsj_scale = (0.1, 2.0)  # LSJ's scale range
repeat_threshold = 0.0  # >0: LVIS's repeat-factor sampling at this class frequency (EVA-01's LVIS: 0.001)
lvis_eval = False  # LVIS-style AP (federated: negative / not-exhaustive classes, APr / APc / APf), max_dets per image
# model
pretrain_img_size = 224  # the size pos_embed is for (14 x 14 at patch 16, the psz14to16 export's), resized per input
window = 16  # window attention's side in tokens
global_blocks = (3, 7, 11, 15, 19, 23, 27, 31, 35, 39)  # blocks attending globally
rel_pos_interp = 'linear'  # tables resized for a larger test_size: 'linear' (ViTDet); 'beit' (EVA-01's 1536 configs)
masks = True  # the mask head (instance segmentation); False: boxes only (Objects365 has no masks)
pyramid_dim = 256  # feature pyramid channels
anchor_sizes = (32, 64, 128, 256, 512)  # RPN anchors on p2 ... p6
rpn_batch = 256  # anchors sampled per image for the RPN loss
rpn_pre_nms = (2000, 1000)  # proposals per level before NMS (training, testing)
rpn_post_nms = 1000  # proposals per image after NMS
roi_batch = 512  # proposals sampled per image for the cascade (25% foreground at most)
head_dim = 256  # box and mask heads' convolutions
fc_dim = 1024  # box heads' fc
canonical_box = 224  # a box of this side is pooled from p4
sigmoid_ce = False  # per-class sigmoid cross-entropy in the box heads (LVIS) instead of softmax
fed_classes = 0  # >0: the federated loss over this many classes per step, drawn by image frequency^0.5 (LVIS: 50)
# test (the defaults are detectron2's; EVA-01's released COCO numbers: soft_nms 0.6, score_thresh 0, maskness 0.5)
score_thresh = 0.05  # candidates above this class probability
nms = 0.5  # per-class NMS IoU
soft_nms = 0.0  # >0: linear soft-NMS at this IoU instead of NMS
max_dets = 100  # detections per image (soft-NMS: per image and class)
maskness = 0.0  # >0: scores rescored by their mask's mean probability above it
# -----------------------------------------------------------------------------
# config, task='seg' (seg_model.SegConfig's fields are the model keys here, by the same names)
# data
train_labels = ''  # the training label PNGs (images: train_images); 'synthetic': the scenes' class maps
val_labels = ''  # the validation label PNGs (images: val_images); 'synthetic': likewise
label_suffix = '.png'  # a label is named its image's stem + this (mmseg-converted COCO-Stuff: '_labelTrainIds.png')
label_map = ''  # '' ids as stored, 'reduce_zero_label' (ADE20K: 0 ignored, k -> k - 1), 'cocostuff' (raw 182 -> 171)
seg_scale = (3584, 896)  # mmseg's keep-ratio resize (long, short side), x a ratio from seg_ratio in training
seg_ratio = (0.5, 2.0)  # the training resize ratio's range
cat_max_ratio = 0.75  # a training crop is redrawn (10 tries) while one class covers this fraction of it
test_stride = 512  # sliding windows of img_size at this stride
test_ratios = (1.0,)  # test scales, x seg_scale (EVA-01's multi-scale: 512/896 ... 1280/896 in 7 steps)
test_flip = False  # add each scale's mirror image at test
# model
seg_head = 'mask2former'  # 'mask2former' (the paper's) or 'upernet' (BEiT's / EVA-02's, with an auxiliary FCN head)
taps = (9, 19, 29, 39)  # the blocks feeding the pyramid's strides 4, 8, 16, 32
seg_channels = 1024  # decode head channels (EVA-01's Mask2Former 1024; UperNet: BEiT 512, EVA-02-L 1024)
aux_weight = 0.4  # UperNet: the auxiliary FCN head's loss weight (0: none)
queries = 200  # Mask2Former: queries
dec_layers = 8  # Mask2Former: masked-attention decoder layers
enc_layers = 6  # Mask2Former: deformable-attention pixel-decoder layers
attn_heads = 32  # Mask2Former: attention heads in both
ffn_dim = 4096  # Mask2Former: FFN hidden width in both
train_points = 12544  # Mask2Former: points sampled per mask for matching and the mask losses
adapter = False  # ViT-Adapter between the encoder and the head (EVA-01's) instead of fpn1-fpn4
adapter_heads = 16  # the adapter's deformable-attention heads
adapter_inplanes = 64  # the adapter's spatial-prior stem channels
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
config = {k: globals()[k] for k in _keys}  # noqa: F821 (_keys comes from configurator.py)
# -----------------------------------------------------------------------------
rank, local_rank, world, device = init_distributed(num_workers)  # torchrun's env, or one process
stop = stop_signal()  # Ctrl-C / SIGTERM: an evaluation stops at its next batch, training at its next log step
cuda = on_gpu(device)  # the GPU's choices: fp16, fused AdamW, ... (also the memory projection's meta device)
if eval_only and not init_from:
    config_error("eval_only needs --init_from=CHECKPOINT")
if task not in ('det', 'seg') or schedule not in ('step', 'poly'):
    config_error(f"task must be 'det' or 'seg', schedule 'step' or 'poly'; got {task!r}, {schedule!r}")
if task == 'seg' and seg_head not in ('mask2former', 'upernet'):
    config_error(f"seg_head must be 'mask2former' or 'upernet', got {seg_head!r}")
if task == 'seg' and repeat_threshold > 0:
    config_error(f"repeat_threshold={repeat_threshold}: repeat-factor sampling is for detection (LVIS), not task='seg'")
require_files(init_from=init_from)
require_choice('model_size', model_size, SIZES)
dtype, model_dtype = resolve_dtype(dtype, cuda)
config['dtype'] = dtype
test_size = test_size or img_size
micro_batch, grad_accum = batch_split(batch_size, micro_batch, world)
config['micro_batch'] = micro_batch


def task_keys(fields_of):
    """The config keys named as the fields of a task's model dataclass: DetConfig(**task_keys(DetConfig))."""
    return {f.name: config[f.name] for f in dataclasses.fields(fields_of) if f.name in config}


def synthetic_scenes(shapes):
    """The demos' scenes (PNGs, a COCO json and label PNGs per split), written once by rank 0."""
    if rank == 0:
        write_synthetic_scenes(synthetic_dir, synthetic_size, synthetic_size // 8, img_size, shapes, seed)
    dist.barrier()


def report(metrics, line, step):
    """The evaluation's line in the log, with its image counts, and out_dir/eval.json (step: eval_only's, the one its
    checkpoint records)."""
    unreadable = f", {metrics['unreadable']} unreadable" if metrics['unreadable'] else ''
    print0(f"step {step}: {line}  [{metrics['images']:,} images{unreadable}]")
    write_eval(out_dir, {'init_from': init_from, 'step': step, 'test_size': test_size, **metrics}, eval_only)


# -----------------------------------------------------------------------------
# task='det': COCO-format data (LSJ crops padded to img_size x img_size; the image scaled to test_size at test, its
# predictions mapped back), the detector, COCOeval. ImageNet mean / std in 0-255 units (detectron2's pixel_mean)


def coco_source(json_path, images, train, classes=None):
    if json_path == 'synthetic':
        json_path, images = os.path.join(synthetic_dir, f"instances_{'train' if train else 'val'}.json"), synthetic_dir
    try:
        src = CocoDetection(json_path, images, masks=masks and train, train=train, classes=classes)
    except (ValueError, KeyError, json.JSONDecodeError) as e:
        config_error(str(e) if json_path in str(e) else f"{json_path}: {e}")
    if len(src.categories) != num_classes:
        config_error(f"{json_path} has {len(src.categories)} categories, num_classes={num_classes}")
    return src


def det_inputs(batch, size):
    """A collated batch -> (the model's arguments on the device: images (B, 3, S, S) normalised with the padding 0,
    their sizes, targets; {'bad_anns': annotations the batch skipped})."""
    x = normalize_batch(batch['image'].to(device, non_blocking=True), IMAGENET_MEAN, IMAGENET_STD)
    ar = torch.arange(size, device=device)
    sizes = batch['sizes'].to(device)
    inside = (ar[None, :, None] < sizes[:, 0, None, None]) & (ar[None, None, :] < sizes[:, 1, None, None])
    targets = [{k: t[k].to(device) for k in ('boxes', 'labels', 'masks') if k in t} for t in batch['targets']]
    for t, raw in zip(targets, batch['targets']):
        if 'polygons' in raw:  # polygons stay on the CPU, where their per-proposal targets are rasterised
            t['polygons'] = raw['polygons']
    dropped = sum(t['dropped'] for t in batch['targets'])
    return (x * inside[:, None], batch['sizes'].tolist(), targets), {'bad_anns': dropped}


@torch.no_grad()
def evaluate_det(net):
    """COCO box (and mask) AP over the whole val set: each rank infers a disjoint share, predictions mapped back to
    the original images (boxes / scale, masks pasted at the original size and RLE-encoded), gathered on rank 0, which
    runs COCOeval (faster-coco-eval) against val_json. -> ({'bbox': {AP, AP50, ...}, 'segm': {...}, 'images',
    'unreadable'}, a line for the log) on every rank; None when a signal cut it short."""
    net.eval()
    sampler = ResumableSampler(len(val_set), world, rank, shuffle=False, pad=False)
    results, unreadable, scored = [], 0, []
    for batch in make_loader(val_set, sampler, micro_batch, num_workers, cuda,
                             collate_fn=functools.partial(collate_detection, size=test_size)):
        if stop():
            break
        (x, sizes, _), _ = det_inputs(batch, test_size)
        for out, t, skipped in zip(net(x, sizes), batch['targets'], batch['skipped'].tolist()):
            unreadable += skipped
            if skipped:  # Samples stood the next image in for an unreadable one: not scored twice
                continue
            scored.append(t['image_id'])
            (sy, sx), (H, W) = t['scale'], t['orig_size']
            boxes = out['boxes'] / torch.tensor([sx, sy, sx, sy], device=device)
            boxes[:, 0::2], boxes[:, 1::2] = boxes[:, 0::2].clamp(0, W), boxes[:, 1::2].clamp(0, H)
            rles = []
            if 'masks' in out and len(boxes):  # torchvision's paste (a 1-pixel border, bilinear), >= 0.5
                pasted = paste_masks_in_image(out['masks'][:, None], boxes, (H, W), padding=1)[:, 0] >= 0.5
                rles = mask_util.encode(np.asfortranarray(pasted.permute(1, 2, 0).cpu().numpy().astype(np.uint8)))
            for j, (b, s, c) in enumerate(zip(boxes.tolist(), out['scores'].tolist(), out['labels'].tolist())):
                r = {'image_id': t['image_id'], 'category_id': val_src.categories[c]['id'], 'score': s,
                     'bbox': [b[0], b[1], b[2] - b[0], b[3] - b[1]]}
                if rles:
                    r['segmentation'] = {'size': rles[j]['size'], 'counts': rles[j]['counts'].decode()}
                results.append(r)
    net.train()
    if cut_short(stop, device):
        return None
    gathered = [None] * world
    dist.all_gather_object(gathered, (results, unreadable, scored))
    metrics = {}
    if rank == 0:
        results, unreadable = [r for g in gathered for r in g[0]], sum(g[1] for g in gathered)
        metrics = coco_eval(results, [i for g in gathered for i in g[2]] if unreadable else None)
        metrics['images'], metrics['unreadable'] = len(val_set) - unreadable, unreadable
    box = [metrics]
    dist.broadcast_object_list(box)
    metrics = box[0]
    kinds = [k for k in ('bbox', 'segm') if k in metrics]
    line = '  '.join(f"{k} AP {metrics[k]['AP']:.2f} (AP50 {metrics[k]['AP50']:.2f}, AP75 {metrics[k]['AP75']:.2f})"
                     for k in kinds)
    return metrics, line


def percent(v):
    """A COCOeval number in %; its -1 (no ground truth of that kind, e.g. no large objects) -> None (null in json)."""
    return round(100 * float(v), 3) if v >= 0 else None


def coco_eval(results, image_ids=None):
    """COCOeval_faster's 12 numbers (AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl) in %, for boxes
    and, with masks, for masks, over image_ids (None: every image of val_json; an unreadable one is left out, as if
    the json had not named it); 0 when nothing was detected. lvis_eval: LVIS's rules (a detection of a class neither in
    the image nor among its negative classes is not scored; not-exhaustive classes count no false positives), max_dets
    per image, and APr / APc / APf in place of the ARs."""
    names = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl')
    gt = COCO(val_src.json_path)
    out = {}
    for kind in ('bbox', 'segm') if masks else ('bbox',):
        if not results:
            out[kind] = dict.fromkeys(names, 0.0)
            continue
        E = COCOeval_faster(gt, gt.loadRes(results), kind, print_function=lambda *a: None, lvis_style=lvis_eval)
        if image_ids is not None:
            E.params.imgIds = sorted(image_ids)
        if lvis_eval:
            E.params.maxDets = [max_dets]
        E.evaluate()
        E.accumulate()
        E.summarize()
        out[kind] = {n: percent(v) for n, v in zip(names[:6], E.stats)}
        if lvis_eval:  # with one maxDets: all_stats = (AP ... APl, AR, 0, 0, ARs, ARm, ARl, AR50, AR75, APr, APc, APf)
            lvis = {'APr': 14, 'APc': 15, 'APf': 16, 'AR': 6}
            out[kind].update({n: percent(E.all_stats[i]) for n, i in lvis.items()})
        else:
            out[kind].update({n: percent(v) for n, v in zip(names[6:], E.stats[6:])})
    return out


with input_errors():  # read once (EVA-g's file is GBs); not a checkpoint: one error line
    init_ckpt = read_checkpoint(init_from) if init_from else {}
init_step = checkpoint_step(init_ckpt) or 0  # what eval_only reports

if task == 'det':
    jsons = {'val_json': val_json} if eval_only else {'val_json': val_json, 'train_json': train_json}
    require_files(**{k: v for k, v in jsons.items() if v != 'synthetic'})  # the demo's scenes are written below
    if 'synthetic' in (train_json, val_json):
        synthetic_scenes(num_classes)
    # the training json first (not for eval_only): the val json's categories take its labels by name, so that the
    # same names under other ids are scored as the same classes
    train_src = None if eval_only else coco_source(train_json, train_images, train=True)
    names = None if eval_only else [c['name'] for c in train_src.categories]
    val_src = coco_source(val_json, val_images, train=False, classes=names)
    val_set = Samples(val_src, LargeScaleJitter(test_size, train=False), seed, joint=True)
    classes = [c['name'] for c in val_src.categories]
    test_desc = f"test {test_size}"
    torch.manual_seed(seed)
    backbone_cfg = eva_config(model_size, img_size=pretrain_img_size, patch_size=patch_size, drop_path=drop_path,
                              grad_checkpointing=grad_checkpointing)  # pos_embed stays 14 x 14, resized per forward
    model_cfg = DetConfig(backbone=backbone_cfg, **task_keys(DetConfig))
    with torch.device(device):
        model = CascadeMaskRCNN(model_cfg)
    if init_from:  # a whole detector (ours, detectron2's names) or an encoder under fresh heads
        with input_errors():
            load_detector(model, init_from, init_ckpt)
    model_inputs, evaluate, decay_rules = det_inputs, evaluate_det, DET_LAYER_DECAY

# -----------------------------------------------------------------------------
# task='seg': image and label-PNG folders through mmseg's pipeline (resize, img_size crops, flip, photometric
# distortion; whole images at test, resized on the device), the segmenter, sliding-window mIoU


def seg_source(images, labels, train):
    if labels == 'synthetic':
        images = os.path.join(synthetic_dir, 'train' if train else 'val')
        labels = images + '_labels'
    try:
        src = SegFiles(images, labels, num_classes, label_map or None, label_suffix)
        src.check()  # a few labels read now: a wrong folder, label_map or num_classes is one error, not 100 skips
    except (OSError, ValueError) as e:
        config_error(str(e))
    return src


def as_is(sample):  # seg at test: the image as it is (evaluate_seg resizes it on the device) and its label
    return sample


def seg_inputs(batch, size):
    """A collated batch -> (the model's arguments on the device: images (B, 3, S, S) normalised, labels (B, S, S);
    {} (nothing beyond unreadable images is skipped))."""
    x = normalize_batch(batch['image'].to(device, non_blocking=True), IMAGENET_MEAN, IMAGENET_STD)
    return (x, batch['label'].to(device, non_blocking=True)), {}


@torch.no_grad()
def evaluate_seg(net):
    """mmseg's evaluation over the whole val set: each rank takes a disjoint share of the images, one at a time; per
    scale of test_ratios (and its mirror with test_flip) the image is resized (seg_test_size: keep-ratio to seg_scale x
    ratio, up to a multiple of 32; a side under img_size padded with black), slid over with img_size windows, the
    logits resized to the original image and softmaxed; their sum's argmax against the label. The (K, K) confusions
    are summed over ranks (exact) -> (mIoU, mAcc, aAcc, per-class IoU, 'images', 'unreadable'; a line for the log) on
    every rank; None when a signal cut it short."""
    net.eval()
    sampler = ResumableSampler(len(val_set), world, rank, shuffle=False, pad=False)
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    counts = torch.zeros(2, dtype=torch.long, device=device)  # (images, unreadable)
    black = normalize_batch(torch.zeros(1, 3, 1, 1, dtype=torch.uint8, device=device), IMAGENET_MEAN, IMAGENET_STD)
    for batch in make_loader(val_set, sampler, 1, num_workers, cuda):  # one image: sizes differ
        if stop():
            break
        counts += torch.tensor([1, batch['skipped'].sum()], device=device)
        if batch['skipped'].any():  # Samples stood the next image in for an unreadable one: not scored twice
            continue
        x = normalize_batch(batch['image'].to(device), IMAGENET_MEAN, IMAGENET_STD)
        label = batch['label'].to(device)
        H, W = label.shape[-2:]
        probs = 0
        for r in test_ratios:
            xr = resize(x, seg_test_size(H, W, seg_scale, r))  # bilinear, no antialias (mmcv's cv2 resize)
            for flip in (False, True) if test_flip else (False,):
                logits = slide_inference(net, xr.flip(-1) if flip else xr, num_classes, img_size, test_stride, black)
                probs = probs + resize(logits.flip(-1) if flip else logits, (H, W)).softmax(1)
        conf += confusion(probs.argmax(1), label, num_classes)
    net.train()
    if cut_short(stop, device):
        return None
    dist.all_reduce(conf)
    dist.all_reduce(counts)
    metrics = {**seg_metrics(conf), 'images': int(counts[0] - counts[1]), 'unreadable': int(counts[1])}
    line = f"mIoU {metrics['mIoU']:.2f}  mAcc {metrics['mAcc']:.2f}  aAcc {metrics['aAcc']:.2f}"
    if num_classes <= 20:  # a few classes: each one's IoU in the log too (always in eval.json)
        line += '  IoU per class: ' + ', '.join('-' if v is None else f'{v:.1f}' for v in metrics['IoU'])
    return metrics, line


if task == 'seg':
    if 'synthetic' in (train_labels, val_labels):
        synthetic_scenes(num_classes - 1)  # the shape kinds: class 0 is the background
    val_set = Samples(seg_source(val_images, val_labels, train=False), as_is, seed, joint=True)
    classes = None
    test_desc = f"test: windows of {img_size} at stride {test_stride}"
    torch.manual_seed(seed)
    backbone_cfg = eva_config(model_size, img_size=img_size, patch_size=patch_size, drop_path=drop_path,
                              grad_checkpointing=grad_checkpointing)  # pos_embed at the crop's grid (resized at load)
    model_cfg = SegConfig(backbone=backbone_cfg, **task_keys(SegConfig))
    with torch.device(device):
        model = Segmenter(model_cfg)
    if init_from:  # a whole segmenter (ours, mmseg's names) or an encoder under fresh heads
        with input_errors():
            load_segmenter(model, init_from, init_ckpt)
    model_inputs, evaluate, decay_rules = seg_inputs, evaluate_seg, SEG_LAYER_DECAY

# -----------------------------------------------------------------------------
# eval_only: init_from on the val set, then exit (no training data, no engine)
del init_ckpt  # not kept for the run: GBs of host memory for EVA-g
if eval_only:
    evaluated = evaluate(model.to(model_dtype) if cuda else model)
    if evaluated is None:
        sys.exit(130)  # cut short by Ctrl-C: nothing written
    report(*evaluated, init_step)
    dist.barrier()
    dist.destroy_process_group()
    sys.exit(0)

# -----------------------------------------------------------------------------
# training data
if task == 'det':
    train_set = Samples(train_src, LargeScaleJitter(img_size, lsj_scale), seed, joint=True)
    collate = functools.partial(collate_detection, size=img_size)
    if fed_classes:  # LVIS's federated loss draws classes by image frequency ^ 0.5
        fed_weights = train_src.image_counts() ** 0.5
        for predictor in model.roi_heads.box_predictor:
            predictor.fed_loss_cls_weights.copy_(fed_weights)
else:
    train_src = seg_source(train_images, train_labels, train=True)
    train_set = Samples(train_src, SegAugment(img_size, seg_scale, seg_ratio, cat_max_ratio), seed, joint=True)
    collate = None  # torch's default
repeats = train_src.repeat_factors(repeat_threshold) if repeat_threshold > 0 else None  # LVIS (refused for seg)
sampler = ResumableSampler(len(train_set), world, rank, seed, repeat_factors=repeats)  # an epoch: the repeats' sum
steps_per_epoch = sampler.n // batch_size
if steps_per_epoch == 0:
    config_error(f"{len(train_set)} training images are fewer than one batch of {batch_size}")
print0(f"world {world} x micro-batch {micro_batch} x grad-accum {grad_accum} = global batch {batch_size}; "
       f"{len(train_set):,} train / {len(val_set):,} val images at {img_size} ({test_desc}), "
       f"{max_steps:,} steps ({max_steps / steps_per_epoch:.1f} epochs); dtype {dtype}, ZeRO-{zero_stage}")


def get_lr(step):
    """Linear warmup from lr x warmup_factor, times steps of x0.1 at lr_steps (detectron2's WarmupParamScheduler over a
    MultiStepParamScheduler) or a linear decay to 0 at max_steps (mmcv's poly with power 1 and linear warmup)."""
    f = 0.1 ** sum(step >= s for s in lr_steps) if schedule == 'step' else 1 - step / max_steps
    if step < warmup_iters:
        f *= warmup_factor + (1 - warmup_factor) * step / warmup_iters
    return lr * f


# -----------------------------------------------------------------------------
# engine, resume, log
groups = param_groups(model, weight_decay, layer_decay, **decay_rules)  # the task's layer-0 names and decay rule
optimizer = torch.optim.AdamW(groups, lr=lr, betas=(beta1, beta2), eps=eps, **({'fused': True} if cuda else {}))
engine, optimizer = deepspeed_engine(model, optimizer, batch_size, micro_batch, grad_clip, zero_stage, dtype)
step, client = resume(engine, out_dir, seed, config)  # 1. out_dir's latest checkpoint wins; 2. else init_from
log = open_log(out_dir, {'config': config, 'world': world, 'grad_accum': grad_accum, 'start_step': step,
                         'steps_per_epoch': steps_per_epoch, 'total_steps': max_steps}, wandb_project, wandb_run_name)

# -----------------------------------------------------------------------------
# training loop
data = train_batches(train_set, sampler, micro_batch, grad_accum, steps_per_epoch, step, num_workers, cuda,
                     collate_fn=collate)
sums = {}  # loss terms summed over the steps since the last log line
skips = {}  # samples skipped since then: bad_samples (unreadable images) and the task's own (det: bad_anns)
t_log, n_logged, t_start, start_step = time.time(), 0, time.time(), step
stopping = False  # a signal (stop, set up at the start): save at the next log step and exit 0
while step < max_steps:
    lr_now = get_lr(step)
    for group in optimizer.param_groups:
        group['lr'] = lr_now * group['lr_scale']
    for _ in range(grad_accum):
        batch = next(data)
        inputs, lost = model_inputs(batch, img_size)
        losses = engine(*inputs)
        loss = sum(losses.values())
        engine.backward(loss)
        engine.step()
        for k, v in {'loss': loss, **losses}.items():
            sums[k] = sums.get(k, 0) + v.detach()
        for k, v in {'bad_samples': batch['skipped'].sum(), **lost}.items():
            skips[k] = skips.get(k, 0) + v
    step += 1
    n_logged += 1
    if step % log_interval == 0 or step == max_steps:
        names, kinds = list(sums), list(skips)
        means = torch.stack([sums[k] for k in names]) / (n_logged * grad_accum)
        counts = torch.tensor([float(skips[k]) for k in kinds], device=device)
        stats = torch.cat((means, counts, torch.tensor([stop()], device=device)))
        dist.all_reduce(stats)
        stopping = stats[-1].item() > 0
        img_s = n_logged * batch_size / (time.time() - t_log)
        log({'step': step, 'epoch': round(step / steps_per_epoch, 4), 'loss': stats[0].item() / world, 'lr': lr_now,
             **engine_stats(engine), 'img_s': round(img_s, 2),
             'eta_h': round((max_steps - step) * (time.time() - t_start) / (step - start_step) / 3600, 4),
             **{k: round(stats[i].item() / world, 4) for i, k in enumerate(names) if i},
             **{k: int(stats[len(names) + i].item()) for i, k in enumerate(kinds)}})
        sums, skips = {}, {}
        t_log, n_logged = time.time(), 0
    evaluate_now = step == max_steps or (eval_interval and step % eval_interval == 0)
    if evaluate_now:
        evaluated = evaluate(engine.module)
        if evaluated is None:  # cut short by a signal: not reported; save and stop
            stopping = True
        else:
            report(*evaluated, step)
            log({'step': step, 'eval': evaluated[0]}, echo=False)
    if step % save_interval == 0 or evaluate_now or step == stop_step or stopping:
        sd = full_state_dict(engine)  # a collective: every rank
        save_checkpoint(engine, out_dir, step, {'config': config},
                        {'last.pt': {'model': sd, 'model_config': dataclasses.asdict(model_cfg), 'classes': classes,
                                     'config': config, 'step': step}}, keep_ckpts)
    if step == stop_step or stopping:
        print0(f"stopped at step {step} ({'signal' if stopping else 'stop_step'}); the same command resumes")
        break
if step > start_step:
    print0(f"{step - start_step} steps in {hms(time.time() - t_start)} (to step {step} of {max_steps})")
dist.barrier()
dist.destroy_process_group()
