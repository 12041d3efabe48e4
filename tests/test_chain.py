"""The recipe's chain (chain.py) and the pictures (plot.py): a clip.pt as the MIM teacher against timm's EVA and the
head by hand, the chain on shortened runs (its table read back from every run's log, its pictures, a second start
that redoes nothing), the curves of a log with a half-written last line."""
import json
import shutil

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import plot
from common import open_log
from conftest import log_rows, run_stage
from model import CLIP, TEXT_SIZES, CLIPTeacher, eva_config, read_clip_file, resize_pos_embed, timm_args



def tiny_clip_file(path, seed=0):
    """A random tiny CLIP saved as train_clip.py saves clip.pt; the image head drawn at full scale (not x0.001) so
    that the projection matters in the comparison."""
    torch.manual_seed(seed)
    cfg = eva_config('eva_tiny', pooling='cls', num_classes=48)
    clip = CLIP(cfg, TEXT_SIZES['tiny'], 48)
    with torch.no_grad():
        clip.visual.head.weight.normal_(0, 0.2)
        clip.visual.head.bias.normal_(0, 0.2)
    torch.save({'model': clip.state_dict(), **clip.describe(), 'config': {}, 'step': 7}, path)
    return clip, cfg


def test_a_clip_pt_teacher_gives_the_towers_projected_patch_tokens(tmp_path):
    clip, cfg = tiny_clip_file(tmp_path / 'clip.pt')
    teacher = CLIPTeacher('ignored', str(tmp_path / 'clip.pt'), 32, 4)
    teacher.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.out_dim == 48 and 'clip.pt' in teacher.description
    # reference: timm's Eva with the image tower's weights gives the tokens after the final norm; the head by hand
    ref = timm.models.eva.Eva(**timm_args(cfg)).eval()
    ref.load_state_dict({k[len('visual.'):]: v for k, v in clip.state_dict().items() if k.startswith('visual.')})
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = ref.forward_features(x)[:, 1:]  # (3, 64, 64): cls dropped
    expected = tokens @ clip.visual.head.weight.T + clip.visual.head.bias
    torch.testing.assert_close(teacher(x), expected, rtol=1e-5, atol=1e-5)
    # at another resolution the tower's pos_embed is resized as load_pretrained does for every stage
    big = CLIPTeacher('ignored', str(tmp_path / 'clip.pt'), 48, 4)
    assert big(torch.randn(1, 3, 48, 48)).shape == (1, 144, 48)
    torch.testing.assert_close(big.eva.pos_embed, resize_pos_embed(clip.visual.pos_embed.detach(), 12))
    # anything else is not taken for a clip.pt: an encoder file, a missing path, an open_clip tag, a non-checkpoint
    torch.save({'model': clip.visual.state_dict()}, tmp_path / 'encoder.pt')
    (tmp_path / 'text.txt').write_text('not a checkpoint')
    for other in (tmp_path / 'encoder.pt', tmp_path / 'missing.pt', 'openai', tmp_path / 'text.txt'):
        assert read_clip_file(str(other)) is None


SHORT = ['--seeds=2', '--jobs=2',
         '--teacher_args=--samples_seen=2560 --eval_interval=20 --zeroshot_size=100 --log_interval=10',
         '--clip_args=--model_size=eva_mini --samples_seen=1280 --eval_interval=10 --zeroshot_size=100 '
         '--log_interval=10',
         '--mim_args=--model_size=eva_mini --max_steps=20 --eval_interval=10 --val_size=64 --log_interval=10',
         '--cls_args=--model_size=eva_mini --synthetic_size=640 --epochs=2 --val_size=100 --log_interval=5']


def chain(out, *args):
    return run_stage('chain.py', f'--out_dir={out}', *SHORT, *args).stdout


@pytest.fixture(scope='module')
def ran(tmp_path_factory):
    out = tmp_path_factory.mktemp('chain') / 'run'
    return out, chain(out)


def last(out, name, key):
    rows = log_rows(out / name)
    return [r for r in rows if key in r][-1]


