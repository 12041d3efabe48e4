"""Semantic segmentation (det_seg.py task='seg', seg_model.py's SegViT / UperNet / Mask2Former / sliding windows / mIoU,
data.py's SegFiles / SegAugment), each against an independent computation: the EVA blocks run by hand, deformable
attention as a per-point bilinear loop, the Hungarian matcher against brute force, point-sampled losses against dense
ones, a 1x1 conv slid and whole, windows and metrics counted by hand, label tables by hand; and the stage itself: the
demo learns with either head, 2 ranks evaluate as 1, a resume continues the same run, a wrong set is one error."""
import itertools
import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from conftest import log_rows, run_stage
from data import SegAugment, SegFiles, Samples, label_lut, seg_test_size
from model import EVA, eva_config, param_groups
from seg_model import (LAYER_DECAY, BatchNorm2d, MSDeformAttn, Segmenter, SegConfig, SegViT, confusion, dice_loss,
                       hungarian, load_segmenter, ms_deform_attn, point_sample, seg_metrics, semantic_inference,
                       semantic_targets, slide_inference)



def tiny_seg(num_classes=5, crop=64, taps=(0, 1, 1, 2), depth=3, head='upernet', adapter=False):
    bb = eva_config('eva_tiny', img_size=crop, patch_size=16, depth=depth)
    channels = 32 if head != 'upernet' else 16
    return SegConfig(backbone=bb, num_classes=num_classes, taps=taps, seg_head=head, seg_channels=channels,
                     aux_channels=8, queries=6, dec_layers=4, enc_layers=2, attn_heads=4, ffn_dim=64, train_points=256,
                     adapter=adapter, adapter_inplanes=8, adapter_heads=4)


def test_taps_are_the_eva_blocks_outputs_and_the_pyramid_strides():
    """fpn3 is the identity: its map is block taps[2]'s patch tokens, computed here with EVA's own blocks over cls +
    patches + pos_embed; the four levels are at strides 4, 8, 16, 32; the segmenter's logits are at the input size."""
    torch.manual_seed(0)
    seg = tiny_seg()
    net = SegViT(seg).eval()
    eva = EVA(eva_config('eva_tiny', img_size=64, patch_size=16, depth=3)).eval()
    eva.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith('fpn')}, strict=False)
    x = torch.randn(2, 3, 64, 64)
    t = torch.cat((eva.cls_token.expand(2, -1, -1), eva.patch_embed(x)), 1) + eva.pos_embed
    for blk in eva.blocks[:2]:  # taps[2] = block 1
        t = blk(t)
    feats = net(x)
    torch.testing.assert_close(feats[2], t[:, 1:].transpose(1, 2).reshape(2, 64, 4, 4))
    assert [tuple(f.shape) for f in feats] == [(2, 64, 16, 16), (2, 64, 8, 8), (2, 64, 4, 4), (2, 64, 2, 2)]
    model = Segmenter(seg).eval()
    assert model(x).shape == (2, 5, 64, 64) and model.decode_head(model.backbone(x)).shape == (2, 5, 16, 16)
    losses = model.train()(x, torch.randint(0, 5, (2, 64, 64)))
    assert set(losses) == {'loss_ce', 'loss_aux'} and all(v.ndim == 0 for v in losses.values())


def test_slide_inference_windows_by_hand_and_a_1x1_conv_slides_as_it_runs_whole():
    """mmseg's windows for a 100 x 150 image, crop 64, stride 40: rows ceil((100 - 64) / 40) + 1 = 2 at 0 and 36 (moved
    back to end at 100), columns 4 at 0, 40, 80, 86; every pixel covered. A position-wise net (1x1 conv) slid over any
    image, or over one smaller than the crop (padded, cut back), equals the net on the whole image."""
    seen = []

    def record(w):
        seen.append(w[0, 0, 0, 0].item())
        return torch.ones(1, 2, 64, 64)
    img = torch.arange(100.)[:, None].expand(100, 150) * 1000 + torch.arange(150.)  # a pixel's value is its position
    out = slide_inference(record, img[None, None].expand(1, 3, 100, 150), 2, crop=64, stride=40)
    assert sorted(seen) == sorted(r * 1000 + c for r in (0, 36) for c in (0, 40, 80, 86))
    assert torch.equal(out, torch.ones(1, 2, 100, 150))  # averaged over each pixel's windows: none left at 0 / 0
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 1)
    for shape in ((1, 3, 100, 150), (2, 3, 64, 64), (1, 3, 40, 50)):
        x = torch.randn(shape)
        torch.testing.assert_close(slide_inference(conv, x, 4, crop=64, stride=40), conv(x).detach())


def test_an_image_under_the_crop_is_padded_with_the_fill_and_cut_back():
    """EVA-01's multi-scale test pads a short image with black before normalising (PadShortSide): a net that sees its
    whole window (each output pixel = the window's mean per channel) sees the fill in the padded part."""
    torch.manual_seed(0)
    x, fill = torch.randn(1, 3, 40, 50), torch.tensor([-2.1, -2.0, -1.8]).view(1, 3, 1, 1)
    out = slide_inference(lambda w: w.mean((2, 3), keepdim=True).expand(-1, -1, 64, 64), x, 3, crop=64, stride=40,
                          fill=fill)
    hand = (x.sum((2, 3)) + fill.flatten() * (64 * 64 - 40 * 50)) / (64 * 64)  # per channel
    assert out.shape == (1, 3, 40, 50)
    torch.testing.assert_close(out, hand[:, :, None, None].expand(1, 3, 40, 50))


