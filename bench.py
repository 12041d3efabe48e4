"""
Benchmark of this repository's real training steps against the reference a user would otherwise run, and of the
MIM input pipeline against torchvision's.

    python bench.py                                    # EVA-g MIM step, batch 64 at 224, fp16 ZeRO-1, vs timm's Eva
    python bench.py --grad_checkpointing=True --micro_batch=32 --reference=no_checkpointing
    python bench.py --compile_blocks=True
    python bench.py --profile=True --reference=        # + a torch.profiler trace of two steps (out/bench/*/trace.json)
    python bench.py --stage=finetune --img_size=336 --micro_batch=8
    python bench.py --stage=clip --micro_batch=160     # also video, det, seg: each stage's recipe by default
    python bench.py --stage=video --stage_args=--num_frames=16
    python bench.py --zero_config=overlap_comm=False   # a DeepSpeed zero_optimization setting for every run
    python bench.py --mode=data                        # input pipeline, images/s per CPU core
    python bench.py --mode=targets                     # the performance targets in one run, each said met or not
    python bench.py --mode=table --rows=mim64,clip     # rows of the README's table (ROWS), each saved as it ends
    python bench.py --mode=memory                      # each row's GPU memory projected on a CPU, world 1 and 16
    python bench.py --mode=memory_row --stage=pretrain --micro_batch=32 --grad_checkpointing=True  # one row
    python bench.py --model_size=eva_tiny --img_size=32 --micro_batch=8 --teacher_model=tiny --steps=3 --warmup=2
                                                       # a CPU smoke run (correctness only, never a speed claim)

Step mode runs the stage script itself (pretrain.py: teacher forward, student forward and backward, the DeepSpeed
optimizer step, data loading; finetune_cls.py: forward, backward, step, EMA; train_clip.py, finetune_video.py,
det_seg.py likewise) on synthetic data, each in a fresh subprocess so that its peak memory is its own, stops it once
its log holds the warm-up and timed steps, and reads the rates from that log. The references are the same script
with model.EVA replaced by timm's Eva of the same size (a mask token and lm_head added for MIM), eager,
before the script imports it: same teacher, same data, same DeepSpeed config. 'timm' also undoes our one change to
DeepSpeed's optimizer (common.fuse_zero_grad_checks), so it is timm's Eva under DeepSpeed as it ships: what a user
would otherwise run; 'timm_our_engine' keeps it, so ours against it is the model's (and compile's) own share.
Warm-up steps are dropped; the median step is reported. MFU counts the student's forward + backward and the
teacher's forward (matmul FLOPs; CLIP: both towers; det and seg: none) against the matmul rate measured here (fp16
on a GPU, fp32 on a CPU). Memory: max_memory_allocated and max_memory_reserved from the stage's log, the device's
free memory once the CUDA context exists and after start-up (engine.json), and beside them the row's world-1
projection from --projection (a memory-mode run's bench_memory.json, made on a CPU; the README's is committed).

Memory mode runs the same stage script, for two optimizer steps, on the meta device under memory.py's counter
(memory_worker): no GPU, no data in the tensors; the stage makes a GPU's choices (fp16, fused AdamW), DeepSpeed runs
its own ZeRO code as rank r of N through a fake process group, attention allocates what the CUDA kernels do. Each
row at world 1 (as step mode measures it, to check against a GPU) and at --zero_ranks ranks with the recipe's batch
(--memory_ranks: which ranks; by default rank 0 and the one DeepSpeed gives the largest gradient partition); the
last step's peak, as max_memory_allocated would give it, plus a device need (fragmentation, CUDA context, NCCL:
printed, settable) against --gpu_gib. What the values would decide is a named policy (det_policies: objects per
image, sampled proposals, boxes kept; seg: classes per crop), RECIPE_ROWS add the EVA-g configs the GPU table has
no row for, as shipped and with their 24 GB settings.

Importable (`import bench`: the command line is under __main__). The stages' own knowledge is one row each in
STAGES (a Stage: script, recipe, synthetic-data arguments, FLOP count, whether timm's Eva can stand in). deepspeed
and timm are imported where used: deepspeed for a fast --help, timm because only the references need it.

Data mode writes JPEGs at ImageNet-like sizes (500x375 and 375x500, quality 90, ~100 kB) and times, in one
process on one thread, in interleaved passes (median pass reported), data.py's MIM sample (read_rgb, uint8 crop +
flip, block mask; normalised on the GPU later) against torchvision's ImageFolder + PIL RandomResizedCrop, flip,
ToTensor, Normalize and the same mask generator, and compares the two outputs' statistics on the same crops (an
untimed pass with every pipeline's generator seeded per image).
"""
import ast
import contextlib
import json
import os
import runpy
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import common  # first: it sets OpenMP's wait policy, which torch's import fixes
import model
import numpy as np
import psutil
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.checkpoint import checkpoint
from torchvision import datasets
from torchvision import transforms as T

from data import (CLIP_MEAN, CLIP_STD, CocoDetection, ImageFiles, MaskingGenerator, ResumableSampler, Samples,
                  SyntheticShapes, make_loader, mim_transform, normalize_batch, sample_seeds, seeded)
from model import CLIP, EVA, TEXT_SIZES, CLIPTeacher, eva_config, vit_flops

ROOT = os.path.dirname(os.path.abspath(__file__))


def timm_eva_class():
    """timm's Eva behind our EVA's constructor and interface (EVA(config), forward(x, mask) for MIM, .config,
    flops_per_image): the reference student. Same key names, so param_groups and checkpoints treat it alike."""
    import timm.models.eva as timm_eva

    class TimmEVA(timm_eva.Eva):
        def __init__(self, cfg):
            super().__init__(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                             depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_dim / cfg.embed_dim,
                             num_classes=cfg.num_classes, global_pool='avg' if cfg.pooling == 'mean' else 'token',
                             drop_path_rate=cfg.drop_path)
            self.config = cfg
            self.set_grad_checkpointing(cfg.grad_checkpointing)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim)) if cfg.use_mask_token else None
            self.lm_head = nn.Linear(cfg.embed_dim, cfg.mim_dim) if cfg.mim_dim > 0 else None

        def forward(self, x, mask=None):
            # DeepSpeed casts the parameters to fp16, not the buffers: timm's constant zero k_bias would stay float32
            # and promote the concatenated qkv bias (and F.linear's output) to float32. Cast once per dtype, not in
            # every timed step (a walk over all modules is host time the reference would pay and ours not)
            dtype = self.patch_embed.proj.weight.dtype
            if getattr(self, 'buffer_dtype', None) != dtype:
                for mod in self.modules():
                    for name, b in mod._buffers.items():
                        if b is not None and b.is_floating_point():
                            mod._buffers[name] = b.to(dtype)
                self.buffer_dtype = dtype
            if mask is None:
                return super().forward(x)
            x = self.patch_embed(x)
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
            x, rope = self._pos_embed(x)
            for blk in self.blocks:
                if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                    x = checkpoint(blk, x, rope=rope, use_reentrant=False)
                else:
                    x = blk(x, rope=rope)
            return self.lm_head(self.norm(x)[:, 1:][mask])

        flops_per_image = EVA.flops_per_image

    return TimmEVA


def around(cls, method, context, then=None):
    """cls.method patched to run inside context(self) (a phase of the step: a profiler range, a memory phase),
    then to call then(self)."""
    inner = getattr(cls, method)

    def wrapped(self, *a, **k):
        with context(self):
            out = inner(self, *a, **k)
        if then:
            then(self)
        return out
    setattr(cls, method, wrapped)


