"""
Semantic segmentation's modules (det_seg.py task='seg'; tests/test_seg.py), as EVA-01's seg code ran them (mmseg 0.20
with mmdet 2.22's Mask2Former; EVA paper section 4.4): the EVA encoder under the ViT-Adapter (Chen et al. 2023) or
tapped at four depths through BEiT's fpn1 ... fpn4, then Mask2Former (Cheng et al. 2022; the paper's) or UperNet
(Xiao et al. 2018; BEiT's and EVA-02's). In reading order:

- SegConfig: the segmenter's settings, named as det_seg.py's config keys
- building blocks: BatchNorm2d (float32, synchronised over GPUs), ConvModule, resize, FFN
- multi-scale deformable attention (the adapter's and the pixel decoder's): ms_deform_attn, MSDeformAttn,
  reference_points
- the ViT-Adapter: adapter_init, SpatialPrior, Injector, ConvFFN, Extractor, Interaction
- the encoder: SegViT (fpn1 ... fpn4, or the adapter)
- UperNet and its auxiliary FCN head: SegHead, UPerHead, FCNHead, seg_ce
- Mask2Former: sine_pos, DeformEncoderLayer, gn_conv, PixelDecoder, DecoderLayer, Mask2FormerHead; its matching and
  losses: hungarian, point_sample, uncertain_points, dice_loss, semantic_targets, mask2former_loss; semantic_inference
- the model: Segmenter
- evaluation: slide_inference, confusion, seg_metrics
- released checkpoints and layer decay: MMSEG_KEYS, load_segmenter (init_from), M2F_LAYER0, LAYER_DECAY

    Segmenter(SegConfig(...))(images, labels) -> {loss name: scalar}            (training)
    Segmenter(SegConfig(...))(images)         -> (B, K, H, W) float32 scores    (inference on crops)

Module names are mmseg's / mmdet's where their released checkpoints need them (MMSEG_KEYS maps the rest).
Detection's modules are in det_model.py; the encoder's in model.py.
"""
import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules._functions import SyncBatchNorm  # what nn.SyncBatchNorm runs, here with float32 weights
from torch.utils.checkpoint import checkpoint

from model import EMBEDDINGS, EVA, DropPath, EVAConfig, load_pretrained, load_whole, read_checkpoint, unwrap_state_dict


@dataclass
class SegConfig:
    backbone: EVAConfig = None     # the encoder at the crop size (load_pretrained resizes a 14 x 14 pos_embed to it)
    num_classes: int = 150         # ADE20K 150, COCO-Stuff-164K 171
    taps: tuple = (9, 19, 29, 39)  # blocks feeding fpn1 ... fpn4 (strides 4, 8, 16, 32); EVA-02-L: 7, 11, 15, 23
    seg_head: str = 'upernet'      # 'upernet' or 'mask2former' (EVA-01's)
    seg_channels: int = 512        # head channels (UperNet: BEiT 512, EVA-02-L 1024; EVA-01's Mask2Former 1024)
    aux_channels: int = 256        # UperNet: the auxiliary FCN head on the stride-16 level
    aux_weight: float = 0.4        # UperNet: its loss weight; 0: no auxiliary head
    queries: int = 200             # Mask2Former: queries
    dec_layers: int = 8            # Mask2Former: masked-attention decoder layers (EVA-01: 8)
    enc_layers: int = 6            # Mask2Former: deformable pixel-decoder layers
    attn_heads: int = 32           # Mask2Former: attention heads (decoder and pixel decoder)
    ffn_dim: int = 4096            # Mask2Former: FFN hidden width
    train_points: int = 12544      # Mask2Former: points per mask for matching and the mask losses (112 x 112)
    no_object_weight: float = 0.1  # Mask2Former: the no-object class's CE weight
    adapter: bool = False          # ViT-Adapter between the encoder and the head (EVA-01's), instead of fpn1-fpn4
    adapter_inplanes: int = 64     # its spatial prior's stem channels
    adapter_heads: int = 16        # its deformable attentions' heads (4 points each)
    deform_ratio: float = 0.5      # their value width / D
    cffn_ratio: float = 0.25       # the extractors' ConvFFN hidden width / D


# -----------------------------------------------------------------------------
# building blocks: mmcv's conv modules and BatchNorm under half weights


class BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm computed in float32 whatever the engine's precision (DeepSpeed casts the weights to half and keeps the
    running statistics float32, a mix torch's kernels refuse), over the whole batch of all ranks when training
    distributed on CUDA (SyncBN: mmseg's heads train with it, a GPU's 1-2 crops being too few alone)."""

    def forward(self, x):
        w, b = self.weight.float(), self.bias.float()
        if not self.training:  # a model cast whole for evaluation (eval_only on a GPU) has half statistics
            return F.batch_norm(x.float(), self.running_mean.float(), self.running_var.float(), w, b, False, 0.0,
                                self.eps).to(x.dtype)
        if x.is_cuda and dist.is_initialized() and dist.get_world_size() > 1:
            y = SyncBatchNorm.apply(x.float(), w, b, self.running_mean, self.running_var, self.eps, self.momentum,
                                    dist.group.WORLD, dist.get_world_size())
        else:
            y = F.batch_norm(x.float(), self.running_mean, self.running_var, w, b, self.training, self.momentum,
                             self.eps)
        return y.to(x.dtype)


class ConvModule(nn.Module):
    """mmcv's ConvModule as mmseg's heads use it: conv (no bias) + BatchNorm (synchronised on several GPUs) + ReLU, keys
    conv.* and bn.*, Kaiming (fan-out) init."""

    def __init__(self, cin, cout, k):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        self.bn = BatchNorm2d(cout)
        nn.init.kaiming_normal_(self.conv.weight, mode='fan_out', nonlinearity='relu')

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def resize(x, size):
    return F.interpolate(x, size=size, mode='bilinear', align_corners=False)


class FFN(nn.Sequential):
    def __init__(self, dim, hidden):
        super().__init__(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

# -----------------------------------------------------------------------------
# multi-scale deformable attention (Zhu et al. 2021): the adapter's and the pixel decoder's


def ms_deform_attn(value, shapes, loc, weights):
    """Deformable DETR's sampling core (its ms_deform_attn_core_pytorch, the CUDA kernel's convention): value (N, S,
    h, d), the levels' (H, W) maps of `shapes` flattened one after another; loc (N, Q, h, L, P, 2) sampling points in
    [0, 1] as (x, y), pixel centres at (i + 0.5) / size; weights (N, Q, h, L, P) -> (N, Q, h * d): per head the
    weighted sum of bilinear samples, zero outside the maps. One grid_sample per level, in float32."""
    N, _, h, d = value.shape
    Q, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    samples = []
    for lvl, (v, (H, W)) in enumerate(zip(value.float().split([H * W for H, W in shapes], 1), shapes)):
        v = v.permute(0, 2, 3, 1).reshape(N * h, d, H, W)
        grid = loc[:, :, :, lvl].transpose(1, 2).reshape(N * h, Q, P, 2).float() * 2 - 1
        sample = F.grid_sample(v, grid, mode='bilinear', padding_mode='zeros', align_corners=False)  # (N h, d, Q, P)
        samples.append(sample)
    w = weights.float().transpose(1, 2).reshape(N * h, 1, Q, L * P)
    return (torch.cat(samples, -1) * w).sum(-1).view(N, h * d, Q).transpose(1, 2)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Zhu et al. 2021; mmcv's MultiScaleDeformableAttention): each query samples
    `points` locations per head and level around its reference point, at offsets (in units of that level's size) and
    with softmaxed weights both predicted from the query. The official initialisation: zero offset weights, biases on a
    star (head k along angle 2 pi k / heads, scaled so the larger coordinate is 1, point p at p + 1 times that), uniform
    attention weights, xavier value and output projections. value_ratio < 1 narrows the value (ViT-Adapter)."""

    def __init__(self, dim, heads, levels, points, value_ratio=1.0):
        super().__init__()
        self.heads, self.levels, self.points = heads, levels, points
        vd = int(dim * value_ratio)
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, vd)
        self.output_proj = nn.Linear(vd, dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        theta = torch.arange(self.heads) * (2 * math.pi / self.heads)
        star = torch.stack((theta.cos(), theta.sin()), -1)
        star = star / star.abs().max(-1, keepdim=True).values
        self.sampling_offsets.weight.zero_()
        self.sampling_offsets.bias.copy_((star[:, None, None] * torch.arange(1, self.points + 1)[:, None]).expand(
            self.heads, self.levels, self.points, 2).flatten())
        self.attention_weights.weight.zero_()
        self.attention_weights.bias.zero_()
        for m in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, query, reference, value, shapes):
        """query (N, Q, C) (positions added), reference (N, Q, 2) in [0, 1] as (x, y), the same on every level (no
        padding: mmcv's valid ratios are 1), value (N, S, C) -> (N, Q, C), no residual."""
        N, Q, _ = query.shape
        v = self.value_proj(value).view(N, value.shape[1], self.heads, -1)
        off = self.sampling_offsets(query).view(N, Q, self.heads, self.levels, self.points, 2)
        w = self.attention_weights(query).view(N, Q, self.heads, -1).softmax(-1).view(off.shape[:-1])
        size = torch.tensor([(W, H) for H, W in shapes], dtype=torch.float32, device=query.device)
        loc = reference[:, :, None, None, None, :].float() + off.float() / size[:, None, :]
        return self.output_proj(ms_deform_attn(v, shapes, loc, w).to(query.dtype))


def reference_points(shapes, device=None):
    """(sum H W, 2): each level's pixel centres as (x, y) in [0, 1], the levels one after another."""
    levels = []
    for H, W in shapes:
        x, y = (torch.arange(W, device=device) + 0.5) / W, (torch.arange(H, device=device) + 0.5) / H
        levels.append(torch.stack(torch.meshgrid(x, y, indexing='xy'), -1).flatten(0, 1))  # (H W, 2)
    return torch.cat(levels)

# -----------------------------------------------------------------------------
# ViT-Adapter (EVA-01's seg/mmseg_custom/models/backbones/adapter_modules.py), driven by SegViT.forward_adapter


def adapter_init(m):
    """BEiTAdapter's _init_weights: linears trunc-normal 0.02, norms at (1, 0), convs N(0, sqrt(2 / fan_out))."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, std=math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class SpatialPrior(nn.Module):
    """The spatial prior module: a ResNet-like stem (three 3x3 conv-BN-ReLU, the first at stride 2, then a stride-2
    max-pool) to stride 4 with c channels, stride-2 conv-BN-ReLU to strides 8 (2c), 16 (4c), 32 (4c); each level
    projected to the ViT's width D by a 1x1 conv (fc1 ... fc4)."""

    def __init__(self, c, D):
        super().__init__()

        def conv_bn(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), BatchNorm2d(cout), nn.ReLU()]
        self.stem = nn.Sequential(*conv_bn(3, c, 2), *conv_bn(c, c, 1), *conv_bn(c, c, 1), nn.MaxPool2d(3, 2, 1))
        self.conv2 = nn.Sequential(*conv_bn(c, 2 * c, 2))
        self.conv3 = nn.Sequential(*conv_bn(2 * c, 4 * c, 2))
        self.conv4 = nn.Sequential(*conv_bn(4 * c, 4 * c, 2))
        self.fc1 = nn.Conv2d(c, D, 1)
        self.fc2 = nn.Conv2d(2 * c, D, 1)
        self.fc3 = nn.Conv2d(4 * c, D, 1)
        self.fc4 = nn.Conv2d(4 * c, D, 1)

    def forward(self, x):
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        return self.fc1(c1), self.fc2(c2), self.fc3(c3), self.fc4(self.conv4(c3))


class Injector(nn.Module):
    """The patch tokens read the prior's three levels by deformable attention, added through gamma (zero at init: the
    ViT starts as it was pretrained)."""

    def __init__(self, D, heads, points, ratio):
        super().__init__()
        self.query_norm = nn.LayerNorm(D, eps=1e-6)
        self.feat_norm = nn.LayerNorm(D, eps=1e-6)
        self.attn = MSDeformAttn(D, heads, 3, points, ratio)
        self.gamma = nn.Parameter(torch.zeros(D))

    def forward(self, x, ref, c, c_shapes):
        return x + self.gamma * self.attn(self.query_norm(x), ref, self.feat_norm(c), c_shapes)


