"""The GPU-memory projection's parts (memory.py) against independent references: the live-memory counter against
torch's own MemTracker; the same training step on CPU tensors and on meta tensors; the attention stand-in against
the shapes of aten's flash / memory-efficient kernels; DeepSpeed ZeRO-1 run on meta tensors with a fake process group
against DeepSpeed ZeRO-1 run on CPU tensors over gloo (1 and 2 ranks, accumulation 2, a small reduce bucket);
bench.py's memory mode (pretrain.py itself on meta) against the one step measured on a GPU, and over 2 ranks.
Run as a script, this file is that ZeRO step's worker: python tests/test_memory.py cpu|meta OUT [WORLD RANK]."""
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision

import bench
import memory
import model
from model import CLIPTeacher


def tiny_step(device, ckpt, mem, steps=2):
    """eva_mini, AdamW, `steps` steps of 8 images at 64 px; phases forward / backward / step."""
    torch.manual_seed(0)
    with torch.device(device):
        m = model.EVA(model.eva_config('eva_mini', img_size=64, num_classes=10, grad_checkpointing=ckpt))
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True)
        x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))
    track = getattr(mem, 'track_external', None)  # MemTracker's way of being told about tensors made before it
    if track:
        track(m, opt, x, y)
    else:
        mem.track([*m.parameters(), *m.buffers()], 'weights')
        mem.track([x, y], 'data')
    phase = getattr(mem, 'in_phase', lambda name, kind=None: memory.contextlib.nullcontext())
    with mem:
        for _ in range(steps):
            with phase('forward', 'activations'):
                loss = F.cross_entropy(m(x), y)
            with phase('backward'):
                loss.backward()
            with phase('step'):
                opt.step()
                opt.zero_grad()
            if track:
                mem.reset_mod_stats()  # MemTracker refuses a second forward of a module otherwise


def test_counter_equals_torch_memtracker():
    """Bytes as they are (MemTracker rounds only on CUDA), on meta tensors: the same peak, to the byte, with and
    without gradient checkpointing (SDPA's math fallback: its N x N softmax makes the activations large here)."""
    from torch.distributed._tools.mem_tracker import MemTracker
    for ckpt in (False, True):
        tracker, ours = MemTracker(), memory.LiveMemory('meta', block=1)
        tiny_step('meta', ckpt, tracker)
        tiny_step('meta', ckpt, ours)
        assert ours.peak == tracker.get_tracker_snapshot('peak')[torch.device('meta')]['Total']
        assert ours.peak > 10 * 2 ** 20 and ours.peak_phase == 'backward'


def test_meta_step_counts_as_the_same_step_on_cpu_tensors():
    """The accounting is the device's, not the meta device's: every phase's peak equal on CPU tensors (with data)
    and on meta tensors, at the allocator's 512-byte blocks (Adam's step counts stay on the host in both)."""
    for ckpt in (False, True):
        runs = {}
        for device in ('cpu', 'meta'):
            runs[device] = memory.LiveMemory(device)
            with memory.cuda_attention():
                tiny_step(device, ckpt, runs[device])
        assert runs['cpu'].phase_peaks == runs['meta'].phase_peaks
        assert runs['cpu'].peak_kinds == runs['meta'].peak_kinds
        # the kinds add up, and the gradients of checkpointing's recompute are what the backward peak holds
        assert sum(runs['meta'].peak_kinds.values()) == runs['meta'].peak