def worker(job):
    """In the subprocess: run a stage script as __main__ with the job's arguments (and timm's Eva as the model
    class for the reference), as `python script ARGS` would."""
    import deepspeed

    # a compiled run must not time a half-compiled model: past 8 recompilations of Block.forward dynamo goes on in
    # eager silently (a graph per drop-path rate would leave most of EVA-g's 40 blocks uncompiled); fail instead
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    if job['impl'].startswith('timm'):
        model.EVA = timm_eva_class()
    if job['impl'] == 'timm':  # DeepSpeed's optimizer as it ships: its per-tensor gradient checks left in place
        common.fuse_zero_grad_checks = lambda optimizer: optimizer
    initialize = deepspeed.initialize

    cuda = torch.cuda.is_available()
    free_at_start = cuda and torch.cuda.mem_get_info()  # (free, total) bytes once this process's context exists

    def engine_record(*a, config, model, **k):  # the DeepSpeed config the run used (with zero_config merged in)
        config = {**config, 'zero_optimization': {**config['zero_optimization'], **job.get('zero_config', {})}}
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        out = initialize(*a, config=config, model=model, **k)
        device = {'total_gb': free_at_start[1] / 2**30, 'free_gb_at_start': free_at_start[0] / 2**30,
                  'free_gb_after_init': torch.cuda.mem_get_info()[0] / 2**30} if cuda else {}
        with open(os.path.join(job['run_dir'], 'engine.json'), 'w') as f:
            json.dump({'deepspeed_config': config, 'trained_params': trained, **device}, f, indent=1)
        return out
    deepspeed.initialize = engine_record
    sys.argv = [job['script'], *job['args']]
    if not job.get('profile'):
        runpy.run_path(os.path.join(ROOT, job['script']), run_name='__main__')
        return
    # a trace of two steps after the warm-up: the profiler steps with each call of the engine's step()
    from deepspeed.runtime.engine import DeepSpeedEngine

    def write(prof):
        prof.export_chrome_trace(os.path.join(job['profile'], 'trace.json'))
        with open(os.path.join(job['profile'], 'profile.txt'), 'w') as f:
            f.write(prof.key_averages().table(sort_by='cuda_time_total' if cuda else 'cpu_time_total', row_limit=60))
    kinds = torch.profiler.ProfilerActivity
    activities = [kinds.CPU, kinds.CUDA] if cuda else [kinds.CPU]

    def named(label):  # the step's phases as labelled ranges in the trace
        return lambda self: torch.profiler.record_function(label)
    steps = torch.profiler.schedule(wait=job['wait'], warmup=1, active=2)
    with torch.profiler.profile(activities=activities, schedule=steps, on_trace_ready=write) as prof:
        around(DeepSpeedEngine, 'forward', named('student_forward'))
        around(DeepSpeedEngine, 'backward', named('student_backward'))
        around(DeepSpeedEngine, 'step', named('optimizer_step'), then=lambda engine: prof.step())
        around(model.CLIPTeacher, 'forward', named('teacher_forward'))
        runpy.run_path(os.path.join(ROOT, job['script']), run_name='__main__')


def memory_worker(job):
    """In the subprocess: the stage script as __main__ on meta tensors (no data in them, no GPU), as rank
    job['rank'] of job['world'], under memory.LiveMemory, stopped after job['steps'] optimizer steps; the peaks of
    the last one (the steady state: Adam's moments exist from the first) -> run_dir/memory.json. The stage makes
    a GPU's choices (common.on_gpu: fp16, fused AdamW, an fp16 teacher), DeepSpeed gets CUDA's overlap_comm and runs
    its own ZeRO code (memory.deepspeed_on_meta), attention allocates what the CUDA kernels do."""
    import warnings

    import torch.optim.optimizer as optim_base

    import memory
    world, rank = job['world'], job['rank']
    mem = memory.LiveMemory('meta', explain=12, fraction=job['det_kept'], unique=job['seg_classes'])
    common.GPU_TYPES.add('meta')
    common.init_distributed = lambda num_workers=0: (rank, 0, world, torch.device('meta'))
    common.resume = lambda *a, **k: (0, {})  # a fresh run (rank 0's choice of checkpoint cannot reach another rank)
    fused = optim_base._get_fused_kernels_supported_devices
    optim_base._get_fused_kernels_supported_devices = lambda: fused() + ['meta']  # AdamW(fused=True), as on a GPU
    warnings.filterwarnings('ignore', "'pin_memory' argument is set as true")  # (the GPU's loader on a CPU host)
    teachers, engines, boundaries, partitions = [], [], [0], []

    class Done(Exception):
        pass

    def phase(name, kind):  # a method counted as a phase of the step (name: a string, or one of the object)
        return lambda self: mem.in_phase(name(self) if callable(name) else name, kind)

    def after_step(engine):
        if engine.global_steps == boundaries[0]:  # (counted at every boundary, an fp16 step skipped or not)
            return
        boundaries[0] = engine.global_steps
        if boundaries[0] == job['steps']:
            raise Done
        if boundaries[0] == job['steps'] - 1:  # from here on the peaks are the last step's; what persists is named
            opt = engine.optimizer
            mem.reset_peaks()
            mem.track([x for t in teachers for x in (*t.parameters(), *t.buffers())], 'teacher')
            mem.track(getattr(opt, 'bit16_groups_flat', []), 'weights (fp16, flat)')
            mem.track(getattr(opt, 'single_partition_of_fp32_groups', []), 'master weights (fp32 partition)')
            mem.track([v for st in opt.optimizer.state.values() for v in st.values() if torch.is_tensor(v)], 'Adam')

    with memory.deepspeed_on_meta(world, rank):
        import deepspeed
        from deepspeed.runtime.engine import DeepSpeedEngine
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
        initialize = deepspeed.initialize

        def engine_on_meta(*a, config, **k):
            config['zero_optimization'].update(overlap_comm=True, **job['zero_config'])  # CUDA's, as common sets it
            with mem.in_phase('DeepSpeed start-up'):
                out = initialize(*a, config=config, **k)
            mem.forget(memory.deepspeed_shapes(out[1]))
            engines.append(out[0])
            partitions.extend(gradient_partitions(out[1], world))
            return out
        deepspeed.initialize = engine_on_meta
        around(DeepSpeedEngine, 'forward', phase('forward', 'activations'))
        around(DeepSpeedEngine, 'backward', phase(lambda e: 'backward' if e.is_gradient_accumulation_boundary() else
                                                  'backward (accumulating)', 'gradients and temporaries'))
        around(DeepSpeedEngine, 'step', phase(lambda e: 'optimizer step' if e.is_gradient_accumulation_boundary() else
                                              'micro-step end', 'optimizer step temporaries'), then=after_step)
        if hasattr(DeepSpeedZeroOptimizer, 'setup_buckets'):  # the reduce buckets, made at a micro-step's first hook
            around(DeepSpeedZeroOptimizer, 'setup_buckets', phase(lambda o: mem.phase, 'reduce buckets'))
        around(model.CLIPTeacher, 'forward', phase('teacher', 'teacher targets'))
        around(model.CLIPTeacher, '__init__', lambda t: contextlib.nullcontext(), then=teachers.append)
        ema_update = model.ema_update_  # (the script imports it from model after this)

        tagged = set()  # the EMA models whose weights are named already

        def ema_update_(ema_model, net, decay):  # finetune_cls.py's EMA: its fp32 weights named, its update a phase
            if id(ema_model) not in tagged:
                tagged.add(id(ema_model))
                mem.track([*ema_model.parameters(), *ema_model.buffers()], 'EMA (fp32)')
            with mem.in_phase('EMA update'):
                ema_update(ema_model, net, decay)
        model.ema_update_ = ema_update_
        if job['script'] == 'det_seg.py':
            det_policies(mem, job['det_objects'])
        sys.argv = [job['script'], *job['args']]
        try:
            with mem, memory.cuda_attention(), mem.in_phase('the loop', 'start-up'):
                runpy.run_path(os.path.join(ROOT, job['script']), run_name='__main__')
        except Done:
            pass
    if boundaries[0] < job['steps']:
        raise SystemExit(f"{job['script']} ended after {boundaries[0]} of {job['steps']} optimizer steps")
    res = dict(mem.summary(), peak_bytes=mem.peak, world=world, rank=rank,
               micro_batch=engines[0].train_micro_batch_size_per_gpu(),
               accumulation=engines[0].gradient_accumulation_steps(),
               trained_params=sum(p.numel() for p in engines[0].module.parameters() if p.requires_grad),
               gradient_partitions=partitions)
    with open(os.path.join(job['run_dir'], 'memory.json'), 'w') as f:
        json.dump(res, f, indent=1)


def load_projection():
    """The projection file's rows (bench_memory.json of a memory-mode run), {} if there is none."""
    path = os.path.join(ROOT, projection) if projection else ''
    return json.load(open(path)) if os.path.exists(path) else {}


def projected(world):
    """This run's projected allocated peak at `world` ranks (GiB) from the projection file: the row with this run's
    stage, model, size, micro-batch, checkpointing, stage arguments and zero_config; None if it holds none."""
    this = dict(stage=stage, model_size=model_size, img_size=img_size, micro_batch=micro_batch,
                grad_checkpointing=grad_checkpointing, stage_args=stage_args, zero_config=zero_config)
    for row in load_projection().values():
        if row and {k: row.get(k) for k in this} == this and str(world) in row['worlds']:
            return row['worlds'][str(world)]['allocated_gib']
    return None


