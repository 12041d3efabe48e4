"""det_model.py and det_seg.py task='det': each piece against an independent computation (plain EVA blocks, windows
cut by hand, a per-pair relative position, torchvision's anchors, hand-made IoUs, a naive soft-NMS loop, COCOeval on
the ground truth), LSJ's consistency, and the stage itself: the demo learns, a resume continues the same run, 2 ranks
evaluate as 1."""
import json
import math
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

from conftest import ROOT, log_rows, run_stage
from data import CocoDetection, LargeScaleJitter, coco_rle, mask_util, masks_to_box, write_synthetic_scenes
from det_model import (LAYER_DECAY, Anchors, Backbone, CascadeMaskRCNN, DetConfig, RelPosAttention, ViTDet,
                       fed_loss_classes, load_detector, match, maskness, rel_pos_table, soft_nms, window_partition,
                       window_unpartition)
from model import EVA, Block, eva_config, param_groups



def tiny(img_size=128, window=4, global_blocks=(1,), depth=2, **kw):
    bb = eva_config('eva_tiny', img_size=224, patch_size=16, depth=depth)  # pos_embed 14 x 14, as EVA-g's
    return DetConfig(backbone=bb, num_classes=4, img_size=img_size, window=window, global_blocks=global_blocks,
                     pyramid_dim=32, anchor_sizes=(16, 32, 64, 128, 256), rpn_batch=64, rpn_pre_nms=(200, 200),
                     rpn_post_nms=50, roi_batch=32, head_dim=16, fc_dim=32, canonical_box=56, **kw)


def randomise_rel_pos(net, std=0.5):
    for n, p in net.named_parameters():
        if 'rel_pos' in n:
            p.data.normal_(std=std)


def test_backbone_with_one_window_and_zero_rel_pos_is_the_plain_eva():
    """A window that covers the grid, zero relative position: the blocks are EVA's, run on the patch tokens (no cls
    token) plus the pos_embed resized to the grid."""
    torch.manual_seed(0)
    det = tiny(img_size=128, window=8, global_blocks=(1,))
    net = ViTDet(det.backbone, det).eval()
    x = torch.randn(2, 3, 128, 128)
    eva = EVA(eva_config('eva_tiny', patch_size=16, depth=2, img_size=128)).eval()
    blocks = [Block(eva.config, 0.0) for _ in range(2)]
    for b, ours in zip(blocks, net.blocks):
        b.load_state_dict({k: v for k, v in ours.state_dict().items() if 'rel_pos' not in k})
    tokens = net.patch_embed(x)
    pos = F.interpolate(net.pos_embed[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2), size=(8, 8), mode='bicubic',
                        align_corners=False).flatten(2).transpose(1, 2)
    ref = tokens + pos
    for b in blocks:
        ref = b(ref)
    out = net(x)  # (B, D, 8, 8)
    torch.testing.assert_close(out.flatten(2).transpose(1, 2), ref, atol=1e-5, rtol=1e-5)


def test_windowed_block_equals_the_block_on_each_window_cut_by_hand():
    torch.manual_seed(0)
    det = tiny(img_size=128, window=4, global_blocks=())
    net = ViTDet(det.backbone, det).eval()
    randomise_rel_pos(net)
    blk = net.blocks[0]
    x = torch.randn(2, 8, 8, 64)
    out = blk(x)
    blk.window = 0  # the same block, attending over whatever grid it is given: here one 4 x 4 window at a time
    for i in range(2):
        for j in range(2):
            win = x[:, 4 * i:4 * i + 4, 4 * j:4 * j + 4]
            torch.testing.assert_close(out[:, 4 * i:4 * i + 4, 4 * j:4 * j + 4], blk(win), atol=1e-5, rtol=1e-5)


def test_window_partition_pads_and_round_trips():
    x = torch.randn(2, 7, 10, 3)
    w, padded = window_partition(x, 4)
    assert padded == (8, 12) and w.shape == (2 * 2 * 3, 4, 4, 3)
    assert torch.equal(w[1], x[0, 0:4, 4:8])  # window (0, 1) of image 0: rows 0-3, columns 4-7
    assert torch.equal(w[5, 3], torch.zeros(4, 3))  # window (1, 2): row 7 is padding
    assert torch.equal(window_unpartition(w, 4, padded, (7, 10)), x)