def test_attention_stand_in_has_the_cuda_kernels_outputs():
    B, H, N, hd = 2, 3, 50, 8
    q, k, v = (torch.empty(B, H, N, hd, device='meta', dtype=torch.float16, requires_grad=True) for _ in range(3))
    bias = torch.empty(B, H, N, N, device='meta', dtype=torch.float16, requires_grad=True)
    flash = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)
    efficient = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True)
    mem = memory.LiveMemory('meta')
    with mem, memory.cuda_attention():
        out = F.scaled_dot_product_attention(q, k, v)
        out_b = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    for ours, theirs in ((out, flash), (out_b, efficient)):
        assert ours.shape == theirs[0].shape and ours.dtype == theirs[0].dtype
    assert out_b.stride() == efficient[0].stride() == (N * H * hd, hd, H * hd, 1)  # (B, N, H, hd) in memory
    assert flash[0].is_contiguous()  # aten's meta flash kernel: (B, H, N, hd); CUDA's writes (B, N, H, hd) as above
    assert out.stride() == out_b.stride()
    # saved for the backward: the fp32 log-sum-exp, (B, H, N) for flash, N padded to 32 for the efficient kernel
    lse = [t for t in out.grad_fn.saved_tensors if t is not None and t.dtype == torch.float32]
    lse_b = [t for t in out_b.grad_fn.saved_tensors if t is not None and t.dtype == torch.float32]
    assert [t.shape for t in lse] == [flash[1].shape] == [(B, H, N)]
    assert [t.shape for t in lse_b] == [efficient[1].shape] == [(B, H, 64)]
    # EVA's x.transpose(1, 2).flatten(2) of the output is a view: no copy of B x N x D per block
    assert out.transpose(1, 2).flatten(2).untyped_storage()._cdata == out.untyped_storage()._cdata
    with mem, memory.cuda_attention(), mem.in_phase('backward'):
        dq, dk, dv, dbias = torch.autograd.grad(out_b.sum(), (q, k, v, bias))
    assert dq.shape == q.shape and dbias.shape == bias.shape and dbias.dtype == torch.float16
    # the backward's fp32 workspaces (dq_accum: B x 128 x H x 32, softmax_d: B x H x 128) were counted, then freed,
    # before the bias gradient was made
    workspace = B * 128 * H * 32 * 4 + B * H * 128 * 4
    assert mem.phase_peaks['backward'] - mem.now >= workspace - memory.round_up(dbias.untyped_storage().nbytes(), 512)
    # and torch.utils.checkpoint's recompute sees the same tensors as the forward (its metadata check passes)
    with torch.device('meta'):
        m = model.EVA(model.eva_config('eva_mini', img_size=64, num_classes=10, grad_checkpointing=True))
    with memory.cuda_attention():
        m(torch.empty(2, 3, 64, 64, device='meta')).sum().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_counts_follow_the_data_and_the_policies():
    """What the values would decide, on meta: a mask copied from the data keeps its count of True through a cast, |
    of disjoint masks and cat, as the same ops on CPU tensors give; a mask made on the device selects the policy's
    share (NMS keeps it too), unique finds the policy's count, x[mask] = values takes values' rows; a copy out to
    the host is zeros; without a policy, an error names the mask."""
    a, b = torch.zeros(40, dtype=torch.bool), torch.zeros(40, dtype=torch.bool)
    a[:7], b[10:15] = True, True
    x = torch.randn(40, 4)

    def shapes(a, b, x):
        u = (a.to(torch.uint8) | b.to(torch.uint8)).bool()  # torchvision's sampler: uint8 masks, or-ed, cast
        return [t.shape for t in (x[a], x[u], torch.cat([x, x])[torch.cat([a, b])], u.nonzero(), x[a.clone()])]
    with memory.LiveMemory('meta'):
        on_meta = shapes(a.to('meta'), b.to('meta'), x.to('meta'))
    assert on_meta == shapes(a, b, x) == [(7, 4), (12, 4), (12, 4), (12, 1), (7, 4)]
    with memory.LiveMemory('meta', fraction=0.25, unique=6) as mem:
        xm = torch.empty(40, 4, device='meta')
        made = xm[:, 0] > 0
        assert xm[made].shape == (10, 4)
        with mem.selecting(0.5):
            assert made.nonzero().shape == (20, 1)
            assert torchvision.ops.nms(xm, xm[:, 0], 0.5).shape == (20,)
        labels = torch.empty(8, 8, dtype=torch.long, device='meta')
        assert labels.unique().shape == (6,) and [t.shape for t in labels.unique(return_counts=True)] == [(6,), (6,)]
        y = xm.clone()
        y[made] = torch.zeros(13, 4, device='meta')  # (13 True, whatever the policy says)
        y[made] = 0
        assert torch.equal(xm.cpu(), torch.zeros(40, 4)) and xm.sum().item() == 0
    with pytest.raises(NotImplementedError, match=r'count of True in a \(40,\) mask'):
        with memory.LiveMemory('meta'):
            (torch.empty(40, device='meta') > 0).nonzero()