class ConvFFN(nn.Module):
    """fc1, a depthwise 3x3 conv over each of the three levels' maps, GELU, fc2."""

    def __init__(self, D, hidden):
        super().__init__()
        self.fc1 = nn.Linear(D, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.fc2 = nn.Linear(hidden, D)

    def forward(self, x, shapes):
        levels = self.fc1(x).split([h * w for h, w in shapes], 1)
        maps = [t.transpose(1, 2).unflatten(2, s) for t, s in zip(levels, shapes)]  # (B, hidden, h, w) each
        x = torch.cat([self.dwconv(m).flatten(2).transpose(1, 2) for m in maps], 1)
        return self.fc2(F.gelu(x))


class Extractor(nn.Module):
    """The prior's tokens read the patch tokens (one level) by deformable attention, then the ConvFFN (drop path)."""

    def __init__(self, D, heads, points, ratio, cffn_ratio, drop_path):
        super().__init__()
        self.query_norm = nn.LayerNorm(D, eps=1e-6)
        self.feat_norm = nn.LayerNorm(D, eps=1e-6)
        self.attn = MSDeformAttn(D, heads, 1, points, ratio)
        self.ffn = ConvFFN(D, int(D * cffn_ratio))
        self.ffn_norm = nn.LayerNorm(D, eps=1e-6)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, c, ref, x, x_shape, c_shapes):
        c = c + self.attn(self.query_norm(c), ref, self.feat_norm(x), [x_shape])
        return c + self.drop_path(self.ffn(self.ffn_norm(c), c_shapes))


class Interaction(nn.Module):
    """One interval's injector and extractor (the last interval has two extra extractors)."""

    def __init__(self, D, heads, points, ratio, cffn_ratio, drop_path, extra):
        super().__init__()
        self.injector = Injector(D, heads, points, ratio)
        self.extractor = Extractor(D, heads, points, ratio, cffn_ratio, drop_path)
        self.extra_extractors = nn.ModuleList(Extractor(D, heads, points, ratio, cffn_ratio, drop_path)
                                              for _ in range(2)) if extra else None

# -----------------------------------------------------------------------------
# the encoder: global attention, tapped at four blocks (fpn1 ... fpn4) or under the adapter


class SegViT(EVA):
    """The EVA encoder as BEiT's / EVA-02's mmseg backbone: global attention over the cls token and the patches, the
    absolute pos_embed at the crop's grid, no final norm; the patch tokens after each of `taps` blocks as a (B, D, h, w)
    map, brought to strides 4, 8, 16, 32 by fpn1 (two 2x2 transposed convs, BN + GELU between), fpn2 (one), fpn3
    (identity), fpn4 (2x2 max-pool). Keys: EVA's, plus fpn1.* and fpn2.*. With seg.adapter: EVA-01's BEiTAdapter
    instead of the fpn (forward_adapter; keys spm.*, level_embed, interactions.*, up.*, norm1-4.*)."""

    def __init__(self, seg):
        cfg, taps = seg.backbone, tuple(seg.taps)
        super().__init__(replace(cfg, num_classes=0, pooling='cls', use_mask_token=False, mim_dim=0))
        if len(taps) != 4 or max(taps) >= cfg.depth:
            raise ValueError(f"taps must be 4 block indices below depth {cfg.depth} (repeats allowed), got {taps}")
        self.norm = nn.Identity()
        self.taps, self.adapter = taps, seg.adapter
        D = cfg.embed_dim
        if not seg.adapter:
            self.fpn1 = nn.Sequential(nn.ConvTranspose2d(D, D, 2, 2), BatchNorm2d(D), nn.GELU(),
                                      nn.ConvTranspose2d(D, D, 2, 2))
            self.fpn2 = nn.ConvTranspose2d(D, D, 2, 2)
            self.fpn3 = nn.Identity()
            self.fpn4 = nn.MaxPool2d(2)
            return
        if cfg.patch_size != 16 or list(taps) != sorted(taps):
            raise ValueError(f"the adapter needs patch 16 (its stride-16 level is the ViT's grid) and 4 non-decreasing "
                             f"taps ending its interaction intervals; got patch {cfg.patch_size}, taps {taps}")
        self.spm = SpatialPrior(seg.adapter_inplanes, D)
        self.level_embed = nn.Parameter(torch.zeros(3, D))
        self.interactions = nn.ModuleList(Interaction(D, seg.adapter_heads, 4, seg.deform_ratio, seg.cffn_ratio,
                                                      cfg.drop_path, extra=i == 3) for i in range(4))
        self.up = nn.ConvTranspose2d(D, D, 2, 2)
        self.norm1 = BatchNorm2d(D)
        self.norm2 = BatchNorm2d(D)
        self.norm3 = BatchNorm2d(D)
        self.norm4 = BatchNorm2d(D)
        for part in (self.up, self.spm, self.interactions):  # BEiTAdapter's _init_weights, then the attentions' own
            part.apply(adapter_init)
        for m in self.interactions.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    def run(self, fn, *args):  # gradient checkpointing of a block (or an adapter module) when training with it
        if self.config.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, x):
        cfg = self.config
        if x.shape[-2:] != (cfg.img_size, cfg.img_size):
            size = cfg.img_size
            raise ValueError(f"input {tuple(x.shape)}: the segmenter is built for {size} x {size} crops")
        x = x.to(self.pos_embed.dtype)  # float32 images into a half model (DeepSpeed fp16)
        if self.adapter:
            return self.forward_adapter(x)
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(len(x), -1, -1).to(x.dtype), x), 1) + self.pos_embed.to(x.dtype)
        maps = {}
        for i, blk in enumerate(self.blocks[:max(self.taps) + 1]):
            x = self.run(blk, x)
            maps[i] = x[:, 1:].transpose(1, 2).unflatten(2, (cfg.grid, cfg.grid))
        return [fpn(maps[i]) for fpn, i in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), self.taps)]

    def forward_adapter(self, img):
        """ViT-Adapter (Chen et al. 2023) as EVA-01's BEiTAdapter: the spatial prior's stride-8/16/32 features (plus
        level embeddings) as one token set c; per interval of blocks ending at a tap, the injector adds to the patch
        tokens what they read of c by deformable attention (through a zero-initialised gamma), the blocks run on cls +
        patches, and the extractor(s) update c from the patch tokens (deformable attention + a depthwise-conv FFN).
        -> c's levels (c1: the stride-4 prior plus c2 upsampled), each plus the ViT map of its interval resized,
        BatchNorm'd."""
        G, N = self.config.grid, len(img)
        c1, c2, c3, c4 = self.spm(img)
        c_shapes = [tuple(t.shape[-2:]) for t in (c2, c3, c4)]
        c = torch.cat([t.flatten(2).transpose(1, 2) + self.level_embed[i] for i, t in enumerate((c2, c3, c4))], 1)
        x = self.patch_embed(img) + self.pos_embed[:, 1:].to(img.dtype)
        cls = self.cls_token.expand(N, -1, -1).to(x.dtype)  # without its pos_embed entry, as the official
        ref_x = reference_points([(G, G)], img.device)[None].expand(N, -1, -1)
        ref_c = reference_points(c_shapes, img.device)[None].expand(N, -1, -1)
        outs, start = [], 0
        for inter, end in zip(self.interactions, self.taps):
            x = self.run(inter.injector, x, ref_x, c, c_shapes)
            t = torch.cat((cls, x), 1)
            for blk in self.blocks[start:end + 1]:
                t = self.run(blk, t)
            cls, x, start = t[:, :1], t[:, 1:], end + 1
            for ext in [inter.extractor, *(inter.extra_extractors or [])]:
                c = self.run(ext, c, ref_c, x, (G, G), c_shapes)
            outs.append(x.transpose(1, 2).unflatten(2, (G, G)))
        tokens = c.split([h * w for h, w in c_shapes], 1)
        c2, c3, c4 = (t.transpose(1, 2).unflatten(2, s) for t, s in zip(tokens, c_shapes))
        levels = (self.up(c2) + c1, c2, c3, c4)
        return [norm(lvl + resize(o, lvl.shape[-2:])) for norm, lvl, o in
                zip((self.norm1, self.norm2, self.norm3, self.norm4), levels, outs)]