def test_relative_position_term_equals_a_per_pair_computation():
    torch.manual_seed(0)
    cfg = eva_config('eva_tiny', patch_size=16)
    attn = RelPosAttention(cfg, 5).eval()
    randomise_rel_pos(attn)
    attn.q_bias.data.normal_()
    attn.v_bias.data.normal_()
    H, W, D, nh = 5, 3, 64, 4  # a non-square grid: the w table (built for 5) is resized to 3 linearly
    x = torch.randn(1, H, W, D)
    q, k, v = (t[0] for t in attn.heads(x.reshape(1, H * W, D)))  # (nh, N, hd)
    Rh, Rw = rel_pos_table(attn.rel_pos_h, H, H), rel_pos_table(attn.rel_pos_w, W, W)
    assert torch.equal(Rh[4, 1], attn.rel_pos_h[4 - 1 + 4])  # offset +3: row 3 + (S - 1)
    out = torch.zeros(nh, H * W, D // nh)
    for n in range(nh):
        logits = torch.zeros(H * W, H * W)
        for i in range(H * W):
            for j in range(H * W):
                (hi, wi), (hj, wj) = divmod(i, W), divmod(j, W)
                logits[i, j] = (q[n, i] @ k[n, j]) / math.sqrt(D // nh) + q[n, i] @ Rh[hi, hj] + q[n, i] @ Rw[wi, wj]
        out[n] = logits.softmax(-1) @ v[n]
    ref = attn.proj(out.transpose(0, 1).reshape(H * W, D))
    torch.testing.assert_close(attn(x).reshape(H * W, D), ref, atol=1e-5, rtol=1e-4)


def test_beit_table_resize_is_eva01s_1536_evaluation():
    """EVA-01's get_rel_pos with interp_type='beit' (its 1536 configs), transcribed: per channel, scipy's cubic
    interp1d through the rows at offsets -(1 + q + ...), ..., -1, 0, 1, ..., extrapolated, read at -95 ... 95 (the
    global blocks' 159 rows at 1280 -> 191 at 1536). Ours, one matrix product, equals it; a cubic is kept exactly."""
    from scipy import interpolate
    torch.manual_seed(0)
    table = torch.randn(159, 8)
    q, dis, cur = 1.0903078, [], 1
    for i in range(159 // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    x = [-d for d in reversed(dis)] + [0] + dis
    dx = np.arange(-95.0, 95.1, 1.0)
    ref = torch.cat([torch.Tensor(interpolate.interp1d(x, table[:, i].numpy(), kind='cubic',
                                                       fill_value='extrapolate')(dx)).view(-1, 1) for i in range(8)], 1)
    got = rel_pos_table(table, 96, 96, 'beit')  # (96, 96, 8): query i, key j -> row i - j + 95
    torch.testing.assert_close(got[95, 0], ref[190])
    torch.testing.assert_close(got[0, 95], ref[0])
    torch.testing.assert_close(got[torch.arange(96), torch.arange(96)], ref[95].expand(96, 8))
    assert torch.equal(rel_pos_table(table, 80, 80, 'beit'), rel_pos_table(table, 80, 80))  # its own grid: untouched
    cubic = torch.tensor([[0.5 + 0.1 * v - 0.02 * v ** 2 + 1e-6 * v ** 3] for v in x], dtype=torch.float64)
    hand = torch.tensor([[0.5 + 0.1 * v - 0.02 * v ** 2 + 1e-6 * v ** 3] for v in dx], dtype=torch.float64)
    torch.testing.assert_close(rel_pos_table(cubic, 96, 96, 'beit')[:, 0], hand[95 + torch.arange(96)])
    net = ViTDet(eva_config('eva_tiny', img_size=224, patch_size=16, depth=2), tiny(rel_pos_interp='beit'))
    assert [blk.attn.interp for blk in net.blocks] == ['beit', 'beit']  # det_seg.py's rel_pos_interp reaches them


def test_pyramid_strides_and_shapes():
    det = tiny(img_size=128)
    p = Backbone(det.backbone, det).eval()(torch.randn(1, 3, 128, 128))
    assert {k: tuple(v.shape) for k, v in p.items()} == {f'p{i}': (1, 32, 128 >> i, 128 >> i) for i in range(2, 7)}


def test_anchors_are_torchvisions_unrounded_and_box_coding_is_detectron2s():
    sizes, ratios = ((32,), (64,)), ((0.5, 1.0, 2.0),) * 2
    fmaps = [torch.zeros(1, 8, 4, 4), torch.zeros(1, 8, 2, 2)]
    images = ImageList(torch.zeros(1, 3, 64, 64), [(64, 64)])
    ours, tv = Anchors(sizes, ratios)(images, fmaps)[0], AnchorGenerator(sizes, ratios)(images, fmaps)[0]
    assert ours.shape == tv.shape and (ours - tv).abs().max() <= 0.5
    w, h = 32 / math.sqrt(0.5), 32 * math.sqrt(0.5)  # ratio h / w = 0.5, area 32^2, centred on (0, 0)
    torch.testing.assert_close(ours[0], torch.tensor([-w / 2, -h / 2, w / 2, h / 2]))
    torch.testing.assert_close(ours[3 * 5], ours[0] + torch.tensor([16.0, 16, 16, 16]))  # cell (1, 1): stride 16
    model = CascadeMaskRCNN(tiny())
    coder = model.box_coders[1]  # stage 2: weights (20, 20, 10, 10)
    p, g = torch.tensor([[10.0, 20, 50, 40]]), torch.tensor([[12.0, 18, 60, 44]])
    d = coder.encode_single(g, p)
    hand = [20 * (36 - 30) / 40, 20 * (31 - 30) / 20, 10 * math.log(48 / 40), 10 * math.log(26 / 20)]
    torch.testing.assert_close(d[0], torch.tensor(hand))
    torch.testing.assert_close(coder.decode_single(d, p)[0], g[0], atol=1e-4, rtol=0)


def box_with_iou(iou):
    """A box of the same height as (0, 0, 100, 100), shifted right so that its IoU with it is `iou`."""
    s = 100 * (1 - iou) / (1 + iou)  # overlap (100 - s) x 100 over union (100 + s) x 100
    return [s, 0.0, 100 + s, 100.0]


def test_rpn_keeps_proposals_of_any_positive_side():
    """detectron2's find_top_rpn_proposals drops boxes of side <= 0 only (torchvision's RPN: side < 1e-3 px)."""
    rpn = CascadeMaskRCNN(tiny()).proposal_generator.eval()
    boxes = torch.tensor([[[10.0, 10, 10.0005, 30], [40, 40, 40, 60], [70, 70, 90, 90]]])  # 5e-4 wide, 0 wide, normal
    kept, _ = rpn.filter_proposals(boxes, torch.tensor([[3.0], [2.0], [1.0]]), [(128, 128)], [3])
    assert kept[0].tolist() == boxes[0, [0, 2]].tolist()


def test_each_cascade_stage_labels_at_its_iou():
    target = {'boxes': torch.tensor([[0.0, 0, 100, 100]]), 'labels': torch.tensor([2])}
    boxes = torch.tensor([box_with_iou(v) for v in (0.45, 0.55, 0.65, 0.75)])
    torch.testing.assert_close(box_iou(target['boxes'], boxes)[0], torch.tensor([0.45, 0.55, 0.65, 0.75]))
    for iou, expected in ((0.5, [4, 2, 2, 2]), (0.6, [4, 4, 2, 2]), (0.7, [4, 4, 4, 2])):
        labels, gt, idx = match(boxes, target, iou, background=4)
        assert labels.tolist() == expected
        assert idx.tolist() == [0 if e == 2 else -1 for e in expected]
    labels, _, idx = match(boxes, {'boxes': torch.zeros(0, 4), 'labels': torch.zeros(0, dtype=torch.long)}, 0.5, 4)
    assert labels.tolist() == [4] * 4 and idx.tolist() == [-1] * 4


def naive_soft_nms(boxes, scores, iou, min_score):
    """mmcv's loop, one class: keep the highest, decay the overlapping others, drop those under min_score."""
    boxes, scores, idx = boxes.tolist(), scores.tolist(), list(range(len(scores)))
    alive = [i for i in idx if scores[i] >= min_score]
    kept = []
    while alive:
        best = max(alive, key=lambda i: scores[i])
        kept.append((best, scores[best]))
        alive.remove(best)
        for i in list(alive):
            o = box_iou(torch.tensor([boxes[best]]), torch.tensor([boxes[i]])).item()
            if o >= iou:  # mmcv's softnms (linear): ovr >= iou_threshold
                scores[i] *= 1 - o
            if scores[i] < min_score:
                alive.remove(i)
    return kept


def test_soft_nms_equals_a_naive_loop_per_class_and_never_mixes_classes():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(60, 2, generator=g) * 40
    boxes = torch.cat((xy, xy + 20 + torch.rand(60, 2, generator=g) * 20), 1)
    scores = torch.rand(60, generator=g)
    classes = torch.randint(0, 3, (60,), generator=g)
    boxes[classes == 2] = boxes[classes == 2][0]  # class 2: identical boxes, heavily decayed, but only by each other
    keep, decayed = soft_nms(boxes, scores, classes, iou=0.3, min_score=0.05)
    got = sorted(zip(keep.tolist(), decayed.tolist()))
    want = []
    for c in range(3):
        idx = (classes == c).nonzero().squeeze(1)
        want += [(idx[i].item(), s) for i, s in naive_soft_nms(boxes[idx], scores[idx], 0.3, 0.05)]
    assert [k for k, _ in got] == [k for k, _ in sorted(want)]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in sorted(want)], rtol=1e-5)
    # IoU exactly at the threshold decays (mmcv), in float32 as the boxes are: [0, 0, 10, 10] and [0, 0, 10, 5] -> 0.5
    keep1, at = soft_nms(torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 5]]), torch.tensor([0.9, 0.8]), torch.zeros(2),
                         iou=0.5)
    assert keep1.tolist() == [0, 1] and at.tolist() == pytest.approx([0.9, 0.4])
    keep2, _ = soft_nms(boxes, scores, classes, iou=0.3, min_score=0.05, per_class=2)  # the first two of each class
    per_class = {c: [k for k in keep.tolist() if classes[k] == c][:2] for c in range(3)}
    assert sorted(keep2.tolist()) == sorted(sum(per_class.values(), []))


def test_maskness_by_hand():
    m = torch.zeros(2, 28, 28)
    m[0, :2, :2] = torch.tensor([[0.9, 0.7], [0.4, 0.6]])  # above 0.5: 0.9, 0.7, 0.6 -> mean 0.7333
    m[1] = 0.3  # nothing above: 0
    torch.testing.assert_close(maskness(m, 0.5), torch.tensor([2.2 / 3, 0.0]))


def test_lsj_keeps_image_boxes_and_masks_consistent(tmp_path):
    """Object pixels are painted a colour of their own: after flip / scale / crop every kept mask's interior is still
    its colour in the image, its box is its mask's box, and dropped objects are the ones cropped away."""
    img = torch.full((3, 90, 120), 60, dtype=torch.uint8)
    masks = torch.zeros(3, 90, 120, dtype=torch.bool)
    masks[0, 10:40, 5:50], masks[1, 50:85, 60:115], masks[2, 5:30, 80:118] = True, True, True
    colours = torch.tensor([[250, 0, 0], [0, 250, 0], [0, 0, 250]], dtype=torch.uint8)
    for m, c in zip(masks, colours):
        img[:, m] = c[:, None]
    target = {'boxes': torch.stack([masks_to_box(m) for m in masks]), 'labels': torch.tensor([0, 1, 2]),
              'masks': masks}
    lsj = LargeScaleJitter(96, scale=(0.5, 2.0))
    seen = set()
    for seed in range(40):
        torch.manual_seed(seed)
        out, t = lsj((img, target))
        assert out.shape[1] <= 96 and out.shape[2] <= 96 and t['masks'].shape[1:] == out.shape[1:]
        seen.add(len(t['labels']))
        for box, m, label in zip(t['boxes'], t['masks'], t['labels']):
            assert torch.equal(box, masks_to_box(m))
            inner = F.max_pool2d((~m)[None, None].float(), 5, 1, 2)[0, 0] == 0  # 2 px from any edge
            if inner.any():
                colour = out[:, inner].float().mean(1)
                assert (colour - colours[label].float()).abs().max() < 30
    assert seen - {3}, "the crops never dropped an object: the test did not exercise the crop"
    # the masks are resized as detectron2 resizes bitmaps: PIL's NEAREST (torch's nearest modes differ on some pixels)
    rng = np.random.default_rng(0)
    blobs = torch.from_numpy(rng.random((2, 90, 120)) > 0.5)
    _, t = LargeScaleJitter(96, train=False)((img, {**target, 'masks': blobs, 'labels': torch.tensor([0, 1])}))
    pil = [np.asarray(Image.fromarray(m.numpy().astype(np.uint8)).resize((96, 72), Image.NEAREST)) for m in blobs]
    assert np.array_equal(t['masks'].numpy(), np.stack(pil).astype(bool))
    test = LargeScaleJitter(96, train=False)
    out, t = test((img, target))
    assert out.shape[1:] == (72, 96) and t['scale'] == (0.8, 0.8) and t['orig_size'] == (90, 120)
    torch.testing.assert_close(t['boxes'], target['boxes'] * 0.8)