def test_segmenter_on_a_crop_sized_image_slides_as_one_window():
    torch.manual_seed(0)
    model = Segmenter(tiny_seg()).eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(slide_inference(model, x, 5, crop=64, stride=40), model(x))


def naive_deform(value, shapes, loc, weights):
    """Per query, head, level and point: the bilinear sample at (x W - 0.5, y H - 0.5) from its 4 neighbours, zero
    outside the map, times its weight, summed."""
    N, _, h, d = value.shape
    Q, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    starts = np.cumsum([0] + [H * W for H, W in shapes])
    out = torch.zeros(N, Q, h, d, dtype=torch.float64)
    for n, q, k, lvl, p in itertools.product(range(N), range(Q), range(h), range(L), range(P)):
        H, W = shapes[lvl]
        x, y = loc[n, q, k, lvl, p, 0].item() * W - 0.5, loc[n, q, k, lvl, p, 1].item() * H - 0.5
        x0, y0 = int(np.floor(x)), int(np.floor(y))
        for xi, yi in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
            if 0 <= xi < W and 0 <= yi < H:
                f = (1 - abs(x - xi)) * (1 - abs(y - yi))
                out[n, q, k] += weights[n, q, k, lvl, p].item() * f * value[n, starts[lvl] + yi * W + xi, k].double()
    return out.flatten(2)


def test_deformable_attention_equals_a_per_point_bilinear_loop_and_starts_on_a_star():
    torch.manual_seed(0)
    shapes = [(3, 4), (2, 2), (5, 3)]
    value = torch.randn(2, sum(H * W for H, W in shapes), 2, 3)
    loc = torch.rand(2, 4, 2, 3, 2, 2) * 1.4 - 0.2  # some points outside the maps
    weights = torch.rand(2, 4, 2, 3, 2)
    torch.testing.assert_close(ms_deform_attn(value, shapes, loc, weights).double(),
                               naive_deform(value, shapes, loc, weights), atol=1e-5, rtol=1e-5)
    attn = MSDeformAttn(16, heads=4, levels=3, points=2)
    bias = attn.sampling_offsets.bias.view(4, 3, 2, 2)  # heads at 0, 90, 180, 270 degrees; point p at p + 1 steps
    torch.testing.assert_close(bias[:, 1, 1], torch.tensor([[2., 0], [0, 2], [-2, 0], [0, -2]]), atol=1e-6, rtol=0)
    assert attn.attention_weights.weight.abs().sum() == 0 and attn.sampling_offsets.weight.abs().sum() == 0


def test_hungarian_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(150):
        n, m = (int(v) for v in rng.integers(1, 6, 2))
        cost = rng.normal(size=(n, m)) * (10 if rng.random() < 0.5 else 1)
        rows, cols = hungarian(cost)
        k = min(n, m)
        assert len(set(rows.tolist())) == len(set(cols.tolist())) == len(rows) == k and list(rows) == sorted(rows)
        best = min(sum(cost[r, c] for r, c in (zip(range(n), perm) if n <= m else zip(perm, range(m))))
                   for perm in itertools.permutations(range(max(n, m)), k))
        assert cost[rows, cols].sum() == pytest.approx(best, abs=1e-9), cost
    tie = np.zeros((3, 3))  # ties: any permutation, still one column per row
    assert sorted(hungarian(tie)[1].tolist()) == [0, 1, 2]


def test_point_sampled_losses_equal_dense_losses_when_every_pixel_is_sampled():
    """Points at the pixel centres read the pixels exactly, so BCE and dice over them are the dense losses."""
    torch.manual_seed(0)
    logits, target = torch.randn(3, 1, 6, 5), (torch.rand(3, 1, 6, 5) > 0.5).float()
    ys, xs = torch.meshgrid((torch.arange(6) + 0.5) / 6, (torch.arange(5) + 0.5) / 5, indexing='ij')
    pts = torch.stack((xs, ys), -1).flatten(0, 1)[None].expand(3, -1, -1)
    lp, tp = point_sample(logits, pts)[:, 0], point_sample(target, pts)[:, 0]
    torch.testing.assert_close(lp, logits.flatten(1))
    dense = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    torch.testing.assert_close(torch.nn.functional.binary_cross_entropy_with_logits(lp, tp), dense)
    p, t = logits.sigmoid().flatten(1), target.flatten(1)
    torch.testing.assert_close(dice_loss(lp.sigmoid(), tp), 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1))