def gradient_partitions(optimizer, world):
    """The elements of the gradient partition (grads_in_partition) each rank of `world` holds, by DeepSpeed's own
    bookkeeping (get_partition_info): a rank keeps the whole gradient of every parameter overlapping its slice of
    each param group, so that with layer decay's ~84 groups some ranks hold far more than 1/world."""
    if not hasattr(optimizer, 'get_partition_info'):  # (not ZeRO-1/2)
        return []
    groups = optimizer.round_robin_bit16_groups
    return [sum(p.numel() for i, g in enumerate(groups) for p in optimizer.get_partition_info(
        g, optimizer.partition_size[i], r, optimizer.round_robin_bit16_padding[i])[0]) for r in range(world)]


def det_policies(mem, objects):
    """det_seg.py's detector on meta, where the values would decide counts: every image of a batch carries `objects`
    ground truths (boxes, labels and, where the data has bitmaps, masks of the whole crop, the largest an image has:
    the loop copies them to the device and holds them for the step, as it does the data's); a sampler draws a full
    sample (positive_fraction of its batch positive, the rest negative, as many as there are boxes: counts the masks
    it returns carry); the mask head sees the sampled boxes' positive share (roi_positive); ROIs spread evenly over
    the pyramid's levels. The rest (boxes the RPN's filters, NMS and the cascade keep) is mem.fraction's share,
    det_kept."""
    import data
    import det_model
    from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
    sample, collate, pool = BalancedPositiveNegativeSampler.__call__, data.collate_detection, det_model.pool_rois

    def sampler(self, labels):
        pos, neg = sample(self, labels)
        for p, n, lab in zip(pos, neg, labels):
            boxes = mem.selected(lab.numel(), 'the boxes a sampler draws from')
            n_pos = min(boxes, int(self.batch_size_per_image * self.positive_fraction))
            mem.count(p, n_pos)
            mem.count(n, min(boxes, self.batch_size_per_image - n_pos))
        return pos, neg

    def collate_detection(samples, size):  # (det_seg.py imports it from data after this)
        batch = collate(samples, size)
        shapes = {'boxes': (objects, 4), 'labels': (objects,), 'masks': (objects, size, size)}  # (the largest crop)
        batch['targets'] = [{k: v.new_zeros(shapes[k]) if k in shapes else v for k, v in t.items()}
                            for t in batch['targets']]
        return batch

    def pool_rois(features, boxes, size, canonical=224):
        with mem.selecting(1 / len(features)):
            return pool(features, boxes, size, canonical)
    BalancedPositiveNegativeSampler.__call__, data.collate_detection = sampler, collate_detection
    det_model.pool_rois = pool_rois
    around(det_model.CascadeMaskRCNN, 'mask_loss', lambda self: mem.selecting(self.config.roi_positive))


def memory_row():
    """This stage's step at bench's settings, projected at world 1 (batch = micro-batch, as step mode measures it)
    and at zero_ranks ranks (the recipe's batch, accumulated): each rank a run of memory_worker in a subprocess."""
    res = {'stage': stage, 'model_size': model_size, 'img_size': img_size, 'micro_batch': micro_batch,
           'grad_checkpointing': grad_checkpointing, 'stage_args': stage_args, 'zero_config': zero_config,
           'constants': {k: config[k] for k in ('gpu_gib', 'fragmentation', 'context_gib', 'nccl_gib',
                                                'workspace_gib')}, 'worlds': {}}
    policies = dict(det_objects=det_objects, det_kept=det_kept, seg_classes=seg_classes)
    res['policies'] = policies if stage in ('det', 'seg') else {}
    for world in sorted({1, zero_ranks} if world1 else {zero_ranks}):
        runs = []
        asked = [] if world == 1 or memory_ranks == 'worst' else [int(r) for r in memory_ranks.split(',')]
        ranks = [0, *(r for r in asked if r)]  # rank 0 first: it writes the synthetic data the others read
        while ranks:
            rank = ranks.pop(0)
            run_dir = os.path.join(out_dir, f'{stage}_memory_world{world}_rank{rank}')
            job = dict(step_job('ours', run_dir, 2, world, workers=0, micro_steps=memory_micro_steps), world=world,
                       rank=rank, steps=2, **policies)  # (workers: the host's)
            with open(os.path.join(run_dir, 'output.txt'), 'w') as out:
                r = subprocess.run([sys.executable, os.path.join(ROOT, 'bench.py')], cwd=ROOT, stdout=out,
                                   stderr=subprocess.STDOUT, env=dict(os.environ, BENCH_JOB=json.dumps(job)))
            if r.returncode:
                tail = open(os.path.join(run_dir, 'output.txt')).read()[-3000:]
                raise SystemExit(f"{S.script} on meta, rank {rank} of {world}, failed; {run_dir}/output.txt ends:\n"
                                 f"{tail}")
            runs.append(json.load(open(os.path.join(run_dir, 'memory.json'))))
            parts = runs[-1]['gradient_partitions']
            largest = parts.index(max(parts)) if parts else 0
            if world > 1 and memory_ranks == 'worst' and len(runs) == 1 and largest:
                ranks.append(largest)  # the rank of the largest gradient partition, if not rank 0
        worst = max(runs, key=lambda r: r['peak_bytes'])
        allocated = worst['peak_gib'] + workspace_gib
        need = allocated * (1 + fragmentation) + context_gib + (nccl_gib if world > 1 else 0)
        res['worlds'][world] = dict(worst, allocated_gib=round(allocated, 2), device_need_gib=round(need, 2),
                                    fits=need <= gpu_gib, ranks=[r['rank'] for r in runs],
                                    micro_steps_run=worst['accumulation'], accumulation=job['accumulation'])
        w = res['worlds'][world]
        run = f" ({w['micro_steps_run']} run a step)" if w['micro_steps_run'] != w['accumulation'] else ''
        print(f"{stage}, {model_size} at {img_size}, world {world} x micro-batch {w['micro_batch']} x accumulation "
              f"{w['accumulation']}{run}, checkpointing {grad_checkpointing}: {allocated:.2f} GiB allocated at the "
              f"peak ({w['peak_phase']}, rank {w['rank']}), device need {need:.2f} GiB "
              f"({'fits' if w['fits'] else 'does NOT fit'} {gpu_gib} GiB)", flush=True)
        print('  at the peak: ' + ', '.join(f'{k} {v:.2f}' for k, v in w['at_peak'].items() if v >= 0.01))
        print('  phase peaks: ' + ', '.join(f'{k} {v:.2f}' for k, v in w['phase_peaks'].items()))
        print('  largest: ' + '; '.join(w['largest'][:6]), flush=True)
    if res['policies']:
        print('policies (the counts the values would decide): ' + ', '.join(f'{k} {v}' for k, v in policies.items()))
    return res


# memory mode: the recipes (as their configs ship them, and with their 24 GB settings) that ROWS do not hold, at
# zero_ranks only (no GPU table row to check at world 1); ROWS at world 1 and zero_ranks (their configs' batches)
RECIPE_ROWS = {
    'mim32': ['--stage=pretrain', '--micro_batch=32', '--grad_checkpointing=False'],  # config/pretrain_eva_g.py
    'in1k336': ['--stage=finetune', '--img_size=336', '--micro_batch=8', '--grad_checkpointing=False',
                '--stage_args=config/finetune_in1k_336.py', '--world1=False'],
    'in1k336_ckpt': ['--stage=finetune', '--img_size=336', '--micro_batch=8', '--grad_checkpointing=True',
                     '--stage_args=config/finetune_in1k_336.py', '--world1=False'],
    'in21k': ['--stage=finetune', '--img_size=224', '--micro_batch=64', '--grad_checkpointing=False',
              '--stage_args=config/finetune_in21k.py', '--world1=False'],
    'in21k_ckpt': ['--stage=finetune', '--img_size=224', '--micro_batch=64', '--grad_checkpointing=True',
                   '--stage_args=config/finetune_in21k.py', '--world1=False'],
    'seg896_mb2': ['--stage=seg', '--img_size=896', '--micro_batch=2', '--world1=False'],
    'det_lvis': ['--stage=det', '--img_size=1280', '--micro_batch=1', '--stage_args=config/det_lvis_eva_g.py',
                 '--world1=False'],  # 1203 classes: the class-specific mask logits; sigmoid CE, federated loss
}
MEMORY_ROWS = ('mim32_ckpt,mim32,mim64,cls336,in1k336,in1k336_ckpt,in21k,in21k_ckpt,cls560_ckpt,clip,video8,video16,'
               'det1280,det1024,det_lvis,seg896,seg896_mb2')  # memory mode's default rows


def chosen_rows(default, known, what):
    """--rows (or `default`), each a key of `known`; -> (the names, this command's other arguments, which every
    row's own bench.py run takes before the row's settings)."""
    names = [r for r in (rows or default).split(',') if r]
    unknown = [r for r in names if r not in known]
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; known: {', '.join(known)}")
    return names, [a for a in sys.argv[1:] if a.split('=')[0] not in ('--mode', '--out_dir', '--rows')]