def detectron2_lsj_polygons(polygons, W, H, flip, h, w, left, top, size):
    """detectron2's LSJ on an image's polygons as its code does it, step by step: HFlipTransform.apply_coords,
    ResizeTransform.apply_coords, fvcore's CropTransform.apply_polygons (shapely), PolygonMasks.get_bounding_boxes and
    filter_empty_instances -> (kept instances' polygons, their boxes, the keep flags)."""
    import shapely.geometry as geometry
    window = geometry.box(left, top, left + size, top + size).buffer(0.0)
    out, boxes = [], []
    for instance in polygons:
        cropped = []
        for p in instance:
            p = p.copy()
            if flip:
                p[:, 0] = W - p[:, 0]
            p[:, 0] = p[:, 0] * (w * 1.0 / W)
            p[:, 1] = p[:, 1] * (h * 1.0 / H)
            cut = geometry.Polygon(p).buffer(0.0).intersection(window)
            if cut.is_empty:
                continue
            for piece in (cut.geoms if isinstance(cut, geometry.base.BaseMultipartGeometry) else [cut]):
                if isinstance(piece, geometry.Polygon) and piece.is_valid:
                    q = np.asarray(piece.exterior.coords)[:-1]
                    q[:, 0] -= left
                    q[:, 1] -= top
                    cropped.append(q)
        lo, hi = torch.tensor([math.inf, math.inf]), torch.zeros(2)
        for q in cropped:
            xy = torch.from_numpy(q).float()
            lo, hi = torch.min(lo, xy.min(0).values), torch.max(hi, xy.max(0).values)
        out.append(cropped)
        boxes.append(torch.cat([lo, hi]))
    boxes = torch.stack(boxes)
    keep = ((boxes[:, 2] - boxes[:, 0]) > 1e-5) & ((boxes[:, 3] - boxes[:, 1]) > 1e-5)
    keep &= torch.tensor([len(c) > 0 for c in out])
    return [c for c, k in zip(out, keep) if k], boxes[keep], keep


def test_lsj_cuts_polygons_as_detectron2_and_they_stay_on_their_objects():
    """Polygon instances (a rectangle, a U whose arms a crop can part, a triangle, a self-crossing bow tie) through LSJ:
    the polygons, boxes and kept instances equal detectron2's code run on the same draws, and each kept instance's
    polygons rasterised on the output cover pixels of its own colour; by hand, the crop of a U across its arms."""
    from data import crop_polygons, polygons_box, polygons_rle
    shapes = [[(5, 10), (50, 10), (50, 40), (5, 40)], [(60, 50), (115, 50), (115, 85), (100, 85), (100, 62),
              (75, 62), (75, 85), (60, 85)], [(80, 5), (118, 5), (99, 30)], [(10, 50), (40, 80), (40, 50), (10, 80)]]
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0)]
    pil = Image.new('RGB', (120, 90), (60, 60, 60))
    for s, c in zip(shapes, colours):
        ImageDraw.Draw(pil).polygon(s, fill=c)
    img = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)
    polygons = [[np.array(s, np.float64)] for s in shapes]
    target = {'boxes': torch.stack([polygons_box(ps) for ps in polygons]), 'labels': torch.arange(4),
              'polygons': polygons}
    lsj, seen = LargeScaleJitter(96, scale=(0.5, 2.0)), set()
    for seed in range(40):
        torch.manual_seed(seed)
        out, t = lsj((img, target))
        torch.manual_seed(seed)  # LSJ's draws in their order: flip, scale, crop offset
        flip, s = bool(torch.rand(()) < 0.5), 0.5 + 1.5 * torch.rand(()).item()
        r = min(96 * s / 90, 96 * s / 120)
        h, w = round(90 * r), round(120 * r)
        u = torch.rand(()).item()
        top, left = round((h - min(h, 96)) * u), round((w - min(w, 96)) * u)
        ref, boxes, keep = detectron2_lsj_polygons(polygons, 120, 90, flip, h, w, left, top, 96)
        assert torch.equal(t['boxes'], boxes) and torch.equal(t['labels'], torch.arange(4)[keep])
        assert [[p.tolist() for p in ps] for ps in t['polygons']] == [[p.tolist() for p in ps] for ps in ref]
        seen.add(len(t['labels']))
        H, W = out.shape[1:]
        for ps, label in zip(t['polygons'], t['labels']):
            m = torch.from_numpy(mask_util.decode(polygons_rle(ps, H, W))).bool()
            inner = F.max_pool2d((~m)[None, None].float(), 5, 1, 2)[0, 0] == 0  # 2 px from any edge
            if inner.any() and label < 3:  # (the bow tie's two lobes meet at a point: its colour is checked nowhere)
                colour = out[:, inner].float().mean(1)
                assert (colour - torch.tensor(colours[label]).float()).abs().max() < 30
    assert seen - {4}, "the crops never dropped an object: the test did not exercise the crop"
    # by hand: a U (arms x 0-10 and 20-30 over y 0-20, its base y 20-30) in the window x 0-30, y -15-15 leaves its
    # arms' tops as two polygons, shifted by the window's corner (0, -15)
    u_shape = np.array([[0., 0], [10, 0], [10, 20], [20, 20], [20, 0], [30, 0], [30, 30], [0, 30]])
    pieces = crop_polygons([u_shape], 0, -15, 30)
    assert sorted(polygons_box([p]).tolist() for p in pieces) == [[0, 15, 10, 30], [20, 15, 30, 30]]
    assert polygons_box(crop_polygons([u_shape], 40, 0, 25)).tolist() == [math.inf, math.inf, 0, 0]  # nothing left


def test_polygon_mask_targets_are_detectron2s_rasterised_in_each_proposal():
    """polygons_in_boxes: by hand (a polygon filling its box, one filling its left half, a box under 0.1 px scaled by
    1 / 0.1), and the same instance as polygons and as a bitmap cut by ROIAlign agree but for their edges."""
    from det_model import polygons_in_boxes
    from torchvision.ops import roi_align
    square = [np.array([[10., 10], [38, 10], [38, 38], [10, 38]])]
    half = [np.array([[10., 10], [24, 10], [24, 38], [10, 38]])]
    m = polygons_in_boxes([square, half, square], torch.tensor([[10., 10, 38, 38]] * 2 + [[10, 10, 10.05, 38]]), 28)
    assert m.shape == (3, 28, 28) and m[0].all()
    assert m[1][:, :14].all() and not m[1][:, 14:].any()
    assert m[2].all(1).tolist() == [True] * 28  # x scaled by 28 / 0.1: the first column alone spans the box
    from data import polygons_rle
    blob = [np.array([[20., 15], [70, 10], [80, 60], [45, 75], [15, 50]]), np.array([[85., 70], [95, 70], [90, 85]])]
    bitmap = torch.from_numpy(mask_util.decode(polygons_rle(blob, 96, 96))).float()
    boxes = torch.tensor([[15., 10, 80, 75], [10, 5, 60, 50], [30, 20, 97, 90]])
    rois = torch.cat([torch.zeros(3, 1), boxes], 1)
    cut = roi_align(bitmap[None, None], rois, 28, 1.0, 0, aligned=True)[:, 0] >= 0.5
    agree = (polygons_in_boxes([blob] * 3, boxes, 28) == cut).float().mean()
    assert 0.95 < agree < 1.0, agree