def test_mask2former_targets_shapes_and_semantic_inference():
    labels = torch.tensor([[0, 0, 3], [255, 3, 3]])
    classes, masks = semantic_targets(labels, 4)
    assert classes.tolist() == [0, 3] and masks.tolist() == [[[1, 1, 0], [0, 0, 0]], [[0, 0, 1], [0, 1, 1]]]
    torch.manual_seed(0)
    model = Segmenter(tiny_seg(head='mask2former')).eval()
    x = torch.randn(2, 3, 64, 64)
    preds = model.decode_head(model.backbone(x))
    assert len(preds) == 5 and all(c.shape == (2, 6, 6) and m.shape == (2, 6, 16, 16) for c, m in preds)
    cls, masks = preds[-1]
    ref = sum(cls.softmax(-1)[:, q, :5, None, None] * masks[:, q, None].sigmoid() for q in range(6))
    torch.testing.assert_close(semantic_inference(cls, masks), ref)
    assert model(x).shape == (2, 5, 64, 64)
    head = model.decode_head  # masked attention: a query whose mask is empty everywhere is not blocked at all
    with torch.no_grad():
        head.mask_embed[4].weight.zero_()
        head.mask_embed[4].bias.fill_(1.0)
    cls, masks, blocked = head.predict(torch.randn(2, 6, 32), -torch.ones(2, 32, 16, 16), (4, 4))
    assert (masks < 0).all() and blocked.shape == (2 * 4, 6, 16) and not blocked.any()
    _, _, blocked = head.predict(torch.randn(2, 6, 32), torch.ones(2, 32, 16, 16) * torch.linspace(-1, 1, 16), (4, 4))
    assert blocked.any() and not blocked.all(-1).any()  # half the pixels negative: those blocked
    losses = model.train()(x, torch.randint(0, 5, (2, 64, 64)))
    assert set(losses) == {'loss_cls', 'loss_mask', 'loss_dice'} and all(v.ndim == 0 for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_checkpointed_pixel_decoder_recomputes_the_same_layers():
    """With the backbone's grad_checkpointing the pixel decoder's deformable layers are recomputed in the backward
    (torch.utils.checkpoint, counted), with the same outputs and gradients as without."""
    import torch.utils.checkpoint as ckpt
    torch.manual_seed(0)
    cfg = tiny_seg(head='mask2former')
    plain = Segmenter(cfg).decode_head.pixel_decoder.train()
    cfg = replace(cfg, backbone=replace(cfg.backbone, grad_checkpointing=True))
    recomputed = Segmenter(cfg).decode_head.pixel_decoder.train()
    recomputed.load_state_dict(plain.state_dict())
    feats = [torch.randn(2, 64, s, s, requires_grad=True) for s in (16, 8, 4, 2)]
    grads, calls, real = [], [], ckpt.checkpoint
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr('seg_model.checkpoint', lambda *a, **k: calls.append(a[0]) or real(*a, **k))
        for net in (plain, recomputed):
            mask_features, outs = net(feats)
            (mask_features.square().sum() + sum(o.sum() for o in outs)).backward()
            grads.append([f.grad.clone() for f in feats] + [p.grad.clone() for p in net.parameters()])
            for f in feats:
                f.grad = None
    assert calls == list(recomputed.encoder)  # each layer once, the plain decoder none
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_batchnorm_runs_in_float32_under_half_weights():
    """As DeepSpeed leaves it (bf16 weights, float32 running statistics): the statistics update as float32 BatchNorm's
    do and the output is its, rounded to bf16; a model cast whole (bf16 statistics) evaluates too."""
    torch.manual_seed(0)
    ref, ours = nn.BatchNorm2d(4), BatchNorm2d(4)
    for m in (ref, ours):
        m.weight.data.uniform_(0.5, 1.5)
    ours.load_state_dict(ref.state_dict())
    ours.weight.data, ours.bias.data = ours.weight.data.bfloat16(), ours.bias.data.bfloat16()
    x = torch.randn(3, 4, 5, 5) * 3 + 1
    y = ours(x.bfloat16())
    torch.testing.assert_close(y, ref(x.bfloat16().float()).bfloat16(), atol=0.05, rtol=0.02)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert ours.running_var.dtype == torch.float32
    ours.eval().bfloat16()
    torch.testing.assert_close(ours(x.bfloat16()).float(), ref.eval()(x), atol=0.1, rtol=0.05)


def test_adapter_pyramid_and_its_zero_injection_leaves_the_vit_as_pretrained():
    """Levels at strides 4, 8, 16, 32, D channels. With the injectors' gamma at 0 (their init) the ViT's tokens after
    each interval are the blocks' own on cls (no pos_embed, as BEiTAdapter) + patches + pos_embed, computed here with
    EVA's blocks; whatever the injectors' attention weights, the output is the same; with gamma != 0 it changes."""
    torch.manual_seed(0)
    seg = tiny_seg(crop=128, taps=(0, 1, 2, 3), depth=4, head='mask2former', adapter=True)
    net = SegViT(seg).eval()
    x = torch.randn(2, 3, 128, 128)
    seen = {}
    for i in seg.taps:
        net.blocks[i].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out))
    feats = net(x)
    assert [tuple(f.shape) for f in feats] == [(2, 64, 32, 32), (2, 64, 16, 16), (2, 64, 8, 8), (2, 64, 4, 4)]
    t = torch.cat((net.cls_token.expand(2, -1, -1), net.patch_embed(x) + net.pos_embed[:, 1:]), 1)
    for i, blk in enumerate(net.blocks):
        t = blk(t)
        torch.testing.assert_close(seen[i], t)
    with torch.no_grad():
        for inter in net.interactions:
            for p in inter.injector.attn.parameters():
                p.normal_()
    torch.testing.assert_close(net(x), feats)
    with torch.no_grad():
        net.interactions[0].injector.gamma.fill_(0.5)
    assert (net(x)[2] - feats[2]).abs().max() > 1e-3