# -----------------------------------------------------------------------------
# UperNet and mmseg's auxiliary FCN head


class SegHead(nn.Module):
    """mmseg's BaseDecodeHead tail: Dropout2d(0.1) and the 1x1 classifier conv_seg, N(0, 0.01) init."""

    def __init__(self, channels, num_classes):
        super().__init__()
        self.dropout = nn.Dropout2d(0.1)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def classify(self, x):
        return self.conv_seg(self.dropout(x))


class UPerHead(SegHead):
    """UperNet (Xiao et al. 2018) as mmseg's UPerHead: a pyramid pooling module (scales 1, 2, 3, 6) on the stride-32
    level, 1x1 laterals on the others, top-down additions, 3x3 convs, everything upsampled to stride 4, concatenated,
    fused by a 3x3 conv, classified: (B, K, H/4, W/4) logits."""

    def __init__(self, D, channels, num_classes, pool_scales=(1, 2, 3, 6)):
        super().__init__(channels, num_classes)
        C = channels
        pools = [nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(D, C, 1)) for s in pool_scales]
        self.psp_modules = nn.ModuleList(pools)
        self.bottleneck = ConvModule(D + len(pool_scales) * C, C, 3)
        self.lateral_convs = nn.ModuleList(ConvModule(D, C, 1) for _ in range(3))
        self.fpn_convs = nn.ModuleList(ConvModule(C, C, 3) for _ in range(3))
        self.fpn_bottleneck = ConvModule(4 * C, C, 3)

    def forward(self, feats):
        top = feats[3]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        pooled = [resize(m(top), top.shape[-2:]) for m in self.psp_modules]
        laterals.append(self.bottleneck(torch.cat([top] + pooled, 1)))
        for i in (3, 2, 1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)] + [laterals[3]]
        outs = [outs[0]] + [resize(x, outs[0].shape[-2:]) for x in outs[1:]]
        return self.classify(self.fpn_bottleneck(torch.cat(outs, 1)))


class FCNHead(SegHead):
    """mmseg's auxiliary FCNHead (num_convs 1, no input concat) on the stride-16 level; its convs a Sequential, as
    mmseg's (keys convs.0.*: a released UperNet's auxiliary head loads)."""

    def __init__(self, D, channels, num_classes):
        super().__init__(channels, num_classes)
        self.convs = nn.Sequential(ConvModule(D, channels, 3))

    def forward(self, x):
        return self.classify(self.convs(x))


def seg_ce(logits, labels, ignore=255):
    """Cross-entropy of logits at any stride against (B, H, W) labels: the logits upsampled bilinearly to the labels
    (float32), pixels of `ignore` contribute 0, the mean over all pixels, ignored ones included (mmseg 0.20's
    CrossEntropyLoss, EVA-01's version; avg_non_ignore came later)."""
    logits = resize(logits.float(), labels.shape[-2:])
    return F.cross_entropy(logits, labels.long(), ignore_index=ignore, reduction='none').mean()

# -----------------------------------------------------------------------------
# Mask2Former (Cheng et al. 2022) as EVA-01 ran it (mmdet 2.22's Mask2FormerHead and MSDeformAttnPixelDecoder):
# the deformable pixel decoder, the masked-attention transformer decoder