def memory_mode():
    """Memory rows (ROWS' settings, and RECIPE_ROWS'), each a bench.py memory_row run of its own, memory_jobs at a
    time (a row's output goes to out_dir/<row>.txt, printed as it ends); a failed row is said and the rest run.
    -> out_dir/memory.md, a row per world, in the rows' order."""
    known = {k: v for k, v in {**ROWS, **RECIPE_ROWS}.items() if k != 'data'}
    names, passed = chosen_rows(MEMORY_ROWS, known, 'memory rows')
    res, running, todo = {}, {}, list(names)
    try:
        while todo or running:
            while todo and len(running) < memory_jobs:
                name = todo.pop(0)
                args = [a for a in known[name] if not a.startswith('--reference')]
                out = open(os.path.join(out_dir, f'{name}.txt'), 'w')
                command = [sys.executable, os.path.join(ROOT, 'bench.py'), *passed, '--mode=memory_row', *args,
                           f'--out_dir={os.path.join(out_dir, name)}']
                running[name] = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT), out, args
            time.sleep(0.5)
            for name, (proc, out, args) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                out.close()
                print(f"-- {name}: python bench.py --mode=memory_row {' '.join(args)}\n{open(out.name).read()}",
                      flush=True)
                path = os.path.join(out_dir, name, 'bench_memory_row.json')
                res[name] = json.load(open(path)) if proc.returncode == 0 else None
    finally:  # Ctrl-C: the rows' runs stop too
        for proc, _, _ in running.values():
            proc.terminate()
    lines = ['| row | world x micro-batch x accumulation | allocated peak, projected (GiB) | peak in | device need '
             f'(GiB) | fits {gpu_gib} GiB |', '|---|---|---|---|---|---|']
    for name in names:
        for world, w in (res[name] or {'worlds': {}})['worlds'].items():
            lines.append(f"| {name} | {world} x {w['micro_batch']} x {w['accumulation']} | {w['allocated_gib']:.2f} | "
                         f"{w['peak_phase']} | {w['device_need_gib']:.2f} | {'yes' if w['fits'] else 'NO'} |")
        if res[name] is None:
            lines.append(f"| {name} | failed: see {out_dir}/{name}.txt | | | | |")
    with open(os.path.join(out_dir, 'memory.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    return res


def matmul_tflops():
    """Measured dense matmul rate: fp16 8192^3 on a GPU, fp32 1024^3 on a CPU (TFLOP/s)."""
    cuda = torch.cuda.is_available()
    n, dtype = (8192, torch.float16) if cuda else (1024, torch.float32)
    a = torch.randn(n, n, dtype=dtype, device='cuda' if cuda else 'cpu')
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    reps = 50 if cuda else 5
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if cuda:
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12


# -----------------------------------------------------------------------------
# config (the command line reads it under __main__, at the end)
mode = 'step'  # 'step': a stage's training step, ours vs references; 'data': input pipeline vs torchvision's; 'table':
#   the benchmark table's rows (ROWS) in order, each saved as it ends; 'targets': the rows the targets need, and checks;
#   'index': the data indexes of 1M-30M image lists and an Objects365-sized json (memory, start-up; no GPU);
#   'memory': each row's GPU memory projected on a CPU (memory.py; no GPU); 'memory_row': one such
#   row, of the settings below (stage, micro_batch, grad_checkpointing, ...)
stage = 'pretrain'  # step mode: 'pretrain' (MIM with the CLIP teacher), 'finetune' (finetune_cls.py), 'clip'
#   (train_clip.py), 'video' (finetune_video.py), 'det' or 'seg' (det_seg.py's two tasks): STAGES
model_size = 'eva_g'  # a key of model.SIZES
img_size = 0  # resolution; 0: the stage's recipe (pretrain, clip, video 224; finetune 336; det 1280; seg 896)
micro_batch = 0  # images (pairs, clips) per step on one GPU, no accumulation; 0: the stage's (see STAGES)
grad_checkpointing = None  # recompute blocks in backward; None: the stage's recipe (on for clip, video, det, seg)
compile_blocks = False  # torch.compile each of our blocks (pretrain, finetune, video; the timm references run eager)
profile = False  # step mode: also write a torch.profiler trace of two steps of ours (out_dir/<stage>_ours/trace.json)
reference = 'auto'  # runs to compare with, comma-separated: 'timm' (timm's Eva, eager, under DeepSpeed as it ships:
#   what a user would otherwise run), 'timm_our_engine' (timm's Eva, eager, with our engine changes: the model's own
#   share), 'no_checkpointing' (ours without gradient checkpointing); '': ours only; 'auto': 'timm,timm_our_engine'
#   for the stages timm's Eva can stand in for (pretrain, finetune), '' for the others
stage_args = ''  # more arguments for the stage script, space-separated: a config file there replaces the stage's base
#   config (bench's own settings still override it), --key=value come last: e.g. '--num_frames=16'
zero_config = ''  # DeepSpeed zero_optimization settings merged in for every run: 'key=value,...' (overlap_comm=False)
teacher_model = 'ViT-L-14'  # pretrain teacher, randomly initialised (its cost, not its weights); 'tiny' for CPU
dtype = 'fp16'  # training precision on a GPU (a CPU falls back to fp32, as the stages do)
steps = 10  # timed steps; the median is reported
warmup = 5  # steps run first and not timed (allocator, autotuning, compilation)
zero_ranks = 16  # memory mode: project the per-GPU peak memory under ZeRO-1 over this many ranks (and world 1)
num_workers = 8  # DataLoader workers of the stage
out_dir = 'out/bench'  # logs of the runs and bench_<mode>.json (table mode: a folder per row and table.md)
rows = ''  # table mode: the ROWS to run, comma-separated, in this order; '': all of them
data_images = 256  # data mode: JPEGs written
data_passes = 5  # data mode: timed passes over them per pipeline, interleaved; the median pass is reported
index_lists = '1e6,1e7,3e7'  # index mode: image lists of these many lines (merged-30M: 29.6M)
index_jsons = '1.7e6'  # index mode: Objects365-shaped jsons of these many images (Objects365 v2: 1.7M)
index_boxes_per_image = 15  # index mode: boxes of each json image (Objects365 v2: ~25M boxes / 1.7M images)
index_worker_samples = 10_000  # index mode: samples each of two DataLoader workers reads (their memory before, after)
projection = 'assets/memory_projection.json'  # step / table / targets: a memory-mode run's rows, beside the measured
memory_micro_steps = 3  # memory mode: micro-steps run a step at most; a recipe's 4th and later are its 2nd again
#   (grads accumulated into, not made), the same peak to the byte (tested); 0: all of them
memory_jobs = 2  # memory mode: rows projected at a time (each a process: mostly one core)
world1 = True  # memory mode: also project world 1 at batch = micro-batch (as step mode measures it on one GPU)
memory_ranks = 'worst'  # memory mode: ranks of zero_ranks projected, a run each, the largest peak reported; 'worst':
#   rank 0, then the rank with the largest gradient partition by DeepSpeed's own bookkeeping (layer decay's groups)
gpu_gib = 22.0  # memory mode: usable GiB of the GPU a row must fit ("24 GB" cards: 24e9 bytes, 22.4 GiB, less ECC)
fragmentation = 0.10  # memory mode: the caching allocator's reserved-over-allocated, an allowance (not modelled)
context_gib = 0.6  # memory mode: the CUDA context, outside the allocator (lazy module loading)
nccl_gib = 0.5  # memory mode: NCCL's buffers when there is more than one rank, outside the allocator
workspace_gib = 0.07  # memory mode: cuBLAS / cuBLASLt workspaces, inside the allocator (max_memory_allocated)
# memory mode, what the values would decide (meta tensors have none), as the study set it
det_objects = 50  # det: ground-truth objects per image, masks of the whole crop (COCO: 7.3 on average, up to ~90)
det_kept = 1.0  # det: share of boxes the RPN's filters and NMS keep (then its top 1000) and the cascade keeps
seg_classes = 20  # seg: classes present in a crop (the Mask2Former targets; ADE20K: ~9 per image, up to ~70)
# -----------------------------------------------------------------------------
# step mode's stages: one row each (STAGES) with everything bench.py knows of it


def masked_patches(img_size, model_size):
    """The paper's 105 of 256 patches masked at any grid, and the smallest block (16; 4 on a toy grid)."""
    grid = img_size // eva_config(model_size).patch_size
    return round(105 / 256 * grid * grid), 16 if grid >= 14 else 4


def pretrain_args(m, n, synthetic):  # its warmup_epochs / epochs make the lr schedule, which does not change the speed
    num_masked, min_masked = masked_patches(img_size, model_size)
    return ['--data_path=synthetic', f'--synthetic_size={m * n}', '--max_steps=0', '--epochs=1', '--ckpt_interval=0',
            '--eval_interval=0', '--val_data_path=', f'--teacher_model={teacher_model}', '--teacher_pretrained=',
            f'--num_mask_patches={num_masked}', f'--min_mask_patches={min_masked}']


def finetune_args(m, n, synthetic):
    return ['--data_path=synthetic', f'--synthetic_size={m * n}', '--epochs=1', '--save_ckpt=False',
            '--val_data_path=synthetic:1', f'--val_size={m}']


def clip_args(m, n, synthetic):  # a random text tower: its cost, not OpenAI's weights
    return ['--train_data=synthetic', f'--synthetic_size={m * n}', f'--samples_seen={m * n}', '--warmup_steps=1',
            '--zeroshot_data=', '--text_init_from=']


def video_args(m, n, synthetic):  # (the synthetic videos have at most 24 classes: the head is 0.01% of the step)
    return ['--data_path=synthetic', '--val_data_path=synthetic', f'--synthetic_dir={synthetic}',
            f'--synthetic_size={max(m * n, 8)}', '--num_classes=24', '--epochs=1', '--save_ckpt=False']  # val: 1/4


def scenes_args(task, m, n, synthetic):
    """det / seg on the synthetic scenes (10 shape kinds) with the recipe's class count (COCO 80, LVIS 1203, ADE20K
    150: the heads' sizes), the classes past the 10 kinds in no scene."""
    return [f'--task={task}', f'--synthetic_dir={synthetic}', f'--synthetic_size={max(m * n, 16)}',  # val: 1/8
            f'--max_steps={n}', '--eval_interval=0', f'--save_interval={n + 1}']


def det_args(m, n, synthetic):
    return scenes_args('det', m, n, synthetic) + ['--train_json=synthetic', '--val_json=synthetic']


def seg_args(m, n, synthetic):
    return scenes_args('seg', m, n, synthetic) + ['--train_labels=synthetic', '--val_labels=synthetic', '--label_map=']


def pretrain_flops(c):
    """The student's forward + backward and the teacher's forward (matmul FLOPs), from the run's logged settings c."""
    student = EVA(eva_config(c['model_size'], img_size=c['img_size'], pooling='cls', use_mask_token=True, mim_dim=768))
    flops = student.flops_per_image(num_masked=masked_patches(c['img_size'], c['model_size'])[0])
    if c['teacher_model'] == 'tiny':
        return flops + CLIPTeacher('tiny', '', c['img_size'], student.config.patch_size).flops_per_image
    import open_clip  # an open_clip tower: its forward from its config, without building it (open_clip: optional)
    mc = open_clip.get_model_config(c['teacher_model'])
    v = mc['vision_cfg']
    grid = v['image_size'] // v['patch_size']
    mlp = int(v['width'] * v.get('mlp_ratio', 4.0))
    flops += vit_flops(v['image_size'], v['patch_size'], v['width'], v['layers'], mlp)
    return flops + 2 * grid * grid * v['width'] * mc['embed_dim']  # proj


def clip_flops(c):
    """Both towers, as train_clip.py counts them for its MFU."""
    vision = eva_config(c['model_size'], img_size=c['img_size'], pooling='cls', num_classes=c['embed_dim'])
    return CLIP(vision, TEXT_SIZES[c['text_size']], c['embed_dim']).flops_per_pair()


def eva_flops(c):
    """An EVA classifier on images or clips, as finetune_cls.py and finetune_video.py count it."""
    cfg = eva_config(c['model_size'], img_size=c['img_size'], num_classes=c['num_classes'],
                     num_frames=c.get('num_frames', 1))
    return EVA(cfg).flops_per_image()


@dataclass(frozen=True)
class Stage:
    script: str  # the stage script
    base_config: str  # its config file for the runs ('': the script's own defaults, the EVA-g recipe)
    rate_key: str  # the rate in its log
    unit: str  # one sample
    img_size: int  # the recipe's resolution ...
    micro_batch: int  # ... micro-batch per GPU ...
    grad_checkpointing: bool  # ... and gradient checkpointing
    timm: bool  # timm's Eva can stand in for its model (the timm references: 'auto' runs them, others refuse them)
    compiles: bool  # the script has compile_blocks
    args: object  # (micro-batch, steps, synthetic data folder) -> its arguments for synthetic data and a short run
    flops: object = None  # (its logged config) -> matmul FLOPs of one trained sample; None: no count (det, seg heads)


STAGES = {  # pretrain at micro-batch 64, the MIM target's (the recipe runs 32); clip: 160 on an A100-40GB (the paper)
    'pretrain': Stage('pretrain.py', '', 'img_s', 'img', 224, 64, False, True, True, pretrain_args, pretrain_flops),
    'finetune': Stage('finetune_cls.py', '', 'img_s', 'img', 336, 16, False, True, True, finetune_args, eva_flops),
    'clip': Stage('train_clip.py', '', 'samples_s', 'pair', 224, 160, True, False, False, clip_args, clip_flops),
    'video': Stage('finetune_video.py', '', 'samples_s', 'clip', 224, 2, True, False, True, video_args, eva_flops),
    'det': Stage('det_seg.py', '', 'img_s', 'img', 1280, 1, True, False, False, det_args),
    'seg': Stage('det_seg.py', 'config/seg_ade20k_eva_g.py', 'img_s', 'img', 896, 1, True, False, False, seg_args),
}


def recipe_setting(key, files):
    """A setting as the stage script would read it: the last config file that sets it, else the script's default."""
    for path in reversed(files):
        ns = {}
        exec(open(os.path.join(ROOT, path)).read(), ns)
        if key in ns:
            return ns[key]
    for node in ast.parse(open(os.path.join(ROOT, S.script)).read()).body:
        if isinstance(node, ast.Assign) and [getattr(t, 'id', None) for t in node.targets] == [key]:
            return ast.literal_eval(node.value)
    raise KeyError(f"{S.script} has no setting {key}")


def step_job(impl, run_dir, n, world=1, workers=None, micro_steps=0):
    """A run of the stage script for `n` optimizer steps in a fresh run_dir, as a job for worker / memory_worker:
    world 1 at batch = micro-batch (no accumulation), as step mode measures it; a larger world at the recipe's batch
    (the stage's config), accumulated as the recipe does on that many ranks, or over at most `micro_steps`
    micro-steps a step (0: all; the job's 'accumulation' is the recipe's)."""
    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    os.makedirs(run_dir)
    m = micro_batch
    ckpt, comp = grad_checkpointing and impl != 'no_checkpointing', compile_blocks and not impl.startswith('timm')
    extra = stage_args.split()
    files = [a for a in extra if not a.startswith('--')] or [S.base_config] * bool(S.base_config)
    args = [*files, f'--out_dir={run_dir}', f'--model_size={model_size}', f'--img_size={img_size}',
            f'--micro_batch={m}', *[f'--batch_size={m}'] * (world == 1), f'--grad_checkpointing={ckpt}',
            f'--dtype={dtype}', f'--num_workers={num_workers if workers is None else workers}', '--log_interval=1']
    args += [f'--compile_blocks={comp}'] * S.compiles
    synthetic = os.path.join(out_dir, 'synthetic_' + stage)  # written once, read by every run of the stage
    batch = m if world == 1 else recipe_setting('batch_size', files)
    args += S.args(batch, n, synthetic)  # a step's images
    m, accumulation = common.batch_split(batch, m, world)  # as the stage splits it (a micro-batch it lowers too)
    if micro_steps and accumulation > micro_steps:
        args.append(f'--batch_size={m * world * micro_steps}')
    return {'script': S.script, 'impl': impl, 'args': args + [a for a in extra if a.startswith('--')],
            'run_dir': os.path.abspath(run_dir), 'zero_config': ZERO, 'accumulation': accumulation}


def run_step(impl):
    """One stage run of warmup + steps steps, stopped once they are logged (a stage's end-of-run evaluation and
    checkpoint are not the step, and cost minutes at EVA-g); -> per-step rates (timed steps), peak GiB, wall s."""
    run_dir = os.path.join(out_dir, f'{stage}_{impl}')
    n = warmup + steps
    job = step_job(impl, run_dir, n)
    if profile and impl == 'ours':  # profiled steps are slower: this run's rates are marked 'profiled'
        job.update(profile=os.path.abspath(run_dir), wait=max(warmup - 1, 0))
    env, log_path, t = dict(os.environ, BENCH_JOB=json.dumps(job)), os.path.join(run_dir, 'log.jsonl'), time.time()
    with open(os.path.join(run_dir, 'output.txt'), 'w') as out:  # the stage's own output, for a failure or a look
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'bench.py')], env=env, cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # its own group: workers go too
        logged = []
        try:
            while proc.poll() is None and len(logged) < n:
                time.sleep(0.2)
                lines = open(log_path).readlines() if os.path.exists(log_path) else []
                logged = [r for r in map(json.loads, lines[:-1] if lines and not lines[-1].endswith('\n') else lines)
                          if S.rate_key in r]
        finally:  # also on Ctrl-C or SIGTERM: a run in its own session would outlive bench.py on the GPU
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    wall = time.time() - t
    if len(logged) < n:
        tail = open(os.path.join(run_dir, 'output.txt')).read()[-4000:]
        raise RuntimeError(f"{S.script} with {impl} ended (exit status {proc.returncode}) after {len(logged)} of {n} "
                           f"steps; its output ({run_dir}/output.txt) ends:\n{tail}")
    mem = {k: max((row.get(k) or 0) for row in logged[:n]) or None for k in ('mem_gb', 'reserved_gb')}
    return [row[S.rate_key] for row in logged[warmup:n]], mem, wall


