"""bench.py on the CPU with the tiny size: correctness of what it measures and reports, never a speed threshold.
The timm reference it swaps in must be the same model as ours (same keys, same MIM outputs)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from model import EVA, eva_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench(*args):
    r = subprocess.run([sys.executable, 'bench.py', *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def bench_module():
    """bench.py's definitions (above its config section), without running it."""
    src = open(os.path.join(ROOT, 'bench.py')).read()
    ns = {'__name__': 'bench', '__file__': os.path.join(ROOT, 'bench.py')}
    exec(compile(src[:src.index('# config\n')], 'bench.py', 'exec'), ns)
    return ns


def test_timm_reference_is_the_same_model():
    """The reference student: timm's Eva behind our interface. With our weights it gives our MIM predictions and
    our logits, so the benchmark compares implementations of one model, not two models."""
    TimmEVA = bench_module()['timm_eva_class']()
    torch.manual_seed(0)
    for cfg in (eva_config('eva_tiny', pooling='cls', use_mask_token=True, mim_dim=768),
                eva_config('eva_tiny', num_classes=10)):
        ours, ref = EVA(cfg).eval(), TimmEVA(cfg).eval()
        assert set(ours.state_dict()) == set(ref.state_dict())
        ref.load_state_dict(ours.state_dict())
        x = torch.randn(3, 3, 32, 32)
        mask = torch.rand(3, 64) < 0.4
        with torch.no_grad():
            if cfg.mim_dim:
                torch.testing.assert_close(ref(x, mask), ours(x, mask), atol=1e-5, rtol=0)
            else:
                torch.testing.assert_close(ref(x), ours(x), atol=1e-5, rtol=0)
        assert ref.flops_per_image() == ours.flops_per_image()


def test_step_mode_runs_both_stages_and_reports(tmp_path):
    # bf16: a low-precision engine as on a GPU (DeepSpeed casts parameters, not buffers: timm's k_bias must follow)
    out = bench('--model_size=eva_tiny', '--img_size=32', '--micro_batch=8', '--teacher_model=tiny', '--steps=3',
                '--warmup=2', '--num_workers=0', '--dtype=bf16', '--profile=True', f'--out_dir={tmp_path}')
    res = json.load(open(tmp_path / 'bench_step.json'))
    ours = res['runs']['ours']
    assert list(res['runs']) == ['ours', 'timm', 'timm_our_engine'] and res['config']['dtype'] == 'bf16'
    assert len(ours['img_s_all']) == 3 and sorted(ours['img_s_all'])[1] == ours['img_s']  # the median
    for ref in ('timm', 'timm_our_engine'):
        assert ours['vs'][ref] == ours['img_s'] / res['runs'][ref]['img_s'] and f'x {ref}' in out
    # MFU = img/s x (student fwd+bwd + teacher fwd FLOPs) / the measured matmul rate
    assert ours['mfu'] == pytest.approx(ours['img_s'] * res['flops_per_image'] / (res['matmul_tflops'] * 1e12))
    logs = [json.loads(line) for line in open(tmp_path / 'pretrain_ours' / 'log.jsonl')]
    assert [r['step'] for r in logs if 'img_s' in r] == [1, 2, 3, 4, 5]  # warm-up 2 + 3 timed, the real script
    # --profile: ours marked, a trace of two steps with each phase labelled twice
    assert ours['profiled'] and not res['runs']['timm']['profiled']
    trace = json.load(open(tmp_path / 'pretrain_ours' / 'trace.json'))['traceEvents']
    phases = [e['name'] for e in trace if e.get('cat') == 'user_annotation']
    for phase in ('teacher_forward', 'student_forward', 'student_backward', 'optimizer_step'):
        assert phases.count(phase) == 2, (phase, phases)
    bench('--stage=finetune', '--model_size=eva_tiny', '--img_size=32', '--micro_batch=8', '--steps=2', '--warmup=1',
          '--num_workers=0', '--reference=', f'--out_dir={tmp_path}')
    res = json.load(open(tmp_path / 'bench_step.json'))
    assert list(res['runs']) == ['ours'] and res['runs']['ours']['img_s'] > 0
    assert not (tmp_path / 'finetune_ours' / 'last.pt').exists()  # save_ckpt=False: no checkpoint writing timed


def test_data_mode_compares_pipelines(tmp_path):
    out = bench('--mode=data', '--data_images=16', '--data_passes=1', '--img_size=112', f'--out_dir={tmp_path}')
    res = json.load(open(tmp_path / 'bench_data.json'))
    assert set(res['runs']) == {'torchvision', 'ours', 'ours+normalise'} and 'img/s/core' in out
    assert 60 < res['image_kb'] < 200  # ImageNet-like JPEG sizes
    for name in ('ours', 'ours+normalise'):  # the same crops of the same images: the same statistics up to rounding
        for key in ('channel_mean', 'channel_std'):
            for a, b in zip(res['runs'][name][key], res['runs']['torchvision'][key]):
                assert abs(a - b) < 0.005, (name, key, a, b)


def test_targets_mode_reports_every_check(tmp_path):
    out = bench('--mode=targets', '--model_size=eva_tiny', '--img_size=32', '--micro_batch=8', '--teacher_model=tiny',
                '--steps=1', '--warmup=1', '--num_workers=0', '--data_images=8', '--data_passes=1',
                f'--out_dir={tmp_path}')
    res = json.load(open(tmp_path / 'bench_targets.json'))
    assert [c['bound'] for c in res['checks']] == [1.25, 0.5, 20.0, 1.5] and out.count('met ') == 4
    step = res['step']['runs']['ours']
    assert res['checks'][0]['value'] == step['vs']['timm'] and res['checks'][1]['value'] == step['mfu']
    assert res['checkpointed']['config']['grad_checkpointing'] is True
    ckpt = res['checkpointed']['runs']
    assert list(ckpt) == ['ours', 'no_checkpointing'] and 'runs at' in out  # the cost of checkpointing, stated
    logged = [json.loads(line) for line in open(tmp_path / 'checkpointed' / 'pretrain_no_checkpointing' / 'log.jsonl')]
    assert logged[0]['config']['grad_checkpointing'] is False
    assert res['checkpointed']['config']['micro_batch'] == 32 and res['checkpointed']['config']['zero_ranks'] == 16
    assert res['checks'][2]['value'] is None  # no GPU memory on a CPU: reported, never faked
