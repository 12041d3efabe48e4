"""
The EVA encoder (a plain ViT with BEiT-style attention biases) and what every stage does with it, in one file:

- sizes: SIZES (eva_g, eva_l, eva_b, eva_tiny, eva_mini), EVAConfig, eva_config; CLIP's mean / std (every stage)
- the modules: DropPath, PatchEmbed, Attention, Mlp, Block, EVA (images; videos with num_frames), their FLOP counts
- MIM (pretrain.py, plot.py): mim_loss, CLIPTeacher (an OpenAI / open_clip CLIP tower, or our clip.pt's)
- resizing as the official code does it: resize_pos_embed (and over frames), resize_patch_embed
- checkpoints: read_checkpoint, unwrap_state_dict, load_pretrained (an encoder of any layout; every stage),
  load_whole (a whole detector / segmenter: det_model.py's and seg_model.py's loaders)
- optimizer groups: param_groups (layer decay; every stage, with det / seg / the text tower's rules as arguments),
  ema_update_ (finetune_cls.py, finetune_video.py)
- EVA-CLIP (train_clip.py): TEXT_SIZES, CLIP, clip_loss, load_text_tower; the timm and open_clip exports
- the command line: `python model.py psz14to16 IN.pt OUT.pt` (a patch-14 checkpoint at patch 16, as the official
  interpolate_patch_14to16.py: detection and segmentation start from it), `python model.py open_clip CLIP.pt DIR`

    EVA(config).forward_features(x, mask=None) -> all tokens (B, 1+N, D)
    EVA(config).forward(x)                     -> logits (B, num_classes), or pooled features
    EVA(config).forward_mim(x, mask)           -> lm_head outputs at the masked positions (M, mim_dim)

State-dict keys are those of the official EVA-01 release (github.com/baaivision/EVA, EVA-01) and of timm's
`Eva` (timm/models/eva.py), so checkpoints move freely between the three. open_clip and timm are imported where they
are used: only the teacher, CLIP and the exports need them, and they take seconds to import.
"""
import dataclasses
import inspect
import json
import math
import os
import re
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.nn import all_gather  # differentiable, unlike torch.distributed.all_gather
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------
# sizes

# the input normalisation of OpenAI's CLIP, which the MIM teacher, EVA (EVA-01 trains with it) and EVA-CLIP expect
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# EVA-g is the paper's model (Table 1 of the paper: 1408 wide, 40 deep, 16 heads, MLP 6144, patch 14).
# eva_l / eva_b are the usual ViT-L / ViT-B shapes at patch 14; eva_tiny is for CPU tests and demos, eva_mini (4 blocks)
# for chain.py's student.
SIZES = {
    'eva_g': dict(patch_size=14, embed_dim=1408, depth=40, num_heads=16, mlp_dim=6144),
    'eva_l': dict(patch_size=14, embed_dim=1024, depth=24, num_heads=16, mlp_dim=4096),
    'eva_b': dict(patch_size=14, embed_dim=768, depth=12, num_heads=12, mlp_dim=3072),
    'eva_tiny': dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, mlp_dim=128),
    'eva_mini': dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_dim=256),
}


@dataclass
class EVAConfig:
    img_size: int = 224          # square input resolution
    patch_size: int = 14         # Conv2d kernel = stride
    in_chans: int = 3
    num_frames: int = 1          # video clips: frames, each patch-embedded alone (time kernel 1), tokens frame-major
    embed_dim: int = 1408
    depth: int = 40
    num_heads: int = 16
    mlp_dim: int = 6144
    num_classes: int = 0         # 0: forward() returns pooled features, no head
    pooling: str = 'mean'        # 'mean': patch tokens' mean -> fc_norm -> head; 'cls': all tokens -> norm, cls -> head
    drop_path: float = 0.0       # stochastic depth rate of the last block (linear from 0)
    grad_checkpointing: bool = False  # recompute each block in backward: ~1/3 more compute, far less activation memory
    use_mask_token: bool = False  # MIM pretraining: masked patch embeddings are replaced by a learned token
    mim_dim: int = 0             # >0: add lm_head Linear(embed_dim, mim_dim) predicting the teacher's features
    init_std: float = 0.02       # trunc-normal std of every Linear / Conv / token
    init_trunc: float = 0.0      # >0: draws cut at +-init_trunc * init_std (EVA-01's MIM model: 1); 0: at +-2 absolute
    head_init_scale: float = 0.001  # classifier head scaled after init (BEiT/EVA fine-tuning)

    def __post_init__(self):
        assert self.pooling in ('mean', 'cls'), f"pooling must be 'mean' or 'cls', got {self.pooling!r}"
        assert self.img_size % self.patch_size == 0, \
            f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}"
        assert self.embed_dim % self.num_heads == 0, \
            f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"

    @property
    def grid(self):
        return self.img_size // self.patch_size

    @property
    def num_patches(self):
        return self.num_frames * self.grid ** 2


def eva_config(name, **overrides):
    """EVAConfig for a size of the table, with any field overridden: eva_config('eva_g', img_size=336)."""
    if name not in SIZES:
        raise KeyError(f"unknown model size {name!r}; known sizes: {', '.join(SIZES)}")
    return EVAConfig(**{**SIZES[name], **overrides})

# -----------------------------------------------------------------------------
# modules, in dependency order


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, rescale the kept ones."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        # a uniform draw compared with the keep rate rather than bernoulli_(rate): the comparison lets torch.compile
        # treat the rate as an input, so the blocks' different rates share one compiled graph (bernoulli_ bakes the
        # rate into the graph: one recompilation per block, and dynamo stops compiling after 8)
        keep = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device) < 1.0 - self.p
        # rescaled per sample first (as timm's drop_path): one pass over x forward and backward, not two
        return x * (keep.to(x.dtype) / (1.0 - self.p))


class PatchEmbed(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x):
        if x.ndim == 5:  # (B, C, T, H, W): EVA-01's video Conv3d of kernel (1, p, p) is this conv on each frame
            frames = self(x.transpose(1, 2).flatten(0, 1))  # (B*T, N, D)
            return frames.unflatten(0, (x.shape[0], -1)).flatten(1, 2)  # (B, T*N, D), frame-major
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, H/p, W/p) -> (B, N, D)