def step_mode():
    cuda = torch.cuda.is_available()
    rate = matmul_tflops()
    results = {'config': config, 'stage': stage, 'unit': S.unit, 'script': S.script, 'img_size': img_size,
               'micro_batch': micro_batch, 'grad_checkpointing': grad_checkpointing, 'reference': reference,
               'device': torch.cuda.get_device_name() if cuda else 'cpu', 'matmul_tflops': rate, 'runs': {}}
    references = [r for r in reference.split(',') if r]
    unknown = set(references) - {'timm', 'timm_our_engine', 'no_checkpointing'}
    assert not unknown, f"unknown reference {unknown}: 'timm', 'timm_our_engine' or 'no_checkpointing'"
    timm_stages = ' and '.join(k for k, v in STAGES.items() if v.timm)
    assert S.timm or not {'timm', 'timm_our_engine'} & set(references), \
        f"the timm references are for {timm_stages} (timm's Eva as MIM or classification model), not {stage}"
    for impl in ['ours'] + references:
        try:
            rates, mem, wall = run_step(impl)
        except RuntimeError as e:  # a reference that fails (out of memory without checkpointing) is a finding
            if impl == 'ours':
                raise
            print(e)
            results['runs'][impl] = {'error': str(e)[-1000:]}
            continue
        run_dir = os.path.join(out_dir, f'{stage}_{impl}')
        logged = json.loads(open(os.path.join(run_dir, 'log.jsonl')).readline())['config']  # the stage's settings
        engine = json.load(open(os.path.join(run_dir, 'engine.json')))
        if impl == 'ours':
            with torch.device('meta'):  # the FLOP counts build their models without weights
                flops = S.flops(logged) if S.flops else None
            results.update(flops_per_sample=flops, params=engine['trained_params'])
        med, flops = statistics.median(rates), results['flops_per_sample']
        results['runs'][impl] = {
            'samples_s': med, 'samples_s_all': rates, 'wall_s': round(wall, 1),
            'mfu': flops and med * flops / (rate * 1e12), 'peak_gb': mem['mem_gb'], 'reserved_gb': mem['reserved_gb'],
            **{k: round(v, 2) for k, v in engine.items() if k.endswith('_gb')},  # the device's free memory
            'grad_checkpointing': logged['grad_checkpointing'], 'trained_params': engine['trained_params'],
            'zero_optimization': engine['deepspeed_config']['zero_optimization'],
            'profiled': profile and impl == 'ours'}  # then its rate includes the profiler's overhead
    ours = results['runs']['ours']
    ours['vs'] = {ref: ours['samples_s'] / results['runs'][ref]['samples_s'] for ref in references
                  if 'samples_s' in results['runs'][ref]}
    ours['projected_gb'] = projected(1)  # this row's world-1 projection on a CPU, if the projection file has it
    precision = dtype if cuda or dtype != 'fp16' else 'fp32 (CPU)'  # the stages' CPU fallback for fp16
    print(f"{stage} step ({S.script}), {model_size} at {img_size}, micro-batch {micro_batch}, {precision}, grad "
          f"checkpointing {grad_checkpointing}, compile {compile_blocks}" + (f", zero {ZERO}" if ZERO else '') +
          f" on {results['device']} (matmul {rate:.1f} TFLOP/s measured):")
    for impl, r in results['runs'].items():
        if 'error' in r:
            print(f"  {impl:16s} failed: {r['error'].strip().splitlines()[-1]}")
            continue
        mfu = f"{100 * r['mfu']:5.1f}%" if r['mfu'] is not None else '    -'
        p = r.get('projected_gb')
        print(f"  {impl:16s} {r['samples_s']:6.1f} {S.unit}/s (median of {steps}) | MFU {mfu} | peak "
              f"{r['peak_gb']} GiB (reserved {r['reserved_gb']})" + (f" | projected {p} GiB" if p else '')
              + ''.join(f" | {v:.2f}x {ref}" for ref, v in r.get('vs', {}).items())
              + (' | profiled: slower, trace in ' + os.path.join(out_dir, f'{stage}_{impl}') if r['profiled'] else ''))
    return results