def test_ground_truth_as_predictions_scores_ap_one(tmp_path):
    """The synthetic json read back by CocoDetection (RLE -> masks), the masks re-encoded as predictions: COCOeval
    (faster-coco-eval) gives box and mask AP 1.0; one box moved off gives less."""
    from faster_coco_eval import COCO, COCOeval_faster
    from faster_coco_eval.core import mask as mask_util
    folder = write_synthetic_scenes(str(tmp_path / 'scenes'), 8, 16, img_size=64)
    json_path = os.path.join(folder, 'instances_val.json')
    src = CocoDetection(json_path, folder, train=False)
    results = []
    for i in range(len(src)):
        img, t = src.load(i)
        assert t['masks'].shape[1:] == img.shape[1:]
        for b, c, m in zip(t['boxes'].tolist(), t['labels'].tolist(), t['masks']):
            assert torch.equal(torch.tensor(b), masks_to_box(m))  # the json's boxes are the visible pixels'
            rle = mask_util.encode(np.asfortranarray(m.numpy().astype(np.uint8)))
            results.append({'image_id': t['image_id'], 'category_id': src.categories[c]['id'], 'score': 0.9,
                            'bbox': [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                            'segmentation': {'size': rle['size'], 'counts': rle['counts'].decode()}})
    gt = COCO(json_path)
    for kind in ('bbox', 'segm'):
        E = COCOeval_faster(gt, gt.loadRes(results), kind, print_function=lambda *a: None)
        E.evaluate(), E.accumulate(), E.summarize()
        assert E.stats[0] == pytest.approx(1.0), kind
    results[0]['bbox'][0] += 30
    E = COCOeval_faster(gt, gt.loadRes(results), 'bbox', print_function=lambda *a: None)
    E.evaluate(), E.accumulate(), E.summarize()
    assert E.stats[0] < 1.0


def test_synthetic_scenes_with_a_recipes_class_count(tmp_path):
    """LVIS's 1203 classes (bench.py's memory rows use the recipe's count): the same scenes as with the 10 shape
    kinds, the json's categories 1203, each image_count the images showing the class (counted here from the
    annotations), at least 1; CocoDetection reads them, and the federated loss's frequencies are those counts."""
    ten = write_synthetic_scenes(str(tmp_path / 'ten'), 6, 2, img_size=64, num_classes=10)
    lvis = write_synthetic_scenes(str(tmp_path / 'lvis'), 6, 2, img_size=64, num_classes=1203)
    a, b = (json.load(open(os.path.join(f, 'instances_train.json'))) for f in (ten, lvis))
    assert a['annotations'] == b['annotations'] and a['categories'] == b['categories'][:10]
    assert all(open(os.path.join(ten, 'train', n), 'rb').read() == open(os.path.join(lvis, 'train', n), 'rb').read()
               for n in sorted(os.listdir(os.path.join(ten, 'train'))))
    shown = {}
    for img in {(x['image_id'], x['category_id']) for x in b['annotations']}:
        shown[img[1]] = shown.get(img[1], 0) + 1
    assert len(b['categories']) == 1203 and b['categories'][10]['name'] == 'class 10'
    assert [c['image_count'] for c in b['categories']] == [max(shown.get(k, 0), 1) for k in range(1, 1204)]
    assert max(shown) <= 10 and sum(shown.values()) > 6  # only the shape kinds are shown
    src = CocoDetection(os.path.join(lvis, 'instances_train.json'), lvis)
    assert len(src.categories) == 1203
    assert src.image_counts().tolist() == [c['image_count'] for c in b['categories']]


def test_bad_annotations_are_skipped_named_and_counted(tmp_path, capsys):
    folder = write_synthetic_scenes(str(tmp_path / 'scenes'), 4, 4, img_size=64)
    d = json.load(open(os.path.join(folder, 'instances_train.json')))
    a = d['annotations']
    a[0]['bbox'] = [10, 10, 0, 5]  # degenerate box
    a[1]['segmentation'] = [[1, 2, 3, 4]]  # a 2-point polygon
    a[2]['category_id'] = 99  # unknown category
    del a[3]['bbox']  # no box, a box of 3 numbers, of a string: that annotation only is skipped, its image kept
    a[4]['bbox'] = a[4]['bbox'][:3]
    a[5]['bbox'][1] = 'ten'
    bad_json = tmp_path / 'bad.json'
    bad_json.write_text(json.dumps(d))
    src = CocoDetection(str(bad_json), folder)
    dropped = sum(src.load(i)[1]['dropped'] for i in range(len(src)))
    assert dropped == 6 and len(src) == 4
    err = capsys.readouterr().err
    assert f"annotation {a[0]['id']}" in err and 'empty box' in err and 'polygon' in err and 'category 99' in err
    assert err.count('no bbox of 4 numbers') == 3
    del d['annotations'][0]['image_id']  # an annotation of no image: the json is refused, in one line
    bad_json.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="bad.json: an entry of 'annotations' without an image_id"):
        CocoDetection(str(bad_json), folder)
    (tmp_path / 'not_coco.json').write_text('{"images": []}')
    with pytest.raises(ValueError, match='not_coco.json is not a COCO-format instances json'):
        CocoDetection(str(tmp_path / 'not_coco.json'), folder)


def test_the_json_index_gives_what_the_json_says(tmp_path):
    """CocoDetection's columnar index (data.index_coco) against the json read plainly: annotations shuffled over the
    images, an image without any, one with crowd annotations only, LVIS's coco_url, unsorted category ids, polygons
    and RLE; each image's boxes (clipped, json order), labels and masks, the training filter, the class counts."""
    folder = write_synthetic_scenes(str(tmp_path / 'scenes'), 6, 4, img_size=64)
    d = json.load(open(os.path.join(folder, 'instances_train.json')))
    random.Random(0).shuffle(d['annotations'])
    d['categories'] = [{k: v for k, v in c.items() if k != 'image_count'} for c in d['categories'][::-1]]  # counted
    d['images'][1]['coco_url'] = 'http://images.cocodataset.org/' + d['images'][1].pop('file_name')
    d['annotations'] = [a for a in d['annotations'] if a['image_id'] != d['images'][2]['id']]
    assert d['annotations'][0]['image_id'] == d['images'][0]['id']  # the polygon below is on an image trained on
    for a in d['annotations']:  # (the annotations' ids: 1, 2, ...)
        a['iscrowd'] = int(a['image_id'] == d['images'][3]['id'])
        a['bbox'][2] += 70 * (a['id'] % 2)  # out of the image: clipped
    assert any(a['image_id'] == d['images'][4]['id'] for a in d['annotations'])
    for a in d['annotations']:  # a polygon among the RLEs (image 1), an image of polygons only (image 5)
        x, y, w, h = a['bbox']
        if a['id'] == d['annotations'][0]['id'] or a['image_id'] == d['images'][4]['id']:
            a['segmentation'] = [[x, y, x + w, y, x + w, y + h, x, y + h], [x, y, x + 1, y, x, y + 1]]
    (tmp_path / 'odd.json').write_text(json.dumps(d))
    cats = sorted(c['id'] for c in d['categories'])
    mixed = 0
    for train in (True, False):
        src = CocoDetection(str(tmp_path / 'odd.json'), folder, train=train)
        images = [im for im in d['images'] if not train or any(a['image_id'] == im['id'] and not a['iscrowd']
                                                               for a in d['annotations'])]
        assert len(src) == len(images) == 6 - 2 * train
        for i, im in enumerate(images):
            img, t = src.load(i)
            anns = [a for a in d['annotations'] if a['image_id'] == im['id'] and not a['iscrowd']]
            boxes = [[x, y, min(x + w, 64), min(y + h, 64)] for x, y, w, h in (a['bbox'] for a in anns)]
            assert src.path(i) == os.path.join(folder, im.get('file_name', 'train/' + f"{im['id'] - 1:05d}.png"))
            assert t['image_id'] == im['id'] and t['boxes'].tolist() == boxes
            assert t['labels'].tolist() == [cats.index(a['category_id']) for a in anns]
            if all(isinstance(a['segmentation'], list) for a in anns):  # polygons as they are, in (x, y) rows
                assert 'masks' not in t and len(t['polygons']) == len(anns)
                for ps, a in zip(t['polygons'], anns):
                    assert [p.tolist() for p in ps] == [np.reshape(q, (-1, 2)).tolist() for q in a['segmentation']]
                continue
            mixed += any(isinstance(a['segmentation'], list) for a in anns)
            masks = [mask_util.decode(coco_rle(a['segmentation'], 64, 64)) for a in anns]
            assert t['masks'].shape == (len(anns), 64, 64) and all((m == t['masks'][k].numpy()).all()
                                                                    for k, m in enumerate(masks))
            assert 'polygons' not in t
    assert mixed == 2  # the polygon among RLEs, rasterised with them, in both splits
    shown = {(a['image_id'], a['category_id']) for a in d['annotations']}
    assert src.image_counts().tolist() == [sum((i, c) in shown for i in range(1, 7)) for c in cats]