def sine_pos(h, w, dim, device=None):
    """DETR's sine positional encoding of an h x w map (mmdet's SinePositionalEncoding(dim / 2, normalize=True)):
    (h * w, dim), the y half then the x half, coordinates (i + 1) / (size + 1e-6) x 2 pi, sin / cos interleaved."""
    n = dim // 2
    t = 10000 ** (2 * (torch.arange(n, device=device) // 2) / n)
    y = torch.arange(1, h + 1, device=device, dtype=torch.float32) / (h + 1e-6) * 2 * math.pi
    x = torch.arange(1, w + 1, device=device, dtype=torch.float32) / (w + 1e-6) * 2 * math.pi

    def enc(c):  # (size,) -> (size, n): sin at even channels, cos at odd
        c = c[:, None] / t
        return torch.stack((c[:, 0::2].sin(), c[:, 1::2].cos()), -1).flatten(1)
    return torch.cat((enc(y)[:, None].expand(h, w, n), enc(x)[None].expand(h, w, n)), -1).flatten(0, 1)


class DeformEncoderLayer(nn.Module):
    """The pixel decoder's encoder layer, post-norm: deformable self-attention over all levels, then the FFN."""

    def __init__(self, dim, heads, levels, points, ffn):
        super().__init__()
        self.attn = MSDeformAttn(dim, heads, levels, points)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = FFN(dim, ffn)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x, pos, ref, shapes):
        x = self.norm1(x + self.attn(x + pos, ref, x, shapes))
        return self.norm2(x + self.ffn(x))


def gn_conv(cin, cout, k, relu=False, bias=False):
    """mmcv's ConvModule with GroupNorm(32), an optional ReLU; caffe2's xavier init (kaiming uniform, a=1), or with
    a conv bias (the pixel decoder's input projections, mmdet's bias=True there) xavier-uniform with gain 1 and a zero
    bias, as mmdet's MSDeformAttnPixelDecoder.init_weights does for those."""
    conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias)
    if bias:
        nn.init.xavier_uniform_(conv.weight)
        nn.init.zeros_(conv.bias)
    else:
        nn.init.kaiming_uniform_(conv.weight, a=1)
    return nn.Sequential(conv, nn.GroupNorm(32, cout), *([nn.ReLU()] if relu else []))


class PixelDecoder(nn.Module):
    """Mask2Former's MSDeformAttnPixelDecoder: the stride-32, 16, 8 maps projected to C (1x1 conv + GN), with sine
    positions + a learned level embedding, through `layers` deformable encoder layers attending across the three
    levels; the stride-4 map joins FPN-style (lateral 1x1 + GN, plus the upsampled stride-8 output, 3x3 conv + GN +
    ReLU) -> (mask features (B, C, H/4, W/4) through a 1x1 conv, [the encoded stride-32, 16, 8 maps]). With
    grad_checkpointing its encoder layers are recomputed in the backward: ms_deform_attn keeps its float32 samples
    for the weighted sum's gradient (EVA-g at 896: 0.75 GiB a layer, 4.5 GiB in all; bench.py --mode=memory), which
    mmcv's CUDA kernel (EVA-01's) never holds."""

    def __init__(self, D, C, heads, layers, points, ffn, grad_checkpointing=False):
        super().__init__()
        self.grad_checkpointing = grad_checkpointing
        self.input_convs = nn.ModuleList(gn_conv(D, C, 1, bias=True) for _ in range(3))
        self.level_encoding = nn.Embedding(3, C)
        nn.init.normal_(self.level_encoding.weight)
        self.encoder = nn.ModuleList(DeformEncoderLayer(C, heads, 3, points, ffn) for _ in range(layers))
        for layer in self.encoder:  # mmdet: xavier-normal for the encoder's matrices, then the attention's own init
            for m in (layer.ffn[0], layer.ffn[2]):
                nn.init.xavier_normal_(m.weight)
        self.lateral_conv = gn_conv(D, C, 1)
        self.output_conv = gn_conv(C, C, 3, relu=True)
        self.mask_feature = nn.Conv2d(C, C, 1)
        nn.init.kaiming_uniform_(self.mask_feature.weight, a=1)
        nn.init.zeros_(self.mask_feature.bias)

    def forward(self, feats):
        maps = [conv(f) for conv, f in zip(self.input_convs, feats[:0:-1])]  # strides 32, 16, 8
        shapes = [tuple(m.shape[-2:]) for m in maps]
        pos = torch.cat([sine_pos(*s, m.shape[1], m.device) + self.level_encoding.weight[i] for i, (m, s) in
                         enumerate(zip(maps, shapes))]).to(maps[0].dtype)
        ref = reference_points(shapes, maps[0].device)[None].expand(len(maps[0]), -1, -1)
        x = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)  # (B, S, C)
        for layer in self.encoder:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, pos, ref, shapes, use_reentrant=False)
            else:
                x = layer(x, pos, ref, shapes)
        outs = [t.transpose(1, 2).unflatten(2, s) for t, s in zip(x.split([h * w for h, w in shapes], 1), shapes)]
        fine = self.output_conv(self.lateral_conv(feats[0]) + resize(outs[-1], feats[0].shape[-2:]))
        return self.mask_feature(fine), outs


class DecoderLayer(nn.Module):
    """Mask2Former's transformer decoder layer, post-norm (mmdet's operation order): masked cross-attention to one
    level's pixels, self-attention among the queries, the FFN; positions added to queries and keys, not values."""

    def __init__(self, dim, heads, ffn):
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ffn = FFN(dim, ffn)

    def forward(self, q, qpos, mem, mpos, mask):
        q = self.norm1(q + self.cross_attn(q + qpos, mem + mpos, mem, attn_mask=mask, need_weights=False)[0])
        qp = q + qpos
        q = self.norm2(q + self.self_attn(qp, qp, q, need_weights=False)[0])
        return self.norm3(q + self.ffn(q))