def mmseg_names(sd):
    """Our adapter + Mask2Former keys renamed by hand to mmseg / mmdet 2.22's module names."""
    import re
    official = {}
    for k, v in sd.items():
        k = re.sub(r'(input_convs\.\d)\.0\.', r'\1.conv.', k)
        k = re.sub(r'(input_convs\.\d)\.1\.', r'\1.gn.', k)
        k = k.replace('lateral_conv.0.', 'lateral_convs.0.conv.').replace('lateral_conv.1.', 'lateral_convs.0.gn.')
        k = k.replace('output_conv.0.', 'output_convs.0.conv.').replace('output_conv.1.', 'output_convs.0.gn.')
        k = re.sub(r'encoder\.(\d)\.attn\.', r'encoder.layers.\1.attentions.0.', k)
        k = re.sub(r'transformer_decoder\.(\d)\.cross_attn\.', r'transformer_decoder.layers.\1.attentions.0.attn.', k)
        k = re.sub(r'transformer_decoder\.(\d)\.self_attn\.', r'transformer_decoder.layers.\1.attentions.1.attn.', k)
        k = re.sub(r'(encoder|transformer_decoder)\.(\d)\.ffn\.0\.', r'\1.layers.\2.ffns.0.layers.0.0.', k)
        k = re.sub(r'(encoder|transformer_decoder)\.(\d)\.ffn\.2\.', r'\1.layers.\2.ffns.0.layers.1.', k)
        k = re.sub(r'(encoder|transformer_decoder)\.(\d)\.norm(\d)\.',
                   lambda m: f'{m[1]}.layers.{m[2]}.norms.{int(m[3]) - 1}.', k)
        k = k.replace('decode_head.post_norm.', 'decode_head.transformer_decoder.post_norm.')
        k = k.replace('.ffn.dwconv.', '.ffn.dwconv.dwconv.')
        official[k] = v
    return official


def test_released_mmseg_names_load_through_the_key_map(tmp_path):
    """Our adapter + Mask2Former state dict renamed by hand to mmseg / mmdet 2.22's module names (ConvModule's .conv /
    .gn, BaseTransformerLayer's attentions / ffns.0.layers / norms, the adapter's DWConv), under 'state_dict' with the
    unused conv_seg BaseDecodeHead makes: load_segmenter brings every tensor back."""
    torch.manual_seed(0)
    src = Segmenter(tiny_seg(crop=128, taps=(0, 1, 2, 3), depth=4, head='mask2former', adapter=True))
    official = mmseg_names(src.state_dict())
    assert 'decode_head.transformer_decoder.layers.3.attentions.1.attn.in_proj_weight' in official
    official['decode_head.conv_seg.weight'] = torch.zeros(5, 32, 1, 1)
    torch.save({'meta': {}, 'state_dict': official}, tmp_path / 'eva_sem_seg.pth')
    dst = Segmenter(tiny_seg(crop=128, taps=(0, 1, 2, 3), depth=4, head='mask2former', adapter=True))
    load_segmenter(dst, str(tmp_path / 'eva_sem_seg.pth'))
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v, msg=k)


def official_head_shapes(D=64, C=32, aux=8, K=5):
    """The keys and shapes of the parts of EVA-01's released segmenters whose names or tensors we once got wrong,
    written from the official modules at tiny_seg's sizes: mmdet 2.22's MSDeformAttnPixelDecoder (ConvModule .conv /
    .gn; the three input projections with a conv bias, the FPN lateral / output convs without; its deformable encoder
    layers as BaseTransformerLayer names them), and mmseg 0.20's
    auxiliary FCNHead of UperNet (its ConvModules in a Sequential, BatchNorm)."""
    pd, s = 'decode_head.pixel_decoder.', {}
    for i in range(3):
        s.update({f'{pd}input_convs.{i}.conv.weight': (C, D, 1, 1), f'{pd}input_convs.{i}.conv.bias': (C,),
                  f'{pd}input_convs.{i}.gn.weight': (C,), f'{pd}input_convs.{i}.gn.bias': (C,)})
    s.update({f'{pd}lateral_convs.0.conv.weight': (C, D, 1, 1), f'{pd}output_convs.0.conv.weight': (C, C, 3, 3),
              f'{pd}mask_feature.weight': (C, C, 1, 1), f'{pd}mask_feature.bias': (C,),
              f'{pd}level_encoding.weight': (3, C)})
    for name in ('lateral_convs.0.gn.', 'output_convs.0.gn.'):
        s.update({pd + name + 'weight': (C,), pd + name + 'bias': (C,)})
    for i in range(2):  # the deformable encoder's layers: 4 heads, 3 levels, 4 points, FFN 64
        e = f'{pd}encoder.layers.{i}.'
        for name, rows, cols in (('attentions.0.sampling_offsets', 96, C), ('attentions.0.attention_weights', 48, C),
                                 ('attentions.0.value_proj', C, C), ('attentions.0.output_proj', C, C),
                                 ('ffns.0.layers.0.0', 64, C), ('ffns.0.layers.1', C, 64)):
            s.update({e + name + '.weight': (rows, cols), e + name + '.bias': (rows,)})
        s.update({f'{e}norms.{n}.{p}': (C,) for n in (0, 1) for p in ('weight', 'bias')})
    a = 'auxiliary_head.'
    s.update({a + 'conv_seg.weight': (K, aux, 1, 1), a + 'conv_seg.bias': (K,),
              a + 'convs.0.conv.weight': (aux, D, 3, 3), a + 'convs.0.bn.num_batches_tracked': ()})
    s.update({f'{a}convs.0.bn.{p}': (aux,) for p in ('weight', 'bias', 'running_mean', 'running_var')})
    return s