def write_jpegs(folder, n):
    """n JPEGs at ImageNet-like sizes and detail: synthetic shapes scaled to 500x375 / 375x500 with noise."""
    os.makedirs(os.path.join(folder, 'images'), exist_ok=True)
    src, rng = SyntheticShapes(n, 256, seed=11), np.random.default_rng(0)
    for i in range(n):
        w, h = (500, 375) if i % 2 else (375, 500)
        a = np.asarray(src.load(i)[0].resize((w, h), Image.BICUBIC)).astype(np.float32)
        a = np.clip(a + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)
        Image.fromarray(a).save(os.path.join(folder, 'images', f'{i:05d}.jpg'), quality=90)


def data_mode():
    torch.set_num_threads(1)  # one core: the rate a DataLoader worker gets
    folder = os.path.join(out_dir, 'jpegs')
    if not os.path.isdir(folder) or len(os.listdir(os.path.join(folder, 'images'))) != data_images:
        write_jpegs(folder, data_images)
    kb = sum(e.stat().st_size for e in os.scandir(os.path.join(folder, 'images'))) / data_images / 1e3
    grid = img_size // 14
    masks = MaskingGenerator(grid, round(105 / 256 * grid * grid))
    crop = T.RandomResizedCrop(img_size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
                               interpolation=T.InterpolationMode.BICUBIC)
    ref_tf = T.Compose([crop, T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
    ref_set = datasets.ImageFolder(folder, transform=ref_tf)
    ours_set = Samples(ImageFiles(folder, tensors=True), mim_transform(img_size, uint8=True), 0, masks)
    pipelines = {
        'torchvision': lambda i: (ref_set[i][0], masks())[0],
        'ours': lambda i: ours_set[i]['image'],
        'ours+normalise': lambda i: normalize_batch(ours_set[i]['image'][None])[0],  # what the GPU does, done here
    }
    results = {'config': config, 'image_kb': kb, 'runs': {}}
    for name, f in pipelines.items():  # an untimed pass each (file cache, allocator), with the same crops for all
        # torch's generator seeded as Samples seeds sample i: every pipeline draws the same crop
        x = torch.stack([normalize_batch(seeded(f, i, sample_seeds(0, 0, i)[0])[None])[0] for i in range(data_images)])
        results['runs'][name] = {'channel_mean': x.mean((0, 2, 3)).tolist(), 'channel_std': x.std((0, 2, 3)).tolist(),
                                 'passes': []}
    for _ in range(data_passes):  # passes interleaved, so that a drifting machine slows every pipeline alike
        for name, f in pipelines.items():
            t = time.perf_counter()
            for i in range(data_images):
                f(i)
            results['runs'][name]['passes'].append(data_images / (time.perf_counter() - t))
    for r in results['runs'].values():
        r['img_s_per_core'] = statistics.median(r['passes'])
    ref = results['runs']['torchvision']['img_s_per_core']
    print(f"MIM input pipeline, {data_images} JPEGs of ~{kb:.0f} kB (500x375), crop {img_size}, one core:")
    for name, r in results['runs'].items():
        r['vs_torchvision'] = r['img_s_per_core'] / ref
        mean = ', '.join(f'{v:+.3f}' for v in r['channel_mean'])
        std = ', '.join(f'{v:.3f}' for v in r['channel_std'])
        print(f"  {name:15s} {r['img_s_per_core']:7.1f} img/s/core | {r['vs_torchvision']:.2f}x | output mean {mean} "
              f"std {std}")
    return results


# -----------------------------------------------------------------------------
# index mode: the data indexes at the recipes' sizes (data.cached_index)

def write_image_list(path, n):
    """An n-line list shaped as the merged 30M's IN-21K part: 'in21k/n<class>/n<class>_<k>.JPEG <class>', ~650 images
    a class (45 bytes a line)."""
    with open(path, 'w') as f:
        for i in range(n):
            f.write(f"in21k/n{i // 650:08d}/n{i // 650:08d}_{i}.JPEG {i // 650}\n")


def write_o365_json(path, images, per_image, seed=0):
    """An Objects365-shaped json (boxes only): images of 'objects365_v2_<id>.jpg' with per_image boxes each, the
    annotations' keys as Objects365 v2 has them (~150 bytes a box), 365 categories."""
    rng = np.random.default_rng(seed)
    with open(path, 'w') as f:
        f.write('{"images": [')
        f.write(','.join(f'{{"id": {i}, "file_name": "images/v2/patch{i % 51}/objects365_v2_{i:08d}.jpg", '
                         f'"height": 800, "width": 1067, "license": 1}}' for i in range(images)))
        f.write('], "annotations": [')
        for s in range(0, images, 1 << 16):
            e = min(s + (1 << 16), images)
            xy = rng.uniform(0, 700, ((e - s) * per_image, 2)).round(2)
            wh = rng.uniform(4, 300, ((e - s) * per_image, 2)).round(2)
            cats = rng.integers(1, 366, (e - s) * per_image)
            f.write(('' if s == 0 else ',') + ','.join(
                f'{{"id": {s * per_image + k}, "iscrowd": 0, "isfake": 0, "area": {a[0] * a[1]:.2f}, "isreflected": 0, '
                f'"bbox": [{b[0]}, {b[1]}, {a[0]}, {a[1]}], "image_id": {s + k // per_image}, "category_id": {c}}}'
                for k, (b, a, c) in enumerate(zip(xy.tolist(), wh.tolist(), cats.tolist()))))
        f.write('], "categories": [' + ','.join(f'{{"id": {c}, "name": "class {c}"}}' for c in range(1, 366)) + ']}')


def memory():
    """This process's memory (bytes): rss, pss, uss, and the private dirty part of uss (copy-on-write copies, heap)."""
    m = psutil.Process().memory_full_info()
    with open('/proc/self/smaps_rollup') as f:
        dirty = sum(int(line.split()[1]) * 1024 for line in f if line.startswith('Private_Dirty'))
    return {'rss': m.rss, 'pss': m.pss, 'uss': m.uss, 'dirty': dirty}


def index_probe(kind, path, read, barrier=None, results=None):
    """In a fresh process: build or read a source's index, read every entry once (read: ImageFiles' name and label,
    CocoDetection's target); with a barrier, two probes measure before and after at the same moments (both alive,
    so that PSS splits the pages they share the same way). -> its figures in results (a Queue)."""
    import resource
    if barrier is not None:
        barrier.wait()  # both started: the libraries' shared pages split between them before and after alike
    base = memory()
    t = time.perf_counter()
    src = ImageFiles(path) if kind == 'list' else CocoDetection(path, '', masks=False)
    start = time.perf_counter() - t
    for i in range(len(src) if read else 0):
        if kind == 'list':
            src.name(i), src.label(i)
        else:
            src.target(i, 800, 1067)
    read = time.perf_counter() - t - start
    if barrier is not None:
        barrier.wait()
    end = memory()
    out = {k: end[k] - base[k] for k in end}
    out.update(start_s=start, read_s=read, n=len(src),
               peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base['rss'])
    t = time.perf_counter()  # an epoch's order at 128 ranks, to the first index of rank 0
    next(iter(ResumableSampler(len(src), 128, 0)))
    out['sampler_s'] = time.perf_counter() - t
    results.put(out)
    if barrier is not None:
        barrier.wait()  # the other probe has measured too


class NamesOnly(torch.utils.data.Dataset):
    """What a DataLoader worker reads of a source per sample, minus the image (path and label), and the worker's
    memory at its 100th and its last sample."""

    def __init__(self, src, last):
        self.src, self.calls, self.last = src, 0, last

    def __len__(self):
        return len(self.src)

    def __getitem__(self, i):
        self.src.name(i), self.src.label(i)
        self.calls += 1
        m = memory() if self.calls in (100, self.last) else {'uss': 0, 'dirty': 0}
        return torch.tensor([torch.utils.data.get_worker_info().id, self.calls, m['uss'], m['dirty']])


def worker_probe(path, samples, results):
    src = ImageFiles(path)
    sampler = ResumableSampler(len(src), seed=1)
    sampler.set_epoch(0, 0, 2 * samples)
    seen = torch.cat(list(make_loader(NamesOnly(src, samples), sampler, 100, num_workers=2)))
    results.put(seen[seen[:, 2] > 0].tolist())


def probe(fn, *args, n=1):
    """fn(*args, barrier, queue) in n fresh processes at once (spawned: nothing inherited) -> their results."""
    ctx = __import__('multiprocessing').get_context('spawn')
    q, barrier = ctx.Queue(), ctx.Barrier(n) if n > 1 else None
    procs = [ctx.Process(target=fn, args=(*args, barrier, q) if fn is index_probe else (*args, q)) for _ in range(n)]
    for p in procs:
        p.start()
    out = [q.get() for _ in procs]
    for p in procs:
        p.join()
    return out


def index_mode():
    """Per size: the source written (an image list, an Objects365-shaped json), its index built in a fresh process
    (time, the builder's peak), read from the cache by a fresh process (start-up time; its memory after reading
    every entry once, per entry), by two processes at once (their PSS together against one's), and for a list the
    DataLoader workers' unique memory over index_worker_samples samples each."""
    folder = os.path.join(out_dir, 'index')
    os.makedirs(folder, exist_ok=True)
    os.environ['EVA_INDEX_DIR'] = os.path.join(folder, 'cache')
    results = {'config': config, 'rows': []}
    sizes = [('list', int(float(n))) for n in index_lists.split(',') if n]
    sizes += [('coco', int(float(n))) for n in index_jsons.split(',') if n]
    for kind, n in sizes:
        path = os.path.join(folder, f'{kind}_{n}.' + ('txt' if kind == 'list' else 'json'))
        t = time.perf_counter()
        if not os.path.exists(path):
            write_image_list(path, n) if kind == 'list' else write_o365_json(path, n, index_boxes_per_image)
        shutil.rmtree(os.environ['EVA_INDEX_DIR'], ignore_errors=True)
        row = {'kind': kind, 'n': n, 'file_mb': os.path.getsize(path) / 2 ** 20, 'write_s': time.perf_counter() - t}
        row['build'] = probe(index_probe, kind, path, False)[0]
        row['one'] = probe(index_probe, kind, path, True)[0]
        row['two'] = probe(index_probe, kind, path, True, n=2)
        if kind == 'list':
            row['workers'] = probe(worker_probe, path, index_worker_samples)[0]
        entries = n if kind == 'list' else n * index_boxes_per_image
        row['bytes_per_entry'] = row['one']['rss'] / entries
        row['two_vs_one_pss'] = sum(r['pss'] for r in row['two']) / row['one']['pss']
        results['rows'].append(row)
        w = sorted(row.get('workers', []))  # per worker (id, calls, uss, dirty) at its 100th and last sample
        growth = ', '.join(f"{(b[2] - a[2]) / 2 ** 20:+.1f} MB USS ({(b[3] - a[3]) / 2 ** 20:+.1f} private dirty)"
                           for a, b in zip(w[0::2], w[1::2]))
        what, whats = ('image', 'images') if kind == 'list' else ('box', 'boxes')
        print(f"{kind} {n:,} ({row['file_mb']:.0f} MB; {entries:,} {whats}): built in "
              f"{row['build']['start_s']:.1f} s (builder peak +{row['build']['peak'] / 2 ** 30:.2f} GiB) | start-up "
              f"from the cache {row['one']['start_s']:.2f} s | after reading all ({row['one']['read_s']:.0f} s): "
              f"+{row['bytes_per_entry']:.1f} B per {what} (RSS), "
              f"two processes {row['two_vs_one_pss']:.2f}x one by PSS | an epoch's order at 128 ranks "
              f"{row['one']['sampler_s']:.2f} s" + (f" | workers: {growth}" if w else ''),
              flush=True)
    return results


# the benchmark table's rows (EVA-g, one GPU), in the order a short GPU session should run them: each a bench.py run
ROWS = {'mim64': ['--stage=pretrain', '--micro_batch=64', '--reference=timm,timm_our_engine'],
        'mim64_compiled': ['--stage=pretrain', '--micro_batch=64', '--compile_blocks=True', '--reference='],
        'mim64_no_overlap': ['--stage=pretrain', '--micro_batch=64', '--reference=',  # world size 1: nothing to overlap
                             '--zero_config=overlap_comm=False,contiguous_gradients=False'],
        'mim64_teacher_stream': ['--stage=pretrain', '--micro_batch=64', '--reference=',
                                 '--stage_args=--teacher_stream=True'],
        'mim32_ckpt': ['--stage=pretrain', '--micro_batch=32', '--grad_checkpointing=True',
                       '--reference=no_checkpointing'],
        'cls336': ['--stage=finetune', '--img_size=336', '--micro_batch=16', '--reference=timm'],
        'cls560_ckpt': ['--stage=finetune', '--img_size=560', '--micro_batch=8', '--grad_checkpointing=True',
                        '--reference='],
        'clip': ['--stage=clip', '--micro_batch=160'],
        'video8': ['--stage=video', '--micro_batch=2', '--stage_args=--num_frames=8'],
        'video16': ['--stage=video', '--micro_batch=2', '--stage_args=--num_frames=16'],
        'det1280': ['--stage=det', '--img_size=1280', '--micro_batch=1'],
        'det1024': ['--stage=det', '--img_size=1024', '--micro_batch=1'],
        'seg896': ['--stage=seg', '--img_size=896', '--micro_batch=1'],
        'data': ['--mode=data']}
TARGET_ROWS = 'mim64,mim64_compiled,mim32_ckpt,data'


def table_mode():
    """ROWS in order, each a bench.py run of its own in out_dir/<row> (this command's other settings pass through,
    the row's own come last), each added to out_dir/table.md and bench_table.json as it ends: a GPU session cut
    short keeps what it measured. A failed row is said and the next one runs. targets mode: TARGET_ROWS, then
    the performance targets, each said met or not (or not run)."""
    names, passed = chosen_rows(TARGET_ROWS if mode == 'targets' else ','.join(ROWS), ROWS, 'rows')
    res, table = {}, os.path.join(out_dir, 'table.md')
    with open(table, 'w') as f:
        f.write('| row | command (`python bench.py ...`) | rate | MFU | peak (reserved) | projected (measured / '
                'projected) | vs |\n|---|---|---|---|---|---|---|\n')
    for name in names:
        d, args = os.path.join(out_dir, name), ROWS[name]
        print(f"-- {name}: python bench.py {' '.join(args)}", flush=True)  # its summary follows, as it comes
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'bench.py'), *passed, *args, f'--out_dir={d}'],
                                cwd=ROOT, stderr=subprocess.PIPE, text=True)
        try:
            err = proc.communicate()[1]
        finally:  # stopped itself: the row's bench.py is told to stop its run (a SIGKILL would leave that running)
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
        res[name] = None
        if proc.returncode == 0:
            res[name] = json.load(open(os.path.join(d, f"bench_{'data' if name == 'data' else 'step'}.json")))
        else:  # the other rows still run: a short GPU session should not lose them to one failure
            print(f"bench.py {' '.join(args)} failed:\n{err[-3000:]}", flush=True)
        command = ' '.join(a if ' ' not in a else repr(a) for a in args)
        if res[name] is None:
            cells = ['failed'] + [''] * 4
        elif name == 'data':
            ours = res[name]['runs']['ours']
            cells = [f"{ours['img_s_per_core']:.1f} img/s/core", '', '', '',
                     f"{ours['vs_torchvision']:.2f}x torchvision"]
        else:
            o, unit = res[name]['runs']['ours'], res[name]['unit']
            mfu = '' if o['mfu'] is None else f"{100 * o['mfu']:.1f}%"
            peak = '' if o['peak_gb'] is None else f"{o['peak_gb']} GiB ({o['reserved_gb']})"
            p = o.get('projected_gb')
            ratio = f" ({o['peak_gb'] / p:.3f})" if p and o['peak_gb'] else ''
            cells = [f"{o['samples_s']:.4g} {unit}/s", mfu, peak, f"{p} GiB{ratio}" if p else '',
                     ', '.join(f"{v:.2f}x {k}" for k, v in o['vs'].items())]
        with open(table, 'a') as f:
            f.write(f"| {name} | `{command}` | {' | '.join(cells)} |\n")
        with open(os.path.join(out_dir, f'bench_{mode}.json'), 'w') as f:
            json.dump(res, f, indent=1)
    print(open(table).read(), end='')
    if mode == 'targets':
        res['checks'] = targets(res)
    return res