class Mask2FormerHead(nn.Module):
    """The pixel decoder and `layers` decoder layers over `queries` learned queries (content query_feat, position
    query_embed), visiting the stride-32, 16, 8 maps round-robin; before the first layer and after each, every query
    predicts a class (K + 1 with no-object) and a mask (its embedding dotted with the stride-4 mask features), and the
    mask (sigmoid < 0.5 at the next level's size) limits what it attends to next, unless it would block everything.
    -> [(class logits (B, Q, K + 1), mask logits (B, Q, H/4, W/4))] for the layers + 1 predictions."""

    def __init__(self, D, seg):
        super().__init__()
        C, self.heads = seg.seg_channels, seg.attn_heads
        self.pixel_decoder = PixelDecoder(D, C, seg.attn_heads, seg.enc_layers, 4, seg.ffn_dim,
                                          seg.backbone.grad_checkpointing)
        layers = [DecoderLayer(C, seg.attn_heads, seg.ffn_dim) for _ in range(seg.dec_layers)]
        self.transformer_decoder = nn.ModuleList(layers)
        self.post_norm = nn.LayerNorm(C)
        self.query_feat = nn.Embedding(seg.queries, C)
        self.query_embed = nn.Embedding(seg.queries, C)
        self.level_embed = nn.Embedding(3, C)
        self.cls_embed = nn.Linear(C, seg.num_classes + 1)
        self.mask_embed = nn.Sequential(nn.Linear(C, C), nn.ReLU(), nn.Linear(C, C), nn.ReLU(), nn.Linear(C, C))
        for layer in self.transformer_decoder:  # mmdet's Mask2FormerHead.init_weights: xavier-normal
            for p in layer.parameters():
                if p.dim() > 1:
                    nn.init.xavier_normal_(p)

    def predict(self, q, mask_features, size):
        q = self.post_norm(q)
        masks = torch.einsum('bqc,bchw->bqhw', self.mask_embed(q), mask_features)
        blocked = resize(masks.detach().float(), size).flatten(2).sigmoid() < 0.5  # True: not attended
        blocked &= ~blocked.all(-1, keepdim=True)  # a query whose mask is empty attends everywhere
        return self.cls_embed(q), masks, blocked.repeat_interleave(self.heads, 0)

    def forward(self, feats):
        mask_features, maps = self.pixel_decoder(feats)
        B, C = mask_features.shape[:2]
        mem = [m.flatten(2).transpose(1, 2) + self.level_embed.weight[i] for i, m in enumerate(maps)]
        mpos = [sine_pos(*m.shape[-2:], C, m.device).to(m.dtype) for m in maps]
        q, qpos = self.query_feat.weight.expand(B, -1, -1), self.query_embed.weight.expand(B, -1, -1)
        cls, masks, blocked = self.predict(q, mask_features, maps[0].shape[-2:])
        out = [(cls, masks)]
        for i, layer in enumerate(self.transformer_decoder):
            lvl = i % 3
            q = layer(q, qpos, mem[lvl], mpos[lvl], blocked)
            cls, masks, blocked = self.predict(q, mask_features, maps[(i + 1) % 3].shape[-2:])
            out.append((cls, masks))
        return out

# -----------------------------------------------------------------------------
# Mask2Former's Hungarian matching, point-sampled losses and semantic inference


def hungarian(cost):
    """A minimum-cost assignment of a (n, m) cost matrix (numpy, any shape): -> (rows, cols), min(n, m) pairs, rows
    ascending. Shortest augmenting paths with row and column potentials (Jonker-Volgenant; e-maxx's O(n^2 m) form),
    the inner loop vectorised over columns. Mask2Former's costs are (queries) x (classes in the image), 9 per image
    (its deep supervision)."""
    cost = np.asarray(cost, dtype=np.float64)
    flip = cost.shape[0] > cost.shape[1]
    if flip:
        cost = cost.T
    n, m = cost.shape
    u, v = np.zeros(n + 1), np.zeros(m + 1)
    row_of = np.zeros(m + 1, dtype=np.int64)  # 1-based row assigned to column j (0: none); column 0 is the path's root
    way = np.zeros(m + 1, dtype=np.int64)
    for i in range(1, n + 1):
        row_of[0], j0 = i, 0
        minv, used = np.full(m + 1, np.inf), np.zeros(m + 1, dtype=bool)
        while True:  # grow the shortest-path tree from row i until it reaches a free column
            used[j0] = True
            free = ~used[1:]
            reduced = cost[row_of[j0] - 1] - u[row_of[j0]] - v[1:]
            better = free & (reduced < minv[1:])
            minv[1:][better], way[1:][better] = reduced[better], j0
            j1 = int(np.argmin(np.where(free, minv[1:], np.inf))) + 1
            delta = minv[j1]
            u[row_of[used]] += delta
            v[used] -= delta
            minv[1:][free] -= delta
            j0 = j1
            if row_of[j0] == 0:
                break
        while j0:  # flip the path's assignments
            j1 = way[j0]
            row_of[j0], j0 = row_of[j1], j1
    cols = np.nonzero(row_of[1:])[0]
    rows = row_of[1:][cols] - 1
    rows, cols = (cols, rows) if flip else (rows, cols)
    order = np.argsort(rows)
    return rows[order], cols[order]


def point_sample(x, coords):
    """x (n, c, H, W) at coords (n, P, 2) in [0, 1] as (x, y) -> (n, c, P), bilinear (detectron2's point_sample)."""
    return F.grid_sample(x, 2 * coords[:, :, None] - 1, align_corners=False)[..., 0]


def uncertain_points(logits, num, oversample=3.0, importance=0.75):
    """detectron2's get_uncertain_point_coords_with_randomness for (n, 1, h, w) mask logits: of oversample x num random
    points the importance x num with the logit nearest 0 (-|logit|), plus the rest uniformly random -> (n, num, 2)."""
    n = len(logits)
    coords = torch.rand(n, int(num * oversample), 2, device=logits.device)
    k = int(importance * num)
    idx = (-point_sample(logits, coords)[:, 0].abs()).topk(k, dim=1).indices
    return torch.cat((coords.gather(1, idx[..., None].expand(-1, -1, 2)),
                      torch.rand(n, num - k, 2, device=logits.device)), 1)


def dice_loss(p, t):
    """The naive dice of probabilities p and targets t (n, P) with smoothing 1 (mmdet's DiceLoss(naive_dice=True,
    eps=1)): 1 - (2 sum p t + 1) / (sum p + sum t + 1), per row."""
    return 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)


def semantic_targets(labels, num_classes, ignore=255):
    """A (H, W) label map -> (classes present (n,), their binary masks (n, H, W) float): EVA-01's ToMask."""
    classes = labels.unique()
    classes = classes[(classes != ignore) & (classes < num_classes)]
    return classes.long(), (labels[None] == classes[:, None, None]).float()