def test_a_val_json_takes_the_training_labels_by_category_name(tmp_path):
    """The same category names under other ids (shuffled) in the val json: each annotation gets the label its name
    has in training, and a prediction of label k maps back to the val json's id of that name; other names: refused."""
    folder = write_synthetic_scenes(str(tmp_path / 'scenes'), 4, 6, img_size=64)
    train = CocoDetection(os.path.join(folder, 'instances_train.json'), folder)
    names = [c['name'] for c in train.categories]
    d = json.load(open(os.path.join(folder, 'instances_val.json')))
    new_id = {c['id']: 100 - c['id'] for c in d['categories']}  # reversed order of ids
    for c in d['categories']:
        c['id'] = new_id[c['id']]
    for a in d['annotations']:
        a['category_id'] = new_id[a['category_id']]
    path = tmp_path / 'val_shuffled.json'
    path.write_text(json.dumps(d))
    val = CocoDetection(str(path), folder, train=False, classes=names)
    name_of = {c['id']: c['name'] for c in d['categories']}
    for i in range(len(val)):
        t = val.target(i, 64, 64)
        anns = [a for a in d['annotations'] if a['image_id'] == t['image_id'] and not a['iscrowd']]
        assert [names[k] for k in t['labels'].tolist()] == [name_of[a['category_id']] for a in anns]
    assert [name_of[val.categories[k]['id']] for k in range(len(names))] == names  # label -> the val json's id
    img, cls = val.image_classes()
    shown = {(a['image_id'], names.index(name_of[a['category_id']])) for a in d['annotations']}
    assert set(zip(img.tolist(), cls.tolist())) == shown
    d['categories'][0]['name'] = 'hexagon'
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="category names are not the training json's"):
        CocoDetection(str(path), folder, train=False, classes=names)


def test_federated_loss_by_hand():
    """detectron2's draw: the classes present, the background among them (it counts toward the number, as in EVA-01's
    runs), then classes drawn by weight; only weighted classes can be drawn, so each draw below is certain."""
    weight = torch.tensor([1.0, 0.0, 4.0, 9.0, 0.0])
    for _ in range(20):
        cls = fed_loss_classes(torch.tensor([0, 0, 3, 5, 5]), 4, 5, weight)  # 5 = background
        assert len(cls) == 4 and set(cls[:3].tolist()) == {0, 3, 5} and cls[3].item() == 2
        assert set(fed_loss_classes(torch.tensor([0, 3, 5]), 3, 5, weight).tolist()) == {0, 3, 5}  # none drawn
    model = CascadeMaskRCNN(tiny(sigmoid_ce=True, fed_classes=4))
    predictor = model.roi_heads.box_predictor[1]
    predictor.fed_loss_cls_weights.copy_(weight[:4])
    logits, labels = torch.randn(5, 5), torch.tensor([0, 3, 4, 4, 0])  # 4 = background
    loss = model.classification_loss(logits, labels, predictor)
    target = F.one_hot(labels, 5)[:, :4].float()
    # classes 0, 3 and the background present, class 2 drawn: BCE over classes 0, 2, 3, summed, / 5 boxes
    hand = sum(F.binary_cross_entropy_with_logits(logits[i, c], target[i, c]) for i in range(5) for c in (0, 2, 3))
    torch.testing.assert_close(loss, hand / 5)


def test_detector_trains_and_detects_in_float32_boxes():
    """One forward per mode on the tiny detector: every loss term finite, the outputs' shapes, boxes in float32."""
    torch.manual_seed(0)
    model = CascadeMaskRCNN(tiny(img_size=64))
    x = torch.randn(2, 3, 64, 64)
    masks = torch.zeros(2, 1, 64, 64, dtype=torch.bool)
    masks[:, 0, 10:40, 20:50] = True
    targets = [{'boxes': torch.tensor([[20.0, 10, 50, 40]]), 'labels': torch.tensor([1]), 'masks': masks[i]}
               for i in range(2)]
    losses = model(x, [(64, 64), (50, 60)], targets)
    assert set(losses) == {'loss_rpn_cls', 'loss_rpn_loc', 'loss_mask'} | {f'loss_{k}_stage{s}' for k in
                                                                           ('cls', 'box_reg') for s in range(3)}
    assert all(v.isfinite() and v.dtype == torch.float32 for v in losses.values())
    # two pixel-aligned rectangles as polygons and as bitmaps: the same 28x28 targets either way, so the same mask loss
    # on the same proposals (an instance's polygons taken for another's would change it)
    rects = [(20, 10, 50, 40), (2, 30, 22, 60)]
    both = {'boxes': torch.tensor(rects, dtype=torch.float32), 'labels': torch.tensor([1, 3])}
    bitmaps = torch.zeros(2, 64, 64, dtype=torch.bool)
    for m, (x1, y1, x2, y2) in zip(bitmaps, rects):
        m[y1:y2, x1:x2] = True
    polygons = [[np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], np.float64)] for x1, y1, x2, y2 in rects]
    with torch.no_grad():
        mask_loss = []
        for kind in ({'masks': bitmaps}, {'polygons': polygons}, {'polygons': polygons[::-1]}):
            torch.manual_seed(1)
            mask_loss.append(model(x, [(64, 64), (64, 64)], [both | kind] * 2)['loss_mask'])
    assert mask_loss[0] == mask_loss[1] != mask_loss[2]
    sum(losses.values()).backward()
    assert model.backbone.net.patch_embed.proj.weight.grad is None  # frozen
    assert model.backbone.net.blocks[0].attn.rel_pos_h.grad is not None
    model.eval()
    out = model(x, [(64, 64), (50, 60)])
    assert out[1]['boxes'].dtype == torch.float32 and out[1]['masks'].shape[1:] == (28, 28)
    assert (out[1]['boxes'][:, 2] <= 60).all() and (out[1]['boxes'][:, 3] <= 50).all()  # clipped to the image


def test_backbone_loads_an_encoder_and_layer_decay_groups(tmp_path):
    """An EVA checkpoint at patch 14 (a MIM export) loads into the backbone (kernel and pos_embed resized as psz14to16);
    only the relative-position tables are new. Layer decay: embeddings 0, block i at i + 1, the rest at depth + 1."""
    eva = EVA(eva_config('eva_tiny', img_size=56, patch_size=14, depth=2, pooling='cls'))
    torch.save({'model': eva.state_dict()}, tmp_path / 'eva.pt')
    model = CascadeMaskRCNN(tiny())
    info = load_detector(model, str(tmp_path / 'eva.pt'))
    assert sorted(info['missing']) == sorted(k for k in model.backbone.net.state_dict() if 'rel_pos' in k)
    assert 'cls_token' in info['dropped'] and 'patch_embed 14->16' in info['resized']
    groups = param_groups(model, 0.1, 0.5, **LAYER_DECAY)
    scale = {id(p): g['lr_scale'] for g in groups for p in g['params']}
    assert all(g['weight_decay'] == 0.1 for g in groups)
    assert scale[id(model.backbone.net.pos_embed)] == 0.5 ** 3
    assert scale[id(model.backbone.net.blocks[1].norm1.bias)] == 0.5 ** 1
    assert scale[id(model.roi_heads.box_predictor[2].cls_score.weight)] == 1.0
    assert id(model.backbone.net.patch_embed.proj.weight) not in scale  # frozen: in no group