def test_chain_table_is_what_the_runs_logged(ran):
    out, stdout = ran
    res = json.load(open(out / 'results.json'))
    assert [r['seed'] for r in res['seeds']] == [0, 1]
    for r in res['seeds']:
        s = r['seed']
        for init in ('scratch', 'mim'):
            cls = last(out, f's{s}/cls_{init}', 'eval')['eval']['model']['val']
            zs = last(out, f's{s}/clip_{init}', 'eval')['eval']['zeroshot']
            assert (r[f'cls_top1_{init}'], r[f'cls_top5_{init}']) == (cls['top1'], cls['top5'])
            assert (r[f'clip_top1_{init}'], r[f'clip_top5_{init}']) == (zs['top1'], zs['top5'])
            assert cls['images'] == zs['images'] == 100
        assert r['mim_val_loss'] == last(out, f's{s}/mim', 'val_loss')['val_loss']
    for k, v in res['mean'].items():
        assert v == pytest.approx(np.mean([r[k] for r in res['seeds']]))
    assert res['teacher_top1'] == last(out, 'teacher', 'eval')['eval']['zeroshot']['top1']
    table = (out / 'table.md').read_text()
    assert table in stdout and [line[:6] for line in table.splitlines() if line.startswith('|')] == \
        ['| seed', '|---|-', '| 0 | ', '| 1 | ', '| mean']
    m = res['mean']
    assert f"| mean | {m['cls_top1_scratch']:.1f} / {m['cls_top5_scratch']:.1f} | {m['cls_top1_mim']:.1f}" in table


def test_each_run_used_what_the_chain_gave_it(ran):
    out, _ = ran
    for s in (0, 1):
        mim = json.load(open(out / f's{s}' / 'mim' / 'config.json'))
        assert mim['teacher_pretrained'] == str(out / 'teacher' / 'clip.pt') and mim['seed'] == s
        student = torch.load(out / f's{s}' / 'mim' / 'eva_mim.pt', weights_only=False)
        assert student['model']['lm_head.weight'].shape == (64, 64)  # the teacher's embedding width
        for stage in ('cls', 'clip'):
            scratch = json.load(open(out / f's{s}' / f'{stage}_scratch' / 'config.json'))
            pre = json.load(open(out / f's{s}' / f'{stage}_mim' / 'config.json'))
            assert scratch['init_from'] == '' and pre['init_from'] == str(out / f's{s}' / 'mim' / 'eva_mim.pt')
            assert {k: v for k, v in scratch.items() if k not in ('init_from', 'out_dir')} == \
                   {k: v for k, v in pre.items() if k not in ('init_from', 'out_dir')}  # same steps, same data
    # the same steps from another start: the first logged fine-tuning losses differ
    first = [[r for r in map(json.loads, open(out / 's0' / n / 'log.jsonl')) if 'loss' in r][0]
             for n in ('cls_scratch', 'cls_mim')]
    assert first[0]['step'] == first[1]['step'] and first[0]['loss'] != first[1]['loss']


def test_chain_pictures(ran):
    out, _ = ran
    for png, size in ((out / 'chain.png', (576, 240)), (out / 's0' / 'mim' / 'mim.png', (576, 608))):
        assert Image.open(png).size == size
    names = ['teacher'] + [f's{s}/{r}' for s in (0, 1) for r in ('mim', 'cls_scratch', 'cls_mim', 'clip_scratch',
                                                                 'clip_mim')]
    for name in names:
        img = np.asarray(Image.open(out / name / 'curves.png').convert('L'))
        assert img.shape[1] >= 640 and (img < 128).mean() > 0.01  # drawn, not blank


def test_a_second_start_redoes_nothing(ran):
    out, _ = ran
    before = (out / 'results.json').read_text()
    stdout = chain(out, '--pictures=False')
    assert ' start ' not in stdout and json.loads((out / 'results.json').read_text())['seeds'] == \
        json.loads(before)['seeds']