def targets(res):
    """The performance targets from the rows that ran: each met, NOT met, or without a value (None: the row did not
    run or failed, or a CPU has no GPU memory to measure)."""
    def ours(row, f):
        return f(res[row]['runs']['ours']) if res.get(row) else None
    eager = ours('mim64', lambda o: o['samples_s'])
    projected16 = (load_projection().get('mim32_ckpt') or {}).get('worlds', {}).get('16', {}).get('allocated_gib')
    off = [abs(o['peak_gb'] / o['projected_gb'] - 1) for r in res.values() if r and 'runs' in r
           for o in [r['runs']['ours']] if o.get('peak_gb') and o.get('projected_gb')]
    checks = [  # (what, value, bound, at most: else at least)
        (f'{model_size} MIM step vs timm under DeepSpeed >= 1.25x', ours('mim64', lambda o: o['vs'].get('timm')), 1.25,
         False),
        ('MFU >= 50%', ours('mim64', lambda o: o['mfu']), 0.5, False),
        ('compiled blocks vs eager >= 1.0x', eager and ours('mim64_compiled', lambda o: o['samples_s'] / eager), 1.0,
         False),
        (f'checkpointed micro-batch 32, ZeRO-1 over 16: <= 20 GiB (projected, {projection})', projected16, 20.0, True),
        ('input pipeline vs torchvision per core >= 1.5x',
         res.get('data') and res['data']['runs']['ours']['vs_torchvision'], 1.5, False),
        ("every row's measured memory within 3% of its projection (the largest |measured / projected - 1|)",
         max(off, default=None), 0.03, True)]
    slow = ours('mim32_ckpt', lambda o: o['vs'].get('no_checkpointing'))
    if slow:
        print(f"gradient checkpointing at micro-batch 32 runs at {slow:.2f}x the speed without it "
              f"({res['mim32_ckpt']['runs']['no_checkpointing']['peak_gb']} GiB peak without)")
    print("targets:")
    for what, value, bound, at_most in checks:
        if value is None:
            print(f"  {'no value':8s} {what}")
            continue
        met = value <= bound if at_most else value >= bound
        print(f"  {'met' if met else 'NOT met':8s} {what}: {value:.3f}")
    return [dict(what=w, value=v, bound=b) for w, v, b, _ in checks]


