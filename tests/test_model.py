"""model.py against independent references: timm's Eva, hand-written attention and interpolation, the official
release's key list, torch's FLOP counter."""
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import timm.models.eva as timm_eva
from torch.utils._python_dispatch import TorchDispatchMode

import model as M
from conftest import run_stage
from model import (EVA, eva_config, load_pretrained, param_groups, read_checkpoint, resize_patch_embed,
                   resize_pos_embed)



def randomize_(module, seed=0):
    """Random values everywhere (q/v biases and LayerNorms included), at a scale where logits are O(1), so a
    parity test compares something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


def timm_tiny(**kw):
    c = eva_config('eva_tiny')
    return timm_eva.Eva(img_size=c.img_size, patch_size=c.patch_size, embed_dim=c.embed_dim, depth=c.depth,
                        num_heads=c.num_heads, mlp_ratio=c.mlp_dim / c.embed_dim, **kw)


@pytest.mark.parametrize('pooling,timm_pool', [('mean', 'avg'), ('cls', 'token')])
def test_timm_parity_both_ways(pooling, timm_pool):
    x = torch.randn(3, 3, 32, 32)
    ref = randomize_(timm_tiny(num_classes=10, global_pool=timm_pool)).eval()
    ours = EVA(eva_config('eva_tiny', num_classes=10, pooling=pooling)).eval()
    info = load_pretrained(ours, ref.state_dict())
    assert info['missing'] == [] and info['resized'] == []
    with torch.no_grad():
        expected = ref(x)
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=0)
        assert expected.abs().mean() > 0.1  # the comparison is not between two near-zero tensors
    # and back: our state dict loads into timm strictly and gives the same logits
    ours2 = randomize_(EVA(eva_config('eva_tiny', num_classes=10, pooling=pooling)), seed=1).eval()
    ref2 = timm_tiny(num_classes=10, global_pool=timm_pool).eval()
    ref2.load_state_dict(ours2.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ref2(x), ours2(x), atol=1e-5, rtol=0)


def test_eva_g_keys_and_parameter_count():
    with torch.device('meta'):
        enc = EVA(eva_config('eva_g'))  # mean pooling: fc_norm, no head
        mim = EVA(eva_config('eva_g', pooling='cls', use_mask_token=True, mim_dim=768))
        ref = timm_eva.eva_giant_patch14_224(num_classes=0)
    assert sum(p.numel() for p in enc.parameters()) == 1_011_146_112
    assert sum(p.numel() for p in mim.parameters()) == 1_012_229_632
    assert {k: v.shape for k, v in enc.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def official_mim_state_dict(D=64, depth=2, mlp=128, grid=8, patch=4, out=16):
    """An EVA-01 MIM checkpoint (eva_psz14.pt layout) built from the release's key list by hand."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)
    sd = {'cls_token': r(1, 1, D), 'mask_token': r(1, 1, D), 'pos_embed': r(1, 1 + grid * grid, D),
          'patch_embed.proj.weight': r(D, 3, patch, patch), 'patch_embed.proj.bias': r(D),
          'norm.weight': r(D), 'norm.bias': r(D), 'lm_head.weight': r(out, D), 'lm_head.bias': r(out)}
    for i in range(depth):
        b = f'blocks.{i}.'
        sd.update({b + 'norm1.weight': r(D), b + 'norm1.bias': r(D), b + 'attn.qkv.weight': r(3 * D, D),
                   b + 'attn.q_bias': r(D), b + 'attn.v_bias': r(D), b + 'attn.proj.weight': r(D, D),
                   b + 'attn.proj.bias': r(D), b + 'norm2.weight': r(D), b + 'norm2.bias': r(D),
                   b + 'mlp.fc1.weight': r(mlp, D), b + 'mlp.fc1.bias': r(mlp), b + 'mlp.fc2.weight': r(D, mlp),
                   b + 'mlp.fc2.bias': r(D)})
    return {'model': sd, 'args': None, 'epoch': 149}


def test_official_mim_checkpoint_into_classifier(tmp_path):
    ckpt = official_mim_state_dict()
    path = str(tmp_path / 'eva_psz14.pt')
    torch.save(ckpt, path)
    m = EVA(eva_config('eva_tiny', num_classes=10))
    info = load_pretrained(m, path)
    assert sorted(info['missing']) == ['fc_norm.bias', 'fc_norm.weight', 'head.bias', 'head.weight']
    assert sorted(info['dropped']) == ['lm_head.bias', 'lm_head.weight', 'mask_token', 'norm.bias', 'norm.weight']
    torch.testing.assert_close(m.blocks[1].attn.v_bias, ckpt['model']['blocks.1.attn.v_bias'])
    # the same file into the MIM model loads everything
    mim = EVA(eva_config('eva_tiny', pooling='cls', use_mask_token=True, mim_dim=16))
    assert load_pretrained(mim, path)['missing'] == []
    torch.testing.assert_close(mim.lm_head.weight, ckpt['model']['lm_head.weight'])