def test_det_policies_set_the_detectors_counts(monkeypatch):
    """bench.py's det policies on a tiny cascade on meta: every image of a batch carries det_objects ground truths
    (masks of the whole crop), each cascade stage pools roi_batch boxes per image (the sampler's full sample, kept
    by every stage at det_kept 1.0), the mask head the positive share of them."""
    from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
    from test_det import tiny

    import data
    import det_model
    for owner, name in ((BalancedPositiveNegativeSampler, '__call__'), (data, 'collate_detection'),
                        (det_model.CascadeMaskRCNN, 'mask_loss'), (det_model, 'pool_rois')):
        monkeypatch.setattr(owner, name, getattr(owner, name))  # restored after the test
    mem, rows = memory.LiveMemory('meta', fraction=1.0), {}
    bench.det_policies(mem, objects=5)
    labels = [{'boxes': torch.ones(n, 4), 'labels': torch.ones(n, dtype=torch.long), 'image_id': i,
               'masks': torch.ones(n, 100, 90, dtype=torch.bool), 'dropped': 0} for i, n in ((0, 2), (1, 0))]
    samples = [{'image': torch.zeros(3, 100, 90, dtype=torch.uint8), 'index': i, 'skipped': 0, 'label': label}
               for i, label in enumerate(labels)]
    batch = data.collate_detection(samples, 128)
    assert [(t['boxes'].shape, t['labels'].shape, t['masks'].shape, t['image_id']) for t in batch['targets']] == \
        [((5, 4), (5,), (5, 128, 128), i) for i in (0, 1)]  # masks of the whole crop, the largest an image has
    assert batch['image'].shape == (2, 3, 128, 128)
    with mem, torch.device('meta'):
        net = det_model.CascadeMaskRCNN(tiny())  # 128 px, roi_batch 32, roi_positive 0.25, rpn_post_nms 50
        heads = [*net.roi_heads.box_head, net.roi_heads.mask_head]
        for i, head in enumerate(heads):
            head.register_forward_pre_hook(lambda m, x, i=i: rows.__setitem__(i, len(x[0])))
        targets = [dict(boxes=torch.empty(5, 4), labels=torch.empty(5, dtype=torch.long),
                        masks=torch.empty(5, 128, 128, dtype=torch.bool)) for _ in range(3)]
        losses = net(torch.empty(3, 3, 128, 128), [(128, 128)] * 3, targets)
        sum(losses.values()).backward()
    assert rows == {0: 3 * 32, 1: 3 * 32, 2: 3 * 32, 3: 3 * 8}


# -----------------------------------------------------------------------------
# DeepSpeed ZeRO-1: on meta tensors with a fake process group, against CPU tensors over gloo


