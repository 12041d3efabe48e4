"""common.fuse_zero_grad_checks: DeepSpeed's ZeRO-1 optimizer with its per-tensor inf/NaN test and gradient norm
replaced by multi-tensor ones must decide, clip and step exactly as DeepSpeed's own code does, over 2 ranks (each
owning a padded partition), while launching far fewer operations per step."""

from conftest import ROOT, run_stage

SCRIPT = r'''
import os, sys, torch
sys.path.insert(0, ROOT)
import deepspeed
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from torch.profiler import ProfilerActivity, profile
from common import fuse_zero_grad_checks
from model import EVA, eva_config, param_groups

deepspeed.init_distributed(dist_backend='gloo')
rank = int(os.environ['RANK'])
cfg = eva_config('eva_tiny', depth=3, pooling='cls', use_mask_token=True, mim_dim=16)


def engine(fused, dtype):
    torch.manual_seed(0)
    model = EVA(cfg)
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3)
    ds = {'train_batch_size': 8, 'train_micro_batch_size_per_gpu': 4, 'gradient_clipping': 0.1,
          'zero_optimization': {'stage': 1}, 'bf16': {'enabled': dtype == torch.bfloat16}, 'steps_per_print': 1 << 30}
    eng, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    return eng, fuse_zero_grad_checks(opt) if fused else opt


def backward(eng, i, dtype):
    g = torch.Generator().manual_seed(100 * i + rank)  # each rank its own data, the same in both runs
    x, mask = torch.randn(4, 3, 32, 32, generator=g), torch.rand(4, 64, generator=g) < 0.4
    eng.backward(eng(x.to(dtype), mask).float().pow(2).mean())


# fp32: DeepSpeed takes the gradient norm only; bf16 (as fp16 on a GPU): also the inf/NaN test, before the norm
for dtype in (torch.float32, torch.bfloat16):
    runs = {}
    for fused in (False, True):
        eng, opt = engine(fused, dtype)
        norms, ops = [], {}
        for i in range(4):
            backward(eng, i, dtype)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                eng.step()
            for e in prof.events():  # operations called from Python (not those inside others: CPU foreach loops)
                if e.cpu_parent is None or not e.cpu_parent.name.startswith('aten::'):
                    ops[e.name] = ops.get(e.name, 0) + 1
            norms.append(float(eng.get_global_grad_norm()))
        runs[fused] = dict(norms=norms, ops=ops, master=[p.clone() for p in opt.single_partition_of_fp32_groups])
        assert ('get_grad_norm_direct' in vars(opt)) == fused  # patched on the instance only
        # the overflow test on the same gradients, against DeepSpeed's own per-tensor version
        backward(eng, 9, dtype)
        own = lambda: bool(DeepSpeedZeroOptimizer.has_overflow_partitioned_grads_serial(opt))
        mine = lambda: bool(opt.has_overflow_partitioned_grads_serial())
        assert own() is False and mine() is False
        grads = [g for grads in opt.averaged_gradients.values() for g in grads if g.numel() > 1]
        for bad in (float('inf'), float('-inf'), float('nan')):
            saved = grads[len(grads) // 2].view(-1)[3].clone()
            grads[len(grads) // 2].view(-1)[3] = bad
            assert own() is True and mine() is True, bad
            grads[len(grads) // 2].view(-1)[3] = saved
        assert own() is False and mine() is False
    a, b = runs[False], runs[True]
    print(rank, dtype, a['norms'], b['norms'])
    assert min(a['norms']) > 0.1  # clipping was active in every step
    # fp32: the same norms, clipping and weights over 4 steps; bf16: the first step (later ones see weights rounded
    # after a norm that differs in the 7th digit: float32 sums here, float64 in DeepSpeed)
    for x, y in zip(a['norms'], b['norms'][:4 if dtype == torch.float32 else 1]):
        assert abs(x - y) <= 1e-6 * x, (x, y)
    if dtype == torch.float32:
        for x, y in zip(a['master'], b['master']):
            assert torch.allclose(x, y, rtol=0, atol=1e-6), (x - y).abs().max()
    # DeepSpeed's checks: a norm (and in bf16 an amax and an amin) per gradient tensor; fused: one multi-tensor norm
    tensors = sum(len(p) for p in opt.params_in_partition)
    assert a['ops']['aten::linalg_vector_norm'] >= 4 * tensors
    assert b['ops']['aten::linalg_vector_norm'] == 4  # one a step: DeepSpeed combining the group norms
    checks = len(opt.bit16_groups) + (dtype == torch.bfloat16)  # a norm per group, one inf/NaN test, per step
    assert b['ops']['aten::_foreach_norm'] == 4 * checks, b['ops']
    if dtype == torch.bfloat16:
        assert a['ops']['aten::amax'] >= 4 * tensors and 'aten::amax' not in b['ops']
print('ok', rank)
torch.distributed.barrier()
torch.distributed.destroy_process_group()  # an orderly end: gloo's threads torn down at exit can abort the process
'''


def test_fused_checks_match_deepspeed_over_two_ranks(tmp_path):
    script = tmp_path / 'zero_checks.py'
    script.write_text(SCRIPT.replace('ROOT', repr(ROOT), 1))
    r = run_stage(script, nproc=2, env={'OMP_NUM_THREADS': '1'}, timeout=600)  # a thread each: 2 ranks on 2 cores
    assert 'ok 0' in r.stdout and 'ok 1' in r.stdout, r.stdout[-3000:] + r.stderr[-5000:]