def run(args, env_extra=None, nproc=1):
    threads = {'OMP_NUM_THREADS': '1' if nproc > 1 else os.environ.get('OMP_NUM_THREADS', '2')}
    env = {**threads, **(env_extra or {})}
    return run_stage('det_seg.py', 'config/det_tiny.py', *args, nproc=nproc, env=env).stdout


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    """A shortened demo: trains, evaluates at the end, writes last.pt."""
    d = tmp_path_factory.mktemp('det')
    out = run([f'--out_dir={d}/run', f'--synthetic_dir={d}/scenes', '--max_steps=120', '--lr_steps=(100,)',
               '--warmup_iters=20', '--synthetic_size=256', '--log_interval=10', '--save_interval=100',
               '--keep_ckpts=2'])
    return d, out


def test_demo_learns(demo, check_curves):
    d, out = demo
    ev = json.load(open(d / 'run' / 'eval.json'))
    assert ev['images'] == 32
    # measured at 120 steps (2026-12-03): box AP50 9.4 / mask AP50 9.2 (an untrained detector: 0.0); the full demo's
    # 300 steps reach 35.4 / 33.6 (README)
    assert ev['bbox']['AP50'] > 4 and ev['segm']['AP50'] > 1.5, ev
    rpn = [r['loss_rpn_cls'] for r in log_rows(d / 'run') if 'loss' in r]  # the total rises as proposals find objects
    assert rpn[-1] < 0.3 * rpn[0]
    check_curves(d / 'run', 'eval: bbox', 'eval: segm')


def test_eval_only_on_two_ranks_equals_one(demo):
    """--eval_only of the demo's last.pt gives the training run's final numbers on 1 and 2 ranks, reports the step the
    checkpoint records, and run in the training run's out_dir keeps its eval.json (eval_last.json beside it)."""
    d, _ = demo
    ev = json.load(open(d / 'run' / 'eval.json'))
    assert ev['eval_only'] is False
    for nproc in (1, 2):
        out = d / 'run' if nproc == 2 else d / 'eval1'
        run([f'--out_dir={out}', f'--synthetic_dir={d}/scenes', '--synthetic_size=256', '--eval_only=True',
             f'--init_from={d}/run/last.pt'], nproc=nproc)
        again = json.load(open(out / ('eval_last.json' if nproc == 2 else 'eval.json')))
        assert again['images'] == 32 and again['step'] == ev['step'] > 0 and again['eval_only'] is True
        assert json.load(open(d / 'run' / 'eval.json')) == ev
        for kind in ('bbox', 'segm'):
            assert again[kind] == pytest.approx(ev[kind], abs=1e-6), (nproc, kind)


def test_an_unreadable_val_image_is_counted_not_scored(demo, tmp_path):
    """Samples stands the next image in for an unreadable one; evaluation must not score that stand-in again (its
    detections under the next image's id): with one val image corrupt, the AP is that of the json without it."""
    import shutil
    d, _ = demo
    shutil.copytree(d / 'scenes' / 'val', tmp_path / 'images' / 'val')
    js = json.load(open(d / 'scenes' / 'instances_val.json'))
    gone = js['images'][3]
    (tmp_path / 'images' / gone['file_name']).write_bytes(b'\x89PNG not an image')
    (tmp_path / 'bad.json').write_text(json.dumps(js))
    js['images'] = [im for im in js['images'] if im['id'] != gone['id']]
    js['annotations'] = [a for a in js['annotations'] if a['image_id'] != gone['id']]
    (tmp_path / 'without.json').write_text(json.dumps(js))
    res = {}
    for name in ('bad', 'without'):
        run([f'--out_dir={tmp_path}/{name}', f'--val_json={tmp_path}/{name}.json', f'--val_images={tmp_path}/images',
             '--eval_only=True', f'--init_from={d}/run/last.pt', f'--synthetic_dir={d}/scenes'])
        res[name] = json.load(open(tmp_path / name / 'eval.json'))
    assert res['bad']['unreadable'] == 1 and res['bad']['images'] == res['without']['images'] == 31
    assert res['bad']['bbox'] == res['without']['bbox'] and res['bad']['segm'] == res['without']['segm']


def test_resume_gives_the_same_losses(demo):
    """Steps 101-120 again from the step-100 checkpoint: the same losses as the straight run."""
    d, _ = demo
    import shutil
    shutil.copytree(d / 'run', d / 'resumed', ignore=shutil.ignore_patterns('step120'))
    (d / 'resumed' / 'ckpt' / 'latest').write_text('step100')
    run([f'--out_dir={d}/resumed', f'--synthetic_dir={d}/scenes', '--max_steps=120', '--lr_steps=(100,)',
         '--warmup_iters=20', '--synthetic_size=256', '--log_interval=10', '--save_interval=100'])
    a = {r['step']: r['loss'] for r in log_rows(d / 'run') if 'loss' in r and r['step'] > 100}
    b = {r['step']: r['loss'] for r in log_rows(d / 'resumed') if 'loss' in r and r['step'] > 100}
    assert a.keys() == b.keys() and len(a) == 2
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-4), s


def test_repeat_factors_by_hand_and_the_sampler_repeats_them(tmp_path):
    """4 images: class 0 in all, class 1 in one (f = 1/4). threshold 1: r_0 = max(1, sqrt(1 / 1)) = 1,
    r_1 = sqrt(1 / 0.25) = 2, so the image with class 1 repeats twice and the others once; at threshold 0.75,
    r_1 = sqrt(3): once plus once more 73% of the epochs."""
    images = [{'id': i, 'file_name': f'{i}.png', 'height': 8, 'width': 8} for i in range(4)]
    anns = [{'id': i, 'image_id': i, 'category_id': 1, 'bbox': [0, 0, 4, 4], 'iscrowd': 0} for i in range(4)]
    anns.append({'id': 9, 'image_id': 2, 'category_id': 7, 'bbox': [1, 1, 4, 4], 'iscrowd': 0})
    path = tmp_path / 'lvis.json'
    path.write_text(json.dumps({'images': images, 'annotations': anns,
                                'categories': [{'id': 1, 'name': 'a'}, {'id': 7, 'name': 'b'}]}))
    src = CocoDetection(str(path), str(tmp_path), masks=False)
    torch.testing.assert_close(src.repeat_factors(1.0), torch.tensor([1.0, 1.0, 2.0, 1.0]))
    r = src.repeat_factors(0.75)
    torch.testing.assert_close(r, torch.tensor([1.0, 1.0, math.sqrt(3), 1.0]))
    from data import ResumableSampler
    sampler = ResumableSampler(4, repeat_factors=r)
    assert sampler.n == 5 and len(sampler) == 5  # round(3 + 1.732)
    twice = 0
    for epoch in range(400):
        sampler.set_epoch(epoch)
        idx = list(sampler)
        assert len(idx) == 5 and set(idx) == {0, 1, 2, 3}  # a short draw (image 2 once) is wrapped to 5
        twice += idx.count(2) >= 2 and idx.count(0) == 1  # image 2 drawn twice: nothing wrapped
    assert abs(twice / 400 - (math.sqrt(3) - 1)) < 0.08
    other = ResumableSampler(4, repeat_factors=r)
    other.set_epoch(399)
    assert list(other) == idx  # the epoch's draw depends on (seed, epoch) only


