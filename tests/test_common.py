"""common.py: checkpoints that resume exactly (RNG per rank included) with ZeRO stages 0, 1 and 2, a save cut off
before 'latest' that leaves the previous checkpoint the one resumed, the newest `keep` kept, the cross-rank weight
check, and DeepSpeed's treatment of a parameter that gets no gradient (EVA-01's detached patch embedding); run
over 2 ranks with torchrun, as a stage runs."""
import os

import pytest

from common import batch_split, format_row
from conftest import ROOT, run_stage


SCRIPT = r'''
import os, sys
import numpy as np, torch
sys.path.insert(0, ROOT)
import common
from common import deepspeed_engine, full_state_dict, init_distributed, resume, save_checkpoint

rank, local_rank, world, device = init_distributed()
assert world == 2 and torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
out = sys.argv[1]


class Net(torch.nn.Module):
    def __init__(self, detach_stem=False):
        super().__init__()
        self.stem, self.body, self.head = torch.nn.Linear(8, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)
        self.detach_stem = detach_stem

    def forward(self, x):
        h = self.stem(x)
        return self.head(torch.relu(self.body(h.detach() if self.detach_stem else h)))


def build(stage, seed, freeze=True, detach_stem=False, lr=1e-2, wd=0.1):
    torch.manual_seed(seed)
    net = Net(detach_stem)
    net.stem.requires_grad_(not freeze)
    params = [p for p in net.parameters() if p.requires_grad]
    groups = [{'params': [p for p in params if p.ndim > 1], 'weight_decay': wd},
              {'params': [p for p in params if p.ndim == 1], 'weight_decay': 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr)
    return deepspeed_engine(net, opt, batch_size=8, micro_batch=2, grad_clip=1.0, zero_stage=stage, dtype='fp32')


def train(engine, steps):
    for _ in range(steps):
        for _ in range(2):  # 8 = 2 ranks x micro-batch 2 x 2 accumulation steps
            x = torch.randn(2, 8) + float(np.random.rand())  # both global RNGs: resume must restore them
            engine.backward(engine(x).square().mean())
            engine.step()


def listing(d):  # the step folders and 'latest' (ZeRO also leaves its zero_to_fp32.py scripts there)
    return sorted(f for f in os.listdir(f'{d}/ckpt') if not f.endswith('.py'))


def weights(engine):
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


for stage in (0, 1, 2):
    d = f'{out}/zero{stage}'
    engine, _ = build(stage, seed=0)
    init = weights(engine)
    assert resume(engine, d, 5, {}) == (0, {})  # nothing to resume: seeded with seed + rank
    assert torch.initial_seed() == 5 + rank
    for s in (1, 2, 3):
        train(engine, 1)
        save_checkpoint(engine, d, s, {'tag': s}, {'w.pt': {'model': full_state_dict(engine), 'step': s}}, keep=2)
    at3 = weights(engine)
    ref_draws = (torch.rand(3), np.random.rand(3))
    train(engine, 2)
    ref = weights(engine)
    # a save cut off after every rank's DeepSpeed and RNG files, before the export and 'latest' (a kill): rank 0
    # stops as it writes the export, rank 1 after the files' barrier
    real_save, real_print0 = common.atomic_save, common.print0
    def crash(*args):
        raise KeyboardInterrupt
    common.atomic_save = lambda obj, path: crash() if path.endswith('w.pt') else real_save(obj, path)
    common.print0 = crash
    try:
        save_checkpoint(engine, d, 5, {'tag': 5}, {'w.pt': {'model': full_state_dict(engine), 'step': 5}}, keep=2)
        raise AssertionError('the save went through')
    except KeyboardInterrupt:
        pass
    common.atomic_save, common.print0 = real_save, real_print0
    torch.distributed.barrier()
    assert open(f'{d}/ckpt/latest').read() == 'step3'
    assert listing(d) == ['latest', 'step2', 'step3', 'step5'], listing(d)
    # a new process resumes step 3: DeepSpeed's states (a different init is overwritten) and this rank's RNG
    engine, opt = build(stage, seed=1)
    step, client = resume(engine, d, 0, {})
    assert step == 3 and client['tag'] == 3, (step, client)
    for n, w in weights(engine).items():
        assert torch.equal(w, at3[n]), (stage, n)
    draws = (torch.rand(3), np.random.rand(3))
    assert torch.equal(draws[0], ref_draws[0]) and np.array_equal(draws[1], ref_draws[1]), stage
    train(engine, 2)
    for n, w in weights(engine).items():
        assert torch.equal(w, ref[n]), (stage, n)  # fp32 on a CPU: the same computation, bit for bit
    # the export: fp32 weights of step 3, the frozen stem as initialised (it has no master copy in the optimizer)
    if rank == 0:
        saved = torch.load(f'{d}/w.pt')
        assert saved['step'] == 3 and all(torch.equal(saved['model'][n], at3[n]) for n in at3)
        assert torch.equal(saved['model']['stem.weight'], init['stem.weight'])
    # keep: the oldest step folders go, 'latest' and the newest stay
    save_checkpoint(engine, d, 7, {'tag': 7}, {}, keep=1)
    assert listing(d) == ['latest', 'step7']
    # diverged working weights on one rank fail the save on every rank
    if rank == 1:
        with torch.no_grad():
            engine.module.head.bias[0] += 1
    try:
        save_checkpoint(engine, d, 8, {}, {}, keep=2)
        raise AssertionError('diverged weights were saved')
    except AssertionError as e:
        assert 'diverged' in str(e) and 'saved' not in str(e), e
    assert open(f'{d}/ckpt/latest').read() == 'step7' and not os.path.exists(f'{d}/ckpt/step8')
    open(f'{out}/resume_ok_{stage}_{rank}', 'w').close()

# EVA-01 detaches the patch embedding's output but keeps its parameters in the optimizer: DeepSpeed hands such a
# parameter a zero gradient, so AdamW leaves it alone but for the decoupled weight decay, w *= 1 - lr * wd a step
for stage in (0, 1):
    engine, _ = build(stage, seed=0, freeze=False, detach_stem=True, lr=1e-2, wd=0.1)
    before = weights(engine)
    train(engine, 3)
    after = weights(engine)
    torch.testing.assert_close(after['stem.weight'], before['stem.weight'] * (1 - 1e-2 * 0.1) ** 3, rtol=1e-6, atol=0)
    assert torch.equal(after['stem.bias'], before['stem.bias'])  # no weight decay on biases
    assert not torch.allclose(after['head.weight'], before['head.weight'] * (1 - 1e-2 * 0.1) ** 3)
open(f'{out}/decay_ok_{rank}', 'w').close()
torch.distributed.barrier()
torch.distributed.destroy_process_group()  # an orderly end: gloo's threads torn down at exit can abort the process
'''