def test_released_pixel_decoder_and_auxiliary_head_keys_and_shapes(tmp_path):
    """Our Mask2Former's pixel decoder and UperNet's auxiliary head, under mmseg's names, have exactly the official key
    set and shapes; a released-layout file of each family loads every tensor."""
    want = official_head_shapes()
    m2f = Segmenter(tiny_seg(crop=128, taps=(0, 1, 2, 3), depth=4, head='mask2former', adapter=True))
    upernet = Segmenter(tiny_seg(crop=128, taps=(0, 1, 2, 3), depth=4))
    got = {k: tuple(v.shape) for model in (m2f, upernet) for k, v in mmseg_names(model.state_dict()).items()
           if k.startswith(('decode_head.pixel_decoder.', 'auxiliary_head.'))}
    assert got == want
    torch.manual_seed(1)
    official = {k: torch.randn(v.shape).to(v.dtype) for k, v in mmseg_names(upernet.state_dict()).items()}
    official = {k: v.abs() if 'running_var' in k else v for k, v in official.items()}
    torch.save({'meta': {}, 'state_dict': official}, tmp_path / 'upernet.pth')
    load_segmenter(upernet, str(tmp_path / 'upernet.pth'))
    for k, v in mmseg_names(upernet.state_dict()).items():
        torch.testing.assert_close(v, official[k].to(v.dtype), msg=k)


def test_mask2former_initialises_as_mmdet():
    """mmdet 2.22's init: the transformer decoder's matrices xavier-normal (not uniform: same variance, but ~8% of the
    weights beyond the uniform's bound sqrt(6 / (fan_in + fan_out))); the pixel decoder's input projections
    xavier-uniform with gain 1 and zero biases (bound sqrt(6 / (64 + 32)) = 0.25, not caffe2's sqrt(3 / 64) = 0.217)."""
    torch.manual_seed(0)
    head = Segmenter(tiny_seg(crop=128, taps=(0, 1, 2, 3), depth=4, head='mask2former', adapter=True)).decode_head
    w = head.transformer_decoder[0].ffn[0].weight  # (64, 32)
    beyond = (w.abs() > (6 / sum(w.shape)) ** 0.5).float().mean().item()
    assert 0.04 < beyond < 0.13, beyond  # normal: P(|z| > sqrt 3) = 8.3%
    for conv in head.pixel_decoder.input_convs:
        assert 0.23 < conv[0].weight.abs().max().item() <= 0.25 and not conv[0].bias.any()


def test_miou_macc_aacc_by_hand():
    """label [0 0 1 1 2 255], prediction [0 1 1 1 0 2] (the ignored pixel's prediction does not count): class 0 IoU
    1 / 3 (union 2 + 2 - 1), class 1 2 / 3, class 2 0; acc 1/2, 1, 0; aAcc 3 / 5; a 4th class absent from both is
    skipped, not counted as 0."""
    label, pred = torch.tensor([0, 0, 1, 1, 2, 255]), torch.tensor([0, 1, 1, 1, 0, 2])
    for K in (3, 4):
        m = seg_metrics(confusion(pred, label, K))
        assert m['mIoU'] == pytest.approx(100 / 3) and m['mAcc'] == pytest.approx(50) and m['aAcc'] == pytest.approx(60)
        assert m['IoU'][:3] == [33.33, 66.67, 0.0] and (K == 3 or m['IoU'][3] is None)
    a, b = confusion(pred[:3], label[:3], 3), confusion(pred[3:], label[3:], 3)
    assert torch.equal(a + b, confusion(pred, label, 3))  # what the ranks' all-reduce relies on


def test_label_tables_by_hand():
    ade = label_lut('reduce_zero_label')
    assert ade[0] == 255 and ade[1] == 0 and ade[150] == 149 and ade[255] == 255
    coco = label_lut('cocostuff')  # mmseg's clsID_to_trID: 10 -> 10, 11 unused, 12 -> 11, 26 -> 24, ..., 181 -> 170
    assert [int(coco[i]) for i in (0, 10, 11, 12, 25, 26, 29, 30, 90, 91, 181, 182, 255)] == \
        [0, 10, 255, 11, 255, 24, 255, 26, 255, 80, 170, 255, 255]
    assert (coco < 255).sum() == 171
    assert seg_test_size(512, 683) == (896, 1216)  # x min(3584 / 683, 896 / 512) = 1.75 -> 896 x 1195 -> 32s
    assert seg_test_size(1000, 5000) == (736, 3584)  # the long side binds: x 0.7168 -> 717 x 3584 -> 32s


