"""
README's tiny-demo figures, re-measured: each demo command of README's table run as written (with its own out_dir
under out/demos/), its figures read from the run's files and printed beside the ones this file last recorded, per
thread count (OMP_NUM_THREADS: the tiny runs are bit-identical run to run on one machine and thread count, but move
with the thread count; the spread a user should expect is the spread over thread counts).

    python demos.py                                  # every demo at 1 and 2 threads (the chains once): ~2.5 h
    python demos.py --only=det,seg --threads=2       # some of them

A figure that moved from RECORDED (a change to the code, the data order or the init draws) is marked; exit status 1
then: README's table and RECORDED are re-measured in the same commit. Writes out/demos/results.json.
"""
import json
import os
import shutil
import subprocess
import sys
import time

import plot

# -----------------------------------------------------------------------------
# config
out_dir = 'out/demos'  # a folder per demo and thread count, and results.json
only = ''  # demo names joined by ',' ('' = all): pretrain, cls, clip, video, det, seg, seg_fpn, seg_upernet, chain,
#   chain_sweep
threads = '1,2'  # OMP_NUM_THREADS values, joined by ','
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# -----------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.abspath(__file__))


def read(run, where):
    """A figure of a finished run: where = (file, dotted path); the file is 'log' (the last row of run/log.jsonl
    holding the path's first key), 'eval' (run/eval.json) or 'results' (chain.py's run/results.json)."""
    file, path = where
    keys = path.split('.')
    if file == 'log':
        v = [r for r in plot.read_log(os.path.join(run, 'log.jsonl'))[0] if keys[0] in r][-1]
    else:
        v = json.load(open(os.path.join(run, 'eval.json' if file == 'eval' else 'results.json')))
    for k in keys:
        v = v[k]
    return v


SEG = {'mIoU': ('eval', 'mIoU'), 'aAcc': ('eval', 'aAcc')}  # the three segmentation demos' figures
# name: (README's command after `python`, {figure: where it is read})
DEMOS = {
    'pretrain': ('pretrain.py config/pretrain_tiny.py', {'loss': ('log', 'loss'), 'val_loss': ('log', 'val_loss')}),
    'cls': ('finetune_cls.py config/finetune_cls_tiny.py', {
        'top1': ('log', 'eval.model.val.top1'), 'top5': ('log', 'eval.model.val.top5'),
        'ema_top1': ('log', 'eval.model_ema.val.top1')}),
    'clip': ('train_clip.py config/clip_tiny.py', {
        'loss': ('log', 'loss'), 'zeroshot_top1': ('log', 'eval.zeroshot.top1'),
        'zeroshot_top5': ('log', 'eval.zeroshot.top5')}),
    'video': ('finetune_video.py config/finetune_video_tiny.py', {'top1': ('eval', 'model.top1')}),
    'det': ('det_seg.py config/det_tiny.py', {
        'box_AP': ('eval', 'bbox.AP'), 'box_AP50': ('eval', 'bbox.AP50'), 'mask_AP': ('eval', 'segm.AP'),
        'mask_AP50': ('eval', 'segm.AP50')}),
    'seg': ('det_seg.py config/seg_tiny.py', SEG),
    'seg_fpn': ('det_seg.py config/seg_tiny.py --adapter=False', SEG),
    'seg_upernet': ('det_seg.py config/seg_tiny.py --adapter=False --seg_head=upernet', SEG),
    'chain': ('chain.py', {k: ('results', f'mean.{k}')
                           for k in ('cls_top1_scratch', 'cls_top1_mim', 'clip_top1_scratch', 'clip_top1_mim')}),
    # the chain's fine-tuning sweep (README): each arm at its best lr, 3 and 9 epochs, 2 seeds; ~1.5 h on 2 cores
    'chain_sweep': ('chain.py --seeds=2 --sweep_lrs=1.25e-4,2.5e-4,5e-4,1e-3,2e-3,4e-3 --sweep_epochs=3,9',
                    {f'{e}_{k}': ('results', f'sweep_best.{e}.{k}') for e in (3, 9)
                     for k in ('scratch.top1', 'mim.top1', 'gain')}),
}

