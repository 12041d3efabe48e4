"""
Detection's modules (det_seg.py task='det'; tests/test_det.py): the EVA encoder as a ViTDet backbone (Li et al. 2022,
"Exploring Plain Vision Transformer Backbones for Object Detection": window attention, decomposed relative position,
the simple feature pyramid) under a Cascade Mask R-CNN (Cai & Vasconcelos 2018), the detector of the EVA paper's
section 4.4. In reading order:

- DetConfig: the detector's settings, named as det_seg.py's config keys
- the backbone: window_partition / window_unpartition, rel_pos_table, RelPosAttention, WindowBlock, ViTDet
- the simple feature pyramid: LayerNorm2d, ConvNorm, SimpleFeaturePyramid, Backbone (backbone.net + backbone.simfp_*)
- the RPN: Anchors, FloatRPNHead, RPN (torchvision's, with detectron2's anchors and loss)
- the ROI heads: pool_rois, BoxHead, BoxPredictor, MaskHead, scale_grad, match, fed_loss_classes, and the model,
  CascadeMaskRCNN (its mask targets: polygons_in_boxes); its test-time scoring: maskness, soft_nms
- released checkpoints and layer decay: D2_KEYS, load_detector (init_from), LAYER_DECAY (model.param_groups' rules)

    CascadeMaskRCNN(DetConfig(...))(images, sizes, targets) -> {loss name: scalar}           (training)
    CascadeMaskRCNN(DetConfig(...))(images, sizes)          -> per image {'boxes', 'scores', 'labels', 'masks'}

The cascade, the pooler, the heads, soft-NMS and maskness are written out here. Module names are detectron2's, as
EVA-01's det code (a vendored detectron2) has them, so its released checkpoints load (D2_KEYS, the few names that
differ). Segmentation's modules are in seg_model.py; the encoder's in model.py.

Precision: under DeepSpeed fp16 the weights are half and the convolutions, LayerNorms and linears run in half (the
official trained with AMP, whose autocast runs the same layers in half); every box coordinate, IoU, score, loss and
ROIAlign runs in float32 (half has a 1-pixel spacing between 1024 and 2048: boxes at 1280 px would be off by pixels).

scipy is imported inside beit_resize, the only user (the 1536 evaluation): a GPU host without it trains and evaluates
at 1280.
"""
import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, roi_align

from data import mask_util, polygons_rle
from model import (EMBEDDINGS, Attention, Block, EVAConfig, PatchEmbed, load_pretrained, load_whole, read_checkpoint,
                   resize_pos_embed, unwrap_state_dict)


@dataclass
class DetConfig:
    backbone: EVAConfig = None     # the encoder (patch 16; img_size = the pretraining size its 14x14 pos_embed is for)
    num_classes: int = 80
    img_size: int = 1024           # the square the images are padded to (LSJ crop); the relative positions' grid
    window: int = 16               # window attention's side, in tokens
    rel_pos_interp: str = 'linear'  # tables for another grid at test: 'linear' (ViTDet), 'beit' (EVA-01's 1536 runs)
    global_blocks: tuple = tuple(range(3, 40, 4))  # blocks attending globally (EVA-g: every 4th, 3 ... 39)
    pyramid_dim: int = 256         # channels of the simple feature pyramid and everything after it
    anchor_sizes: tuple = (32, 64, 128, 256, 512)  # one anchor size per level p2 ... p6
    rpn_batch: int = 256           # anchors sampled per image for the RPN loss (half positive at most)
    rpn_pre_nms: tuple = (2000, 1000)  # top proposals per level before NMS (training, testing)
    rpn_post_nms: int = 1000       # proposals per image after NMS
    roi_batch: int = 512           # proposals sampled per image for the first cascade stage
    roi_positive: float = 0.25     # their foreground fraction at most
    stage_ious: tuple = (0.5, 0.6, 0.7)  # the cascade stages' foreground IoU
    head_dim: int = 256            # box and mask heads' conv channels
    fc_dim: int = 1024             # box heads' fc
    canonical_box: int = 224       # a box of this side is pooled from p4 (FPN's level rule)
    masks: bool = True             # the mask head (instance segmentation)
    sigmoid_ce: bool = False       # LVIS: per-class sigmoid cross-entropy instead of softmax
    fed_classes: int = 0           # LVIS: the federated loss on this many classes per step (50); 0 off
    score_thresh: float = 0.05     # test: candidates above this score (0: all, as EVA-01's soft-NMS evaluation)
    nms: float = 0.5               # test: per-class NMS IoU
    soft_nms: float = 0.0          # test: >0 linear soft-NMS at this IoU instead of NMS (EVA-01 COCO: 0.6)
    max_dets: int = 100            # test: detections per image (with soft-NMS: per image and class, COCOeval's cap)
    maskness: float = 0.0          # test: >0 rescores a detection by its mask's mean probability above this (0.5)


# -----------------------------------------------------------------------------
# backbone: windows, decomposed relative position, the pos_embed resized on the fly