def test_checkpoints_resume_exactly_over_zero_stages_and_survive_a_cut_save(tmp_path):
    script = tmp_path / 'common_check.py'
    script.write_text(SCRIPT.replace('ROOT', repr(ROOT), 1))
    run_stage(script, tmp_path / 'out', nproc=2, timeout=600)
    done = sorted(f for f in os.listdir(tmp_path / 'out') if f.endswith(('_0', '_1')))  # each rank reached the end
    assert done == ['decay_ok_0', 'decay_ok_1'] + [f'resume_ok_{s}_{r}' for s in (0, 1, 2) for r in (0, 1)], done


def test_batch_split_and_log_line(capsys):
    assert batch_split(4096, 32, 16) == (32, 8)  # the paper's: 16 nodes x 8 GPUs x 32, or 2 nodes with 8 steps
    assert batch_split(32, 32, 2) == (16, 1) and batch_split(32, 32, 4) == (8, 1)  # a tiny config on 2 or 4
    assert batch_split(36, 8, 2) == (6, 3)  # the largest micro-batch <= 8 that divides a share of 18
    assert 'micro_batch 8 -> 6: 2 processes x 6 x 3 accumulation steps' in capsys.readouterr().out
    for bad in ((32, 32, 3), (32, 0, 1)):
        with pytest.raises(SystemExit, match='^error: batch_size 32 does not split'):
            batch_split(*bad)
    row = {'step': 20, 'epoch': 0.156, 'loss': -0.30841, 'lr': 0.00119, 'grad_norm': 0.709, 'loss_scale': None,
           'skipped': 0, 'img_s': 335.27, 'mfu': 0.5203, 'mem_gb': None, 'bad_samples': 2, 'eta_h': 1.5,
           'val_loss': -0.7, 'eval': {'top1': 3.0}}
    assert format_row(row, 256) == ('step 20/256 | ep 0.16 | loss -0.3084 | lr 1.19e-03 | gnorm 0.709 | skipped 0 | '
                                    '335.3 img/s | mfu 52.0% | bad 2 | eta 1:30:00 | val_loss -0.7')
