"""
Benchmark of this repository's real training steps against the reference a user would otherwise run, and of the
MIM input pipeline against torchvision's.

    python bench.py                                    # EVA-g MIM step, batch 64 at 224, fp16 ZeRO-1, vs timm's Eva
    python bench.py --grad_checkpointing=True --micro_batch=32 --zero_ranks=16 --reference=no_checkpointing
    python bench.py --compile_blocks=True
    python bench.py --profile=True --reference=        # + a torch.profiler trace of two steps (out/bench/*/trace.json)
    python bench.py --stage=finetune --img_size=336 --micro_batch=8
    python bench.py --mode=data                        # input pipeline, images/s per CPU core
    python bench.py --mode=targets                     # the performance targets in one run, each said met or not
    python bench.py --model_size=eva_tiny --img_size=32 --micro_batch=8 --teacher_model=tiny --steps=3 --warmup=2
                                                       # a CPU smoke run (correctness only, never a speed claim)

Step mode runs the stage script itself (pretrain.py: teacher forward, student forward and backward, the DeepSpeed
optimizer step, data loading; finetune_cls.py: forward, backward, step, EMA) on synthetic data, each in a fresh
subprocess so that its peak memory is its own, and reads the step times from its log. The references are the same
script with model.EVA replaced by timm's Eva of the same size (a mask token and lm_head added for MIM), eager,
before the script imports it: same teacher, same data, same DeepSpeed config. 'timm' also undoes our one change to
DeepSpeed's optimizer (common.fuse_zero_grad_checks), so it is timm's Eva under DeepSpeed as it ships: what a user
would otherwise run; 'timm_our_engine' keeps it, so ours against it is the model's (and compile's) own share.
Warm-up steps are dropped; the median step is reported. MFU counts the student's forward + backward and the
teacher's forward (matmul FLOPs) against the matmul rate measured here (fp16 on a GPU, fp32 on a CPU). The
projected per-GPU peak under ZeRO-1 over N ranks subtracts (1 - 1/N) of the fp32 master weights and Adam moments
(12 bytes per trained parameter) that one rank holds whole here: an upper bound (gradient buckets and transient
fp32 gradients are not subtracted).

Data mode writes JPEGs at ImageNet-like sizes (500x375 and 375x500, quality 90, ~100 kB) and times, in one
process on one thread, in interleaved passes (median pass reported), data.py's MIM sample (read_rgb, uint8 crop +
flip, block mask; normalised on the GPU later) against torchvision's ImageFolder + PIL RandomResizedCrop, flip,
ToTensor, Normalize and the same mask generator, and compares the two outputs' statistics on the same crops (an
untimed pass with every pipeline's generator seeded per image).
"""
import json
import os
import runpy
import shutil
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.abspath(__file__))


def timm_eva_class():
    """timm's Eva behind our EVA's constructor and interface (EVA(config), forward(x, mask) for MIM, .config,
    flops_per_image): the reference student. Same key names, so param_groups and checkpoints treat it alike."""
    import timm.models.eva as timm_eva
    from torch.utils.checkpoint import checkpoint

    import model as ours

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

        flops_per_image = ours.EVA.flops_per_image

    return TimmEVA


def worker(job):
    """In the subprocess: run a stage script as __main__ with the job's arguments (and timm's Eva as the model
    class for the reference), as `python script ARGS` would."""
    import common
    import model
    # a compiled run must not time a half-compiled model: past 8 recompilations of Block.forward dynamo would go on
    # in eager silently (bernoulli_'s per-rate graphs once left 32 of EVA-g's 40 blocks uncompiled); fail instead
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    if job['impl'].startswith('timm'):
        model.EVA = timm_eva_class()
    if job['impl'] == 'timm':  # DeepSpeed's optimizer as it ships: its per-tensor gradient checks left in place
        common.fuse_zero_grad_checks = lambda optimizer: optimizer
    sys.argv = [job['script'], *job['args']]
    if not job.get('profile'):
        runpy.run_path(os.path.join(ROOT, job['script']), run_name='__main__')
        return
    # a trace of two steps after the warm-up: the profiler steps with each call of the engine's step()
    from deepspeed.runtime.engine import DeepSpeedEngine
    from torch.profiler import ProfilerActivity, profile, record_function, schedule
    cuda = torch.cuda.is_available()

    def write(prof):
        prof.export_chrome_trace(os.path.join(job['profile'], 'trace.json'))
        with open(os.path.join(job['profile'], 'profile.txt'), 'w') as f:
            f.write(prof.key_averages().table(sort_by='cuda_time_total' if cuda else 'cpu_time_total', row_limit=60))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    def named(cls, method, label, then=None):  # the step's phases as labelled ranges in the trace
        inner = getattr(cls, method)

        def wrapped(*a, **k):
            with record_function(label):
                out = inner(*a, **k)
            if then:
                then()
            return out
        setattr(cls, method, wrapped)
    with profile(activities=activities, schedule=schedule(wait=job['wait'], warmup=1, active=2),
                 on_trace_ready=write) as prof:
        named(DeepSpeedEngine, 'forward', 'student_forward')
        named(DeepSpeedEngine, 'backward', 'student_backward')
        named(DeepSpeedEngine, 'step', 'optimizer_step', then=prof.step)
        named(model.CLIPTeacher, 'forward', 'teacher_forward')
        runpy.run_path(os.path.join(ROOT, job['script']), run_name='__main__')


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