def mask2former_loss(preds, labels, seg):
    """Mask2Former's training loss, summed over every prediction (deep supervision): for each image, queries are matched
    to the classes present by the Hungarian algorithm on 2 x (-p(class)) + 5 x BCE + 5 x dice over `points` uniform
    random points shared by all pairs; then class CE (weight 2; no-object weighted 0.1, averaged by the summed weights)
    over all queries, and mask BCE (5) and dice (5) on the matched pairs at `points` points sampled by uncertainty
    (75%) and at random, averaged over the matched masks of the batch (mmdet also averages that count over the GPUs)."""
    K, P = seg.num_classes, seg.train_points
    targets = [semantic_targets(lab, K) for lab in labels]
    class_weight = torch.ones(K + 1, device=labels.device)
    class_weight[K] = seg.no_object_weight
    total = {'loss_cls': 0.0, 'loss_mask': 0.0, 'loss_dice': 0.0}
    for cls, masks in preds:
        cls, masks = cls.float(), masks.float()
        target_cls = torch.full(cls.shape[:2], K, dtype=torch.long, device=cls.device)
        pred_m, gt_m = [], []
        for b, (gt_cls, gt_masks) in enumerate(targets):
            if len(gt_cls) == 0:
                continue
            with torch.no_grad():
                pts = torch.rand(1, P, 2, device=cls.device)
                pm = point_sample(masks[b][:, None], pts.expand(len(masks[b]), -1, -1))[:, 0]  # (Q, P)
                gm = point_sample(gt_masks[:, None], pts.expand(len(gt_cls), -1, -1))[:, 0]  # (n, P)
                bce = (F.binary_cross_entropy_with_logits(pm, torch.ones_like(pm), reduction='none') @ gm.T +
                       F.binary_cross_entropy_with_logits(pm, torch.zeros_like(pm), reduction='none') @ (1 - gm).T) / P
                p = pm.sigmoid()
                dice = 1 - (2 * p @ gm.T + 1) / (p.sum(-1)[:, None] + gm.sum(-1)[None] + 1)
                cost = -2 * cls[b].softmax(-1)[:, gt_cls] + 5 * bce + 5 * dice  # (Q, n)
                q_idx, g_idx = hungarian(cost.cpu().numpy())
            q_idx, g_idx = torch.as_tensor(q_idx, device=cls.device), torch.as_tensor(g_idx, device=cls.device)
            target_cls[b, q_idx] = gt_cls[g_idx]
            pred_m.append(masks[b][q_idx])
            gt_m.append(gt_masks[g_idx])
        ce = F.cross_entropy(cls.flatten(0, 1), target_cls.flatten(), weight=class_weight, reduction='sum')
        total['loss_cls'] = total['loss_cls'] + 2.0 * ce / class_weight[target_cls].sum()
        if not pred_m:  # no labelled pixel in the batch: zero, with the graph intact
            total['loss_mask'] = total['loss_mask'] + 0 * masks.sum()
            total['loss_dice'] = total['loss_dice'] + 0 * masks.sum()
            continue
        pred_m, gt_m = torch.cat(pred_m)[:, None], torch.cat(gt_m)[:, None]
        with torch.no_grad():
            pts = uncertain_points(pred_m, P)
            gt_p = point_sample(gt_m, pts)[:, 0]
        pred_p = point_sample(pred_m, pts)[:, 0]
        n = len(pred_m)
        bce = F.binary_cross_entropy_with_logits(pred_p, gt_p, reduction='sum')
        total['loss_mask'] = total['loss_mask'] + 5.0 * bce / (n * P)
        total['loss_dice'] = total['loss_dice'] + 5.0 * dice_loss(pred_p.sigmoid(), gt_p).sum() / n
    return total


def semantic_inference(cls, masks):
    """Per-class scores (B, K, h, w) from the last prediction: softmax class probabilities without no-object, times
    the sigmoid masks, summed over the queries (Mask2Former's semantic_inference)."""
    return torch.einsum('bqc,bqhw->bchw', cls.float().softmax(-1)[..., :-1], masks.float().sigmoid())

# -----------------------------------------------------------------------------
# the segmenter


class Segmenter(nn.Module):
    """SegViT + UperNet (+ the auxiliary FCN head) or Mask2Former: (images, labels) -> {loss name: scalar}; (images) ->
    (B, K, H, W) float32 scores at the input's size (UperNet: logits; Mask2Former: its semantic inference). Keys as
    mmseg's EncoderDecoder: backbone.*, decode_head.*, auxiliary_head.*."""

    def __init__(self, seg):
        super().__init__()
        if seg.seg_head not in ('upernet', 'mask2former'):
            raise ValueError(f"seg_head must be 'upernet' or 'mask2former', got {seg.seg_head!r}")
        self.config, D = seg, seg.backbone.embed_dim
        self.backbone = SegViT(seg)
        if seg.seg_head == 'upernet':
            self.decode_head = UPerHead(D, seg.seg_channels, seg.num_classes)
            self.auxiliary_head = FCNHead(D, seg.aux_channels, seg.num_classes) if seg.aux_weight else None
        else:
            self.decode_head = Mask2FormerHead(D, seg)
            self.auxiliary_head = None

    def forward(self, images, labels=None):
        feats = self.backbone(images)
        out = self.decode_head(feats)
        if self.config.seg_head == 'mask2former':
            if labels is None:
                return resize(semantic_inference(*out[-1]), images.shape[-2:])
            return mask2former_loss(out, labels, self.config)
        if labels is None:
            return resize(out.float(), images.shape[-2:])
        losses = {'loss_ce': seg_ce(out, labels)}
        if self.auxiliary_head is not None:
            losses['loss_aux'] = self.config.aux_weight * seg_ce(self.auxiliary_head(feats[2]), labels)
        return losses

# -----------------------------------------------------------------------------
# evaluation: sliding windows, mIoU


@torch.no_grad()
def slide_inference(net, img, num_classes, crop, stride, fill=0.0):
    """(B, K, H, W) float32 logits of a normalised (B, 3, H, W) image from crop x crop windows at `stride`, as mmseg's
    slide_inference: ceil((H - crop) / stride) + 1 rows (likewise columns), row r at r * stride moved back to end inside
    the image, the logits of overlapping windows averaged. An image with a side shorter than the crop is first padded
    at the bottom / right to the crop with `fill` (per channel, (1, 3, 1, 1) or a scalar) and its logits cut back:
    EVA-01's multi-scale test (PadShortSide with pad_val 0 on the raw image, before Normalize: fill = black
    normalised); the model is built for the crop and cannot take a smaller window, as mmseg's could."""
    B, C, H, W = img.shape
    if H < crop or W < crop:
        canvas = torch.empty(B, C, max(H, crop), max(W, crop), dtype=img.dtype, device=img.device)
        canvas[:] = fill
        canvas[..., :H, :W] = img
        return slide_inference(net, canvas, num_classes, crop, stride)[..., :H, :W]
    out = img.new_zeros(B, num_classes, H, W, dtype=torch.float32)
    count = img.new_zeros(1, 1, H, W, dtype=torch.float32)
    rows, cols = (max(s - crop + stride - 1, 0) // stride + 1 for s in (H, W))
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, H), min(c * stride + crop, W)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            out[:, :, y1:y2, x1:x2] += net(img[:, :, y1:y2, x1:x2]).float()
            count[:, :, y1:y2, x1:x2] += 1
    return out / count