class Attention(nn.Module):
    """Fused qkv without bias plus learned q and v biases; k has no bias (BEiT, kept by EVA: with a softmax a
    k bias adds the same constant to every logit of a query, so it is redundant)."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.embed_dim
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(D))
        self.v_bias = nn.Parameter(torch.zeros(D))
        self.proj = nn.Linear(D, D)

    def heads(self, x):
        """x (B, N, D) -> q, k, v, each (B, H, N, hd)."""
        B, N, D = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias)
        # the same (B, H, N, hd) views as permute(2, 0, 3, 1, 4) (timm's Eva), split at dim 2 so that backward stacks
        # dq, dk, dv straight into the (B, N, 3, H, hd) layout: one copy, not a stack and then a transposing copy
        return (t.transpose(1, 2) for t in qkv.view(B, N, 3, self.num_heads, D // self.num_heads).unbind(2))

    def forward(self, x):
        x = F.scaled_dot_product_attention(*self.heads(x))  # softmax(q k^T / sqrt(hd)) v, flash / efficient kernels
        return self.proj(x.transpose(1, 2).flatten(2))


class Mlp(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.mlp_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.embed_dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm block; no layer-scale, no relative position bias, no RoPE (EVA-01 uses none of them)."""

    def __init__(self, cfg, drop_path):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = Mlp(cfg)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class EVA(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = cfg = config
        D = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.use_mask_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, D))  # learned, cls position included
        dpr = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linear 0 -> drop_path over depth
        self.blocks = nn.ModuleList([Block(cfg, dpr[i]) for i in range(cfg.depth)])
        # one final LayerNorm: on all tokens for cls pooling and MIM, after pooling for mean pooling (BEiT/EVA)
        self.norm = nn.LayerNorm(D, eps=1e-6) if cfg.pooling == 'cls' else nn.Identity()
        self.fc_norm = nn.LayerNorm(D, eps=1e-6) if cfg.pooling == 'mean' else nn.Identity()
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.lm_head = nn.Linear(D, cfg.mim_dim) if cfg.mim_dim > 0 else None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        # official EVA-01 / BEiT init: trunc-normal for every Linear, Conv and token, LayerNorm at (1, 0). The
        # fine-tuning models cut the draws at +-2 (timm's default, absolute: no cut at std 0.02); EVA-01's MIM model
        # (modeling_pretrain.py) cuts them at +-1 std, which leaves an effective std of 0.54 * init_std
        std = self.config.init_std
        cut = self.config.init_trunc * std if self.config.init_trunc > 0 else 2.0
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=std, a=-cut, b=cut)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (self.cls_token, self.pos_embed, self.mask_token):
            if p is not None:
                nn.init.trunc_normal_(p, std=std, a=-cut, b=cut)
        # BEiT's fix_init_weight: the residual branches of block i (1-based) are scaled by 1/sqrt(2i), so that
        # the residual stream's variance does not grow with depth
        for i, blk in enumerate(self.blocks, start=1):
            blk.attn.proj.weight.div_(math.sqrt(2.0 * i))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * i))
        if isinstance(self.head, nn.Linear):  # a near-zero head keeps early fine-tuning from wrecking the trunk
            self.head.weight.mul_(self.config.head_init_scale)
            self.head.bias.mul_(self.config.head_init_scale)

    def forward_features(self, x, mask=None):
        """x (B, C, H, W), or a clip (B, C, T, H, W); mask (B, N) bool or None -> tokens (B, 1+N, D) after the
        final `norm`. A clip's N = T x grid^2 tokens attend jointly in space and time (EVA-01 video)."""
        cfg = self.config
        if x.shape[-2:] != (cfg.img_size, cfg.img_size) or (x.shape[2] if x.ndim == 5 else 1) != cfg.num_frames:
            raise ValueError(f"input {tuple(x.shape)} does not fit: the model is built for {cfg.img_size}x"
                             f"{cfg.img_size}, {cfg.num_frames} frame(s) (set img_size / num_frames; load_pretrained "
                             f"resizes pos_embed)")
        x = self.patch_embed(x)  # (B, N, D)
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("a mask was given but the model has no mask_token (use_mask_token=False)")
            # masked patch embeddings become the mask token before cls and pos_embed are added, the official
            # order; torch.where (not x*(1-w) + t*w) so the masked pixels cannot leak in, not even as NaN
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)  # (B, 1+N, D)
        x = x + self.pos_embed.to(x.dtype)
        for blk in self.blocks:
            if self.config.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)  # keeps the RNG state, so drop path recomputes alike
            else:
                x = blk(x)
        return self.norm(x)

    def compile_blocks(self):
        """torch.compile each block in place: the same modules (and parameters) DeepSpeed and checkpointing see.
        Refused with gradient checkpointing on CUDA, where the recompute of a compiled block saved other tensors than
        its forward had and the backward stopped (torch 2.11; a CPU runs both)."""
        assert not (self.config.grad_checkpointing and self.cls_token.is_cuda), \
            "compile_blocks with grad_checkpointing fails on CUDA: choose one"
        for blk in self.blocks:
            blk.compile()

    def forward_head(self, x):
        """tokens (B, 1+N, D) -> logits (B, num_classes), or pooled features (B, D) without a head."""
        x = self.fc_norm(x[:, 1:].mean(dim=1)) if self.config.pooling == 'mean' else x[:, 0]
        return self.head(x)

    def forward(self, x, mask=None):
        """Logits (B, num_classes) or pooled features; with a MIM mask, forward_mim's predictions (one entry
        point, so that a DeepSpeed engine can call either)."""
        if mask is not None:
            return self.forward_mim(x, mask)
        return self.forward_head(self.forward_features(x))

    def forward_mim(self, x, mask):
        """MIM head: final norm on all tokens, then lm_head at the masked positions only -> (M, mim_dim),
        rows in the order of mask.nonzero() (batch-major), as the official modeling_pretrain.py."""
        x = self.forward_features(x, mask)
        return self.lm_head(x[:, 1:][mask])

    def flops_per_image(self, num_masked=0, backward=True):
        """Matmul FLOPs per image or clip (2 per multiply-add), the same count torch's FlopCounterMode gives; with
        backward, x3 (the usual estimate: backward costs twice the forward). Used for MFU."""
        cfg = self.config
        f = vit_flops(cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.mlp_dim, cfg.in_chans, cfg.num_frames)
        f += 2 * cfg.embed_dim * cfg.num_classes + 2 * num_masked * cfg.embed_dim * cfg.mim_dim
        return 3 * f if backward else f