if __name__ == '__main__' and 'BENCH_JOB' in os.environ:
    worker(json.loads(os.environ['BENCH_JOB']))
    raise SystemExit(0)

# -----------------------------------------------------------------------------
# config
mode = 'step'  # 'step': ours vs timm's Eva; 'data': input pipeline vs torchvision's; 'targets': the performance targets
stage = 'pretrain'  # 'pretrain' (pretrain.py's MIM step with the CLIP teacher) or 'finetune' (finetune_cls.py's)
model_size = 'eva_g'  # a key of model.SIZES
img_size = 224  # resolution
micro_batch = 64  # images per step (one GPU, no accumulation)
grad_checkpointing = False  # recompute blocks in backward
compile_blocks = False  # torch.compile each of our blocks (the timm references always run eager)
profile = False  # step mode: also write a torch.profiler trace of two steps of ours (out_dir/<stage>_ours/trace.json)
reference = 'timm,timm_our_engine'  # runs to compare with, comma-separated: 'timm' (timm's Eva, eager, under
#   DeepSpeed as it ships: what a user would otherwise run), 'timm_our_engine' (timm's Eva, eager, with our engine
#   changes: the model's own share), 'no_checkpointing' (ours without gradient checkpointing); '': ours only
teacher_model = 'ViT-L-14'  # pretrain teacher, randomly initialised (its cost, not its weights); 'tiny' for CPU
dtype = 'fp16'  # training precision on a GPU (a CPU falls back to fp32, as the stages do)
steps = 10  # timed steps; the median is reported
warmup = 5  # steps run first and not timed (allocator, autotuning, compilation)
zero_ranks = 16  # project the per-GPU peak memory under ZeRO-1 over this many ranks
num_workers = 8  # DataLoader workers of the stage
out_dir = 'out/bench'  # logs of the runs and bench.json
data_images = 256  # data mode: JPEGs written
data_passes = 5  # data mode: timed passes over them per pipeline, interleaved; the median pass is reported
exec(open(os.path.join(ROOT, 'configurator.py')).read())
config = {k: globals()[k] for k in _keys}  # noqa: F821 (_keys comes from configurator.py)
# -----------------------------------------------------------------------------


