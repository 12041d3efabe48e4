"""bench.py on the CPU with the tiny size: correctness of what it measures and reports, never a speed threshold.
The timm reference it swaps in must be the same model as ours (same keys, same MIM outputs)."""
import json

import pytest
import torch
import torch.nn.functional as F

from bench import timm_eva_class
from conftest import log_rows, run_stage
from model import CLIP, EVA, TEXT_SIZES, CLIPTeacher, eva_config


def bench(*args):
    return run_stage('bench.py', *args, timeout=600).stdout


def test_timm_reference_is_the_same_model():
    """The reference student: timm's Eva behind our interface. With our weights it gives our MIM predictions and
    our logits, so the benchmark compares implementations of one model, not two models."""
    TimmEVA = timm_eva_class()
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
                '--warmup=2', '--num_workers=0', '--dtype=bf16', '--profile=True', f'--out_dir={tmp_path}',
                '--zero_config=contiguous_gradients=False,reduce_bucket_size=1000')
    res = json.load(open(tmp_path / 'bench_step.json'))
    ours = res['runs']['ours']
    assert list(res['runs']) == ['ours', 'timm', 'timm_our_engine'] and res['config']['dtype'] == 'bf16'
    assert len(ours['samples_s_all']) == 3 and sorted(ours['samples_s_all'])[1] == ours['samples_s']  # the median
    for ref in ('timm', 'timm_our_engine'):
        assert ours['vs'][ref] == ours['samples_s'] / res['runs'][ref]['samples_s'] and f'x {ref}' in out
    # MFU = img/s x (student fwd+bwd + teacher fwd FLOPs) / the measured matmul rate
    assert ours['mfu'] == pytest.approx(ours['samples_s'] * res['flops_per_sample'] / (res['matmul_tflops'] * 1e12))
    logs = log_rows(tmp_path / 'pretrain_ours')
    assert [r['step'] for r in logs if 'img_s' in r] == [1, 2, 3, 4, 5]  # warm-up 2 + 3 timed, the real script
    assert ours['samples_s_all'] == [r['img_s'] for r in logs if 'img_s' in r][2:]
    # zero_config reaches DeepSpeed in every run (the engine's config as written by the run itself)
    for run in ('ours', 'timm'):
        zero = json.load(open(tmp_path / f'pretrain_{run}' / 'engine.json'))['deepspeed_config']['zero_optimization']
        assert zero['contiguous_gradients'] is False and zero['reduce_bucket_size'] == 1000 and zero['stage'] == 1
    width = CLIPTeacher('tiny', '', 32, 4).out_dim  # the student's lm_head predicts the teacher's features
    student = EVA(eva_config('eva_tiny', pooling='cls', use_mask_token=True, mim_dim=width))
    assert ours['trained_params'] == res['params'] == sum(p.numel() for p in student.parameters())
    # --profile: ours marked, a trace of two steps with each phase labelled twice
    assert ours['profiled'] and not res['runs']['timm']['profiled']
    trace = json.load(open(tmp_path / 'pretrain_ours' / 'trace.json'))['traceEvents']
    phases = [e['name'] for e in trace if e.get('cat') == 'user_annotation']
    for phase in ('teacher_forward', 'student_forward', 'student_backward', 'optimizer_step'):
        assert phases.count(phase) == 2, (phase, phases)
    assert ours['peak_gb'] is ours['reserved_gb'] is ours['projected_gb'] is None  # (a CPU; no projected row)
    # beside the measured memory, the projection of the same settings from a memory-mode file (made up here)
    rows = {'mine': {'stage': 'finetune', 'model_size': 'eva_tiny', 'img_size': 32, 'micro_batch': 8,
                     'grad_checkpointing': False, 'stage_args': '', 'zero_config': '',
                     'worlds': {'1': {'allocated_gib': 1.23}}}}
    rows['other'] = {**rows['mine'], 'micro_batch': 4, 'worlds': {'1': {'allocated_gib': 9.9}}}
    (tmp_path / 'projection.json').write_text(json.dumps(rows))
    out = bench('--stage=finetune', '--model_size=eva_tiny', '--img_size=32', '--micro_batch=8', '--steps=2',
                '--warmup=1', '--num_workers=0', '--reference=', f'--out_dir={tmp_path}',
                f"--projection={tmp_path / 'projection.json'}")
    res = json.load(open(tmp_path / 'bench_step.json'))
    assert list(res['runs']) == ['ours'] and res['runs']['ours']['samples_s'] > 0
    assert res['runs']['ours']['projected_gb'] == 1.23 and '| projected 1.23 GiB' in out
    assert not (tmp_path / 'finetune_ours' / 'last.pt').exists()  # save_ckpt=False: no checkpoint writing timed