def test_lvis_style_evaluation_scores_only_the_federated_classes(tmp_path):
    """faster-coco-eval's lvis_style, as det_seg's lvis_eval uses it: a detection of a class that is neither in the
    image nor among its negative classes is not scored; one among the negatives is a false positive; APr / APc / APf
    at all_stats[14:17]."""
    from faster_coco_eval import COCO, COCOeval_faster
    folder = write_synthetic_scenes(str(tmp_path / 'scenes'), 4, 8, img_size=64)
    d = json.load(open(os.path.join(folder, 'instances_val.json')))
    for c, f in zip(d['categories'], 'rcff'):
        c['frequency'] = f
    for im in d['images']:
        im['neg_category_ids'], im['not_exhaustive_category_ids'] = [], []
    present = {(a['image_id'], a['category_id']) for a in d['annotations']}
    img, cat = next((im['id'], c['id']) for im in d['images'] for c in d['categories'] if (im['id'], c['id']) not in
                    present)
    path = tmp_path / 'lvis.json'
    results = [{'image_id': a['image_id'], 'category_id': a['category_id'], 'bbox': a['bbox'], 'score': 0.5}
               for a in d['annotations']]
    wrong = {'image_id': img, 'category_id': cat, 'bbox': [0, 0, 20, 20], 'score': 0.9}

    def ap(neg):
        for im in d['images']:
            im['neg_category_ids'] = [cat] if neg and im['id'] == img else []
        path.write_text(json.dumps(d))
        gt = COCO(str(path))
        dts = json.loads(json.dumps(results + [wrong]))  # fresh dicts: the evaluator marks them
        E = COCOeval_faster(gt, gt.loadRes(dts), 'bbox', lvis_style=True, print_function=lambda *a: None)
        E.params.maxDets = [300]
        E.evaluate(), E.accumulate(), E.summarize()
        # with one maxDets: AP, AP50, AP75, APs, APm, APl, AR, 0, 0, ARs, ARm, ARl, AR50, AR75, APr, APc, APf
        return E.all_stats
    unscored, scored = ap(False), ap(True)
    assert unscored[0] == pytest.approx(1.0) and scored[0] < 1.0
    assert len(unscored) >= 17 and all(v == pytest.approx(1.0) or v == -1 for v in unscored[14:17])


def test_a_detector_loads_across_tasks_and_from_detectron2_names(tmp_path):
    """A boxes-only detector of 3 classes trained at 64 px (Objects365's role) into a mask detector of 4 classes at
    128 px (COCO's): relative-position tables resized, cls_score and the mask head new, all else equal. The same file
    with detectron2's RPN-head names (EVA-01's releases) loads the same; a backbone of another width is refused."""
    from dataclasses import replace
    torch.manual_seed(0)
    src = CascadeMaskRCNN(replace(tiny(img_size=64, masks=False), num_classes=3))
    randomise_rel_pos(src)
    sd = {k: v for k, v in src.state_dict().items()}
    d2 = {k.replace('proposal_generator.head.conv.0.0.', 'proposal_generator.rpn_head.conv.conv0.')
           .replace('proposal_generator.head.conv.1.0.', 'proposal_generator.rpn_head.conv.conv1.')
           .replace('proposal_generator.head.cls_logits.', 'proposal_generator.rpn_head.objectness_logits.')
           .replace('proposal_generator.head.bbox_pred.', 'proposal_generator.rpn_head.anchor_deltas.'): v
          for k, v in sd.items()}
    assert sum('rpn_head' in k for k in d2) == 8  # 2 convs, objectness, deltas: weight and bias each
    for name, state in (('ours.pt', {'model': sd}), ('d2.pth', {'model': {**d2, 'pixel_mean': torch.zeros(3)}})):
        torch.save(state, tmp_path / name)
        dst = CascadeMaskRCNN(tiny(img_size=128))
        load_detector(dst, str(tmp_path / name))
        got = dst.state_dict()
        for k, v in sd.items():
            if '.cls_score.' in k:
                assert got[k].shape[0] == 5
            elif 'rel_pos' in k and k.startswith('backbone.net.blocks.1.'):  # global: 2 x 4 - 1 -> 2 x 8 - 1 rows
                ref = F.interpolate(v.T[None], size=15, mode='linear')[0].T
                assert got[k].shape == (15, 16) and torch.equal(got[k], ref)
            else:
                assert torch.equal(got[k], v), k
    wide = CascadeMaskRCNN(replace(tiny(), backbone=eva_config('eva_tiny', img_size=224, patch_size=16,
                                                               embed_dim=32)))
    with pytest.raises(ValueError, match=r'does not fit the detector \(86 keys, e.g. backbone.simfp_2.0.weight: file '):
        load_detector(wide, str(tmp_path / 'ours.pt'))
    # a detector given to a segmenter, a segmenter to a detector: each called what it is
    from seg_model import Segmenter, SegConfig, load_segmenter
    seg = Segmenter(SegConfig(backbone=eva_config('eva_tiny', img_size=64, patch_size=16, depth=4), num_classes=3,
                              taps=(0, 1, 2, 3), seg_channels=16, aux_channels=8))
    torch.save({'model': seg.state_dict()}, tmp_path / 'seg.pt')
    with pytest.raises(ValueError, match=f"{tmp_path / 'ours.pt'} is a detector"):
        load_segmenter(seg, str(tmp_path / 'ours.pt'))
    with pytest.raises(ValueError, match=f"{tmp_path / 'seg.pt'} is a segmenter"):
        load_detector(dst, str(tmp_path / 'seg.pt'))