def test_curves_of_every_stage_and_a_half_written_line(ran, tmp_path):
    out, _ = ran
    for name, panels in (('s0/mim', ('val_loss',)), ('s0/cls_mim', ('eval: model.val',)),
                         ('teacher', ('eval: zeroshot',))):
        run = tmp_path / name.replace('/', '_')
        shutil.copytree(out / name, run, ignore=shutil.ignore_patterns('ckpt', '*.pt'))
        with open(run / 'log.jsonl', 'a') as f:
            f.write('{"step": 999, "loss": 0.12')  # the run killed while writing
        rows, bad = plot.read_log(run / 'log.jsonl')
        assert bad == 1 and rows[-1]['step'] != 999
        got = plot.curves(rows)
        assert {'training loss', 'lr', *panels} <= set(got), got.keys()
        steps, losses = got['training loss']['loss']
        assert losses == [r['loss'] for r in rows if 'loss' in r] and steps == sorted(steps)
        assert plot.plot_curves(str(run)) == str(run / 'curves.png')
        # and a resume drops the broken line instead of failing on it
        open_log(str(run), {'config': {}, 'start_step': 10})
        lines = open(run / 'log.jsonl').read().splitlines()
        assert all(json.loads(line).get('step', 0) <= 10 for line in lines)
    # the command line: a folder without a log is named
    r = run_stage('plot.py', tmp_path / 'nothing', check=False)
    assert r.returncode != 0 and 'has no log.jsonl' in r.stderr


def test_the_sweep_fine_tunes_both_arms_at_each_lr_and_budget(ran):
    """chain.py's fine-tuning sweep on top of a finished chain: only the new runs start; each has its arm's init,
    its lr and its budget; the table reads each arm's mean over seeds and its best lr from the runs' own logs."""
    out, _ = ran
    stdout = chain(out, '--sweep_lrs=1e-3,3e-3', '--sweep_epochs=1', '--pictures=False')
    assert stdout.count(' start ') == 8 and ' start s0/cls' not in stdout  # 2 seeds x 2 arms x 2 lrs x 1 budget
    sweep = json.load(open(out / 'results.json'))['sweep']
    means = {}
    for init in ('scratch', 'mim'):
        assert list(sweep[init]) == ['1'] and list(sweep[init]['1']) == ['0.001', '0.003']
        for lr in ('0.001', '0.003'):
            top1 = []
            for s in (0, 1):
                run = out / f's{s}' / 'sweep' / f'{init}_e1_lr{lr}'
                c = json.load(open(run / 'config.json'))
                assert (c['lr'], c['epochs'], c['seed']) == (float(lr), 1, s)
                assert c['init_from'] == ('' if init == 'scratch' else str(out / f's{s}' / 'mim' / 'eva_mim.pt'))
                top1.append(last(out, f's{s}/sweep/{init}_e1_lr{lr}', 'eval')['eval']['model']['val']['top1'])
            assert sweep[init]['1'][lr] == top1
            means[init, lr] = np.mean(top1)
    best = {init: max(('0.001', '0.003'), key=lambda lr: means[init, lr]) for init in ('scratch', 'mim')}
    table = (out / 'table.md').read_text()
    gain = means['mim', best['mim']] - means['scratch', best['scratch']]
    assert f"{means['mim', best['mim']]:.1f} at {best['mim']} | {gain:+.1f} |" in table
    assert f"| 1 | scratch | {means['scratch', '0.001']:.1f} (" in table


def test_demos_remeasures_a_readme_figure_and_says_whether_it_moved(tmp_path):
    """demos.py runs the MIM demo as README writes it (1 thread, its own out_dir), reads its figures, which equal the
    run's own log, and marks them moved (exit 1) exactly when they differ from what it recorded."""
    r = run_stage('demos.py', '--only=pretrain', '--threads=1', f'--out_dir={tmp_path}', check=False)
    got = json.load(open(tmp_path / 'results.json'))['pretrain_1t']
    rows = log_rows(tmp_path / 'pretrain_1t')
    assert got['loss'] == round([x['loss'] for x in rows if 'loss' in x][-1], 2)
    assert got['val_loss'] == round([x['val_loss'] for x in rows if 'val_loss' in x][-1], 2)
    assert got['command'] == 'python pretrain.py config/pretrain_tiny.py' and got['threads'] == 1
    assert "pretrain at 1 thread(s)" in r.stdout and (r.returncode == 1) == ('MOVED from' in r.stdout), r.stdout
    r = run_stage('demos.py', '--only=pretrain,nope', check=False)
    assert r.returncode == 1 and r.stderr.strip() == \
        "error: no demo nope; the demos: pretrain, cls, clip, video, det, seg, seg_fpn, seg_upernet, chain, chain_sweep"