def confusion(pred, label, num_classes, ignore=255):
    """(K, K) int64 counts of (label, prediction) pairs over the pixels whose label is not `ignore`."""
    keep = label != ignore
    return torch.bincount(label[keep].long() * num_classes + pred[keep].long(),
                          minlength=num_classes ** 2).view(num_classes, num_classes)


def seg_metrics(conf):
    """mmseg's metrics from a whole set's confusion: per class IoU = intersection / union and accuracy = intersection /
    label pixels; mIoU and mAcc their means over the classes present (a class with no union, or no label pixel, is
    NaN and skipped), aAcc = all correct / all labelled; in %."""
    conf = conf.double()
    inter, label, pred = conf.diag(), conf.sum(1), conf.sum(0)
    iou, acc = inter / (label + pred - inter), inter / label  # 0 / 0 = NaN: skipped by nanmean
    return {'mIoU': 100 * iou.nanmean().item(), 'mAcc': 100 * acc.nanmean().item(),
            'aAcc': 100 * (inter.sum() / label.sum().clamp(min=1)).item(),
            'IoU': [None if math.isnan(v) else round(100 * v, 2) for v in iou.tolist()]}

# -----------------------------------------------------------------------------
# released checkpoints and layer decay

# mmseg / mmdet 2.22 names (EVA-01's released eva_sem_seg_mask2former_*.pth, from the module definitions of its seg
# code; not checked against the files, which are 4-5 GB) -> ours, where they differ: mmcv's ConvModule (.conv, .gn),
# BaseTransformerLayer (attentions.k, ffns.0.layers, norms.k) and the adapter's DWConv wrapper
MMSEG_KEYS = ((r'pixel_decoder\.(input_convs\.\d|lateral_convs\.0|output_convs\.0)\.conv\.', r'pixel_decoder.\1.0.'),
              (r'pixel_decoder\.(input_convs\.\d|lateral_convs\.0|output_convs\.0)\.gn\.', r'pixel_decoder.\1.1.'),
              (r'pixel_decoder\.(lateral|output)_convs\.0\.', r'pixel_decoder.\1_conv.'),
              (r'\.encoder\.layers\.(\d+)\.attentions\.0\.', r'.encoder.\1.attn.'),
              (r'\.transformer_decoder\.layers\.(\d+)\.attentions\.0\.attn\.', r'.transformer_decoder.\1.cross_attn.'),
              (r'\.transformer_decoder\.layers\.(\d+)\.attentions\.1\.attn\.', r'.transformer_decoder.\1.self_attn.'),
              (r'\.(encoder|transformer_decoder)\.layers\.(\d+)\.ffns\.0\.layers\.0\.0\.', r'.\1.\2.ffn.0.'),
              (r'\.(encoder|transformer_decoder)\.layers\.(\d+)\.ffns\.0\.layers\.1\.', r'.\1.\2.ffn.2.'),
              (r'\.(encoder|transformer_decoder)\.layers\.(\d+)\.norms\.(\d)\.',
               lambda m: f'.{m[1]}.{m[2]}.norm{int(m[3]) + 1}.'),
              (r'\.transformer_decoder\.post_norm\.', '.post_norm.'),
              (r'\.ffn\.dwconv\.dwconv\.', '.ffn.dwconv.'))


def load_segmenter(model, path, ckpt=None):
    """init_from for segmentation. A whole segmenter (weights under 'model': our last.pt; under 'state_dict': EVA-01's
    released mmseg files through MMSEG_KEYS), fitted to this one by model.load_whole: the classifiers of another class
    count (conv_seg, cls_embed) new (ADE20K from the COCO-Stuff model, as EVA-01); the conv_seg that mmseg's
    BaseDecodeHead gives Mask2Former, unused, dropped. Or an encoder into backbone with load_pretrained's checks: only
    what the task adds to the encoder (fpn1 ... fpn4, or the adapter) is new. ckpt: the file already read (path
    names it). -> load_pretrained's report for an encoder, None for a whole segmenter."""
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    keys = unwrap_state_dict(ckpt)[0]
    if any(k.startswith(('roi_heads.', 'proposal_generator.')) for k in keys):
        raise ValueError(f"{path} is a detector (roi_heads.*): a segmenter starts from a segmenter or an encoder")
    if any(k.startswith('decode_head.') for k in keys):
        return load_whole(model, ckpt, path, 'segmenter', renames=MMSEG_KEYS, unused=('decode_head.conv_seg.',),
                          fresh=('.conv_seg.', '.cls_embed.'))
    encoder = ('patch_embed.', 'pos_embed', 'cls_token', 'blocks.')
    new = tuple(k for k in model.backbone.state_dict() if not k.startswith(encoder))
    return load_pretrained(model.backbone, ckpt, allowed_missing=new, name=path)


# EVA-01's seg layer decay (seg/mmcv_custom/layer_decay_optimizer_constructor.py, from ViT-Adapter) puts Mask2Former's
# query, level and class embeddings and its mask MLP at layer 0, with the patch embedding (lr x 0.95 ** 41 = 0.12 for
# EVA-g): kept, as the paper's numbers were trained so
M2F_LAYER0 = tuple('decode_head.' + k for k in ('mask_embed', 'cls_embed', 'level_embed', 'query_embed', 'query_feat'))

# model.param_groups' rules for a segmenter (BEiT's mmseg LayerDecayOptimizerConstructor, as EVA-01 ran it): the
# encoder's embeddings and M2F_LAYER0 at layer 0, block i at i + 1, the rest at depth + 1; no weight decay on 1-D
# parameters and biases. mmseg's pos_embed / cls_token exemption compares names without the 'backbone.' they have, so
# they are decayed: kept (the default no_decay names never match 'backbone.pos_embed')
LAYER_DECAY = dict(blocks='backbone.blocks.', layer0=tuple('backbone.' + k for k in EMBEDDINGS) + M2F_LAYER0)