def zero_step(where, out, world=1, rank=0):
    """eva_tiny (a classifier of 32 px images) under common.deepspeed_engine in fp32 (a CPU cannot run DeepSpeed
    fp16), ZeRO-1 with a 20,000-element reduce bucket, 2 micro-steps of 4 images per optimizer step, 2 steps, layer
    decay's param groups; every phase's peak (bytes) to OUT.RANK.json."""
    import common
    import deepspeed
    if where == 'cpu':
        rank, _, world, device = common.init_distributed()
        ctx = memory.contextlib.nullcontext()
    else:
        device, ctx = torch.device('meta'), memory.deepspeed_on_meta(world, rank)
    initialize = deepspeed.initialize

    def small_bucket(*a, config, **k):
        config['zero_optimization'].update(reduce_bucket_size=20_000, allgather_bucket_size=20_000)
        return initialize(*a, config=config, **k)
    deepspeed.initialize = small_bucket
    with ctx:
        torch.manual_seed(0)
        with torch.device(device):
            m = model.EVA(model.eva_config('eva_tiny', img_size=32, num_classes=10))
            x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
        opt = torch.optim.AdamW(model.param_groups(m, 0.05, 0.9), lr=1e-3)
        mem, held = memory.LiveMemory(device.type), []
        mem.track([*m.parameters(), *m.buffers()], 'weights')
        mem.track([x, y], 'data')
        with mem, memory.cuda_attention():
            with mem.in_phase('init'):
                engine, opt = common.deepspeed_engine(m, opt, batch_size=8 * world, micro_batch=4, grad_clip=1.0,
                                                      zero_stage=1, dtype='fp32')
                mem.forget(memory.deepspeed_shapes(opt))
            release = opt._release_ipg_buffers

            def released():  # the rank's gradient partition (made at a boundary) as DeepSpeed lets it go
                if opt.grads_in_partition is not None:
                    held.append(opt.grads_in_partition.numel())
                release()
            opt._release_ipg_buffers = released
            for step in range(2):
                for micro in range(2):
                    with mem.in_phase(f'forward{micro}', 'activations'):
                        loss = F.cross_entropy(engine(x), y)
                    with mem.in_phase(f'backward{micro}'):
                        engine.backward(loss)
                    with mem.in_phase(f'step{micro}'):
                        engine.step()
        shapes = sum(memory.round_up(t.untyped_storage().nbytes(), 512) for t in memory.deepspeed_shapes(opt))
        with open(f'{out}.{rank}.json', 'w') as f:
            json.dump({'phase_peaks': mem.phase_peaks, 'peak': mem.peak, 'groups': len(opt.param_groups),
                       'shapes': shapes, 'steps': engine.global_steps, 'held': held,
                       'partitions': bench.gradient_partitions(opt, world)}, f)


def test_deepspeed_zero1_on_meta_equals_deepspeed_on_cpu(tmp_path):
    from conftest import ROOT, run_stage
    env = {'PYTHONPATH': ROOT}  # this file runs as the worker
    for world in (1, 2):
        run_stage(__file__, 'cpu', tmp_path / f'cpu{world}', nproc=world, env=env)
        for rank in range(world):  # a process each: the fake group and DeepSpeed's state are per process
            run_stage(__file__, 'meta', tmp_path / f'meta{world}', world, rank, env=env)
            cpu = json.load(open(tmp_path / f'cpu{world}.{rank}.json'))
            meta = json.load(open(tmp_path / f'meta{world}.{rank}.json'))
            assert cpu['steps'] == meta['steps'] == 2 and cpu['groups'] == meta['groups'] > 2
            # every phase after start-up to the byte (DeepSpeed's flat buffers, fp32 partition, Adam moments, reduce
            # buckets, gradients held between micro-steps); start-up also held DeepSpeed's shape-only meta copies
            init = cpu['phase_peaks'].pop('init'), meta['phase_peaks'].pop('init')
            assert cpu['phase_peaks'] == meta['phase_peaks'] and cpu['peak'] == meta['peak']
            assert init[0] <= init[1] <= init[0] + meta['shapes']
            # bench.py's pick of the worst rank: the gradient partition each rank makes, from DeepSpeed's bookkeeping
            assert cpu['held'] == meta['held'] and set(meta['held']) == {meta['partitions'][rank]}
            assert cpu['partitions'] == meta['partitions']
        if world == 2:  # half the optimizer state on each rank: less than the world of one holds
            assert meta['peak'] < json.load(open(tmp_path / 'meta1.0.json'))['peak']


# -----------------------------------------------------------------------------
# bench.py's memory mode: the stage script itself on meta tensors


def memory_row(tmp_path, *args):
    from conftest import run_stage
    out = run_stage('bench.py', '--mode=memory_row', f'--out_dir={tmp_path}', *args, timeout=600).stdout
    return json.load(open(tmp_path / 'bench_memory_row.json')), out