def write_set(root, n=6, size=(40, 48), num_classes=4):
    rng = np.random.default_rng(0)
    for d in ('img', 'ann'):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, size + (3,), dtype=np.uint8)).save(os.path.join(root, 'img', f'{i}.jpg'))
        Image.fromarray(rng.integers(0, num_classes, size, dtype=np.uint8)).save(os.path.join(root, 'ann', f'{i}.png'))
    return os.path.join(root, 'img'), os.path.join(root, 'ann')


def test_seg_files_pair_skip_and_name_bad_labels(tmp_path, capsys):
    img, ann = write_set(str(tmp_path))
    os.remove(os.path.join(ann, '5.png'))  # an image without its label
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(os.path.join(ann, 'extra.png'))  # a label without its image
    Image.fromarray(np.zeros((30, 48), np.uint8)).save(os.path.join(ann, '1.png'))  # another size
    Image.fromarray(np.full((40, 48), 7, np.uint8)).save(os.path.join(ann, '2.png'))  # class 7 of 4
    src = SegFiles(img, ann, num_classes=4)
    assert list(src.names) == ['0', '1', '2', '3', '4'] and src.unpaired == ['5', 'extra']
    assert '2 of' in capsys.readouterr().err
    img0, label0 = src.load(0)
    assert img0.shape == (3, 40, 48) and label0.shape == (40, 48) and label0.max() < 4
    with pytest.raises(ValueError, match='1.png is \\(30, 48\\), its image \\(40, 48\\)'):
        src.load(1)
    with pytest.raises(ValueError, match='class ids \\[7\\] >= num_classes 4'):
        src.load(2)
    ds = Samples(src, lambda s: s, joint=True)
    assert ds[1]['skipped'] == 2 and ds[1]['index'] == 1 and ds[3]['skipped'] == 0  # 1 and 2 passed over, 3 served
    with pytest.raises(ValueError, match='none of 5 samples loads: .*class ids'):
        SegFiles(img, ann, num_classes=1).check()


def test_seg_augment_keeps_image_and_label_together(monkeypatch):
    """Colour = 60 x class + 20 in a 3-class image of big blocks; without the photometric step, every output pixel
    away from a block edge is closest to its label's colour (resized, cropped and flipped together), the padding is
    the mean colour labelled 255, the crop is the configured size."""
    import data
    monkeypatch.setattr(data, 'photometric_distortion', lambda x: x)
    label = torch.zeros(60, 90, dtype=torch.uint8)
    label[:, 30:60], label[:, 60:] = 1, 2
    img = (label * 60 + 20).expand(3, -1, -1).clone()
    aug = SegAugment(crop=64, scale=(160, 64), ratio=(0.5, 2.0), cat_max_ratio=0.75)
    for seed in range(20):
        torch.manual_seed(seed)
        x, y = aug((img, label))
        assert x.shape == (3, 64, 64) and y.shape == (64, 64)
        valid = y != 255
        edge = (y[:, 1:] != y[:, :-1])
        interior = valid.clone()
        interior[:, 1:] &= ~edge
        interior[:, :-1] &= ~edge
        assert torch.equal(((x[0][interior].float() - 20) / 60).round(), y[interior].float())  # its own class's colour
        assert (x[:, ~valid] == torch.tensor([124, 116, 104])[:, None]).all()  # the mean colour (normalised 0)


def test_cat_max_ratio_redraws_single_class_crops(monkeypatch):
    """Class 1 in a 48 x 48 corner of a 200 x 200 label, no resize, crop 64: a crop showing under 75% of one class is
    rare (offsets uniform in 0-136: 10 of 300 draws); with up to 10 redraws it comes about 7 times as often (68)."""
    import data
    monkeypatch.setattr(data, 'photometric_distortion', lambda x: x)
    label = torch.zeros(200, 200, dtype=torch.uint8)
    label[:48, :48] = 1
    img = torch.zeros(3, 200, 200, dtype=torch.uint8)
    mixed = {}
    for ratio in (1.0, 0.75):
        aug, mixed[ratio] = SegAugment(crop=64, scale=(200, 200), ratio=(1.0, 1.0), cat_max_ratio=ratio), 0
        for seed in range(300):
            torch.manual_seed(seed)
            y = aug((img, label))[1]
            mixed[ratio] += int(y.flatten().bincount().max() < 0.75 * y.numel())
    assert mixed[1.0] < 15 and mixed[0.75] > 4 * max(mixed[1.0], 3), mixed