def counted_flops(model, *inputs):
    """3 x the forward's matmul FLOPs as torch's counter sees them (it does not see inside CPU SDPA: plain matmuls
    instead; a mask changes no FLOP count)."""
    from torch.utils.flop_counter import FlopCounterMode

    def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v
    sdpa, F.scaled_dot_product_attention = F.scaled_dot_product_attention, attention
    try:
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            model(*inputs)
    finally:
        F.scaled_dot_product_attention = sdpa
    return 3 * fc.get_total_flops()


@pytest.mark.parametrize('stage,config,more', [('clip', 'config/clip_tiny.py', ''),
                                               ('video', 'config/finetune_video_tiny.py', ' --num_frames=2'),
                                               ('det', 'config/det_tiny.py', ''),
                                               ('seg', 'config/seg_tiny.py', ' --seg_head=upernet')])
def test_every_stage_steps(tmp_path, stage, config, more):
    """Each stage's real script, stopped once warm-up + timed steps are logged: bench's settings win over the stage
    config given in stage_args (checkpointing is these stages' recipe), its --key=value last; the rate is the log's;
    MFU from the stage's FLOPs (torch's counter on the same model) where there is a count."""
    out = bench(f'--stage={stage}', f'--stage_args={config}{more}', '--model_size=eva_tiny', '--img_size=32',
                '--micro_batch=4', '--steps=2', '--warmup=1', '--num_workers=0', f'--out_dir={tmp_path}',
                *(['--reference=no_checkpointing'] if stage == 'seg' else []))
    res = json.load(open(tmp_path / 'bench_step.json'))
    ours = res['runs']['ours']
    assert list(res['runs']) == (['ours', 'no_checkpointing'] if stage == 'seg' else ['ours'])  # auto: no timm here
    rows = log_rows(tmp_path / f'{stage}_ours')
    c = rows[0]['config']
    assert (c['model_size'], c['img_size'], c['micro_batch'], c['batch_size']) == ('eva_tiny', 32, 4, 4)
    assert c['grad_checkpointing'] is True and ours['grad_checkpointing'] is True  # the tiny configs say False
    key = 'samples_s' if stage in ('clip', 'video') else 'img_s'
    assert ours['samples_s_all'] == [r[key] for r in rows if key in r][1:3]
    assert ours['samples_s'] == pytest.approx(sum(ours['samples_s_all']) / 2)  # the median of two
    if stage in ('clip', 'video'):
        if stage == 'clip':
            model = CLIP(eva_config('eva_tiny', pooling='cls', num_classes=c['embed_dim']), TEXT_SIZES['tiny'],
                         c['embed_dim'])
            flops = counted_flops(model, torch.randn(1, 3, 32, 32), torch.zeros(1, 16, dtype=torch.long))
            assert ours['trained_params'] == sum(p.numel() for p in model.parameters())
        else:
            assert c['num_frames'] == 2 and c['num_classes'] == 24 and res['unit'] == 'clip'
            model = EVA(eva_config('eva_tiny', num_frames=2, num_classes=24))
            flops = counted_flops(model, torch.randn(1, 3, 2, 32, 32))
        assert res['flops_per_sample'] == flops
        assert ours['mfu'] == pytest.approx(ours['samples_s'] * flops / (res['matmul_tflops'] * 1e12))
    else:  # no FLOP count of the detection and segmentation heads: no MFU, said as such
        assert res['flops_per_sample'] is None and ours['mfu'] is None and 'MFU     -' in out
        assert c['task'] == stage and c['max_steps'] == 3
        assert c['num_classes'] == {'det': 4, 'seg': 5}[stage]  # the config's: the recipe's class count
    if stage == 'seg':
        assert c['seg_head'] == 'upernet'  # stage_args' --key=value reach the script
        ref = res['runs']['no_checkpointing']
        assert ref['grad_checkpointing'] is False
        assert ours['vs']['no_checkpointing'] == ours['samples_s'] / ref['samples_s']