def window_partition(x, w):
    """x (B, H, W, C) -> windows (B * nH * nW, w, w, C), zero-padded at the bottom and right to multiples of w;
    and the padded (Hp, Wp). The padding tokens are attended to, unmasked, as ViTDet does."""
    B, H, W, C = x.shape
    x = F.pad(x, (0, 0, 0, -W % w, 0, -H % w))
    Hp, Wp = x.shape[1:3]
    x = x.view(B, Hp // w, w, Wp // w, w, C).transpose(2, 3)  # (B, nH, nW, w, w, C)
    return x.reshape(-1, w, w, C), (Hp, Wp)


def window_unpartition(windows, w, padded, size):
    """windows (B * nH * nW, w, w, C) -> x (B, H, W, C), the padding cut off."""
    (Hp, Wp), (H, W) = padded, size
    x = windows.view(-1, Hp // w, Wp // w, w, w, windows.shape[-1]).transpose(2, 3)
    return x.reshape(-1, Hp, Wp, windows.shape[-1])[:, :H, :W]


@functools.cache
def beit_resize(src, dst):
    """EVA-01's 'beit' table resize (its detectron2 backbone/utils.py get_rel_pos, from BEiT; its 1536 evaluation
    configs set it: the global blocks' 159 rows become 191): the src rows placed at offsets 0, +-1, +-(1 + q),
    +-(1 + q + q^2), ... (q = 1.0903078), a cubic spline through them (scipy's interp1d, not-a-knot, extrapolated)
    read at the integer offsets -(dst // 2) ... dst // 2. The spline is linear in the rows: -> a (dst, src) float64
    matrix, built once per size pair, that multiplies the table."""
    from scipy.interpolate import interp1d
    dis = np.cumsum(1.0903078 ** np.arange(src // 2))
    x = np.concatenate((-dis[::-1], [0.0], dis))
    spline = interp1d(x, np.eye(len(x)), kind='cubic', axis=0, fill_value='extrapolate')
    return torch.from_numpy(spline(np.arange(-(dst // 2), dst // 2 + 1.0)))


def rel_pos_table(rel_pos, q_size, k_size, interp='linear'):
    """rel_pos (2S - 1, hd) -> (q_size, k_size, hd): the embedding of each query-key offset along one axis, the table
    resized for another grid than S, linearly in float32 (ViTDet's get_rel_pos) or by beit_resize (interp='beit')."""
    n = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != n and interp == 'beit':
        rel_pos = (beit_resize(rel_pos.shape[0], n).to(rel_pos.device) @ rel_pos.double()).to(rel_pos.dtype)
    elif rel_pos.shape[0] != n:
        rel_pos = F.interpolate(rel_pos.float().T[None], size=n, mode='linear')[0].T.to(rel_pos.dtype)
    q = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    return rel_pos[(q - k + (k_size - 1) * max(q_size / k_size, 1.0)).long()]


class RelPosAttention(Attention):
    """EVA's attention (same parameters and keys) on a (B, H, W, D) grid, plus MViTv2's decomposed relative position:
    q_i . Rh[h_i - h_j] + q_i . Rw[w_i - w_j] added to the logits (unscaled q, as ViTDet), zero-initialised tables
    for a side of `size` tokens, new parameters that no MIM checkpoint has."""

    def __init__(self, cfg, size, interp='linear'):
        super().__init__(cfg)
        self.interp = interp  # rel_pos_table's resize when the grid is not `size` (a larger test image)
        hd = cfg.embed_dim // cfg.num_heads
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * size - 1, hd))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * size - 1, hd))

    def forward(self, x):
        B, H, W, D = x.shape
        q, k, v = self.heads(x.reshape(B, H * W, D))  # (B, heads, H*W, hd)
        r = q.unflatten(2, (H, W))  # (B, heads, H, W, hd)
        Rh, Rw = rel_pos_table(self.rel_pos_h, H, H, self.interp), rel_pos_table(self.rel_pos_w, W, W, self.interp)
        rel_h = torch.einsum('bnhwc,hkc->bnhwk', r, Rh)  # (B, heads, H, W, H)
        rel_w = torch.einsum('bnhwc,wkc->bnhwk', r, Rw)  # (B, heads, H, W, W)
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, -1, H * W, H * W)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))  # SDPA adds the bias to q k^T / sqrt
        return self.proj(x.transpose(1, 2).reshape(B, H, W, D))


class WindowBlock(Block):
    """EVA's block on a (B, H, W, D) grid; attention within w x w windows (w > 0) or over the whole grid."""

    def __init__(self, cfg, drop_path, window, grid, interp='linear'):
        super().__init__(cfg, drop_path)
        self.window = window
        self.attn = RelPosAttention(cfg, window or grid, interp)

    def forward(self, x):
        h = self.norm1(x)
        if self.window:
            h, padded = window_partition(h, self.window)
        h = self.attn(h)
        if self.window:
            h = window_unpartition(h, self.window, padded, x.shape[1:3])
        x = x + self.drop_path(h)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViTDet(nn.Module):
    """The EVA encoder as ViTDet's plain backbone: (B, 3, S, S) -> the stride-16 map (B, D, S/16, S/16). Keys are EVA's
    (patch_embed, pos_embed, blocks.i...) plus blocks.i.attn.rel_pos_h / _w; no cls token, no final norm. The pos_embed
    stays the pretraining one (14 x 14 at 224) and is resized to the token grid at every forward (ViTDet's get_abs_pos:
    fine-tuning then trains the small grid, as the official); the patch embedding is frozen (EVA-01's det config)."""

    def __init__(self, cfg, det):
        super().__init__()
        if cfg.patch_size != 16 or det.img_size % 32:
            raise ValueError(f"ViTDet's pyramid (strides 4 ... 64) needs patch 16 (got {cfg.patch_size}; "
                             f"load_pretrained resizes a patch-14 kernel) and an image side divisible by 32 (got "
                             f"{det.img_size})")
        self.config = cfg  # load_pretrained reads it
        self.patch_embed = PatchEmbed(cfg).requires_grad_(False)
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.grid ** 2, cfg.embed_dim))  # cls entry kept, unused
        grid = det.img_size // cfg.patch_size
        dpr = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList([WindowBlock(cfg, dpr[i], 0 if i in det.global_blocks else det.window, grid,
                                                 det.rel_pos_interp) for i in range(cfg.depth)])
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x):
        h, w = (s // self.config.patch_size for s in x.shape[-2:])
        x = self.patch_embed(x).unflatten(1, (h, w))  # (B, h, w, D)
        pos = resize_pos_embed(self.pos_embed, (h, w))[:, 1:].to(x.dtype)  # bicubic, float32 inside
        x = x + pos.reshape(1, h, w, -1)
        for blk in self.blocks:
            if self.config.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x.permute(0, 3, 1, 2)  # (B, D, h, w)

# -----------------------------------------------------------------------------
# the simple feature pyramid (ViTDet): p2 ... p6 from the single stride-16 map


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of (B, C, H, W) at every position (detectron2's channels-first LayerNorm)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNorm(nn.Conv2d):
    """detectron2's Conv2d with a norm: no bias, LayerNorm2d as `.norm` (keys weight, norm.weight, norm.bias), an
    optional ReLU; MSRA init (c2_msra_fill)."""

    def __init__(self, cin, cout, k, relu=False):
        super().__init__(cin, cout, k, padding=k // 2, bias=False)
        self.norm = LayerNorm2d(cout, eps=1e-6)
        self.relu = relu
        nn.init.kaiming_normal_(self.weight, mode='fan_out', nonlinearity='relu')

    def forward(self, x):
        x = self.norm(super().forward(x))
        return F.relu(x) if self.relu else x


class SimpleFeaturePyramid(nn.Module):
    """(B, D, h, w) at stride 16 -> {'p2': stride 4, 'p3': 8, 'p4': 16, 'p5': 32, 'p6': 64}, each (B, dim, ., .):
    scale 4 = two 2x2 transposed convs (LayerNorm + GELU between), 2 = one, 1 = identity, 1/2 = 2x2 max-pool; each
    then a 1x1 and a 3x3 ConvNorm; p6 = p5 subsampled (LastLevelMaxPool). Names simfp_2 ... simfp_5 as ViTDet's."""

    def __init__(self, D, dim):
        super().__init__()
        self.simfp_2 = nn.Sequential(nn.ConvTranspose2d(D, D // 2, 2, 2), LayerNorm2d(D // 2, eps=1e-6), nn.GELU(),
                                     nn.ConvTranspose2d(D // 2, D // 4, 2, 2), ConvNorm(D // 4, dim, 1),
                                     ConvNorm(dim, dim, 3))
        self.simfp_3 = nn.Sequential(nn.ConvTranspose2d(D, D // 2, 2, 2), ConvNorm(D // 2, dim, 1),
                                     ConvNorm(dim, dim, 3))
        self.simfp_4 = nn.Sequential(ConvNorm(D, dim, 1), ConvNorm(dim, dim, 3))
        self.simfp_5 = nn.Sequential(nn.MaxPool2d(2, 2), ConvNorm(D, dim, 1), ConvNorm(dim, dim, 3))

    def forward(self, x):
        p = {f'p{i}': getattr(self, f'simfp_{i}')(x) for i in (2, 3, 4, 5)}
        p['p6'] = F.max_pool2d(p['p5'], 1, 2)
        return p


class Backbone(SimpleFeaturePyramid):
    """backbone.net (the ViT) + backbone.simfp_* (the pyramid), detectron2's nesting, so that keys line up."""

    def __init__(self, cfg, det):
        super().__init__(cfg.embed_dim, det.pyramid_dim)
        self.net = ViTDet(cfg, det)

    def forward(self, x):
        return super().forward(self.net(x))

# -----------------------------------------------------------------------------
# RPN: torchvision's, with detectron2's anchors and loss


class Anchors(AnchorGenerator):
    """detectron2's DefaultAnchorGenerator: the same grid as torchvision's, but base anchors not rounded (torchvision
    rounds them, up to 0.5 px off) and always float32, whatever the features' dtype."""

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32, device=torch.device('cpu')):
        scales, ratios = (torch.as_tensor(t, dtype=torch.float32, device=device) for t in (scales, aspect_ratios))
        ws, hs = (scales[None] / ratios.sqrt()[:, None]).view(-1), (scales[None] * ratios.sqrt()[:, None]).view(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2

    def forward(self, image_list, feature_maps):  # only the maps' sizes, dtype and device are read
        return super().forward(image_list, [torch.empty(f.shape[-2:], device=f.device) for f in feature_maps])


class FloatRPNHead(RPNHead):
    """torchvision's RPNHead (2 convs + ReLU, 1x1 objectness and deltas, init N(0, 0.01)); outputs in float32."""

    def forward(self, x):
        logits, deltas = super().forward(x)
        return [t.float() for t in logits], [t.float() for t in deltas]


class RPN(RegionProposalNetwork):
    """torchvision's RPN (matching 0.7 / 0.3 with low-quality matches, 256 anchors at half positive, per-level top-k,
    NMS 0.7, top-k per image) with detectron2's loss: BCE summed over the sampled anchors and L1 (not smooth-L1) over
    the positives, both divided by batch x images (rpn.py's losses); proposals of any positive side kept."""

    def __init__(self, det):
        anchors = Anchors(tuple((s,) for s in det.anchor_sizes), ((0.5, 1.0, 2.0),) * len(det.anchor_sizes))
        super().__init__(anchors, FloatRPNHead(det.pyramid_dim, 3, conv_depth=2), 0.7, 0.3, det.rpn_batch, 0.5,
                         dict(training=det.rpn_pre_nms[0], testing=det.rpn_pre_nms[1]),
                         dict(training=det.rpn_post_nms, testing=det.rpn_post_nms), 0.7)
        # detectron2 drops proposals of side <= 0 (min_box_size 0), torchvision those under 1e-3 px: its test is
        # side >= min_size, so the smallest positive float32 (2 ** -149) keeps exactly the boxes of positive side
        self.min_size = 2.0 ** -149

    def compute_loss(self, objectness, deltas, labels, regression_targets):
        pos, neg = (torch.cat(m) for m in self.fg_bg_sampler(labels))
        norm = self.fg_bg_sampler.batch_size_per_image * len(labels)
        sampled = (pos | neg).bool()
        obj = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], torch.cat(labels)[sampled],
                                                 reduction='sum')
        box = F.l1_loss(deltas[pos.bool()], torch.cat(regression_targets)[pos.bool()], reduction='sum')
        return obj / norm, box / norm

# -----------------------------------------------------------------------------
# ROI heads: pooler, box heads, the cascade, the mask head; test-time scoring


def pool_rois(features, boxes, size, canonical=224):
    """ROIAlignV2 over levels (detectron2's ROIPooler): features [p2, p3, p4, p5] (B, C, ., .) float32, boxes a list of
    (R_i, 4) float32 per image -> (sum R_i, C, size, size). A box goes to level floor(4 + log2(sqrt(area) / canonical))
    clamped to 2 ... 5 (FPN's rule); roi_align with aligned=True (half-pixel centres), sampling_ratio 0 (adaptive).
    torchvision's MultiScaleRoIAlign is not aligned, hence this."""
    rois = torch.cat([torch.cat((torch.full_like(b[:, :1], i), b), 1) for i, b in enumerate(boxes)])
    side = ((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])).clamp(min=0).sqrt()
    level = torch.floor(4 + torch.log2(side / canonical + 1e-8)).clamp(2, 5).long() - 2
    out = features[0].new_zeros(len(rois), features[0].shape[1], size, size)
    for i, f in enumerate(features):
        idx = (level == i).nonzero().squeeze(1)
        if len(idx):
            out[idx] = roi_align(f, rois[idx], size, spatial_scale=1 / 2 ** (i + 2), sampling_ratio=0, aligned=True)
    return out


class BoxHead(nn.Sequential):
    """4conv1fc with LayerNorm (ViTDet's cascade box head): 4 x (3x3 ConvNorm + ReLU), flatten, fc + ReLU."""

    def __init__(self, cin, dim, fc, pool=7):
        super().__init__()
        for i in range(1, 5):
            self.add_module(f'conv{i}', ConvNorm(cin if i == 1 else dim, dim, 3, relu=True))
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(dim * pool * pool, fc)
        self.fc_relu1 = nn.ReLU()
        nn.init.kaiming_uniform_(self.fc1.weight, a=1)  # c2_xavier_fill
        nn.init.zeros_(self.fc1.bias)


class BoxPredictor(nn.Module):
    """cls_score (K + 1, background last, as detectron2) and class-agnostic bbox_pred (4). With the federated loss,
    detectron2's buffer of the classes' draw weights (image frequency ^ 0.5, set from the training data), under its
    name: a released LVIS detector holds one per cascade stage."""

    def __init__(self, fc, num_classes, fed=False):
        super().__init__()
        self.cls_score = nn.Linear(fc, num_classes + 1)
        self.bbox_pred = nn.Linear(fc, 4)
        if fed:
            self.register_buffer('fed_loss_cls_weights', torch.ones(num_classes))
        for m, std in ((self.cls_score, 0.01), (self.bbox_pred, 0.001)):
            nn.init.normal_(m.weight, std=std)
            nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.cls_score(x).float(), self.bbox_pred(x).float()


class MaskHead(nn.Module):
    """14x14 ROI features -> 28x28 mask logits for every class (B, K, 28, 28): 4 x (3x3 ConvNorm + ReLU), a 2x2
    transposed conv + ReLU, a 1x1 predictor (detectron2's MaskRCNNConvUpsampleHead with LN)."""

    def __init__(self, cin, dim, num_classes):
        super().__init__()
        for i in range(1, 5):
            setattr(self, f'mask_fcn{i}', ConvNorm(cin if i == 1 else dim, dim, 3, relu=True))
        self.deconv = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.predictor = nn.Conv2d(dim, num_classes, 1)
        nn.init.kaiming_normal_(self.deconv.weight, mode='fan_out', nonlinearity='relu')
        nn.init.zeros_(self.deconv.bias)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, x):
        for i in range(1, 5):
            x = getattr(self, f'mask_fcn{i}')(x)
        return self.predictor(F.relu(self.deconv(x))).float()


def scale_grad(x, s):
    """x forward, s x its gradient backward (detectron2's _ScaleGradient): each cascade stage sends 1/3 of its gradient
    into the shared features."""
    return x * s + x.detach() * (1 - s)


def match(boxes, target, iou, background):
    """boxes (R, 4) against target['boxes'] (G, 4) at one IoU threshold, no low-quality matches (Cascade R-CNN's
    stages) -> (labels (R,): the matched box's class or `background`, matched boxes (R, 4), matched index (R,) or
    -1)."""
    if len(target['boxes']) == 0:
        return (torch.full((len(boxes),), background, device=boxes.device), torch.zeros_like(boxes),
                torch.full((len(boxes),), -1, device=boxes.device))
    idx = Matcher(iou, iou, False)(box_iou(target['boxes'], boxes))  # -1: below iou
    fg, safe = idx >= 0, idx.clamp(min=0)
    return torch.where(fg, target['labels'][safe], background), target['boxes'][safe], torch.where(fg, idx, -1)


def matched_targets(matched, targets, background):
    """Each image's matched indices (R_i,) (-1: none) -> the ground truth of all images' boxes: labels (sum R_i,) (the
    class, or `background`) and boxes (sum R_i, 4) (zeros where none)."""
    labels, boxes = [], []
    for m, t in zip(matched, targets):
        if len(t['labels']):
            labels.append(torch.where(m >= 0, t['labels'][m.clamp(min=0)], background))
            boxes.append(t['boxes'][m.clamp(min=0)])
        else:
            labels.append(torch.full_like(m, background))
            boxes.append(torch.zeros(len(m), 4, device=m.device))
    return torch.cat(labels), torch.cat(boxes)


def fed_loss_classes(gt_classes, num, num_classes, weight):
    """LVIS's federated loss (Zhou et al. 2021, detectron2's get_fed_loss_classes): the classes present among the
    sampled boxes, then classes drawn without replacement with probability ~ weight (image frequency ^ 0.5) up to
    `num`. The background (num_classes) counts among the `num` when present, as in detectron2, which EVA-01 runs: 49
    foreground classes a step when background boxes were sampled (nearly always)."""
    present = gt_classes.unique()
    if len(present) >= num:
        return present
    prob = torch.zeros(num_classes + 1, device=weight.device)
    prob[:num_classes] = weight.float()
    prob[present] = 0
    return torch.cat((present, torch.multinomial(prob, num - len(present), replacement=False)))


class CascadeMaskRCNN(nn.Module):
    """ViTDet backbone + simple feature pyramid + RPN + 3-stage cascade box heads + mask head (EVA-01's det model)."""

    def __init__(self, det):
        super().__init__()
        self.config, K = det, det.num_classes
        self.backbone = Backbone(det.backbone, det)
        self.proposal_generator = RPN(det)
        self.roi_heads = nn.Module()  # detectron2's nesting: roi_heads.box_head.k, box_predictor.k, mask_head
        self.roi_heads.box_head = nn.ModuleList([BoxHead(det.pyramid_dim, det.head_dim, det.fc_dim)
                                                 for _ in det.stage_ious])
        self.roi_heads.box_predictor = nn.ModuleList([BoxPredictor(det.fc_dim, K, fed=det.fed_classes > 0)
                                                      for _ in det.stage_ious])
        self.roi_heads.mask_head = MaskHead(det.pyramid_dim, det.head_dim, K) if det.masks else None
        # the stages' box coding: finer weights for the later, better-aligned stages (Cascade R-CNN)
        self.box_coders = [BoxCoder((10.0 * (k + 1), 10.0 * (k + 1), 5.0 * (k + 1), 5.0 * (k + 1)), math.log(1000 / 16))
                           for k in range(len(det.stage_ious))]
        self.sampler = BalancedPositiveNegativeSampler(det.roi_batch, det.roi_positive)

    def forward(self, images, sizes, targets=None):
        """images (B, 3, S, S) normalised and zero-padded; sizes [(h, w)] of the images inside; targets per image:
        {'boxes' (n, 4) x1y1x2y2 float32, 'labels' (n,) int64, 'masks' (n, S, S) bool (with the mask head)}.
        Training -> {loss name: float32 scalar}; else per image {'boxes' (d, 4), 'scores' (d,), 'labels' (d,),
        'masks' (d, 28, 28) probabilities of the box's class (with the mask head)}, boxes in the padded frame."""
        sizes = [tuple(int(v) for v in s) for s in sizes]
        p = self.backbone(images.to(self.backbone.net.pos_embed.dtype))
        proposals, losses = self.proposal_generator(ImageList(images, sizes), p, targets)
        features = [p[f'p{i}'].float() for i in (2, 3, 4, 5)]  # ROIAlign and what follows in float32 (boxes!)
        if not self.training:
            return self.detect(features, proposals, sizes)
        losses = {'loss_rpn_cls': losses['loss_objectness'], 'loss_rpn_loc': losses['loss_rpn_box_reg']}
        K = self.config.num_classes
        # stage 1's proposals: the RPN's plus the ground truth, matched at IoU 0.5, 512 sampled at 25% foreground
        boxes, matched = [], []
        for props, t in zip(proposals, targets):
            props = torch.cat((props, t['boxes']))
            labels, _, idx = match(props, t, self.config.stage_ious[0], K)
            pos, neg = self.sampler([(labels < K).long()])  # one image: 1 foreground, 0 background
            keep = (pos[0] | neg[0]).nonzero().squeeze(1)
            boxes.append(props[keep])
            matched.append(idx[keep])
        first = (boxes, matched)
        for k, (head, predictor, coder) in enumerate(zip(self.roi_heads.box_head, self.roi_heads.box_predictor,
                                                         self.box_coders)):
            if k:  # the previous stage's boxes (clipped, empty ones dropped), re-matched at this stage's IoU
                boxes = [clip_boxes_to_image(b.detach(), s) for b, s in zip(boxes, sizes)]
                boxes = [b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])] for b in boxes]
                matched = [match(b, t, self.config.stage_ious[k], K)[2] for b, t in zip(boxes, targets)]
            x = scale_grad(pool_rois(features, boxes, 7, self.config.canonical_box), 1 / len(self.box_coders))
            logits, deltas = predictor(head(x.to(head.conv1.weight.dtype)))
            labels, gt = matched_targets(matched, targets, K)
            cat = torch.cat(boxes)
            losses[f'loss_cls_stage{k}'] = self.classification_loss(logits, labels, predictor)
            fg = labels < K  # class-agnostic L1 over the foreground, divided by all sampled boxes (detectron2)
            losses[f'loss_box_reg_stage{k}'] = F.l1_loss(deltas[fg], coder.encode_single(gt[fg], cat[fg]),
                                                         reduction='sum') / max(len(labels), 1)
            boxes = coder.decode_single(deltas.detach(), cat).split([len(b) for b in boxes])
        if self.roi_heads.mask_head is not None:
            losses['loss_mask'] = self.mask_loss(features, *first, targets)
        return losses

    def classification_loss(self, logits, labels, predictor):
        """Softmax cross-entropy over K + 1 (mean), or for LVIS sigmoid BCE over the K classes, summed over the
        federated classes (drawn by the stage predictor's weights) and divided by the boxes (detectron2's
        sigmoid_cross_entropy_loss)."""
        if not self.config.sigmoid_ce:
            return F.cross_entropy(logits, labels)
        K = self.config.num_classes
        target = F.one_hot(labels, K + 1)[:, :K].float()
        loss = F.binary_cross_entropy_with_logits(logits[:, :K], target, reduction='none')
        if self.config.fed_classes:
            keep = torch.zeros(K + 1, device=logits.device)
            keep[fed_loss_classes(labels, self.config.fed_classes, K, predictor.fed_loss_cls_weights)] = 1
            loss = loss * keep[:K]
        return loss.sum() / max(len(labels), 1)

    def mask_loss(self, features, boxes, matched, targets):
        """BCE of the ground-truth class's 28x28 logits on stage 1's foreground proposals; the target is the matched
        instance in the proposal at 28x28 (detectron2's mask_rcnn_loss): its polygons rasterised there
        (PolygonMasks.crop_and_resize), or its bitmap cut by ROIAlignV2 and thresholded at 0.5 (BitMasks')."""
        fg_boxes, masks, classes = [], [], []
        for b, m, t in zip(boxes, matched, targets):
            b, m = b[m >= 0], m[m >= 0]
            fg_boxes.append(b)
            if 'polygons' in t:
                masks.append(polygons_in_boxes([t['polygons'][k] for k in m.tolist()], b, 28))
            else:
                rois = torch.cat((m[:, None].to(b.dtype), b), 1)
                masks.append(roi_align(t['masks'][:, None].float(), rois, 28, 1.0, 0, aligned=True)[:, 0] >= 0.5)
            classes.append(t['labels'][m])
        head = self.roi_heads.mask_head
        logits = head(pool_rois(features, fg_boxes, 14, self.config.canonical_box).to(head.predictor.weight.dtype))
        if len(logits) == 0:
            return logits.sum() * 0
        logits = logits[torch.arange(len(logits), device=logits.device), torch.cat(classes)]
        return F.binary_cross_entropy_with_logits(logits, torch.cat(masks).float())

    @torch.no_grad()
    def detect(self, features, proposals, sizes):
        """The three stages in a row on each image's proposals; class probabilities averaged over the stages, boxes
        from the last (detectron2's cascade inference); then per class NMS or soft-NMS, the mask head on the kept boxes,
        maskness."""
        det, K = self.config, self.config.num_classes
        boxes, probs = list(proposals), []
        for head, predictor, coder in zip(self.roi_heads.box_head, self.roi_heads.box_predictor, self.box_coders):
            x = pool_rois(features, boxes, 7, det.canonical_box)
            logits, deltas = predictor(head(x.to(head.conv1.weight.dtype)))
            probs.append(logits.sigmoid() if det.sigmoid_ce else logits.softmax(-1))
            boxes = [clip_boxes_to_image(b, s) for b, s in
                     zip(coder.decode_single(deltas, torch.cat(boxes)).split([len(b) for b in boxes]), sizes)]
        probs = (sum(probs) / len(probs))[:, :K].split([len(b) for b in boxes])
        out = []
        for b, pr in zip(boxes, probs):
            ok = b.isfinite().all(1) & pr.isfinite().all(1)
            b, pr = b[ok], pr[ok]
            i, c = (pr > det.score_thresh).nonzero().unbind(1)  # candidates: (box, class) pairs
            bc, sc = b[i], pr[i, c]
            if det.soft_nms > 0:
                keep, sc = soft_nms(bc, sc, c, det.soft_nms, per_class=det.max_dets)
            else:
                keep = batched_nms(bc, sc, c, det.nms)[:det.max_dets]
                sc = sc[keep]
            out.append({'boxes': bc[keep], 'scores': sc, 'labels': c[keep]})
        if self.roi_heads.mask_head is not None:
            head = self.roi_heads.mask_head
            logits = head(pool_rois(features, [o['boxes'] for o in out], 14, det.canonical_box)
                          .to(head.predictor.weight.dtype))
            labels = torch.cat([o['labels'] for o in out])
            masks = logits[torch.arange(len(labels), device=labels.device), labels].sigmoid()
            for o, m in zip(out, masks.split([len(o['boxes']) for o in out])):
                o['masks'] = m
                if det.maskness > 0:
                    o['scores'] = o['scores'] * maskness(m, det.maskness)
        return out