def transformer_flops(tokens, width, depth, mlp_dim):
    """Forward matmul FLOPs of pre-norm transformer blocks: per block qkv, q k^T and attn v, proj, and the MLP."""
    N, D = tokens, width
    return depth * (2 * N * D * 3 * D + 2 * 2 * N * N * D + 2 * N * D * D + 2 * 2 * N * D * mlp_dim)


def vit_flops(img_size, patch_size, width, depth, mlp_dim, in_chans=3, frames=1):
    """Forward matmul FLOPs of a plain ViT with a cls token: the patch embedding, then the blocks (on 1 + frames x
    grid^2 tokens for a clip)."""
    P = frames * (img_size // patch_size) ** 2
    return 2 * P * in_chans * patch_size ** 2 * width + transformer_flops(P + 1, width, depth, mlp_dim)


def mim_loss(pred, target, mask):
    """EVA's MIM loss: negative cosine similarity between the predictions at the masked positions, pred (M, C)
    from forward_mim, and the teacher's features there, target (B, N, C); mean over masked tokens, float32
    (EVA-01 engine_for_pretraining.py). Unmasked targets are never read."""
    return -F.cosine_similarity(pred.float(), target[mask].float(), dim=-1).mean()


class CLIPTeacher(nn.Module):
    """The frozen MIM teacher's patch features, cls dropped: (B, N, out_dim).
    - an open_clip CLIP image tower (OpenAI ViT-L/14 in the paper): the patch tokens after ln_post and after the
      output projection (1024 -> 768 for ViT-L/14); name='tiny' builds a small randomly initialised tower of that
      class for tests and CPU demos;
    - our own clip.pt as `pretrained` (train_clip.py's EVA image tower; `name` unused): all patch tokens after the
      final norm, through the tower's head (its projection to the joint embedding), the same place as the OpenAI
      tokens; EVA-02 distils an EVA-CLIP tower this way. Its pos_embed is resized to img_size if need be."""

    def __init__(self, name='ViT-L-14', pretrained='openai', img_size=224, patch_size=14):
        super().__init__()
        ckpt = read_clip_file(pretrained)
        self.eva = self.visual = None
        if ckpt is not None:
            frozen = {'img_size': img_size, 'drop_path': 0.0, 'grad_checkpointing': False}
            cfg = EVAConfig(**{**ckpt['vision_cfg'], **frozen})
            self.eva = EVA(cfg)
            load_pretrained(self.eva, {k[len('visual.'):]: v for k, v in ckpt['model'].items()
                                       if k.startswith('visual.')}, allowed_missing=())
            self.eva.eval().requires_grad_(False)
            self.out_dim, self.description = cfg.num_classes, f"the EVA image tower of {pretrained}"
            self.flops_per_image = self.eva.flops_per_image(backward=False)
            self.flops_per_image += 2 * cfg.num_patches * cfg.embed_dim * cfg.num_classes  # head on every patch
            return
        import open_clip
        if name == 'tiny':
            visual = open_clip.transformer.VisionTransformer(
                image_size=img_size, patch_size=patch_size, width=64, layers=2, heads=4, mlp_ratio=4.0,
                output_dim=768)
        else:  # pretrained: an open_clip tag ('openai' downloads once) or a local file
            visual = open_clip_model(name, pretrained, force_quick_gelu=uses_quick_gelu(name, pretrained)).visual
        visual.output_tokens = True  # open_clip returns the tokens after ln_post but before proj
        self.visual = visual.eval().requires_grad_(False)
        width = visual.conv1.out_channels
        self.out_dim = visual.proj.shape[1]
        self.description = f"{name} ({'random init' if name == 'tiny' or not pretrained else pretrained})"
        self.flops_per_image = vit_flops(visual.image_size[0], visual.patch_size[0], width,
                                         len(visual.transformer.resblocks),
                                         visual.transformer.resblocks[0].mlp.c_fc.out_features)
        self.flops_per_image += 2 * visual.grid_size[0] * visual.grid_size[1] * width * visual.proj.shape[1]

    def train(self, mode=True):
        return super().train(False)  # always in eval mode

    @torch.no_grad()
    def forward(self, x):
        """x (B, 3, H, W), normalised with CLIP's mean/std -> targets (B, N, out_dim)."""
        if self.eva is not None:
            tokens = self.eva.forward_features(x.to(self.eva.cls_token.dtype))  # (B, 1+N, D) after the final norm
            return self.eva.head(tokens[:, 1:])
        _, tokens = self.visual(x.to(self.visual.proj.dtype))
        return tokens @ self.visual.proj


def read_clip_file(path):
    """Our clip.pt (train_clip.py's export: 'model' with visual.* / text.*, 'vision_cfg', ...) read from `path`, or
    None for anything else (an open_clip tag, OpenAI's archive, an open_clip state dict)."""
    if not path or not os.path.isfile(path):
        return None
    try:  # mmap: a multi-GB open_clip file is not read in only to be told apart
        ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception:
        return None
    return ckpt if isinstance(ckpt, dict) and 'vision_cfg' in ckpt and isinstance(ckpt.get('model'), dict) else None


def uses_quick_gelu(name, pretrained):
    """True where open_clip's table says the tagged weights were trained with QuickGELU (all of OpenAI's): open_clip
    builds 'ViT-L-14' with nn.GELU and only warns when the 'openai' weights are loaded into it, which would
    silently change the teacher's features."""
    import open_clip
    return bool(pretrained) and bool(open_clip.get_pretrained_cfg(name, pretrained).get('quick_gelu', False))


def open_clip_model(name, pretrained, **kwargs):
    """open_clip.create_model, whose unknown model, unknown tag, missing file and failed download (offline) are
    RuntimeErrors: an OSError naming both settings instead, which the stages' input_errors print as one line."""
    import open_clip
    try:
        return open_clip.create_model(name, pretrained=pretrained or None, **kwargs)
    except RuntimeError as e:
        what = str(e).split('. ')[0]  # its first sentence: not the list of every model or tag open_clip knows
        hint = '; offline, give the weights as a local file' if 'download' in what else ''
        raise OSError(f"open_clip model {name!r}, pretrained {pretrained!r}: {what}{hint}") from e

# -----------------------------------------------------------------------------
# resizing, as the official code does it (pure functions, float32 inside)


def resize_pos_embed(pos_embed, new_grid, num_prefix_tokens=1, compute_dtype=torch.float32, frames=1):
    """(1, prefix + T*H*W, D) -> (1, prefix + T*h*w, D): the cls entry is kept, each frame's grid is resized with
    bicubic interpolation, align_corners=False (EVA-01 run_class_finetuning.py / interpolate_patch_14to16.py), computed
    in compute_dtype (None: in pos_embed's own dtype, as interpolate_patch_14to16.py does to an fp16 file)."""
    new_grid = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old = math.isqrt(grid.shape[1] // frames)
    assert frames * old * old == grid.shape[1], f"pos_embed has {grid.shape[1]} grid tokens, not {frames} squares"
    if (old, old) == new_grid:
        return pos_embed
    D = grid.shape[-1]
    grid = grid.reshape(frames, old, old, D).permute(0, 3, 1, 2).to(compute_dtype or grid.dtype)  # (T, D, H, W)
    grid = F.interpolate(grid, size=new_grid, mode='bicubic', align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, frames * new_grid[0] * new_grid[1], D).to(pos_embed.dtype)
    return torch.cat((prefix, grid), dim=1)


def resize_pos_embed_frames(pos_embed, old_frames, new_frames, num_prefix_tokens=1):
    """(1, prefix + T0*N, D) -> (1, prefix + T1*N, D), frame-major square grids, the cls entry kept: an image's grid
    (T0 = 1) repeated over the T1 frames (EVA-01 video's init from an image model); a clip's interpolated trilinearly
    in float32, align_corners=False, and returned in float32 (EVA-01 video's 8 -> 16 frames: with the grid unchanged,
    linear in time)."""
    if old_frames == new_frames:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    if old_frames == 1:
        return torch.cat((prefix, grid.repeat(1, new_frames, 1)), dim=1)
    N, D = grid.shape[1] // old_frames, grid.shape[-1]
    g = math.isqrt(N)
    grid = grid.reshape(1, old_frames, g, g, D).permute(0, 4, 1, 2, 3).float()  # (1, D, T0, g, g)
    grid = F.interpolate(grid, size=(new_frames, g, g), mode='trilinear', align_corners=False)
    # float32 out, as EVA-01 video's tools.py (its cat promotes the fp16 cls entry): an fp16 file's grid is not rounded
    return torch.cat((prefix.float(), grid.permute(0, 2, 3, 4, 1).reshape(1, new_frames * N, D)), dim=1)


def resize_patch_embed(weight, new_size):
    """Conv kernel (D, C, p, p) -> (D, C, q, q) by plain bicubic interpolation, no rescaling: the official
    psz14to16 conversion. (timm's FlexiViT pseudo-inverse resize gives a different result.)"""
    new_size = (new_size, new_size) if isinstance(new_size, int) else tuple(new_size)
    if tuple(weight.shape[-2:]) == new_size:
        return weight
    out = F.interpolate(weight.float(), size=new_size, mode='bicubic', align_corners=False)
    return out.to(weight.dtype)

# -----------------------------------------------------------------------------
# loading checkpoints of every layout

# keys a model may lack after loading (they are (re)initialised): heads and final norms change with the task
HEAD_KEYS = ('head.', 'fc_norm.', 'norm.', 'lm_head.', 'mask_token')


def read_checkpoint(path):
    """torch.load of a checkpoint file to the CPU, tensors only where it allows (official EVA-01 files also pickle an
    argparse.Namespace: then fully, a trusted file). A missing or non-checkpoint file is named in the error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    for weights_only in (True, False):  # the second try only for objects weights_only refuses
        try:
            ckpt = torch.load(path, map_location='cpu', weights_only=weights_only)
            break
        except Exception as e:  # not a pickle torch can read (a text file, a numpy array), or refused objects
            if not weights_only or ('weights_only' not in str(e) and 'Unsupported global' not in str(e)):
                raise ValueError(f"{path} is not a PyTorch checkpoint (torch.load: {type(e).__name__} {e})") from None
    if not weights_only:
        print(f"read_checkpoint: {path} holds non-tensor objects; read with weights_only=False (a trusted file)")
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint (a dict of tensors)")
    return ckpt


def checkpoint_step(ckpt):
    """The training step a checkpoint records (ours: 'step'; detectron2's: 'iteration'), None where it has none."""
    step = ckpt.get('step', ckpt.get('iteration'))
    return int(step) if isinstance(step, (int, float)) else None


def unwrap_state_dict(ckpt):
    """Find the encoder's state dict in any of the layouts: official EVA-01 ('model', 'module', EMA
    'model_ema'), timm ('state_dict'), open_clip EVA01-g-14 ('visual.trunk.' prefix), our checkpoints
    ('model'), DDP / torch.compile prefixes. Returns (state_dict, list of notes)."""
    notes = []
    for key in ('model', 'module', 'state_dict', 'model_ema'):
        if isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            notes.append(f"weights under '{key}'")
            break
    sd = {k: v for k, v in ckpt.items() if isinstance(v, torch.Tensor)}
    for prefix in ('module.', '_orig_mod.'):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    for prefix in ('visual.trunk.', 'visual.'):  # open_clip's timm tower, then EVA-CLIP's own layout
        if prefix + 'pos_embed' in sd:
            n = len(sd)
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            notes.append(f"image tower under '{prefix}' ({n - len(sd)} other keys ignored)")
            break
    return sd, notes


def load_pretrained(model, path_or_state_dict, allowed_missing=HEAD_KEYS, verbose=True, name=''):
    """Load an encoder checkpoint of any layout into `model` (an EVA). Resizes pos_embed and the patch kernel
    to the model's grid and patch size, drops what the model does not use (mask_token, lm_head, a final norm
    of the other pooling, a head of another class count), and fails on everything else: a key of another
    shape names the key and both shapes; keys left missing must all start with `allowed_missing`. A checkpoint
    already read is named `name` in the messages. Returns dict(missing=[...], dropped=[...], resized=[...])."""
    src = path_or_state_dict if isinstance(path_or_state_dict, str) else name or 'state dict'
    ckpt = read_checkpoint(path_or_state_dict) if isinstance(path_or_state_dict, str) else path_or_state_dict
    sd, notes = unwrap_state_dict(ckpt)
    target = model.state_dict()
    cfg = model.config
    out, dropped, resized, bad = {}, [], [], []
    n = sd['pos_embed'].shape[1] - 1 if 'pos_embed' in sd else 0
    frames = (ckpt.get('model_config') or {}).get('num_frames')  # our exports store it; else the layout tells:
    if frames is None:  # a clip on the model's grid if the model is a video one, EVA-01 video's 5-D kernel or no square
        on_grid = cfg.num_frames > 1 and n % cfg.grid ** 2 == 0
        video_kernel = getattr(sd.get('patch_embed.proj.weight'), 'ndim', 4) == 5
        clip = on_grid or math.isqrt(n) ** 2 != n or video_kernel
        frames = max(n // cfg.grid ** 2, 1) if clip else 1
    for k, v in sd.items():
        if k == 'patch_embed.proj.weight' and v.ndim == 5 and v.shape[2] == 1:  # EVA-01 video's Conv3d (D, C, 1, p, p)
            v = v.squeeze(2)
        if k not in target:
            # what other stages leave in an encoder file, and which this model does not have (ViTDet: no cls token)
            if k.startswith(HEAD_KEYS) or k.endswith('attn.k_bias') or k in ('rel_pos_bias', 'cls_token'):
                dropped.append(k)
                continue
            bad.append(f"{k}: in the checkpoint {tuple(v.shape)}, not in the model (depth {cfg.depth}, "
                       f"pooling {cfg.pooling!r})")
            continue
        t = target[k]
        if k == 'patch_embed.proj.weight' and v.shape[:2] == t.shape[:2] and v.shape != t.shape:
            v = resize_patch_embed(v, t.shape[-2:])
            resized.append(f"patch_embed {sd[k].shape[-1]}->{t.shape[-1]}")
        elif k == 'pos_embed' and v.ndim == 3 and v.shape[-1] == t.shape[-1] and v.shape != t.shape:
            old = math.isqrt(n // frames)
            v = resize_pos_embed_frames(resize_pos_embed(v, cfg.grid, frames=frames), frames, cfg.num_frames)
            resized.append(f"pos_embed {old}x{old}->{cfg.grid}x{cfg.grid}" if frames == cfg.num_frames == 1 else
                           f"pos_embed {frames}x{old}x{old}->{cfg.num_frames}x{cfg.grid}x{cfg.grid}")
        elif k.startswith('head.') and v.shape != t.shape and v.shape[1:] == t.shape[1:]:
            dropped.append(f"{k} ({v.shape[0]} outputs, the model {t.shape[0]})")
            continue
        if v.shape != t.shape:
            bad.append(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(t.shape)}")
            continue
        out[k] = v
    if bad:
        raise ValueError(f"checkpoint {src} does not fit the model ({len(bad)} keys, e.g. {bad[0]}):\n  " +
                         "\n  ".join(bad[:10]) + (f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""))
    missing = [k for k in target if k not in out]
    not_allowed = [k for k in missing if not k.startswith(tuple(allowed_missing))]
    if not_allowed:
        raise ValueError(f"checkpoint {src} lacks {len(not_allowed)} keys the model needs, e.g. "
                         f"{', '.join(not_allowed[:5])}")
    model.load_state_dict(out, strict=False)
    if verbose:
        said = [f"load_pretrained: {len(out)} tensors from {src}", *notes]
        if resized:
            said.append(f"resized {', '.join(resized)}")
        if dropped:
            said.append(f"dropped {', '.join(dropped)}")
        if missing:
            said.append(f"newly initialised {', '.join(missing)}")
        print('; '.join(said))
    return dict(missing=missing, dropped=dropped, resized=resized)


def load_whole(model, ckpt, src, what, renames=(), unused=(), fresh=(), optional=(), resizable=()):
    """A whole task model (a detector, a segmenter: ours, or a released file of another framework) into `model`, every
    tensor checked. What the task's files differ in comes as arguments (det_model.py and seg_model.py hold them):
    renames: (regex, replacement) pairs from the framework's key names to ours; unused: name parts of keys the file
    may have and the model not (dropped); fresh: name parts of class-dependent layers, initialised afresh for another
    class count; optional: name parts of the model's keys that the file may lack (a mask head new to a boxes-only
    model); resizable: key suffixes of relative-position tables (L, C), resized linearly to another L for another grid
    (ViTDet's rule). Anything else that does not fit is one error naming the keys."""
    target, sd, new, resized, bad = model.state_dict(), {}, [], [], []
    for k, v in unwrap_state_dict(ckpt)[0].items():  # under 'model' (ours, detectron2's) or 'state_dict' (mmcv's)
        for pattern, name in renames:
            k = re.sub(pattern, name, k)
        t = target.get(k)
        if t is None and any(u in k for u in unused):
            continue
        if t is None:
            bad.append(f"{k}: not in the model")
        elif v.shape != t.shape and k.endswith(resizable) and v.shape[1:] == t.shape[1:]:
            sd[k] = F.interpolate(v.float().T[None], size=t.shape[0], mode='linear')[0].T.to(v.dtype)
            resized.append(k)
        elif v.shape != t.shape and any(n in k for n in fresh):
            new.append(k)
        elif v.shape != t.shape:
            bad.append(f"{k}: file {tuple(v.shape)}, model {tuple(t.shape)}")
        else:
            sd[k] = v
    missing = [k for k in target if k not in sd and k not in new]
    bad += [f"{k}: not in the file" for k in missing if not any(o in k for o in optional)]
    if bad:
        raise ValueError(f"{src} does not fit the {what} ({len(bad)} keys, e.g. {bad[0]}):\n  " + "\n  ".join(bad[:10]))
    model.load_state_dict(sd, strict=False)
    said = [f"load_whole: a whole {what}, {len(sd)} tensors from {src}"]
    if resized:
        said.append(f"resized {len(resized)} relative-position tables")
    if new:
        said.append(f"new for {model.config.num_classes} classes: {', '.join(new)}")
    if missing:
        said.append(f"new: {len(missing)} tensors the file lacks ({', '.join(optional)})")
    print('; '.join(said))

# -----------------------------------------------------------------------------
# optimizer parameter groups, shared by every stage

EMBEDDINGS = ('cls_token', 'mask_token', 'pos_embed', 'patch_embed')  # an EVA's layer 0


def param_groups(model, weight_decay, layer_decay=1.0, blocks='blocks.', layer0=EMBEDDINGS,
                 no_decay=('pos_embed', 'cls_token'), decay_all=False):
    """AdamW groups with a layer-wise lr scale layer_decay ** (depth + 1 - layer id) in each group's 'lr_scale' (the
    training loop sets lr = lr * lr_scale per step): names starting with `layer0` are layer 0, `blocks` + 'i.' is
    block i at i + 1 (depth: the length of that module list), everything else (final norms, heads) depth + 1. No
    weight decay on 1-D parameters, biases and names starting with `no_decay`, unless decay_all. BEiT's
    get_parameter_groups for an EVA (the mask_token is decayed there too); the other stages' variants are arguments:
    a task model's encoder under a prefix ('backbone.net.blocks.', with EVA-01's det config decaying everything),
    EVA-01's seg layer-0 names, a CLIP text tower's blocks and embeddings. Parameters without a gradient are left out
    (the patch embedding frozen in fine-tuning)."""
    depth = len(model.get_submodule(blocks.rstrip('.')))
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(layer0):
            layer_id = 0
        elif name.startswith(blocks):
            layer_id = int(name[len(blocks):].split('.')[0]) + 1
        else:
            layer_id = depth + 1
        decay = decay_all or not (p.ndim <= 1 or name.endswith('.bias') or name.startswith(no_decay))
        # one group per distinct (lr scale, decay): without layer decay that is 2 groups, not 2 per layer, and
        # DeepSpeed keeps a flat buffer and a loop iteration per group
        key = (layer_decay ** (depth + 1 - layer_id), weight_decay if decay else 0.0)
        groups.setdefault(key, dict(params=[], weight_decay=key[1], lr_scale=key[0]))['params'].append(p)
    return [groups[k] for k in sorted(groups)]


@torch.no_grad()
def ema_update_(ema_model, model, decay, chunk=2 ** 26):
    """EMA of the weights in float32 (timm's ModelEmaV2, as EVA-01's fine-tuning uses it):
    ema = decay * ema + (1 - decay) * weights, for every parameter and buffer. A foreach over tensors of about
    `chunk` elements at a time: the float32 copies of fp16 weights it needs exist a chunk at a time (256 MiB), not
    all at once (EVA-g: 3.8 GiB more at the step's end on every GPU; bench.py --mode=memory)."""
    ema = [t for t in ema_model.state_dict().values() if t.is_floating_point()]
    cur = [t for t in model.state_dict().values() if t.is_floating_point()]
    assert len(ema) == len(cur), "EMA and model differ in their tensors"
    start, n = 0, 0
    for i, e in enumerate(ema):
        n += e.numel()
        if n >= chunk or i == len(ema) - 1:
            lerp = [c.to(x.dtype) for x, c in zip(ema[start:i + 1], cur[start:i + 1])]
            torch._foreach_lerp_(ema[start:i + 1], lerp, 1.0 - decay)
            start, n = i + 1, 0

# -----------------------------------------------------------------------------
# EVA-CLIP: the EVA image tower + open_clip's text transformer, the contrastive loss, the open_clip export

# text towers (open_clip's TextTransformer arguments); 'clip_l' is OpenAI CLIP-L/14's, which EVA-CLIP starts from
TEXT_SIZES = {
    'clip_l': dict(context_length=77, vocab_size=49408, width=768, heads=12, layers=12),
    'clip_b': dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12),  # CLIP-B's (EVA02-CLIP-B)
    'tiny': dict(context_length=16, vocab_size=49408, width=64, heads=4, layers=2),  # CLIP's BPE vocabulary
}
TEXT_EMBEDDINGS = ('token_embedding', 'positional_embedding')  # a text tower's layer 0, not decayed (train_clip.py)


class CLIP(nn.Module):
    """EVA-CLIP (EVA paper section 2.3.5): the image tower is an EVA with cls pooling -> `norm` -> `head`
    Linear(D, embed_dim); the text tower is open_clip's TextTransformer (CLIP's causal transformer, pooled at the
    end-of-text token, projected to embed_dim); a learned temperature initialised to ln(1/0.07) (CLIP).
    Keys: `visual.*` (EVA's own names), `text.*` and `logit_scale` (open_clip's CustomTextCLIP names)."""

    def __init__(self, vision_cfg, text_cfg, embed_dim=1024, quick_gelu=False):
        super().__init__()
        from open_clip.transformer import QuickGELU, TextTransformer
        assert vision_cfg.pooling == 'cls' and vision_cfg.num_classes == embed_dim, \
            f"the image tower needs pooling='cls' and num_classes={embed_dim} (its head is the projection)"
        self.vision_cfg = vision_cfg
        self.text_cfg = dict(text_cfg)
        self.embed_dim = embed_dim
        self.quick_gelu = quick_gelu
        self.visual = EVA(vision_cfg)
        # nn.GELU, not OpenAI's QuickGELU: the released EVA01-CLIP-g trained its OpenAI-initialised text tower with
        # nn.GELU (EVA-CLIP's _build_text_tower with a timm/EVA image tower; open_clip's EVA01-g-14.json)
        self.text = TextTransformer(**text_cfg, output_dim=embed_dim, act_layer=QuickGELU if quick_gelu else nn.GELU)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))  # 1-D: DeepSpeed broadcasts no 0-D

    def describe(self):
        """The towers' shapes, stored beside the weights in clip.pt so that export_open_clip can rebuild them."""
        return {'vision_cfg': dataclasses.asdict(self.vision_cfg), 'text_cfg': self.text_cfg,
                'embed_dim': self.embed_dim, 'quick_gelu': self.quick_gelu}

    def set_grad_checkpointing(self, enable=True):
        self.visual.config.grad_checkpointing = enable
        self.text.set_grad_checkpointing(enable)

    def encode_image(self, x):
        """images (B, 3, H, W) -> unit-norm embeddings (B, embed_dim)"""
        return F.normalize(self.visual(x), dim=-1)

    def encode_text(self, tokens):
        """token ids (B, context_length) -> unit-norm embeddings (B, embed_dim)"""
        return F.normalize(self.text(tokens), dim=-1)

    def forward(self, image, text):
        # the temperature is clamped at 100 in the forward (CLIP clamps the parameter after each step; under ZeRO
        # the fp32 master copy lives in the optimizer, so the clamp is applied where the value is used)
        return self.encode_image(image), self.encode_text(text), self.logit_scale.clamp(max=math.log(100)).exp()[0]

    def flops_per_pair(self, backward=True):
        """Matmul FLOPs of one image and one caption (for MFU): the EVA tower and the text transformer."""
        t = self.text_cfg
        text = transformer_flops(t['context_length'], t['width'], t['layers'], 4 * t['width'])
        text += 2 * t['width'] * self.embed_dim
        return self.visual.flops_per_image(backward=backward) + (3 if backward else 1) * text


def clip_loss(image_features, text_features, logit_scale, rank=0, world=1):
    """Symmetric InfoNCE over the global batch (CLIP): every image against every caption of all ranks.
    Features (B, E) are this rank's, unit norm. With world > 1 the features of all ranks are all-gathered with
    torch.distributed.nn.all_gather, whose backward sends each rank the gradient of every rank's loss with respect
    to its own features; each rank then scores only its own rows against the gathered columns (open_clip's
    gather_with_grad + local_loss, as EVA-CLIP trains). The mean of the ranks' losses is the loss of the
    concatenated batch, and the data-parallel average of the gradients is its gradient."""
    image_features, text_features = image_features.float(), text_features.float()  # logits and softmax in fp32
    all_image, all_text = image_features, text_features
    if world > 1:
        all_image = torch.cat(all_gather(image_features))
        all_text = torch.cat(all_gather(text_features))
    logits_per_image = logit_scale * image_features @ all_text.T  # (B, world * B)
    logits_per_text = logit_scale * text_features @ all_image.T
    labels = torch.arange(image_features.shape[0], device=image_features.device) + rank * image_features.shape[0]
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def load_text_tower(text, model_name='ViT-L-14', pretrained='openai'):
    """Initialise a TextTransformer from an open_clip CLIP: a tag ('openai' downloads OpenAI's CLIP-L/14 once) or
    a local file open_clip reads (OpenAI's JIT archive, an open_clip checkpoint). A projection of another
    output size (OpenAI's 768 vs EVA-CLIP g's 1024) stays newly initialised; any other mismatch fails."""
    src = open_clip_model(model_name, pretrained).state_dict()
    src = {k[len('text.'):] if k.startswith('text.') else k: v for k, v in src.items()}  # CustomTextCLIP layout
    target = text.state_dict()
    sd, skipped = {}, []
    for k, t in target.items():
        if k not in src:
            raise ValueError(f"{model_name} ({pretrained}) has no text-tower key {k!r}")
        if src[k].shape != t.shape:
            if k == 'text_projection':
                skipped.append(f"text_projection {tuple(src[k].shape)} -> {tuple(t.shape)} (newly initialised)")
                continue
            raise ValueError(f"{model_name} ({pretrained}): {k} is {tuple(src[k].shape)}, the text tower has "
                             f"{tuple(t.shape)}")
        sd[k] = src[k]
    text.load_state_dict(sd, strict=False)
    print(f"load_text_tower: {len(sd)} tensors from {model_name} ({pretrained})" +
          (f"; {', '.join(skipped)}" if skipped else ''))


def timm_eva_name(cfg):
    """The timm model that builds this image tower: timm's own for EVA-g at 224/336/560; any other shape is
    registered in timm under a name of its own (register_timm_eva), so open_clip's TimmModel can build it."""
    eva_g = (cfg.embed_dim, cfg.depth, cfg.patch_size, cfg.mlp_dim) == (1408, 40, 14, 6144)
    if eva_g and cfg.img_size in (224, 336, 560):
        return f'eva_giant_patch14_{cfg.img_size}'
    return f'eva_{cfg.embed_dim}x{cfg.depth}_patch{cfg.patch_size}_{cfg.img_size}'


def timm_args(cfg):
    """The arguments of timm's Eva (timm.models.eva.Eva) that build this encoder: the same key names, so it takes
    our weights (less mask_token and lm_head). The stages store them in their export files."""
    return dict(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
                num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_dim / cfg.embed_dim, num_classes=cfg.num_classes,
                global_pool='avg' if cfg.pooling == 'mean' else 'token')


def register_timm_eva(export_dir_or_cfg):
    """Register the image tower of an export (its open_clip_config.json) or an EVAConfig in timm, so that
    `open_clip.create_model('local-dir:DIR')` can build a size timm does not ship. Returns the timm name."""
    import timm
    from timm.models import register_model
    cfg = export_dir_or_cfg
    if isinstance(cfg, str):
        cfg = EVAConfig(**json.load(open(os.path.join(cfg, 'open_clip_config.json')))['eva_config'])
    name = timm_eva_name(cfg)
    if name not in timm.list_models(name):
        args = timm_args(cfg)  # open_clip's TimmModel passes its own num_classes and global_pool

        def build(pretrained=False, **kwargs):  # timm's factory also passes its own bookkeeping (cache_dir, ...)
            from timm.models.eva import Eva
            known = inspect.signature(Eva).parameters
            return Eva(**{**args, **{k: v for k, v in kwargs.items() if k in known}})
        build.__name__ = name
        register_model(build)
    return name


def open_clip_state_dict(state_dict):
    """Our CLIP keys -> open_clip's CustomTextCLIP over a timm trunk: visual.X -> visual.trunk.X (timm's Eva has
    EVA's key names), text.* unchanged, a scalar logit_scale."""
    sd = {('visual.trunk.' + k[len('visual.'):] if k.startswith('visual.') else k): v
          for k, v in state_dict.items() if not k.startswith(('visual.lm_head', 'visual.mask_token'))}
    sd['logit_scale'] = sd['logit_scale'].reshape(())
    return sd


def export_open_clip(ckpt, out_dir):
    """Write a CLIP checkpoint (clip.pt's dict or path: 'model' with visual.*, text.*, logit_scale, and the
    towers' 'vision_cfg', 'text_cfg', 'embed_dim', 'quick_gelu') as an open_clip model folder:
    open_clip_config.json (CustomTextCLIP over timm's Eva, as open_clip's EVA01-g-14) and
    open_clip_pytorch_model.bin. Load it with open_clip.create_model_and_transforms('local-dir:' + out_dir)
    (for sizes other than EVA-g, call register_timm_eva(out_dir) first)."""
    src, ckpt = ckpt, read_checkpoint(ckpt) if isinstance(ckpt, str) else ckpt
    missing = [k for k in ('model', 'vision_cfg', 'text_cfg', 'embed_dim', 'quick_gelu') if k not in ckpt]
    if missing:
        raise ValueError(f"{src if isinstance(src, str) else 'the checkpoint'} is no train_clip.py CLIP checkpoint "
                         f"(clip.pt): it has no {', '.join(missing)}")
    vision_cfg, text_cfg = EVAConfig(**ckpt['vision_cfg']), ckpt['text_cfg']
    os.makedirs(out_dir, exist_ok=True)
    config = {
        'model_cfg': {
            'embed_dim': ckpt['embed_dim'], 'quick_gelu': ckpt['quick_gelu'], 'custom_text': True,
            'vision_cfg': {'image_size': vision_cfg.img_size, 'timm_model_name': timm_eva_name(vision_cfg),
                           'timm_model_pretrained': False, 'timm_pool': 'token', 'timm_proj': None},
            'text_cfg': dict(text_cfg),
        },
        'preprocess_cfg': {'mean': list(CLIP_MEAN), 'std': list(CLIP_STD), 'interpolation': 'bicubic',
                           'resize_mode': 'shortest'},
        'eva_config': ckpt['vision_cfg'],  # for register_timm_eva; open_clip ignores it
    }
    sd = {k: v.float().cpu().contiguous() for k, v in open_clip_state_dict(ckpt['model']).items()}
    torch.save(sd, os.path.join(out_dir, 'open_clip_pytorch_model.bin.tmp'))
    os.replace(os.path.join(out_dir, 'open_clip_pytorch_model.bin.tmp'),
               os.path.join(out_dir, 'open_clip_pytorch_model.bin'))
    with open(os.path.join(out_dir, 'open_clip_config.json'), 'w') as f:
        json.dump(config, f, indent=1)

# -----------------------------------------------------------------------------
# command line: python model.py psz14to16 IN.pt OUT.pt [--image_size=224] [--patch_size=16]
#               python model.py open_clip CLIP.pt OUT_DIR


def convert_psz14to16(src, dst, image_size=224, patch_size=16):
    """The official interpolate_patch_14to16.py, bit for bit: the patch kernel resized in fp32 and kept in fp32,
    pos_embed resized in its own dtype (fp16 in the released eva_psz14.pt); every other entry of the file (its
    layout, the 'model' dict, args) kept as it was."""
    ckpt = read_checkpoint(src)
    sd = ckpt['model'] if isinstance(ckpt.get('model'), dict) else ckpt
    for k in ('patch_embed.proj.weight', 'pos_embed'):
        if k not in sd:
            raise ValueError(f"{src} has no '{k}' (keys: {', '.join(list(sd)[:8])} ...)")
    old_p, old_g = sd['patch_embed.proj.weight'].shape[-1], math.isqrt(sd['pos_embed'].shape[1] - 1)
    sd['patch_embed.proj.weight'] = resize_patch_embed(sd['patch_embed.proj.weight'].float(), patch_size)
    sd['pos_embed'] = resize_pos_embed(sd['pos_embed'], image_size // patch_size, compute_dtype=None)
    torch.save(ckpt, dst)
    print(f"{src} -> {dst}: patch {old_p}->{patch_size}, pos_embed {old_g}x{old_g}->"
          f"{image_size // patch_size}x{image_size // patch_size}")


if __name__ == '__main__':
    args = [a for a in sys.argv[1:] if not a.startswith('--')]
    opts = dict(a[2:].split('=', 1) if '=' in a else (a[2:], '') for a in sys.argv[1:] if a.startswith('--'))
    usage = ("usage: python model.py psz14to16 IN.pt OUT.pt [--image_size=224] [--patch_size=16]\n"
             "       python model.py open_clip CLIP.pt OUT_DIR     (a train_clip.py checkpoint -> open_clip folder)")
    if len(args) == 3 and not os.path.isfile(args[1]):
        sys.exit(f"error: no such file: {args[1]}")
    export = len(args) == 3 and args[0] == 'open_clip' and not opts
    convert = len(args) == 3 and args[0] == 'psz14to16' and not set(opts) - {'image_size', 'patch_size'}
    if not (export or convert):
        ok = 'help' in opts or not sys.argv[1:]
        print(usage, file=sys.stdout if ok else sys.stderr)
        sys.exit(0 if ok else 2)
    if convert and not os.path.isdir(os.path.dirname(os.path.abspath(args[2]))):
        sys.exit(f"error: no folder for {args[2]}")
    try:  # a file that is no checkpoint, or another kind: one error line
        if export:
            export_open_clip(args[1], args[2])
            print(f"{args[1]} -> {args[2]}: open_clip.create_model_and_transforms('local-dir:{args[2]}')")
        else:
            convert_psz14to16(args[1], args[2], **{k: int(v) for k, v in opts.items()})
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