# the figures measured at each thread count on this repository's 2-core machine, 2026-12-03 (README quotes them)
RECORDED = {
    'pretrain_1t': {'loss': -0.72, 'val_loss': -0.75},
    'cls_1t': {'top1': 33.6, 'top5': 86.2, 'ema_top1': 32.4},
    'clip_1t': {'loss': 1.57, 'zeroshot_top1': 18.6, 'zeroshot_top5': 74.4},
    'video_1t': {'top1': 99.22},
    'det_1t': {'box_AP': 18.54, 'box_AP50': 35.37, 'mask_AP': 16.57, 'mask_AP50': 33.64},
    'seg_1t': {'mIoU': 26.86, 'aAcc': 85.95},
    'seg_fpn_1t': {'mIoU': 29.77, 'aAcc': 86.77},
    'seg_upernet_1t': {'mIoU': 26.73, 'aAcc': 88.55},
    'chain_1t': {'cls_top1_scratch': 13.4, 'cls_top1_mim': 35.0, 'clip_top1_scratch': 17.93, 'clip_top1_mim': 21.73},
    'chain_sweep_1t': {'3_scratch.top1': 17.5, '3_mim.top1': 35.2, '3_gain': 17.7, '9_scratch.top1': 50.2,
                       '9_mim.top1': 50.7, '9_gain': 0.5},  # (2026-12-04)
    'pretrain_2t': {'loss': -0.72, 'val_loss': -0.75},
    'cls_2t': {'top1': 33.6, 'top5': 86.2, 'ema_top1': 32.4},
    'clip_2t': {'loss': 1.55, 'zeroshot_top1': 19.1, 'zeroshot_top5': 75.8},
    'video_2t': {'top1': 99.22},
    'det_2t': {'box_AP': 20.42, 'box_AP50': 37.46, 'mask_AP': 17.87, 'mask_AP50': 35.16},
    'seg_2t': {'mIoU': 29.25, 'aAcc': 86.31},
    'seg_fpn_2t': {'mIoU': 29.02, 'aAcc': 86.7},
    'seg_upernet_2t': {'mIoU': 26.7, 'aAcc': 88.51},
}

# -----------------------------------------------------------------------------
names = [n for n in DEMOS if not only or n in only.split(',')]
unknown = sorted(set(only.split(',')) - set(DEMOS)) if only else []
if unknown:
    sys.exit(f"error: no demo {', '.join(unknown)}; the demos: {', '.join(DEMOS)}")
results, moved = {}, []
os.makedirs(out_dir, exist_ok=True)
thread_counts = [int(t) for t in threads.split(',')]
for n_threads in thread_counts:
    for name in names:
        if name.startswith('chain') and n_threads != thread_counts[0]:
            continue  # chain.py sets each of its runs' threads itself (cores / jobs): once
        command, figures = DEMOS[name]
        run = os.path.join(out_dir, f'{name}_{n_threads}t')
        if os.path.exists(run):  # a fresh run each time: a finished out_dir would only be evaluated again
            shutil.rmtree(run)
        t = time.time()
        args = [sys.executable, *command.split(), f'--out_dir={run}']
        with open(run + '.stdout.log', 'w') as log:
            r = subprocess.run(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                               env=dict(os.environ, OMP_NUM_THREADS=str(n_threads)))
        wall = time.time() - t
        if r.returncode:
            sys.exit(f"error: {' '.join(args)} failed (exit {r.returncode}); its output: {run}.stdout.log")
        got = {k: round(float(read(run, where)), 2) for k, where in figures.items()}
        want = RECORDED.get(f'{name}_{n_threads}t')
        mark = '' if want is None else '  (as recorded)' if want == got else f'  MOVED from {want}'
        if want is not None and want != got:
            moved.append(name)
        results[f'{name}_{n_threads}t'] = {'command': f'python {command}', 'threads': n_threads,
                                           'wall_s': round(wall), **got}
        print(f"{name} at {n_threads} thread(s), {wall:.0f} s: {got}{mark}", flush=True)
with open(os.path.join(out_dir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1)
print(f"{out_dir}/results.json" + (f"; moved: {', '.join(moved)}" if moved else ''))
sys.exit(1 if moved else 0)