def test_memory_mode_reproduces_the_h200_rows(tmp_path):
    """The three EVA-g MIM steps measured on an H200 (README's GPU table, 2026-11-26, one rank, ZeRO-1 fp16, the
    5e8-element reduce buckets of then) projected by memory mode (two rows at a time): micro-batch 32 with
    checkpointing 21.4 GiB max_memory_allocated, whose peak is DeepSpeed's optimizer step, 22 bytes per trained
    parameter (fp16 weights and gradients, fp32 master, Adam's two moments, the step's fp16 flatten and fp32 copy);
    without checkpointing 30.4 and at micro-batch 64 45.1, whose peaks are the backward's activations."""
    from conftest import run_stage
    out = run_stage('bench.py', '--mode=memory', '--rows=mim32_ckpt,mim32,mim64', '--zero_ranks=1',
                    '--zero_config=reduce_bucket_size=5e8', f'--out_dir={tmp_path}', timeout=900).stdout
    res = json.load(open(tmp_path / 'bench_memory.json'))
    rows = {name: res[name]['worlds']['1'] for name in ('mim32_ckpt', 'mim32', 'mim64')}
    for name, measured in (('mim32_ckpt', 21.4), ('mim32', 30.4), ('mim64', 45.1)):
        assert abs(rows[name]['allocated_gib'] - measured) <= 0.3, (name, rows[name]['allocated_gib'])
    w = rows['mim32_ckpt']
    assert w['peak_phase'] == 'optimizer step' and rows['mim64']['peak_phase'] == 'backward'
    n = w['trained_params']
    assert n == 1_012_229_632  # DESIGN.md: the MIM model (EVA-g + mask token + lm_head)
    assert w['at_peak']['Adam'] == pytest.approx(8 * n / 2 ** 30, rel=1e-3)
    assert w['at_peak']['master weights (fp32 partition)'] == pytest.approx(4 * n / 2 ** 30, rel=1e-3)
    assert w['micro_batch'] == 32 and w['accumulation'] == 1 and '| mim32_ckpt | 1 x 32 x 1 | 21.40 |' in out


def test_memory_mode_shards_over_ranks(tmp_path):
    """A tiny MIM run on meta at 2 ranks: the fp32 master and Adam's moments are halved (DeepSpeed's partitions,
    with their alignment padding), the model is the script's, the recipe's batch is accumulated (4 micro-steps,
    3 run: the same peaks, kinds and phases to the byte as all 4); rank 0 is run, then the rank whose gradient
    partition is the largest, if another."""
    tiny = ['--stage=pretrain', '--model_size=eva_tiny', '--img_size=32', '--micro_batch=4', '--teacher_model=tiny',
            '--num_workers=0', '--zero_ranks=2', '--stage_args=config/pretrain_tiny.py']  # its batch: 32
    res, out = memory_row(tmp_path / 'three', *tiny)
    one, two = res['worlds']['1'], res['worlds']['2']
    parts = two['gradient_partitions']
    assert len(parts) == 2 and two['ranks'] == sorted({0, parts.index(max(parts))})
    assert (one['accumulation'], two['accumulation'], two['micro_steps_run']) == (1, 4, 3)
    ranks = ','.join(map(str, two['ranks']))
    every, _ = memory_row(tmp_path / 'all', *tiny, '--world1=False', '--memory_micro_steps=0',
                          f'--memory_ranks={ranks}')
    every = every['worlds']['2']
    assert every['micro_steps_run'] == 4 and list(every['phase_peaks']) == list(two['phase_peaks'])
    for key in ('peak_bytes', 'peak_phase', 'phase_peaks', 'at_peak_bytes', 'rank'):
        assert every[key] == two[key], key
    width = CLIPTeacher('tiny', '', 32, 4).out_dim
    student = model.EVA(model.eva_config('eva_tiny', pooling='cls', use_mask_token=True, mim_dim=width))
    n = sum(p.numel() for p in student.parameters())
    assert one['trained_params'] == two['trained_params'] == n
    for kind, per_param in (('Adam', 8), ('master weights (fp32 partition)', 4)):  # (a few 512-byte blocks more)
        assert one['at_peak_bytes'][kind] == pytest.approx(per_param * n, rel=0.01)
        assert two['at_peak_bytes'][kind] == pytest.approx(one['at_peak_bytes'][kind] / 2, rel=0.01)
    assert 'world 2 x micro-batch 4 x accumulation 4 (3 run a step)' in out


if __name__ == '__main__':
    zero_step(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:]))
    os._exit(0)  # (the gloo group's threads)