@pytest.mark.parametrize('wrapper', ['module', 'model_ema', 'state_dict', 'open_clip'])
def test_checkpoint_layouts(wrapper):
    src = randomize_(EVA(eva_config('eva_tiny')))
    sd = src.state_dict()
    if wrapper == 'open_clip':  # EVA01-g-14: timm trunk under visual.trunk., plus a text tower and a projection
        ckpt = {**{'visual.trunk.' + k: v for k, v in sd.items()}, 'visual.head.proj.weight': torch.zeros(8, 64),
                'text.token_embedding.weight': torch.zeros(10, 8), 'logit_scale': torch.tensor(1.0)}
    else:
        ckpt = {wrapper: sd}
    dst = EVA(eva_config('eva_tiny'))
    assert load_pretrained(dst, ckpt)['missing'] == []
    for k, v in sd.items():
        torch.testing.assert_close(dst.state_dict()[k], v)


def test_resize_pos_embed():
    pe = torch.randn(1, 1 + 16 * 16, 8)
    assert resize_pos_embed(pe, 16) is pe
    out = resize_pos_embed(pe, 24)
    grid = pe[:, 1:].reshape(1, 16, 16, 8).permute(0, 3, 1, 2)
    direct = F.interpolate(grid, size=(24, 24), mode='bicubic', align_corners=False).permute(0, 2, 3, 1)
    assert out.shape == (1, 1 + 24 * 24, 8)
    torch.testing.assert_close(out[:, 0], pe[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(out[:, 1:], direct.reshape(1, 576, 8))
    # the row-major token order is kept: a grid whose channel 0 is the row and channel 1 the column stays so
    r, c = torch.meshgrid(torch.arange(16.), torch.arange(16.), indexing='ij')
    ramp = torch.cat((torch.zeros(1, 1, 2), torch.stack((r, c), -1).reshape(1, 256, 2)), dim=1).double()
    big = resize_pos_embed(ramp, 32)[0, 1:].reshape(32, 32, 2)
    assert big.dtype == torch.float64
    assert (big[:, :, 0] - big[:, :1, 0]).abs().max() < 1e-9 and (big[:, :, 1] - big[:1, :, 1]).abs().max() < 1e-9
    assert (big[1:, 0, 0] > big[:-1, 0, 0]).all() and (big[0, 1:, 1] > big[0, :-1, 1]).all()


def test_checkpoint_at_new_resolution():
    """224 -> 336 in miniature: a 32 px checkpoint into a 48 px model resizes pos_embed 8x8 -> 12x12."""
    src = randomize_(EVA(eva_config('eva_tiny')))
    dst = EVA(eva_config('eva_tiny', img_size=48))
    info = load_pretrained(dst, src.state_dict())
    assert info['resized'] == ['pos_embed 8x8->12x12']
    torch.testing.assert_close(dst.pos_embed.data, resize_pos_embed(src.pos_embed.data, 12))
    assert dst(torch.randn(1, 3, 48, 48)).shape == (1, 64)


def test_psz14to16_cli_equals_bicubic_kernel(tmp_path):
    src = EVA(eva_config('eva_tiny', img_size=28, patch_size=14))
    sd = src.state_dict()
    torch.save({'model': sd}, tmp_path / 'in.pt')
    run_stage('model.py', 'psz14to16', tmp_path / 'in.pt', tmp_path / 'out.pt', '--image_size=32')
    out = torch.load(tmp_path / 'out.pt')['model']
    w = sd['patch_embed.proj.weight']
    expected = F.interpolate(w, size=(16, 16), mode='bicubic', align_corners=False)
    torch.testing.assert_close(out['patch_embed.proj.weight'], expected)
    assert out['pos_embed'].shape == (1, 1 + 2 * 2, 64)
    torch.testing.assert_close(out['patch_embed.proj.bias'], sd['patch_embed.proj.bias'], rtol=0, atol=0)
    # and load_pretrained does the same when a patch-14 file meets a patch-16 model
    dst = EVA(eva_config('eva_tiny', img_size=32, patch_size=16))
    info = load_pretrained(dst, str(tmp_path / 'in.pt'))
    assert info['resized'] == ['patch_embed 14->16']  # 28/14 = 32/16: the grid stays 2x2
    torch.testing.assert_close(dst.patch_embed.proj.weight.data, expected)
    assert resize_patch_embed(w, 14) is w


def test_psz14to16_of_an_fp16_file_is_bit_for_bit_the_official_script(tmp_path):
    """The released eva_psz14.pt holds fp16 weights. interpolate_patch_14to16.py resizes the kernel as
    `F.interpolate(w.float(), ...)` and stores that fp32 result; it resizes pos_embed's grid (reshape, permute to
    (1, D, H, W), bicubic, permute back, flatten) in fp16, the file's own dtype. Here those steps by hand."""
    sd = {k: v.half() for k, v in EVA(eva_config('eva_tiny', img_size=56, patch_size=14)).state_dict().items()}
    torch.save({'model': sd, 'epoch': 7}, tmp_path / 'in.pt')
    run_stage('model.py', 'psz14to16', tmp_path / 'in.pt', tmp_path / 'out.pt', '--image_size=48')
    out = torch.load(tmp_path / 'out.pt')
    kernel = F.interpolate(sd['patch_embed.proj.weight'].float(), size=(16, 16), mode='bicubic', align_corners=False)
    grid = sd['pos_embed'][:, 1:].reshape(-1, 4, 4, 64).permute(0, 3, 1, 2)  # 56/14 = 4 -> 48/16 = 3
    grid = F.interpolate(grid, size=(3, 3), mode='bicubic', align_corners=False).permute(0, 2, 3, 1).flatten(1, 2)
    pos = torch.cat((sd['pos_embed'][:, :1], grid), dim=1)
    got = out['model']
    assert got['patch_embed.proj.weight'].dtype == torch.float32 and got['pos_embed'].dtype == torch.float16
    assert torch.equal(got['patch_embed.proj.weight'], kernel) and torch.equal(got['pos_embed'], pos)
    # fp32 arithmetic for the fp16 pos_embed would differ in some bits: the test can tell the two apart
    assert not torch.equal(resize_pos_embed(sd['pos_embed'], 3), pos)
    # a checkpoint of another kind: one error line naming the file and what it lacks
    torch.save({'model': {'head.weight': torch.zeros(2, 2)}}, tmp_path / 'head.pt')
    for cmd, error in (('psz14to16', "has no 'patch_embed.proj.weight'"), ('open_clip', 'is no train_clip.py CLIP')):
        r = run_stage('model.py', cmd, tmp_path / 'head.pt', tmp_path / 'other', check=False)
        assert r.returncode == 1 and r.stderr.startswith(f"error: {tmp_path / 'head.pt'} {error}"), r.stderr[-1000:]
    assert out['epoch'] == 7 and all(torch.equal(got[k], v) for k, v in sd.items() if 'pos_embed' not in k and
                                     k != 'patch_embed.proj.weight')


class Writes(TorchDispatchMode):
    """Records the ops that write a new tensor of `numel` elements (views excluded): memory passes."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        copies = not (func.is_view or func is torch.ops.aten._unsafe_view.default)  # reshape's view of a clone
        if isinstance(out, torch.Tensor) and out.numel() == self.numel and copies:
            self.ops.append(str(func.overloadpacket))
        return out


def test_sdpa_matches_manual_attention():
    torch.manual_seed(0)
    attn = randomize_(M.Attention(eva_config('eva_tiny')))
    x = torch.randn(2, 5, 64)
    q, k, v = (F.linear(x, attn.qkv.weight).chunk(3, dim=-1))
    q, v = q + attn.q_bias, v + attn.v_bias
    heads = lambda t: t.reshape(2, 5, 4, 16).transpose(1, 2)  # (B, H, N, hd)
    a = torch.softmax(heads(q) @ heads(k).transpose(-2, -1) / math.sqrt(16), dim=-1)
    expected = attn.proj((a @ heads(v)).transpose(1, 2).reshape(2, 5, 64))
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def test_attention_gradients_and_one_copy_of_the_qkv_gradient():
    """The head split's backward (a performance choice) gives the manual attention's gradients and writes the
    (B, N, 3D) qkv gradient once: permute(2, 0, 3, 1, 4) + unbind(0) would stack and then copy it again."""
    torch.manual_seed(0)
    attn = randomize_(M.Attention(eva_config('eva_tiny'))).double()
    x = torch.randn(2, 5, 64, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 5, 64, dtype=torch.float64)  # a weighting so the loss is not symmetric in the outputs
    params = [x, attn.qkv.weight, attn.q_bias, attn.v_bias, attn.proj.weight]

    def manual():
        q, k, v = F.linear(x, attn.qkv.weight).chunk(3, dim=-1)
        heads = lambda t: t.reshape(2, 5, 4, 16).transpose(1, 2)
        a = torch.softmax(heads(q + attn.q_bias) @ heads(k).transpose(-2, -1) / 4.0, dim=-1)
        return attn.proj((a @ heads(v + attn.v_bias)).transpose(1, 2).reshape(2, 5, 64))
    expected = torch.autograd.grad((manual() * w).sum(), params)

    loss = (attn(x) * w).sum()
    with Writes(numel=2 * 5 * 192) as writes:  # the qkv activation's size
        got = torch.autograd.grad(loss, params)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-9)
    # one full-size write: the stack of dq, dk, dv (permute + unbind(0) wrote ['aten.stack', 'aten.clone'])
    assert len(writes.ops) == 1, writes.ops


def test_gradient_checkpointing_same_gradients():
    x = torch.randn(4, 3, 32, 32)
    grads = []
    for ckpt in (False, True):
        m = EVA(eva_config('eva_tiny', num_classes=10, drop_path=0.3, grad_checkpointing=ckpt))
        randomize_(m).train()
        torch.manual_seed(123)  # the same drop-path draws; checkpointing must replay them in its recompute
        m(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5, msg=n)


def test_mask_hides_masked_pixels():
    m = randomize_(EVA(eva_config('eva_tiny', pooling='cls', use_mask_token=True, mim_dim=16))).eval()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[0, 2:5, 1:4] = True
    mask[1, 6:, :] = True
    pixel_mask = mask.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None].expand_as(x)
    x2 = torch.where(pixel_mask, torch.randn_like(x) * 100, x)
    with torch.no_grad():
        a, b = m.forward_features(x, mask.flatten(1)), m.forward_features(x2, mask.flatten(1))
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.allclose(m.forward_features(x), m.forward_features(x2))  # unmasked, they differ
        out = m.forward_mim(x, mask.flatten(1))
    assert out.shape == (int(mask.sum()), 16)


def test_init_follows_official_recipe():
    torch.manual_seed(0)
    m = EVA(eva_config('eva_b', img_size=56, num_classes=1000))
    std = lambda t: t.float().std().item()
    assert abs(std(m.blocks[0].mlp.fc1.weight) - 0.02) < 0.001
    for i in (0, 5, 11):  # block i (0-based) scaled by 1/sqrt(2 (i + 1))
        assert abs(std(m.blocks[i].attn.proj.weight) - 0.02 / math.sqrt(2 * (i + 1))) < 0.002 / math.sqrt(i + 1)
        assert abs(std(m.blocks[i].mlp.fc2.weight) - 0.02 / math.sqrt(2 * (i + 1))) < 0.002 / math.sqrt(i + 1)
    assert abs(std(m.head.weight) - 0.02 * 0.001) < 2e-6
    assert m.blocks[3].attn.q_bias.abs().max() == 0 and m.blocks[3].norm1.weight.min() == 1


def test_mim_init_cuts_every_draw_at_one_std():
    """EVA-01's MIM model (modeling_pretrain.py) draws every Linear, Conv, pos_embed, cls_token, mask_token and
    lm_head with trunc_normal_(std, a=-std, b=std): a normal cut at +-1 std, whose std is
    std * sqrt(1 - 2 phi(1) / (2 Phi(1) - 1)) = 0.5396 std; then BEiT's 1/sqrt(2 layer) rescale."""
    torch.manual_seed(0)
    std = 0.015
    m = EVA(eva_config('eva_b', img_size=56, pooling='cls', use_mask_token=True, mim_dim=768, init_std=std,
                       init_trunc=1.0))
    phi1, Phi1 = math.exp(-0.5) / math.sqrt(2 * math.pi), 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    cut_std = std * math.sqrt(1 - 2 * phi1 / (2 * Phi1 - 1))
    assert cut_std == pytest.approx(0.5396 * std, rel=1e-3)
    for name in ('pos_embed', 'cls_token', 'mask_token', 'lm_head.weight', 'patch_embed.proj.weight',
                 'blocks.0.attn.qkv.weight', 'blocks.7.mlp.fc1.weight'):
        t = m.get_parameter(name)
        assert t.abs().max() <= std, name
        if t.numel() > 10_000:
            assert t.std().item() == pytest.approx(cut_std, rel=0.02), name
    assert m.blocks[4].attn.proj.weight.abs().max() <= std / math.sqrt(2 * 5)
    # the default (fine-tuning models, timm): cut at +-2 absolute, i.e. a plain normal at this std
    torch.manual_seed(0)
    plain = EVA(eva_config('eva_b', img_size=56, init_std=std))
    assert plain.blocks[0].mlp.fc1.weight.std().item() == pytest.approx(std, rel=0.01)
    assert plain.blocks[0].mlp.fc1.weight.abs().max() > 3 * std


def test_drop_path_is_linear_over_depth():
    m = EVA(eva_config('eva_tiny', depth=5, drop_path=0.4))
    rates = [getattr(b.drop_path, 'p', 0.0) for b in m.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


def test_drop_path_statistics_and_one_compiled_graph_for_all_rates():
    """Stochastic depth drops a sample's branch with probability p and rescales the kept ones (expectation kept);
    compiled block by block, the blocks' different rates share one graph instead of one compile each (dynamo
    gives up after 8 recompilations: EVA-g's 40 blocks would mostly run uncompiled)."""
    from model import DropPath
    torch.manual_seed(0)
    x = torch.ones(40_000, 3, 2)
    y = DropPath(0.3).train()(x)
    dropped = (y[:, 0, 0] == 0).float().mean().item()
    assert abs(dropped - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 40_000)  # 4 standard deviations
    assert torch.all((y == 0).all((1, 2)) | (y - 1 / 0.7).abs().lt(1e-6).all((1, 2)))  # whole samples, rescaled
    assert torch.equal(DropPath(0.3).eval()(x), x)
    x.requires_grad_(True)
    with Writes(numel=x.numel()) as fwd:
        y = DropPath(0.3).train()(x)
    dy = torch.ones_like(y)
    with Writes(numel=x.numel()) as bwd:
        y.backward(dy)
    assert fwd.ops == ['aten.mul'] and bwd.ops == ['aten.mul']  # one pass each way (x * keep / (1-p): two)
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    m = EVA(eva_config('eva_tiny', depth=6, drop_path=0.3))
    m.compile_blocks()  # what the stages' --compile_blocks=True calls
    m(torch.randn(2, 3, 32, 32)).sum().backward()
    assert counters['stats']['unique_graphs'] <= 3  # the rate-0 block, then the others (at most one respecialisation)
    torch._dynamo.reset()


def test_param_groups_layer_decay_and_weight_decay():
    m = EVA(eva_config('eva_tiny', depth=3, num_classes=10, use_mask_token=True))
    m.patch_embed.proj.weight.requires_grad_(False)  # frozen parameters belong to no group
    groups = param_groups(m, weight_decay=0.05, layer_decay=0.75)
    flat = param_groups(m, weight_decay=0.05, layer_decay=1.0)  # no layer decay: decay and no-decay, nothing else
    assert sorted((g['lr_scale'], g['weight_decay']) for g in flat) == [(1.0, 0.0), (1.0, 0.05)]
    assert sum(len(g['params']) for g in flat) == sum(len(g['params']) for g in groups)
    names = {id(p): n for n, p in m.named_parameters()}
    seen = [names[id(p)] for g in groups for p in g['params']]
    assert sorted(seen) == sorted(n for n, p in m.named_parameters() if p.requires_grad)  # each exactly once
    where = {names[id(p)]: g for g in groups for p in g['params']}
    expect_layer = {'cls_token': 0, 'pos_embed': 0, 'mask_token': 0, 'patch_embed.proj.bias': 0,
                    'blocks.0.attn.qkv.weight': 1, 'blocks.2.mlp.fc2.bias': 3, 'fc_norm.weight': 4, 'head.weight': 4}
    for n, layer in expect_layer.items():
        assert where[n]['lr_scale'] == pytest.approx(0.75 ** (3 + 1 - layer)), n
    for n in ('cls_token', 'pos_embed', 'patch_embed.proj.bias', 'blocks.1.attn.q_bias', 'blocks.1.norm1.weight',
              'head.bias', 'fc_norm.weight'):
        assert where[n]['weight_decay'] == 0.0, n
    for n in ('blocks.1.attn.qkv.weight', 'head.weight', 'mask_token', 'blocks.0.mlp.fc1.weight'):
        assert where[n]['weight_decay'] == 0.05, n


def test_flop_estimate_matches_torch_counter(monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode

    def manual_attention(q, k, v):  # the counter does not see inside CPU SDPA, but it sees these matmuls
        return torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1) @ v
    monkeypatch.setattr(F, 'scaled_dot_product_attention', manual_attention)
    m = EVA(eva_config('eva_tiny', num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    with FlopCounterMode(display=False) as fc:
        m(x)
    assert fc.get_total_flops() == 2 * m.flops_per_image(backward=False)  # counter: 2 per multiply-add, 2 images
    with FlopCounterMode(display=False) as fc:
        m(x).sum().backward()
    # x3 overcounts only the input gradient of the patch embedding, which is never computed
    assert fc.get_total_flops() / (2 * m.flops_per_image()) == pytest.approx(1.0, abs=0.015)


# ---- bad input ---------------------------------------------------------------------------------------------

def test_missing_checkpoint_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.pt'):
        load_pretrained(EVA(eva_config('eva_tiny')), str(tmp_path / 'nope.pt'))


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path):
    """A text file, a numpy array, a plain pickle, a list of tensors: one ValueError naming the file, from both
    torch.load attempts (the weights_only=False retry included)."""
    (tmp_path / 'notes.pt').write_text('hello')
    np.save(tmp_path / 'array.npy', np.zeros(3))
    (tmp_path / 'pickle.pt').write_bytes(pickle.dumps({'a': [1, 2]}))
    torch.save([torch.zeros(2)], tmp_path / 'list.pt')
    for name, why in (('notes.pt', 'not a PyTorch checkpoint'), ('array.npy', 'not a PyTorch checkpoint'),
                      ('pickle.pt', 'not a PyTorch checkpoint'), ('list.pt', 'holds a list, not a checkpoint')):
        with pytest.raises(ValueError, match=f"{tmp_path / name} .*{why}"):
            read_checkpoint(str(tmp_path / name))


def test_wrong_width_names_key_and_shapes():
    src = EVA(eva_config('eva_tiny', embed_dim=32, num_heads=4, mlp_dim=64))
    with pytest.raises(ValueError, match=r'cls_token: checkpoint \(1, 1, 32\) vs model \(1, 1, 64\)'):
        load_pretrained(EVA(eva_config('eva_tiny')), src.state_dict())


def test_wrong_depth_fails_both_ways():
    deep = EVA(eva_config('eva_tiny', depth=3)).state_dict()
    with pytest.raises(ValueError, match=r'blocks\.2\.norm1\.weight: in the checkpoint'):
        load_pretrained(EVA(eva_config('eva_tiny')), deep)
    shallow = EVA(eva_config('eva_tiny', depth=1)).state_dict()
    with pytest.raises(ValueError, match=r'lacks .* blocks\.1\.'):
        load_pretrained(EVA(eva_config('eva_tiny')), shallow)


def test_head_of_other_class_count_is_dropped_not_loaded():
    src = EVA(eva_config('eva_tiny', num_classes=21841 // 100))
    dst = EVA(eva_config('eva_tiny', num_classes=10))
    head_before = dst.head.weight.clone()
    info = load_pretrained(dst, src.state_dict())
    assert sorted(info['missing']) == ['head.bias', 'head.weight']
    assert torch.equal(dst.head.weight, head_before)


def test_unknown_size_and_wrong_input_size():
    with pytest.raises(KeyError, match='eva_g'):
        eva_config('eva_x')
    with pytest.raises(ValueError, match='built for 32x32'):
        EVA(eva_config('eva_tiny'))(torch.randn(1, 3, 48, 48))


@pytest.mark.parametrize('chunk', [2 ** 26, 1, 7])
def test_ema_closed_form(chunk):
    """ema_k = d^k ema_0 + sum_j (1 - d) d^(k-1-j) w_j for the weights w_j after each of k updates; the same
    whether the update runs over all tensors at once or a chunk at a time (a tensor each; the 6-element weight and
    the 2-element bias together at 7)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = torch.nn.Linear(3, 2)
    e0 = {k: v.clone() for k, v in ema.state_dict().items()}
    d, ws = 0.9, []
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ws.append({k: v.clone() for k, v in model.state_dict().items()})
        M.ema_update_(ema, model, d, chunk=chunk)
    for k in e0:
        expected = d ** 5 * e0[k] + sum((1 - d) * d ** (4 - j) * ws[j][k] for j in range(5))
        torch.testing.assert_close(ema.state_dict()[k], expected)