def run_step(impl, num_masked, min_masked):
    """One stage run of warmup + steps steps; -> per-step img/s (timed steps), peak GiB, trained parameters."""
    run_dir = os.path.join(out_dir, f'{stage}_{impl}')
    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    n = warmup + steps
    ckpt, comp = grad_checkpointing and impl != 'no_checkpointing', compile_blocks and not impl.startswith('timm')
    common = [f'--out_dir={run_dir}', f'--model_size={model_size}', f'--img_size={img_size}',
              f'--micro_batch={micro_batch}', f'--batch_size={micro_batch}', f'--grad_checkpointing={ckpt}',
              f'--compile_blocks={comp}', f'--dtype={dtype}', f'--num_workers={num_workers}', '--log_interval=1',
              f'--synthetic_size={micro_batch * n}']
    if stage == 'pretrain':
        script = 'pretrain.py'  # its warmup_epochs / epochs make the lr schedule, which does not change the speed
        args = common + ['--max_steps=0', '--epochs=1', '--ckpt_interval=0', '--eval_interval=0', '--val_data_path=',
                         f'--teacher_model={teacher_model}', '--teacher_pretrained=', f'--num_mask_patches={num_masked}',
                         f'--min_mask_patches={min_masked}']
    else:
        script = 'finetune_cls.py'
        args = common + ['--epochs=1', '--save_ckpt=False', '--val_data_path=synthetic:1',
                         f'--val_size={micro_batch}']
    job = {'script': script, 'impl': impl, 'args': args}
    if profile and impl == 'ours':  # profiled steps are slower: this run's img/s are marked 'profiled'
        job.update(profile=os.path.abspath(run_dir), wait=max(warmup - 1, 0))
    env = dict(os.environ, BENCH_JOB=json.dumps(job))
    t = time.time()
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'bench.py')], env=env, cwd=ROOT, capture_output=True,
                       text=True)
    wall = time.time() - t
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, 'output.txt'), 'w') as f:  # the stage's own output, for a failure or a look
        f.write(r.stdout + r.stderr)
    if r.returncode != 0:
        raise RuntimeError(f"{script} with {impl} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    rows = [json.loads(line) for line in open(os.path.join(run_dir, 'log.jsonl'))]
    steps_rows = [row for row in rows if 'img_s' in row]
    assert len(steps_rows) == n, f"{script}: {len(steps_rows)} logged steps, expected {n}"
    mem = max((row['mem_gb'] or 0) for row in steps_rows) or None
    return [row['img_s'] for row in steps_rows[warmup:]], mem, wall


def step_mode():
    from model import EVA, CLIPTeacher, eva_config, vit_flops
    cuda = torch.cuda.is_available()
    rate = matmul_tflops()
    mim = stage == 'pretrain'
    cfg = eva_config(model_size, img_size=img_size, pooling='cls' if mim else 'mean', use_mask_token=mim,
                     mim_dim=768 if mim else 0, num_classes=0 if mim else 1000)
    with torch.device('meta'):
        student = EVA(cfg)
    params = sum(p.numel() for p in student.parameters())
    num_masked = round(105 / 256 * cfg.num_patches)  # the paper's 105 of 256 at any grid
    flops = student.flops_per_image(num_masked=num_masked if mim else 0)
    if mim and teacher_model == 'tiny':
        flops += CLIPTeacher('tiny', '', img_size, cfg.patch_size).flops_per_image
    elif mim:  # an open_clip tower: its forward from its config, without building it
        import open_clip
        mc = open_clip.get_model_config(teacher_model)
        v, grid = mc['vision_cfg'], mc['vision_cfg']['image_size'] // mc['vision_cfg']['patch_size']
        flops += vit_flops(v['image_size'], v['patch_size'], v['width'], v['layers'], int(v['width'] * v.get('mlp_ratio', 4.0)))
        flops += 2 * grid * grid * v['width'] * mc['embed_dim']  # proj
    results = {'config': config, 'device': torch.cuda.get_device_name() if cuda else 'cpu',
               'matmul_tflops': rate, 'flops_per_image': flops, 'params': params, 'runs': {}}
    references = [r for r in reference.split(',') if r]
    unknown = set(references) - {'timm', 'timm_our_engine', 'no_checkpointing'}
    assert not unknown, f"unknown reference {unknown}: 'timm', 'timm_our_engine' or 'no_checkpointing'"
    for impl in ['ours'] + references:
        img_s, mem, wall = run_step(impl, num_masked, 16 if cfg.grid >= 14 else 4)
        med = statistics.median(img_s)
        optimizer_gb = 12 * params / 2**30
        results['runs'][impl] = {
            'img_s': med, 'img_s_all': img_s, 'wall_s': round(wall, 1), 'mfu': med * flops / (rate * 1e12),
            'peak_gb': mem, 'zero_projected_gb': mem - optimizer_gb * (1 - 1 / zero_ranks) if mem else None,
            'profiled': profile and impl == 'ours'}  # then its img/s include the profiler's overhead
    ours = results['runs']['ours']
    ours['vs'] = {ref: ours['img_s'] / results['runs'][ref]['img_s'] for ref in references}
    precision = dtype if cuda or dtype != 'fp16' else 'fp32 (CPU)'  # the stages' CPU fallback for fp16
    print(f"{stage} step, {model_size} at {img_size}, micro-batch {micro_batch}, {precision}, grad checkpointing "
          f"{grad_checkpointing}, compile {compile_blocks} on {results['device']} (matmul {rate:.1f} TFLOP/s "
          "measured):")
    for impl, r in results['runs'].items():
        projected = r['zero_projected_gb'] and round(r['zero_projected_gb'], 2)
        print(f"  {impl:16s} {r['img_s']:6.1f} img/s (median of {steps}) | MFU {100 * r['mfu']:5.1f}% | peak "
              f"{r['peak_gb']} GiB | ZeRO-1 over {zero_ranks}: <= {projected} GiB"
              + ''.join(f" | {v:.2f}x {ref}" for ref, v in r.get('vs', {}).items())
              + (' | profiled: slower, trace in ' + os.path.join(out_dir, f'{stage}_{impl}') if r['profiled'] else ''))
    return results


def write_jpegs(folder, n):
    """n JPEGs at ImageNet-like sizes and detail: synthetic shapes scaled to 500x375 / 375x500 with noise."""
    import numpy as np
    from PIL import Image

    from data import SyntheticShapes
    os.makedirs(os.path.join(folder, 'images'), exist_ok=True)
    src, rng = SyntheticShapes(n, 256, seed=11), np.random.default_rng(0)
    for i in range(n):
        w, h = (500, 375) if i % 2 else (375, 500)
        a = np.asarray(src.load(i)[0].resize((w, h), Image.BICUBIC)).astype(np.float32)
        a = np.clip(a + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)
        Image.fromarray(a).save(os.path.join(folder, 'images', f'{i:05d}.jpg'), quality=90)


def data_mode():
    from torchvision import datasets
    from torchvision import transforms as T

    from data import (CLIP_MEAN, CLIP_STD, ImageFiles, MaskingGenerator, Samples, mim_transform, normalize_batch,
                      sample_seeds, seeded)
    torch.set_num_threads(1)  # one core: the rate a DataLoader worker gets
    folder = os.path.join(out_dir, 'jpegs')
    if not os.path.isdir(folder) or len(os.listdir(os.path.join(folder, 'images'))) != data_images:
        write_jpegs(folder, data_images)
    kb = sum(e.stat().st_size for e in os.scandir(os.path.join(folder, 'images'))) / data_images / 1e3
    grid = img_size // 14
    masks = MaskingGenerator(grid, round(105 / 256 * grid * grid))
    ref_set = datasets.ImageFolder(folder, transform=T.Compose([
        T.RandomResizedCrop(img_size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]))
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
        print(f"  {name:15s} {r['img_s_per_core']:7.1f} img/s/core | {r['vs_torchvision']:.2f}x | output mean "
              f"{', '.join(f'{v:+.3f}' for v in r['channel_mean'])} std {', '.join(f'{v:.3f}' for v in r['channel_std'])}")
    return results


def targets_mode():
    """The performance targets in one command (one GPU session): the MIM step at micro_batch against timm (>= 1.25x,
    >= 50% MFU), the checkpointed step at micro-batch 32 projected over 16 ranks (<= 20 GiB), the input pipeline
    (>= 1.5x torchvision per core). Each is a bench.py run of its own; the other settings pass through."""
    passed = [f'--{k}={v}' for k, v in config.items() if k not in ('mode', 'out_dir', 'micro_batch',
                                                                   'grad_checkpointing', 'reference', 'zero_ranks')]
    runs = {'step': ['--mode=step', f'--micro_batch={micro_batch}', '--reference=timm'],
            'checkpointed': ['--mode=step', '--grad_checkpointing=True', '--micro_batch=32',  # eager (see pretrain.py)
                             '--reference=no_checkpointing', '--zero_ranks=16', '--compile_blocks=False'],
            'data': ['--mode=data']}
    res = {}
    for name, args in runs.items():
        d = os.path.join(out_dir, name)
        r = subprocess.run([sys.executable, os.path.join(ROOT, 'bench.py'), *passed, *args, f'--out_dir={d}'],
                           cwd=ROOT, capture_output=True, text=True)
        print(r.stdout, end='')
        res[name] = None
        if r.returncode == 0:
            res[name] = json.load(open(os.path.join(d, f"bench_{args[0].split('=')[1]}.json")))
        else:  # the other checks still run: a short GPU session should not lose them to one failure
            print(f"bench.py {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    step = res['step'] and res['step']['runs']['ours']
    ckpt = res['checkpointed'] and res['checkpointed']['runs']['ours']
    checks = [(f'{model_size} step vs timm under DeepSpeed >= 1.25x', step and step['vs']['timm'], 1.25),
              ('MFU >= 50%', step and step['mfu'], 0.5),
              ('checkpointed micro-batch 32, ZeRO-1 over 16: <= 20 GiB', ckpt and ckpt['zero_projected_gb'], 20.0),
              ('input pipeline vs torchvision per core >= 1.5x',
               res['data'] and res['data']['runs']['ours']['vs_torchvision'], 1.5)]
    if ckpt:
        print(f"gradient checkpointing at micro-batch 32 runs at {ckpt['vs']['no_checkpointing']:.2f}x the speed "
              f"without it ({res['checkpointed']['runs']['no_checkpointing']['peak_gb']} GiB peak without)")
    print("targets:")
    for what, value, bound in checks:
        ok = value is not None and (value <= bound if 'GiB' in what else value >= bound)
        print(f"  {'met    ' if ok else 'NOT met'} {what}: {value if value is None else round(value, 3)}")
    res['checks'] = [dict(what=w, value=v, bound=b) for w, v, b in checks]
    return res


os.makedirs(out_dir, exist_ok=True)
result = {'data': data_mode, 'step': step_mode, 'targets': targets_mode}[mode]()
with open(os.path.join(out_dir, f'bench_{mode}.json'), 'w') as f:
    json.dump(result, f, indent=1)