def polygons_in_boxes(polygons, boxes, size):
    """Each instance's polygons (lists of (k, 2) arrays) rasterised in its box (n, 4) on a size x size grid -> (n, size,
    size) bool on the boxes' device: detectron2's rasterize_polygons_within_box (shifted to the box's corner, scaled by
    size / max(side, 0.1) in the box's float32, COCO's rasteriser), on the CPU as detectron2 does."""
    out = np.zeros((len(boxes), size, size), np.uint8)
    for i, (polys, box) in enumerate(zip(polygons, boxes.detach().float().cpu().numpy())):
        scale = np.array([size / max(box[2] - box[0], 0.1), size / max(box[3] - box[1], 0.1)])
        if polys:  # COCO's rasteriser takes no empty list (detectron2: an empty mask)
            out[i] = mask_util.decode(polygons_rle([(p - box[:2]) * scale for p in polys], size, size))
    return torch.from_numpy(out).bool().to(boxes.device)


def maskness(masks, thresh=0.5):
    """masks (n, 28, 28) probabilities -> (n,): the mean probability over the pixels above thresh, 0 where none
    (SOLOv2's maskness, EVA-01's cascade_rcnn.py: a detection's score is multiplied by it)."""
    above = masks > thresh
    return (masks * above).sum((1, 2)) / above.sum((1, 2)).clamp(min=1)