def detectron2_lvis_shapes(K=4, depth=2, global_blocks=(1,)):
    """Every key of an EVA-01 LVIS detector as detectron2 names it (ViT, SimpleFeaturePyramid, StandardRPNHead,
    CascadeROIHeads: FastRCNNConvFCHead, FastRCNNOutputLayers with the federated loss's buffer per stage,
    MaskRCNNConvUpsampleHead; the model's pixel mean / std), with its shape at tiny()'s sizes (width 64, patch 16, 128
    px, windows of 4, pyramid 32, head convs 16, fc 32, 3 anchors), written from those modules, not from ours."""
    d, p, h, f = 64, 32, 16, 32
    s = {'pixel_mean': (3, 1, 1), 'pixel_std': (3, 1, 1), 'backbone.net.pos_embed': (1, 197, d),
         'backbone.net.patch_embed.proj.weight': (d, 3, 16, 16), 'backbone.net.patch_embed.proj.bias': (d,)}
    for i in range(depth):
        rows = 15 if i in global_blocks else 7  # 2 x grid - 1: 8 x 8 global, 4 x 4 windows
        b = f'backbone.net.blocks.{i}.'
        s.update({b + 'norm1.weight': (d,), b + 'norm1.bias': (d,), b + 'attn.q_bias': (d,), b + 'attn.v_bias': (d,),
                  b + 'attn.rel_pos_h': (rows, 16), b + 'attn.rel_pos_w': (rows, 16), b + 'attn.qkv.weight': (3 * d, d),
                  b + 'attn.proj.weight': (d, d), b + 'attn.proj.bias': (d,), b + 'norm2.weight': (d,),
                  b + 'norm2.bias': (d,), b + 'mlp.fc1.weight': (2 * d, d), b + 'mlp.fc1.bias': (2 * d,),
                  b + 'mlp.fc2.weight': (d, 2 * d), b + 'mlp.fc2.bias': (d,)})

    def conv(name, cin, cout, k, norm=True):  # detectron2's Conv2d with a LayerNorm `norm`, no bias
        s[name + '.weight'] = (cout, cin, k, k)
        s.update({name + '.norm.weight': (cout,), name + '.norm.bias': (cout,)} if norm else {name + '.bias': (cout,)})
    fp = 'backbone.simfp_'
    s.update({fp + '2.0.weight': (d, d // 2, 2, 2), fp + '2.0.bias': (d // 2,),  # transposed convs: (in, out, k, k)
              fp + '2.1.weight': (d // 2,), fp + '2.1.bias': (d // 2,), fp + '2.3.weight': (d // 2, d // 4, 2, 2),
              fp + '2.3.bias': (d // 4,), fp + '3.0.weight': (d, d // 2, 2, 2), fp + '3.0.bias': (d // 2,)})
    for name, cin in (('2.4', d // 4), ('3.1', d // 2), ('4.0', d), ('5.1', d)):
        conv(fp + name, cin, p, 1)
    for name in ('2.5', '3.2', '4.1', '5.2'):
        conv(fp + name, p, p, 3)
    rpn = 'proposal_generator.rpn_head.'
    for name, cout, k in (('conv.conv0', p, 3), ('conv.conv1', p, 3), ('objectness_logits', 3, 1),
                          ('anchor_deltas', 12, 1)):
        conv(rpn + name, p, cout, k, norm=False)
    for k in range(3):
        for i in range(1, 5):
            conv(f'roi_heads.box_head.{k}.conv{i}', p if i == 1 else h, h, 3)
        s.update({f'roi_heads.box_head.{k}.fc1.weight': (f, h * 49), f'roi_heads.box_head.{k}.fc1.bias': (f,),
                  f'roi_heads.box_predictor.{k}.cls_score.weight': (K + 1, f),
                  f'roi_heads.box_predictor.{k}.cls_score.bias': (K + 1,),
                  f'roi_heads.box_predictor.{k}.bbox_pred.weight': (4, f),
                  f'roi_heads.box_predictor.{k}.bbox_pred.bias': (4,),
                  f'roi_heads.box_predictor.{k}.fed_loss_cls_weights': (K,)})
    for i in range(1, 5):
        conv(f'roi_heads.mask_head.mask_fcn{i}', p if i == 1 else h, h, 3)
    s.update({'roi_heads.mask_head.deconv.weight': (h, h, 2, 2), 'roi_heads.mask_head.deconv.bias': (h,)})
    conv('roi_heads.mask_head.predictor', h, K, 1, norm=False)
    return s


def test_a_released_lvis_detector_loads_with_every_key(tmp_path):
    """An EVA-01 LVIS file's whole key set (716 keys at EVA-g: the 713 of a COCO detector and detectron2's federated
    loss weights per cascade stage): every tensor lands in an LVIS detector, the weights included; a detector without
    the federated loss drops them; one with it keeps its own when a COCO file has none."""
    from dataclasses import replace
    torch.manual_seed(0)
    official = {k: torch.randn(v) for k, v in detectron2_lvis_shapes().items()}
    assert len(official) == 2 + 3 + 2 * 15 + 32 + 8 + 3 * (14 + 5) + 16  # pixel, stem, blocks, pyramid, rpn, roi, mask
    torch.save({'model': official}, tmp_path / 'eva_lvis.pth')
    lvis = CascadeMaskRCNN(tiny(sigmoid_ce=True, fed_classes=3))
    load_detector(lvis, str(tmp_path / 'eva_lvis.pth'))
    ours = lvis.state_dict()
    assert len(ours) == len(official) - 2  # all but the pixel mean / std
    for k, v in official.items():
        k = k.replace('rpn_head.conv.conv0.', 'head.conv.0.0.').replace('rpn_head.conv.conv1.', 'head.conv.1.0.')
        k = k.replace('rpn_head.objectness_logits.', 'head.cls_logits.')
        k = k.replace('rpn_head.anchor_deltas.', 'head.bbox_pred.')
        assert k.startswith('pixel_') or torch.equal(ours[k], v), k
    coco = CascadeMaskRCNN(tiny())
    load_detector(coco, str(tmp_path / 'eva_lvis.pth'))
    assert torch.equal(coco.roi_heads.box_predictor[2].cls_score.weight,
                       lvis.roi_heads.box_predictor[2].cls_score.weight)
    torch.save({'model': coco.state_dict()}, tmp_path / 'coco.pt')
    lvis = CascadeMaskRCNN(replace(tiny(sigmoid_ce=True, fed_classes=3), num_classes=6))
    load_detector(lvis, str(tmp_path / 'coco.pt'))
    assert lvis.roi_heads.box_predictor[0].fed_loss_cls_weights.tolist() == [1.0] * 6


def test_a_missing_image_is_skipped_a_class_count_mismatch_stops_and_lvis_settings_train(tmp_path):
    from data import Samples
    folder = write_synthetic_scenes(str(tmp_path / 'scenes'), 16, 2, img_size=64)
    os.remove(os.path.join(folder, 'train', '00003.png'))
    src = CocoDetection(os.path.join(folder, 'instances_train.json'), folder)
    ds = Samples(src, LargeScaleJitter(64), joint=True)
    i = next(i for i in range(len(src)) if src.path(i).endswith('00003.png'))
    assert ds[i]['skipped'] == 1 and ds[i - 1]['skipped'] == 0
    js = os.path.join(folder, 'instances_train.json')
    r = run_stage('det_seg.py', 'config/det_tiny.py', f'--train_json={js}', f'--val_json={js}',
                  f'--train_images={folder}', f'--val_images={folder}', '--num_classes=5', f'--out_dir={tmp_path}/out',
                  timeout=300, check=False)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == f"error: {js} has 4 categories, num_classes=5"
    # LVIS's training settings on the same data with polygons (LVIS has only polygons; here each box's outline): sigmoid
    # CE, the federated loss weighted by image counts ^ 0.5 (in each stage's buffer, saved with the model, as detectron2
    # does), repeat-factor sampling
    d = json.load(open(js))
    for a in d['annotations']:
        x, y, w, h = a['bbox']
        a['segmentation'] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    js = str(tmp_path / 'polygons.json')
    json.dump(d, open(js, 'w'))
    assert 'polygons' in CocoDetection(js, folder).load(0)[1]
    run_stage('det_seg.py', 'config/det_tiny.py', f'--train_json={js}', f'--val_json={js}', f'--train_images={folder}',
              f'--val_images={folder}', f'--out_dir={tmp_path}/lvis', '--sigmoid_ce=True', '--fed_classes=3',
              '--repeat_threshold=0.5', '--batch_size=4', '--micro_batch=4', '--max_steps=4', '--stop_step=2',
              '--log_interval=1', timeout=300)
    assert [r['step'] for r in log_rows(tmp_path / 'lvis') if 'loss' in r] == [1, 2]
    saved = torch.load(tmp_path / 'lvis' / 'ckpt' / 'step2' / 'mp_rank_00_model_states.pt', weights_only=False)
    for k in range(3):
        torch.testing.assert_close(saved['module'][f'roi_heads.box_predictor.{k}.fed_loss_cls_weights'],
                                   src.image_counts().float() ** 0.5)


def test_recipe_schedules_follow_the_official_lazyconfigs():
    """EVA-01's COCO config: 45,000 iterations, milestones [40000, max_iter - 1]; LVIS: 75,001 iterations, milestones
    [70000, 75000]; the lr at iteration i (0-based) from detectron2's MultiStepParamScheduler (values 1, 0.1, 0.01;
    epoch = int((i / max_iter + 1e-6) * max_iter)) equals ours (x0.1 per lr_steps entry <= i): the last at x0.01."""
    import bisect
    for name, max_iter, milestones in (('det_coco_eva_g.py', 45_000, [40_000, 44_999]),
                                       ('det_lvis_eva_g.py', 75_001, [70_000, 75_000])):
        cfg = {}
        exec(open(os.path.join(ROOT, 'config', name)).read(), cfg)
        assert cfg['max_steps'] == max_iter
        for i in (0, milestones[0] - 1, milestones[0], max_iter - 2, max_iter - 1):
            official = [1.0, 0.1, 0.01][bisect.bisect_right(milestones, int((i / max_iter + 1e-6) * max_iter))]
            assert 0.1 ** sum(i >= s for s in cfg['lr_steps']) == pytest.approx(official), (name, i)
        assert official == 0.01


def test_eva_g_detector_shapes_on_the_meta_device():
    """EVA-01's EVA-g ViTDet at 1280, built without memory: 40 blocks, global attention in 3, 7, ..., 39 with
    relative-position tables for the 80 x 80 grid (159 rows), 16 x 16 windows elsewhere (31 rows), head dim 88; the
    14 x 14 pos_embed; the frozen patch-16 kernel."""
    with torch.device('meta'):
        model = CascadeMaskRCNN(DetConfig(backbone=eva_config('eva_g', patch_size=16), num_classes=80, img_size=1280))
    net = model.backbone.net
    assert [i for i, b in enumerate(net.blocks) if b.window == 0] == list(range(3, 40, 4))
    assert net.blocks[3].attn.rel_pos_h.shape == (159, 88) and net.blocks[0].attn.rel_pos_w.shape == (31, 88)
    assert net.pos_embed.shape == (1, 197, 1408) and net.patch_embed.proj.weight.shape == (1408, 3, 16, 16)
    assert not net.patch_embed.proj.weight.requires_grad
    assert model.roi_heads.box_predictor[0].cls_score.out_features == 81
    encoder = sum(p.numel() for n, p in net.named_parameters() if 'rel_pos' not in n)
    assert encoder == 1_011_146_112 - 2 * 1408 - 1408 + (16 * 16 - 14 * 14) * 3 * 1408 - (257 - 197) * 1408