if __name__ == '__main__':
    if 'BENCH_JOB' in os.environ:  # a run's own subprocess (run_step, memory_row): the stage script
        job = json.loads(os.environ['BENCH_JOB'])
        (memory_worker if 'world' in job else worker)(job)
        raise SystemExit(0)
    exec(open(os.path.join(ROOT, 'configurator.py')).read())
    config = {k: globals()[k] for k in _keys}  # noqa: F821 (_keys comes from configurator.py)
    modes = {'data': data_mode, 'index': index_mode, 'step': step_mode, 'table': table_mode, 'targets': table_mode,
             'memory': memory_mode, 'memory_row': memory_row}
    if mode not in modes:
        raise SystemExit(f"mode must be one of {', '.join(modes)}, got {mode!r}")
    if stage not in STAGES:
        raise SystemExit(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    S = STAGES[stage]
    img_size = img_size or S.img_size
    micro_batch = micro_batch or S.micro_batch
    grad_checkpointing = S.grad_checkpointing if grad_checkpointing is None else grad_checkpointing
    if reference == 'auto':
        reference = 'timm,timm_our_engine' if S.timm else ''
    if compile_blocks and not S.compiles:
        raise SystemExit(f"compile_blocks: {S.script} does not compile its blocks")
    try:
        ZERO = {k: ast.literal_eval(v) for k, v in (kv.split('=', 1) for kv in zero_config.split(',') if kv)}
    except (ValueError, SyntaxError):
        raise SystemExit(f"zero_config wants 'key=value,...' with Python values, got {zero_config!r}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # a scheduler's kill: runs' cleanup
    os.makedirs(out_dir, exist_ok=True)
    result = modes[mode]()
    with open(os.path.join(out_dir, f'bench_{mode}.json'), 'w') as f:
        json.dump(result, f, indent=1)