def test_data_mode_compares_pipelines(tmp_path):
    out = bench('--mode=data', '--data_images=16', '--data_passes=1', '--img_size=112', f'--out_dir={tmp_path}')
    res = json.load(open(tmp_path / 'bench_data.json'))
    assert set(res['runs']) == {'torchvision', 'ours', 'ours+normalise'} and 'img/s/core' in out
    assert 60 < res['image_kb'] < 200  # ImageNet-like JPEG sizes
    for name in ('ours', 'ours+normalise'):  # the same crops of the same images: the same statistics up to rounding
        for key in ('channel_mean', 'channel_std'):
            for a, b in zip(res['runs'][name][key], res['runs']['torchvision'][key]):
                assert abs(a - b) < 0.005, (name, key, a, b)


def test_targets_and_table_rows(tmp_path):
    """targets mode runs its rows (here without the compiled one: minutes on a CPU) and any other row asked for, each
    in its own folder, the table written row by row, every target said met, not met, or without a value."""
    projection = tmp_path / 'projection.json'  # memory mode's rows: the 16-rank figure of mim32_ckpt is a target
    projection.write_text(json.dumps({'mim32_ckpt': {'worlds': {'16': {'allocated_gib': 7.5}}}}))
    out = bench('--mode=targets', '--rows=mim64,mim32_ckpt,data,video8', '--model_size=eva_tiny', '--img_size=32',
                '--teacher_model=tiny', '--steps=1', '--warmup=1', '--num_workers=0', '--data_images=8',
                '--data_passes=1', f'--out_dir={tmp_path}', f'--projection={projection}')
    res = json.load(open(tmp_path / 'bench_targets.json'))
    assert [c['bound'] for c in res['checks']] == [1.25, 0.5, 1.0, 20.0, 1.5, 0.03]
    step = res['mim64']['runs']['ours']
    assert res['checks'][0]['value'] == step['vs']['timm'] and res['checks'][1]['value'] == step['mfu']
    assert res['mim64']['micro_batch'] == 64 and list(res['mim64']['runs']) == ['ours', 'timm', 'timm_our_engine']
    assert res['checks'][2]['value'] is None  # the compiled row did not run: no value, never a guess
    assert res['checks'][3]['value'] == 7.5  # (at most 20: met)
    assert res['checks'][5]['value'] is None  # no GPU memory on a CPU to hold to its projection: never faked
    assert out.count('no value') == 2 and out.count('met') == 4
    ckpt = res['mim32_ckpt']
    assert ckpt['grad_checkpointing'] is True and list(ckpt['runs']) == ['ours', 'no_checkpointing']
    assert 'runs at' in out  # the cost of checkpointing, stated
    logged = log_rows(tmp_path / 'mim32_ckpt' / 'pretrain_no_checkpointing')
    assert logged[0]['config']['grad_checkpointing'] is False and logged[0]['config']['micro_batch'] == 32
    video = res['video8']
    assert video['stage'] == 'video' and video['micro_batch'] == 2 and video['img_size'] == 32  # passed through
    assert json.loads(open(tmp_path / 'video8' / 'video_ours' / 'log.jsonl').readline())['config']['num_frames'] == 8
    table = open(tmp_path / 'table.md').read().splitlines()
    assert [line.split(' | ')[0] for line in table[2:]] == ['| mim64', '| mim32_ckpt', '| data', '| video8']
    assert f"{step['samples_s']:.4g} img/s" in table[2]
    assert f"{video['runs']['ours']['samples_s']:.4g} clip/s" in table[5]


def test_bad_settings_fail_clearly(tmp_path):
    for args, message in ((['--stage=dett'], "stage must be one of"),
                          (['--mode=memroy'], "mode must be one of data, index, step"),
                          (['--mode=table', '--rows=mim64,nope'], "unknown rows ['nope']"),
                          (['--zero_config=overlap_comm'], "zero_config wants 'key=value,...'"),
                          (['--stage=clip', '--compile_blocks=True'], "train_clip.py does not compile its blocks"),
                          (['--stage=det', '--reference=timm'], "the timm references are for pretrain and finetune")):
        r = run_stage('bench.py', *args, f'--out_dir={tmp_path}', timeout=120, check=False)
        assert r.returncode != 0 and message in r.stderr + r.stdout, (args, r.stderr[-500:])