def test_backbone_loading_and_layer_decay_groups(tmp_path):
    """A patch-14, 224 px encoder loads into the segmenter (pos_embed resized to the crop, kernel to 16); only the fpn
    is new. Groups: embeddings at layer 0, block i at i + 1, everything else at depth + 1; no weight decay on biases
    and norms, but pos_embed and cls_token decayed (mmseg's rule as EVA-01 ran it)."""
    torch.manual_seed(0)
    eva = EVA(eva_config('eva_tiny', img_size=224, patch_size=14, depth=3, num_classes=10))
    torch.save({'model': eva.state_dict()}, tmp_path / 'eva.pt')
    model = Segmenter(tiny_seg())
    info = load_segmenter(model, str(tmp_path / 'eva.pt'))
    assert sorted(info['missing']) == sorted(k for k in model.backbone.state_dict() if k.startswith('fpn'))
    torch.testing.assert_close(model.backbone.blocks[2].mlp.fc1.weight, eva.blocks[2].mlp.fc1.weight)
    with_adapter = Segmenter(tiny_seg(crop=128, taps=(0, 1, 2, 2), head='mask2former', adapter=True))
    info = load_segmenter(with_adapter, str(tmp_path / 'eva.pt'))  # the EVA-g recipe: an encoder under the adapter
    assert sorted(info['missing']) == sorted(k for k in with_adapter.backbone.state_dict() if not k.startswith(
        ('patch_embed.', 'pos_embed', 'cls_token', 'blocks.'))) and 'spm.fc1.weight' in info['missing']
    groups = param_groups(model, 0.05, 0.5, **LAYER_DECAY)
    where = {id(p): (g['lr_scale'], g['weight_decay']) for g in groups for p in g['params']}
    b = model.backbone
    assert where[id(b.pos_embed)] == (0.5 ** 4, 0.05) and where[id(b.cls_token)] == (0.5 ** 4, 0.05)
    assert where[id(b.blocks[1].mlp.fc1.weight)] == (0.5 ** 2, 0.05)
    assert where[id(b.blocks[1].norm1.weight)] == (0.25, 0)
    assert where[id(model.decode_head.conv_seg.weight)] == (1.0, 0.05) and where[id(b.fpn2.weight)] == (1.0, 0.05)
    # a whole segmenter of another class count (ADE20K from COCO-Stuff): all but the classifiers carried over
    other = Segmenter(tiny_seg(num_classes=7))
    torch.save({'model': model.state_dict()}, tmp_path / 'seg.pt')
    load_segmenter(other, str(tmp_path / 'seg.pt'))
    bottleneck = model.decode_head.fpn_bottleneck.conv.weight
    torch.testing.assert_close(other.decode_head.fpn_bottleneck.conv.weight, bottleneck)
    assert other.decode_head.conv_seg.weight.shape[0] == 7


def test_mask2former_layer_decay_follows_eva01():
    """EVA-01's quirk: query, level and class embeddings and the mask MLP at layer 0 (with the patch embedding); the
    pixel decoder, the decoder layers and the adapter at the full rate."""
    model = Segmenter(tiny_seg(crop=128, taps=(0, 1, 2, 3), depth=4, head='mask2former', adapter=True))
    where = {id(p): g['lr_scale'] for g in param_groups(model, 0.05, 0.5, **LAYER_DECAY)
             for p in g['params']}
    h, b = model.decode_head, model.backbone
    for p in (h.query_feat.weight, h.query_embed.weight, h.level_embed.weight, h.cls_embed.weight,
              h.mask_embed[2].weight, b.patch_embed.proj.weight):
        assert where[id(p)] == 0.5 ** 5
    for p in (h.pixel_decoder.encoder[0].attn.value_proj.weight, h.transformer_decoder[1].ffn[0].weight,
              b.interactions[0].injector.gamma, b.spm.fc1.weight, b.level_embed):
        assert where[id(p)] == 1.0
    assert where[id(b.blocks[2].attn.qkv.weight)] == 0.5 ** 2


# -----------------------------------------------------------------------------
# the stage


def run(args, nproc=1):
    threads = {'OMP_NUM_THREADS': '1' if nproc > 1 else os.environ.get('OMP_NUM_THREADS', '2')}
    return run_stage('det_seg.py', 'config/seg_tiny.py', *args, nproc=nproc, env=threads).stdout


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp('seg')
    out = run([f'--out_dir={d}/run', f'--synthetic_dir={d}/scenes', '--synthetic_size=256', '--max_steps=100',
               '--save_interval=80', '--keep_ckpts=2'])
    return d, out


# all background, the trivial prediction, scores mIoU 16.8 on these 32 scenes (83.9% of their pixels); measured at
# 100 steps (2026-12-03, 2 CPU cores): the adapter + Mask2Former 28.6, UperNet 25.3 (the full demos: README)
BAR = 21


def test_demo_learns_with_the_adapter_and_mask2former(demo, check_curves):
    d, out = demo
    ev = json.load(open(d / 'run' / 'eval.json'))
    assert ev['images'] == 32 and 'mIoU' in out
    assert 'IoU per class: ' + ', '.join(f'{v:.1f}' for v in ev['IoU']) in out  # 5 classes: in the log line too
    assert ev['mIoU'] > BAR, ev
    check_curves(d / 'run', 'eval: metrics')
    assert 'backbone.interactions.3.extra_extractors.1.ffn.dwconv.weight' in torch.load(d / 'run' / 'last.pt')['model']


def test_demo_learns_with_upernet(demo):
    d, _ = demo
    run([f'--out_dir={d}/upernet', f'--synthetic_dir={d}/scenes', '--synthetic_size=256', '--max_steps=100',
         '--seg_head=upernet', '--adapter=False', '--save_interval=1000'])
    ev = json.load(open(d / 'upernet' / 'eval.json'))
    assert ev['images'] == 32 and ev['mIoU'] > BAR, ev
    assert {'loss_ce', 'loss_aux'} <= set(log_rows(d / 'upernet')[1])