def soft_nms(boxes, scores, classes, iou=0.6, min_score=1e-3, per_class=0):
    """Linear soft-NMS (Bodla et al. 2017) within each class, as mmcv's soft_nms that EVA-01 calls (all classes in one
    call, kept apart by coordinate offsets): repeatedly keep the highest remaining box and multiply the score of every
    other box of its class that overlaps it by `iou` or more by (1 - IoU); boxes below min_score leave (those under it
    at the start on mmcv's first pass). boxes (N, 4), scores (N,), classes (N,) -> (kept indices, their decayed scores),
    by class then selection order; per_class > 0 keeps the first per_class of each class (COCOeval reads no more than
    100 per image and class: the AP is unchanged). All classes run at once: one step per rank within a class."""
    keep0 = (scores >= min_score).nonzero().squeeze(1)
    if len(keep0) == 0:
        return keep0, scores[keep0]
    cls, inv = classes[keep0].unique(return_inverse=True)
    counts = torch.bincount(inv, minlength=len(cls))
    order = torch.argsort(inv, stable=True)  # grouped by class
    rank = torch.arange(len(keep0), device=boxes.device) - (counts.cumsum(0) - counts)[inv[order]]
    M = int(counts.max())
    idx = torch.full((len(cls), M), -1, dtype=torch.long, device=boxes.device)  # (C, M) padded candidates per class
    idx[inv[order], rank] = keep0[order]
    valid = idx >= 0
    b = boxes[idx.clamp(min=0)]  # (C, M, 4)
    s = torch.where(valid, scores[idx.clamp(min=0)].float(), torch.zeros((), device=boxes.device))
    ious = _pairwise_iou(b)  # (C, M, M)
    alive, kept, kept_scores = valid.clone(), [], []
    rows = torch.arange(len(cls), device=boxes.device)
    for _ in range(M if per_class <= 0 else min(M, per_class)):
        cur = torch.where(alive, s, torch.full_like(s, -1.0))
        best, j = cur.max(1)  # (C,)
        took = best >= 0
        kept.append(torch.where(took, idx[rows, j], -1))
        kept_scores.append(best)
        alive[rows, j] = False
        o = ious[rows, j]  # (C, M): IoU with the box just kept
        s = torch.where(alive & took[:, None] & (o >= iou), s * (1 - o), s)  # mmcv: at the threshold too
        alive &= s >= min_score
        if not alive.any():
            break
    kept, kept_scores = torch.stack(kept, 1).flatten(), torch.stack(kept_scores, 1).flatten()  # class-major
    return kept[kept >= 0], kept_scores[kept >= 0]


