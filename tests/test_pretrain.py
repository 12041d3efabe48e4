"""pretrain.py end to end on the CPU through the real DeepSpeed engine (fp32, ZeRO-1), and the MIM pieces it uses:
the loss and the CLIP teacher's targets."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import torch
import torch.nn.functional as F

from common import ROW_FORMAT, slurm_env
from conftest import ROOT, log_rows, run_stage
from data import MaskingGenerator, ResumableSampler, Samples, SyntheticShapes, eval_transform, mim_transform
from model import EVA, CLIPTeacher, eva_config, load_pretrained, mim_loss

TINY = ['config/pretrain_tiny.py', '--eval_interval=0', '--ckpt_interval=0', '--log_interval=1']


def pretrain(out_dir, *args, nproc=1):
    return run_stage('pretrain.py', *TINY, f'--out_dir={out_dir}', *args, nproc=nproc, timeout=300).stdout


def losses(out_dir):
    return {r['step']: r['loss'] for r in log_rows(out_dir) if 'loss' in r}


def test_loss_falls_on_a_tiny_batch_and_checkpoint_loads(tmp_path, run_readme):
    out = tmp_path / 'run'
    # 32 images = one batch, seen 40 times under fresh crops: the loss must fall clearly
    log = pretrain(out, '--synthetic_size=32', '--max_steps=40', '--ckpt_interval=40', '--val_data_path=synthetic:1',
                   '--val_size=40', '--eval_interval=40')
    assert 'training in fp32 instead' in log  # said once, on the CPU
    loss = losses(out)
    assert len(loss) == 40 and loss[1] > -0.1 and loss[40] < loss[1] - 0.3, loss
    val = [r['val_loss'] for r in log_rows(out) if 'val_loss' in r]
    assert len(val) == 1 and val[0] < -0.3
    # the encoder file: official keys, our loader and timm read it
    ckpt = torch.load(out / 'eva_mim.pt', weights_only=False)
    assert ckpt['step'] == 40 and ckpt['config']['model_size'] == 'eva_tiny'
    assert {'mask_token', 'lm_head.weight', 'norm.weight', 'blocks.1.attn.q_bias'} <= set(ckpt['model'])
    clf = EVA(eva_config('eva_tiny', num_classes=10))
    info = load_pretrained(clf, str(out / 'eva_mim.pt'))
    assert sorted(info['missing']) == ['fc_norm.bias', 'fc_norm.weight', 'head.bias', 'head.weight']
    mim = EVA(eva_config('eva_tiny', pooling='cls', use_mask_token=True, mim_dim=768))
    assert load_pretrained(mim, str(out / 'eva_mim.pt'))['missing'] == []
    ref = run_readme("ckpt['timm_args']", **{'out/pretrain_tiny': out})['eva']  # the README's lines, verbatim
    assert ckpt['model_config']['embed_dim'] == 64 and type(ref).__module__ == 'timm.models.eva'
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ref.eval()(x), mim.eval()(x), atol=1e-5, rtol=0)


def test_official_init_and_validation_loss(tmp_path):
    """One step at lr 0 (the warmup's first) leaves eva_mim.pt at the init: EVA-01's MIM init, every draw cut at
    +-1 std of 0.015. The logged validation loss is EVA-01's evaluate_pt: the flat patch indices 0, 2, 4, ...
    masked in every image, images resized to 32 / (224/256) = 36 and center-cropped, recomputed here by hand."""
    out = tmp_path / 'run'
    pretrain(out, '--synthetic_size=32', '--max_steps=1', '--warmup_epochs=1.0', '--ckpt_interval=1',
             '--eval_interval=1', '--val_data_path=synthetic:1', '--val_size=10')
    sd = torch.load(out / 'eva_mim.pt', weights_only=False)['model']
    for k in ('pos_embed', 'cls_token', 'mask_token', 'lm_head.weight', 'patch_embed.proj.weight',
              'blocks.0.attn.qkv.weight', 'blocks.1.mlp.fc1.weight'):
        assert 0.01 < sd[k].abs().max() <= 0.015, k
    cfg = eva_config('eva_tiny', pooling='cls', use_mask_token=True, mim_dim=768, init_std=0.015, init_trunc=1.0)
    torch.manual_seed(0)  # pretrain.py's draws: the teacher from the seed, then the student from the seed
    teacher = CLIPTeacher('tiny', '', 32, 4)
    torch.manual_seed(0)
    student = EVA(cfg)
    assert all(torch.equal(v, sd[k]) for k, v in student.state_dict().items())
    student.eval()
    val = Samples(SyntheticShapes(10, 32, seed=1), eval_transform(32, 224 / 256), 0)
    x = torch.stack([val[i]['image'] for i in range(10)])
    mask = torch.zeros(10, 8, 8, dtype=torch.bool)
    mask[:, :, 0::2] = True  # on an 8-wide grid the even flat indices are the even columns: 32 of 64
    mask = mask.flatten(1)
    with torch.no_grad():
        cos = F.cosine_similarity(student(x, mask), teacher(x)[mask], dim=-1).view(10, 32)
    val_loss = [r['val_loss'] for r in log_rows(out) if 'val_loss' in r]
    assert val_loss == [pytest.approx(-cos.mean().item(), abs=1e-6)]


def test_resume_gives_the_same_losses(tmp_path, zero_stage=1):
    # ZeRO-1 as the configs run it; test_common resumes each of ZeRO 0 / 1 / 2 exactly on 2 ranks
    args = ['--synthetic_size=256', '--max_steps=6', '--batch_size=16', '--micro_batch=8', f'--zero_stage={zero_stage}']
    pretrain(tmp_path / 'full', *args, '--log_samples=True')
    out = pretrain(tmp_path / 'split', *args, '--stop_step=3')
    assert 'stopped at step 3 (stop_step)' in out and len(losses(tmp_path / 'split')) == 3
    out = pretrain(tmp_path / 'split', *args)
    assert 'resumed from' in out and 'at step 3' in out
    full, split = losses(tmp_path / 'full'), losses(tmp_path / 'split')
    assert sorted(split) == list(range(1, 7))
    row = [r for r in log_rows(tmp_path / 'split') if 'loss' in r][-1]
    assert set(ROW_FORMAT) - {'samples_s'} <= set(row), row  # the row every stage logs
    assert row['eta_h'] == 0 and row['bad_samples'] == 0
    assert row['grad_norm'] > 0
    ckpt = torch.load(tmp_path / 'split' / 'eva_mim.pt', weights_only=False)  # the fp32 weights, with any ZeRO stage
    assert ckpt['step'] == 3 and ckpt['model']['pos_embed'].dtype == torch.float32
    # on the CPU in fp32 the resumed run is the same computation: equal to float rounding of the log (1e-6)
    for s in range(1, 7):
        assert split[s] == pytest.approx(full[s], rel=1e-6, abs=1e-7), (s, split[s], full[s])
    # teacher_stream (each next micro-batch and its targets prepared before the optimizer step; on a GPU on a stream
    # of its own), stopped and resumed: the same micro-batches in the same steps, the same losses
    pretrain(tmp_path / 'stream', *args, '--teacher_stream=True', '--log_samples=True', '--stop_step=3')
    pretrain(tmp_path / 'stream', *args, '--teacher_stream=True', '--log_samples=True')
    stream = losses(tmp_path / 'stream')
    samples = [[json.loads(line) for line in open(tmp_path / run / 'samples_rank0.jsonl')]
               for run in ('stream', 'full')]
    assert samples[0] == samples[1] and len(samples[0]) == 12  # 6 steps x 2 micro-batches
    for s in range(1, 7):
        assert stream[s] == pytest.approx(full[s], rel=1e-6, abs=1e-7), (s, stream[s], full[s])


def test_ctrl_c_finishes_the_step_saves_and_the_same_command_resumes(tmp_path):
    args = [sys.executable, 'pretrain.py', *TINY, f'--out_dir={tmp_path}', '--synthetic_size=256', '--max_steps=2000',
            '--batch_size=16', '--micro_batch=8', '--num_workers=2']
    p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    deadline = time.time() + 120
    while not (os.path.exists(tmp_path / 'log.jsonl') and len(losses(tmp_path)) >= 3) and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group, DataLoader workers too
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 0, out[-3000:]
    step = max(losses(tmp_path))
    assert f'stopped at step {step} (signal)' in out and 'Traceback' not in out and step < 2000, out[-2000:]
    assert open(tmp_path / 'ckpt' / 'latest').read() == f'step{step}'
    out = pretrain(tmp_path, '--synthetic_size=256', '--max_steps=2000', '--batch_size=16', '--micro_batch=8',
                   f'--stop_step={step + 2}')
    assert f'resumed from {tmp_path}/ckpt/step{step} at step {step}' in out
    rows = log_rows(tmp_path)
    assert [r['step'] for r in rows if 'loss' in r] == list(range(1, step + 3))  # each step once
    assert sum('config' in r for r in rows) == 2 and json.load(open(tmp_path / 'config.json'))['max_steps'] == 2000


def test_ctrl_c_cuts_an_evaluation_short_and_a_second_one_exits_at_once(tmp_path):
    """A Ctrl-C during the validation at step 2 (100,000 images: minutes) stops it at its next batch, reports nothing
    of it, and the run saves step 2 and exits 0; a second Ctrl-C 2 s or more after the first ends the run at once."""
    base = [sys.executable, 'pretrain.py', *TINY, '--synthetic_size=256', '--batch_size=16', '--micro_batch=8',
            '--max_steps=2000']

    def start(out_dir, *args):
        return subprocess.Popen(base + [f'--out_dir={out_dir}', *args], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def wait(cond):
        deadline = time.time() + 120
        while not cond() and time.time() < deadline:
            time.sleep(0.2)

    p = start(tmp_path / 'eval', '--val_data_path=synthetic', '--val_size=100000', '--eval_interval=2',
              '--log_interval=1')
    wait(lambda: os.path.exists(tmp_path / 'eval' / 'log.jsonl') and len(losses(tmp_path / 'eval')) >= 2)
    t = time.time()
    os.killpg(p.pid, signal.SIGINT)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 0 and time.time() - t < 60, out[-3000:]
    assert 'the evaluation was cut short by the signal' in out and 'stopped at step 2 (signal)' in out, out[-3000:]
    assert not any('val_loss' in r for r in log_rows(tmp_path / 'eval'))
    assert open(tmp_path / 'eval' / 'ckpt' / 'latest').read() == 'step2'
    p = start(tmp_path / 'twice', '--log_interval=1000')  # the first Ctrl-C waits for step 1000's log line
    wait(lambda: os.path.exists(tmp_path / 'twice' / 'log.jsonl'))
    time.sleep(1)
    os.killpg(p.pid, signal.SIGINT)
    time.sleep(2.5)
    os.killpg(p.pid, signal.SIGINT)
    out = p.communicate(timeout=60)[0]
    assert p.returncode == 130 and 'SIGINT again: exiting now, without a checkpoint' in out, out[-3000:]
    assert not os.path.exists(tmp_path / 'twice' / 'ckpt' / 'latest')


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
    # seed 3: its first 8 samples all have 26 masked patches (see the precondition below)
    common = ['--synthetic_size=64', '--max_steps=1', '--batch_size=8', '--drop_path=0.0', '--ckpt_interval=1',
              '--warmup_epochs=0.0', '--log_samples=True', '--seed=3']
    pretrain(tmp_path / 'accum', *common, '--micro_batch=4')
    pretrain(tmp_path / 'whole', *common, '--micro_batch=8')
    steps = [json.loads(line) for line in open(tmp_path / 'accum' / 'samples_rank0.jsonl')]
    assert len(steps) == 2 and all(len(s['indices']) == 4 for s in steps)
    # precondition: the token-mean loss of 2 x 4 equals that of 8 only if every image has as many masked patches
    ds = Samples(SyntheticShapes(64, 32, seed=3), mim_transform(32), 3, MaskingGenerator(8, 26, min_num_patches=4))
    counts = {int(ds[i]['mask'].sum()) for s in steps for i in s['indices']}
    assert len(counts) == 1, f"masked counts differ ({counts}): pick other samples for this test"
    a = torch.load(tmp_path / 'accum' / 'eva_mim.pt', weights_only=False)['model']
    b = torch.load(tmp_path / 'whole' / 'eva_mim.pt', weights_only=False)['model']
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-6, rtol=1e-5, msg=k)
    torch.manual_seed(3)  # pretrain.py's init: the step did move the weights, by far more than the tolerance
    init = EVA(eva_config('eva_tiny', pooling='cls', use_mask_token=True, mim_dim=768)).state_dict()
    assert torch.equal(init['pos_embed'], torch.load(tmp_path / 'accum' / 'ckpt' / 'step1' /
                       'mp_rank_00_model_states.pt', weights_only=False)['module']['pos_embed']) is False
    assert (a['blocks.0.attn.qkv.weight'] - init['blocks.0.attn.qkv.weight']).abs().max() > 1e-4
    assert (losses(tmp_path / 'accum')[1] == pytest.approx(losses(tmp_path / 'whole')[1], rel=1e-5))


def test_two_ranks_zero1_disjoint_data_identical_weights(tmp_path):
    out = pretrain(tmp_path / 'ddp', '--synthetic_size=128', '--max_steps=2', '--batch_size=16', '--micro_batch=8',
                   '--ckpt_interval=2', '--log_samples=True', nproc=2)
    assert 'world 2 x micro-batch 8 x grad-accum 1 = global batch 16' in out
    assert '(weights equal on all 2 ranks)' in out
    r0 = [json.loads(line) for line in open(tmp_path / 'ddp' / 'samples_rank0.jsonl')]
    r1 = [json.loads(line) for line in open(tmp_path / 'ddp' / 'samples_rank1.jsonl')]
    assert [s['step'] for s in r0] == [s['step'] for s in r1] == [0, 1]
    for a, b in zip(r0, r1):
        assert len(a['indices']) == len(b['indices']) == 8 and not set(a['indices']) & set(b['indices'])
    # the split is the sampler's: rank r takes every 2nd index of the epoch's permutation
    expect = [list(ResumableSampler(128, 2, r, seed=0))[:16] for r in range(2)]
    assert r0[0]['indices'] + r0[1]['indices'] == expect[0] and r1[0]['indices'] + r1[1]['indices'] == expect[1]


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


# 8 steps on 2 processes, one OpenMP thread each, a checkpoint every 2 steps: the launch and fault tests' runs
TWO = [*TINY, '--synthetic_size=64', '--max_steps=8', '--batch_size=16', '--micro_batch=8', '--ckpt_interval=2',
       '--keep_ckpts=2', '--log_samples=True']
ONE_THREAD = {**os.environ, 'OMP_NUM_THREADS': '1'}


@pytest.fixture(scope='module')
def torchrun_run(tmp_path_factory):
    """TWO under `torchrun --nproc_per_node 2`, uninterrupted: the reference of the tests below."""
    out = tmp_path_factory.mktemp('torchrun')
    run_stage('pretrain.py', *TWO, f'--out_dir={out}', nproc=2, env=ONE_THREAD)
    expect = losses(out)
    assert sorted(expect) == list(range(1, 9))
    return out, expect


def test_srun_tasks_and_two_torchrun_nodes_train_as_one_torchrun(tmp_path, torchrun_run):
    """The same 8 steps on 2 processes three ways: `torchrun --nproc_per_node 2`; two processes with only the
    variables `srun -n 2 python pretrain.py` gives its tasks (common.slurm_env: rank, world, master host from the node
    list, port from the job id); two torchrun agents as two nodes (`--nnodes 2 --nproc_per_node 1`, c10d rendezvous
    on 127.0.0.1). The same micro-batches and bit-identical losses."""
    reference, expect = torchrun_run
    port = free_port()  # the job id whose port is free now
    slurm = dict(SLURM_JOB_ID=str(port - 15000), SLURM_STEP_NUM_TASKS='2', SLURM_NTASKS='2', SLURM_NODEID='0',
                 SLURM_JOB_NODELIST='127.0.0.1', SLURM_STEP_NODELIST='127.0.0.1', SLURM_STEP_TASKS_PER_NODE='2')
    agent = [sys.executable, '-m', 'torch.distributed.run', '--nnodes=2', '--nproc_per_node=1', '--rdzv-backend=c10d',
             f'--rdzv-endpoint=127.0.0.1:{free_port()}', '--rdzv-id=two_nodes']
    launches = {'srun': [([sys.executable, 'pretrain.py'], {**ONE_THREAD, **slurm, 'SLURM_PROCID': str(r),
                                                             'SLURM_LOCALID': str(r)}) for r in (0, 1)],
                'two_nodes': [(agent + ['pretrain.py'], ONE_THREAD)] * 2}
    for name, procs in launches.items():
        started = [subprocess.Popen(cmd + TWO + [f'--out_dir={tmp_path / name}'], cwd=ROOT, env=e,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for cmd, e in procs]
        outs = [p.communicate(timeout=600)[0] for p in started]
        assert all(p.returncode == 0 for p in started), '\n'.join(o[-3000:] for o in outs)
        assert any('world 2 x micro-batch 8 x grad-accum 1 = global batch 16' in o for o in outs), outs[0][-2000:]
    for name in launches:
        assert losses(tmp_path / name) == expect, name  # exactly: same ranks, same data, same reductions
        for r in (0, 1):
            assert open(tmp_path / name / f'samples_rank{r}.jsonl').read() == \
                open(reference / f'samples_rank{r}.jsonl').read()


def test_a_killed_rank_restarts_a_cut_checkpoint_is_passed_over_and_out_dirs_are_checked(tmp_path, torchrun_run):
    """At scale a run meets faults. kill -9 of one rank of `torchrun --nproc_per_node 2 --max-restarts=1`: the group
    restarts, resumes from the last checkpoint and ends with the losses of an uninterrupted run. A checkpoint cut
    short (a rank's optimizer file truncated after 'latest' named it): passed over, named, the previous one resumed,
    the steps lost said, the same losses again. A resume by another number of processes, and two nodes whose out_dir
    is not the same folder: one error line each."""
    _, expect = torchrun_run
    # kill -9 of rank 1 once step 4's checkpoint is complete
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '--max-restarts=1']
    run = subprocess.Popen(torchrun + ['pretrain.py', *TWO, f'--out_dir={tmp_path / "killed"}'], cwd=ROOT,
                           env=ONE_THREAD, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    latest = tmp_path / 'killed' / 'ckpt' / 'latest'
    while not (latest.exists() and latest.read_text() == 'step4') and run.poll() is None:
        time.sleep(0.02)
    rank1 = [p for p in psutil.Process(run.pid).children(recursive=True) if p.environ().get('RANK') == '1']
    os.kill(rank1[0].pid, signal.SIGKILL)
    out = run.communicate(timeout=600)[0]
    assert run.returncode == 0 and 'resumed from' in out and 'at step 4' in out, out[-3000:]
    assert losses(tmp_path / 'killed') == pytest.approx(expect, rel=1e-6, abs=1e-7)
    # a cut checkpoint: the last one's (step 8) rank-1 optimizer states truncated; step 6 resumed, 2 steps lost
    cut = next((tmp_path / 'killed' / 'ckpt' / 'step8').glob('*rank_1*optim_states.pt'))
    cut.write_bytes(cut.read_bytes()[:1000])
    out = run_stage('pretrain.py', *TWO, f'--out_dir={tmp_path / "killed"}', nproc=2, env=ONE_THREAD).stdout
    assert f'passed over step8: {cut.name} truncated: resuming from step6' in out, out[-3000:]
    assert '2 steps lost: the log went on to step 8' in out
    assert losses(tmp_path / 'killed') == pytest.approx(expect, rel=1e-6, abs=1e-7)
    # resumed by 1 process: one line saying what to do
    r = run_stage('pretrain.py', *TWO, f'--out_dir={tmp_path / "killed"}', '--max_steps=10', env=ONE_THREAD,
                  check=False)
    assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith(f'error: {tmp_path}/killed/ckpt/step8 was written by 2 '
                                                        'processes')
    # two nodes, each with an out_dir of its own (as a node-local disk would give): one error before training
    agent = torchrun[:3] + ['--nnodes=2', '--nproc_per_node=1', '--rdzv-backend=c10d', '--rdzv-id=unshared',
                            f'--rdzv-endpoint=127.0.0.1:{free_port()}', 'pretrain.py', *TWO]
    nodes = [subprocess.Popen(agent + [f'--out_dir={tmp_path / f"node{n}"}'], cwd=ROOT, env=ONE_THREAD, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for n in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in nodes]
    assert all(p.returncode != 0 for p in nodes) and not (tmp_path / 'node0' / 'log.jsonl').exists()
    assert f'error: out_dir {tmp_path / "node0"} is not shared: rank 1 on' in outs[0], outs[0][-3000:]


def test_slurm_variables_by_hand():
    """common.slurm_env: SLURM's task variables -> torchrun's; host lists, tasks per node, what is left alone."""
    step = dict(SLURM_STEP_NUM_TASKS='32', SLURM_PROCID='9', SLURM_LOCALID='1', SLURM_NTASKS='32',
                SLURM_JOB_ID='123456', SLURM_JOB_NODELIST='gpu[07-10,12],gpu20', SLURM_TASKS_PER_NODE='8(x4)',
                SLURM_NODEID='1')
    assert slurm_env(step) == {'RANK': '9', 'LOCAL_RANK': '1', 'WORLD_SIZE': '32', 'LOCAL_WORLD_SIZE': '8',
                               'MASTER_ADDR': 'gpu07', 'MASTER_PORT': str(15000 + 123456 % 20000)}
    assert slurm_env({**step, 'SLURM_STEP_NODELIST': 'rack[2-3]-n[004-009],x1'})['MASTER_ADDR'] == 'rack2-n004'
    assert slurm_env({**step, 'SLURM_JOB_NODELIST': 'a1,b[1-2]'})['MASTER_ADDR'] == 'a1'
    uneven = {**step, 'SLURM_STEP_TASKS_PER_NODE': '2(x3),1'}
    assert [slurm_env({**uneven, 'SLURM_NODEID': str(n)})['LOCAL_WORLD_SIZE'] for n in range(4)] == ['2', '2', '2', '1']
    assert slurm_env({**step, 'MASTER_ADDR': 'head', 'MASTER_PORT': '1234'})['MASTER_ADDR'] == 'head'
    assert slurm_env({**step, 'RANK': '0'}) == {}  # torchrun's variables win
    assert slurm_env({'SLURM_NTASKS': '16', 'SLURM_PROCID': '0', 'SLURM_JOB_ID': '7'}) == {}  # an sbatch script itself
    assert slurm_env({**step, 'SLURM_STEP_NUM_TASKS': '1'}) == {}  # a one-task step: a world of one
    broken = {k: v for k, v in step.items() if k != 'SLURM_JOB_NODELIST'}
    with pytest.raises(SystemExit, match='started 32 tasks without SLURM_JOB_NODELIST: they cannot form one run'):
        slurm_env({**broken, 'SLURM_PROCID': '0'})


def test_bad_inputs_are_named(tmp_path):
    r = run_stage('pretrain.py', *TINY, '--data_path=/no/such/folder', check=False)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith('error: ') and \
        '/no/such/folder' in r.stderr.strip().splitlines()[-1] and 'Traceback' not in r.stderr, r.stderr[-2000:]
    for arg, error in (('--dtype=fp8', "error: dtype must be one of fp16, bf16, fp32, got 'fp8'"),
                       ('--model_size=eva_x', "error: model_size must be one of eva_g, eva_l, eva_b"),
                       ('--teacher_model=ViT-X', "error: open_clip model 'ViT-X', pretrained 'openai': Model config")):
        r = run_stage('pretrain.py', *TINY, arg, check=False)
        assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith(error), r.stderr[-2000:]
        assert 'Traceback' not in r.stderr, r.stderr[-2000:]
    r = run_stage('pretrain.py', *TINY, '--lrr=1e-3', check=False)
    assert r.returncode != 0 and "unknown config key 'lrr'" in r.stderr and 'lr' in r.stderr
    r = run_stage('pretrain.py', '--help', check=False)
    assert r.returncode == 0 and 'global batch (16 nodes x 8 GPUs x 32)' in r.stdout
    r = run_stage('pretrain.py', *TINY, '--micro_batch=0', check=False)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith('error: batch_size 32 does not split')
    # resuming an out_dir: changed settings are named; a checkpoint of another model is one clear error
    pretrain(tmp_path, '--max_steps=4', '--stop_step=2')
    assert 'settings changed since: lr 0.002 -> 0.001' in pretrain(tmp_path, '--max_steps=4', '--stop_step=3',
                                                                    '--lr=1e-3')
    r = run_stage('pretrain.py', *TINY, f'--out_dir={tmp_path}', '--max_steps=4', '--img_size=48', check=False)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr[-2000:]
    assert last.startswith(f'error: {tmp_path}/ckpt/step3 holds another model') and 'img_size 32 -> 48' in last


def test_loss_ignores_unmasked_targets():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(3, 10, generator=g) < 0.4
    pred = torch.randn(int(mask.sum()), 768, generator=g)
    target = torch.randn(3, 10, 768, generator=g)
    loss = mim_loss(pred, target, mask)
    changed = torch.where(mask[..., None], target, torch.randn(3, 10, 768, generator=g) * 50)
    assert mim_loss(pred, changed, mask) == loss
    # by hand: mean over masked tokens of -cos
    t = target[mask]
    manual = -(pred * t).sum(-1) / (pred.norm(dim=-1) * t.norm(dim=-1))
    torch.testing.assert_close(loss, manual.mean())
    assert mim_loss(t * 3.0, target, mask).item() == pytest.approx(-1.0)  # scale-free: perfect = -1


def test_teacher_targets_are_patch_tokens_after_ln_post_and_proj():
    torch.manual_seed(0)
    teacher = CLIPTeacher('tiny', img_size=32, patch_size=4)
    teacher.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    seen = {}
    teacher.visual.ln_post.register_forward_hook(lambda m, i, o: seen.update(ln_post=o))
    x = torch.randn(2, 3, 32, 32)
    out = teacher(x)
    assert out.shape == (2, 64, 768)
    torch.testing.assert_close(out, seen['ln_post'][:, 1:] @ teacher.visual.proj)  # cls dropped, 768-d


def test_teacher_from_a_local_open_clip_file(tmp_path):
    """README's offline teacher: `--teacher_model=ViT-L-14-quickgelu --teacher_pretrained=FILE`, an open_clip state
    dict on disk. Here ViT-B/32's shape: the file's weights exactly, QuickGELU from the name (a file carries no
    activation), and the targets equal open_clip's own tokens after ln_post, through the projection."""
    import open_clip
    src = open_clip.create_model('ViT-B-32-quickgelu')
    torch.save(src.state_dict(), tmp_path / 'clip_b32.bin')
    teacher = CLIPTeacher('ViT-B-32-quickgelu', str(tmp_path / 'clip_b32.bin'), 224, 32)
    got = teacher.visual.state_dict()
    assert got.keys() == {k[len('visual.'):] for k in src.state_dict() if k.startswith('visual.')}
    assert all(torch.equal(v, src.state_dict()['visual.' + k]) for k, v in got.items())
    assert isinstance(teacher.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    x = torch.randn(2, 3, 224, 224)
    src.visual.output_tokens = True
    _, tokens = src.visual.eval()(x)
    assert (teacher(x) - tokens @ src.visual.proj).abs().max() < 1e-5 and teacher(x).shape == (2, 49, 512)
    with pytest.raises(OSError, match=r"open_clip model 'ViT-B-32', pretrained '.*/nope\.bin': Pretrained value"):
        CLIPTeacher('ViT-B-32', str(tmp_path / 'nope.bin'), 224, 32)