def test_plain_mask2former_run_trains_and_evaluates(demo):
    """Mask2Former on the plain encoder through fpn1-fpn4 (--adapter=False) from the stage script."""
    d, _ = demo
    run([f'--out_dir={d}/plain', f'--synthetic_dir={d}/scenes', '--synthetic_size=256', '--max_steps=20',
         '--adapter=False', '--save_interval=1000'])
    losses = [r['loss'] for r in log_rows(d / 'plain') if 'loss' in r]
    ev = json.load(open(d / 'plain' / 'eval.json'))
    assert losses[-1] < losses[0] and ev['images'] == 32 and ev['mIoU'] > 0, (losses, ev)
    sd = torch.load(d / 'plain' / 'last.pt')['model']
    assert 'backbone.fpn1.0.weight' in sd and not any('interactions' in k for k in sd)
    # the adapter's command on this out_dir (as README's seg lines once shared one): one short line, not 12 KB of keys
    r = run_stage('det_seg.py', 'config/seg_tiny.py', f'--out_dir={d}/plain', f'--synthetic_dir={d}/scenes',
                  '--synthetic_size=256', '--max_steps=30', check=False)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and last.startswith(f'error: {d}/plain/ckpt/step20 holds another model'), last[:500]
    assert 'adapter False -> True' in last and len(last) < 600, len(last)


def test_eval_on_two_ranks_equals_the_training_runs_own(demo):
    """last.pt (BatchNorm statistics included) evaluated on 2 ranks, each a share of the images: the confusion summed
    over them gives the one-process evaluation at the end of training."""
    d, _ = demo
    ev = json.load(open(d / 'run' / 'eval.json'))
    run([f'--out_dir={d}/eval2', f'--synthetic_dir={d}/scenes', '--synthetic_size=256', '--eval_only=True',
         f'--init_from={d}/run/last.pt'], nproc=2)
    again = json.load(open(d / 'eval2' / 'eval.json'))
    assert again['images'] == 32 and again['IoU'] == ev['IoU'] and again['mIoU'] == pytest.approx(ev['mIoU'])


def test_an_unreadable_val_image_is_counted_not_scored(demo, tmp_path):
    """Samples stands the next image in for an unreadable one; evaluation must not score that stand-in again: with one
    val image corrupt, the metrics are those of the set without that image."""
    import shutil
    d, _ = demo
    for kind in ('val', 'val_labels'):
        shutil.copytree(d / 'scenes' / kind, tmp_path / 'bad' / kind)
    first = sorted(os.listdir(tmp_path / 'bad' / 'val'))[3]
    shutil.copytree(tmp_path / 'bad', tmp_path / 'without')
    os.remove(tmp_path / 'without' / 'val' / first)
    os.remove(tmp_path / 'without' / 'val_labels' / first)
    (tmp_path / 'bad' / 'val' / first).write_bytes(b'\x89PNG not an image')
    res = {}
    for name in ('bad', 'without'):
        run([f'--out_dir={tmp_path}/{name}_eval', f'--val_images={tmp_path}/{name}/val', '--eval_only=True',
             f'--val_labels={tmp_path}/{name}/val_labels', f'--init_from={d}/run/last.pt',
             f'--synthetic_dir={d}/scenes'])
        res[name] = json.load(open(tmp_path / f'{name}_eval' / 'eval.json'))
    assert res['bad']['unreadable'] == 1 and res['bad']['images'] == res['without']['images'] == 31
    assert res['bad']['IoU'] == res['without']['IoU'] and res['bad']['mIoU'] == res['without']['mIoU']


def test_eval_only_reads_a_released_mmseg_layout_file(demo):
    """The demo's weights saved as EVA-01's mmseg files are (mmcv's {'meta', 'state_dict'}, mmseg / mmdet names):
    init_from takes them as a whole segmenter, and they evaluate as the demo did."""
    d, _ = demo
    sd = torch.load(d / 'run' / 'last.pt')['model']
    torch.save({'meta': {}, 'state_dict': mmseg_names(sd)}, d / 'released.pth')
    out = run([f'--out_dir={d}/released', f'--synthetic_dir={d}/scenes', '--synthetic_size=256', '--eval_only=True',
               f'--init_from={d}/released.pth'])
    assert 'a whole segmenter' in out
    assert json.load(open(d / 'released' / 'eval.json'))['IoU'] == json.load(open(d / 'run' / 'eval.json'))['IoU']


def test_resume_gives_the_same_losses(demo):
    d, _ = demo
    import shutil
    shutil.copytree(d / 'run', d / 'resumed', ignore=shutil.ignore_patterns('step100'))
    (d / 'resumed' / 'ckpt' / 'latest').write_text('step80')
    run([f'--out_dir={d}/resumed', f'--synthetic_dir={d}/scenes', '--synthetic_size=256', '--max_steps=100',
         '--save_interval=80'])
    a = {r['step']: r['loss'] for r in log_rows(d / 'run') if 'loss' in r and r['step'] > 80}
    b = {r['step']: r['loss'] for r in log_rows(d / 'resumed') if 'loss' in r and r['step'] > 80}
    assert a.keys() == b.keys() and len(a) == 2
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-4), s


def test_a_wrong_label_set_is_one_error(tmp_path):
    img, ann = write_set(str(tmp_path))
    r = run_stage('det_seg.py', 'config/seg_tiny.py', f'--train_images={img}', f'--train_labels={ann}',
                  f'--val_images={img}', f'--val_labels={ann}', '--num_classes=2', f'--out_dir={tmp_path}/out',
                  timeout=300, check=False)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith('error: none of 6 samples loads: label ')