def _pairwise_iou(b):
    """b (C, M, 4) -> (C, M, M) IoU within each row."""
    area = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    lt, rb = torch.max(b[:, :, None, :2], b[:, None, :, :2]), torch.min(b[:, :, None, 2:], b[:, None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter / (area[:, :, None] + area[:, None, :] - inter).clamp(min=1e-12)

# -----------------------------------------------------------------------------
# released checkpoints and layer decay

# detectron2's names (EVA-01's released eva_coco_det.pth / eva_coco_seg.pth / eva_lvis.pth, from its module
# definitions; not checked against the files, which are 4 GB) -> ours, where they differ: torchvision's RPN head
D2_KEYS = ((r'^proposal_generator\.rpn_head\.conv\.conv(\d)\.', r'proposal_generator.head.conv.\1.0.'),
           (r'^proposal_generator\.rpn_head\.objectness_logits\.', 'proposal_generator.head.cls_logits.'),
           (r'^proposal_generator\.rpn_head\.anchor_deltas\.', 'proposal_generator.head.bbox_pred.'))


def load_detector(model, path, ckpt=None):
    """init_from for detection. A whole detector (weights under 'model': our last.pt, EVA-01's released detectron2
    files through D2_KEYS), fitted to this one by model.load_whole: relative-position tables of another grid resized
    linearly (ViTDet's rule), the class layers of another class count (cls_score, the mask predictor) new, a mask head
    the file lacks new (COCO from the boxes-only Objects365 model, as EVA-01); detectron2's pixel mean / std buffers
    dropped, its federated-loss weights (an LVIS file's) taken, dropped or new as this model has the loss. Or an
    encoder (ideally `python model.py psz14to16` output, as EVA-01; a patch-14 one is resized the same way on the fly)
    into backbone.net with load_pretrained's checks: only the relative-position tables are new. ckpt: the file
    already read (path names it). -> load_pretrained's report for an encoder, None for a whole detector."""
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    keys = unwrap_state_dict(ckpt)[0]
    if any(k.startswith('decode_head.') for k in keys):
        raise ValueError(f"{path} is a segmenter (decode_head.*): a detector starts from a detector or an encoder")
    if any(k.startswith('backbone.net.') for k in keys):
        fed = '.fed_loss_cls_weights'  # LVIS's (set again from the training data; unused in evaluation)
        return load_whole(model, ckpt, path, 'detector', renames=D2_KEYS, unused=('pixel_mean', 'pixel_std', fed),
                          fresh=('.cls_score.', 'mask_head.predictor.', fed), optional=('roi_heads.mask_head.', fed),
                          resizable=('.rel_pos_h', '.rel_pos_w'))
    new = tuple(k for k in model.backbone.net.state_dict() if '.rel_pos_' in k)
    return load_pretrained(model.backbone.net, ckpt, allowed_missing=new, name=path)


# model.param_groups' rules for a detector (ViTDet's get_vit_lr_decay_rate): the encoder's embeddings at layer 0,
# block i at i + 1, the pyramid and the heads at depth + 1; weight decay on every parameter (EVA-01's det config sets
# no exemption, unlike ViTDet's)
LAYER_DECAY = dict(blocks='backbone.net.blocks.', layer0=tuple('backbone.net.' + k for k in EMBEDDINGS),
                   decay_all=True)
