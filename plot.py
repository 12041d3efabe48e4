"""
Pictures of runs from what they wrote (matplotlib; PNG files in each run's folder).

    python plot.py out/pretrain_tiny out/finetune_cls_tiny out/clip_tiny   # any stage's out_dir, any number
    python plot.py out/chain/s0/mim                                        # a MIM run: curves.png and mim.png

curves.png: the training loss (and its parts: det_seg's loss_*), the learning rate and every evaluation metric in
log.jsonl against the step. A line that does not parse (a run killed while writing it) is skipped and counted.
mim.png (a pretrain.py run, from its eva_mim.pt): for a few validation images, the image, a block-wise mask as in
training, and at each masked patch the cosine similarity between the student's prediction and the teacher's
feature, at initialisation (the run's seed) and after training. chain.py draws its bar chart with plot_chain.
"""
import json
import math
import os
import sys

import matplotlib

matplotlib.use('Agg')  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from data import CLIP_MEAN, CLIP_STD, MaskingGenerator, Samples, eval_transform, image_source  # noqa: E402
from model import EVA, CLIPTeacher, EVAConfig, load_pretrained  # noqa: E402

# log fields that are bookkeeping, not curves
SKIP = ('epoch', 'skipped', 'loss_scale', 'mem_gb', 'img_s', 'samples_s', 'mfu', 'bad_samples', 'eta_h', 'samples',
        'images', 'videos', 'unreadable', 'text_lr', 'logit_scale')


def read_log(path):
    """log.jsonl -> (rows, bad): the step rows (the run headers left out), and how many lines did not parse."""
    rows, bad = [], 0
    for line in open(path):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict) and 'step' in row and 'config' not in row:
            rows.append(row)
    return rows, bad


def scalars(d, prefix=''):
    """Nested dict -> {'a.b.c': number}: the plottable leaves (lists, strings, bookkeeping fields left out)."""
    out = {}
    for k, v in d.items():
        if k in SKIP or k == 'step':
            continue
        if isinstance(v, dict):
            out.update(scalars(v, f'{prefix}{k}.'))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None and math.isfinite(v):
            out[prefix + k] = v
    return out


def curves(rows):
    """Log rows -> {panel: {line: ([steps], [values])}}: the losses in one panel (det_seg's loss_* beside the total),
    lr, grad_norm, val_loss each alone, evaluation metrics grouped by their parent key (top1 / top5 of one
    model, AP / AP50 / ..., mIoU / mAcc / aAcc)."""
    series = {}
    for row in rows:
        for key, v in scalars(row).items():
            if key.startswith('eval.'):
                parent, _, leaf = key[len('eval.'):].rpartition('.')
                panel = f"eval: {parent or 'metrics'}"
            elif key == 'loss' or key.startswith('loss_'):
                panel, leaf = 'training loss', key
            else:
                panel, leaf = key, key  # lr, grad_norm, val_loss
            xs, ys = series.setdefault(panel, {}).setdefault(leaf, ([], []))
            xs.append(row['step'])
            ys.append(v)
    return series


def plot_curves(run_dir, out=None):
    """run_dir/log.jsonl -> run_dir/curves.png, a panel per group of curves(). -> the file written."""
    rows, bad = read_log(os.path.join(run_dir, 'log.jsonl'))
    series = curves(rows)
    if not series:
        unreadable = f" ({bad} unreadable lines)" if bad else ''
        raise ValueError(f"{run_dir}/log.jsonl has no step rows to plot{unreadable}")
    order = sorted(series, key=lambda p: (p != 'training loss', p.startswith('eval'), p))
    cols = min(3, len(order))
    nrows = math.ceil(len(order) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 2.8 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, order):
        lines = series[panel]
        for leaf, (xs, ys) in list(lines.items())[:8]:
            ax.plot(xs, ys, marker='o' if len(xs) <= 12 else None, ms=3, lw=1.2, label=leaf)
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel('step', fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=7)
        if panel == 'lr':
            ax.ticklabel_format(axis='y', style='sci', scilimits=(0, 0))
    for ax in list(axes.flat)[len(order):]:
        ax.axis('off')
    title = os.path.normpath(run_dir) + (f"  ({bad} unreadable log lines skipped)" if bad else '')
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = out or os.path.join(run_dir, 'curves.png')
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def plot_mim(run_dir, n_images=4, out=None):
    """A pretrain.py run -> run_dir/mim.png: rows of (image, its mask, cosine similarity per masked patch at
    initialisation, after training). The student at initialisation is rebuilt from the run's seed as pretrain.py
    draws it; the teacher from the run's teacher settings; the images are the first validation images, the masks
    drawn by the training masking generator (numpy seed 0). -> the file written."""
    ckpt = torch.load(os.path.join(run_dir, 'eva_mim.pt'), map_location='cpu', weights_only=False)
    c, cfg = ckpt['config'], EVAConfig(**ckpt['model_config'])
    torch.manual_seed(c['seed'])
    before = EVA(cfg).eval()  # the draw pretrain.py makes after torch.manual_seed(seed)
    if c.get('init_from'):
        load_pretrained(before, c['init_from'], verbose=False)
    after = EVA(cfg).eval()
    load_pretrained(after, ckpt['model'], allowed_missing=(), verbose=False)
    torch.manual_seed(c['seed'])  # as pretrain.py draws a random teacher
    teacher = CLIPTeacher(c['teacher_model'], c['teacher_pretrained'], cfg.img_size, cfg.patch_size)
    val = Samples(image_source(c['val_data_path'] or 'synthetic:1', cfg.img_size, c['val_size'], c['seed'] + 1),
                  eval_transform(cfg.img_size, c['val_crop_pct']), c['seed'])
    x = torch.stack([val[i]['image'] for i in range(n_images)])
    gen, rng = MaskingGenerator(cfg.grid, c['num_mask_patches'], c['min_mask_patches']), np.random.default_rng(0)
    mask = torch.from_numpy(np.stack([gen(rng).reshape(-1) for _ in range(n_images)]))
    with torch.no_grad():
        features = teacher(x)
        target = features[mask]
        cos = {name: F.cosine_similarity(net(x, mask).float(), target.float(), dim=-1)
               for name, net in (('at initialisation', before), (f"after {ckpt['step']} steps", after))}
        # what a student that predicts one feature for every patch would get: the teacher's features share a large
        # common direction, so a high cosine alone does not show that the student learned the image
        average = F.cosine_similarity(features.flatten(0, 1).mean(0, keepdim=True), target.float(), dim=-1)
    pixels = (x * torch.tensor(CLIP_STD)[:, None, None] + torch.tensor(CLIP_MEAN)[:, None, None]).clamp(0, 1)
    pixels = pixels.permute(0, 2, 3, 1).numpy()
    g, p = cfg.grid, cfg.patch_size
    fig, axes = plt.subplots(n_images, 4, figsize=(7.2, 1.9 * n_images), squeeze=False)
    start = 0
    for i in range(n_images):
        m = mask[i].numpy().reshape(g, g)
        shown = pixels[i].copy()
        shown[np.kron(m, np.ones((p, p))).astype(bool)] = 0.5  # masked patches grey, as the student sees them
        panels = [(pixels[i], 'image'), (shown, f'mask ({int(m.sum())} of {g * g})')]
        for name, v in cos.items():
            grid = np.full((g, g), np.nan)
            grid[m] = v[start:start + int(m.sum())].numpy()
            panels.append((grid, f'{name}\nmean cos {np.nanmean(grid):.2f}'))
        mean_cos = average[start:start + int(m.sum())].mean()
        panels[-1] = (panels[-1][0], panels[-1][1] + f"\n(average feature: {mean_cos:.2f})")
        start += int(m.sum())
        for ax, (img, title) in zip(axes[i], panels):
            if img.ndim == 2:
                im = ax.imshow(img, cmap='viridis', vmin=0, vmax=1)
            else:
                ax.imshow(img, interpolation='nearest')
            ax.set_title(title, fontsize=7)
            ax.axis('off')
    fig.colorbar(im, ax=axes[:, 2:].ravel().tolist(), shrink=0.6, extend='min',
                 label="cosine(student's prediction, teacher's feature)")
    fig.suptitle(f"MIM: {os.path.normpath(run_dir)}; teacher {teacher.description}", fontsize=8)
    out = out or os.path.join(run_dir, 'mim.png')
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def plot_chain(results, out):
    """chain.py's results (per seed: cls top-1 scratch / MIM, CLIP zero-shot scratch / MIM; the teacher's zero-shot)
    -> a bar chart: the mean over seeds, each seed a dot. -> the file written."""
    metrics = [('cls_top1', 'fine-tune top-1 (%)'), ('clip_top1', 'CLIP zero-shot top-1 (%)')]
    fig, axes = plt.subplots(1, len(metrics), figsize=(7.2, 3.0))
    seeds = results['seeds']
    for ax, (key, title) in zip(axes, metrics):
        for j, (init, colour) in enumerate((('scratch', '#999999'), ('mim', '#1f77b4'))):
            vals = [s[f'{key}_{init}'] for s in seeds]
            ax.bar(j, np.mean(vals), color=colour, width=0.6)
            ax.scatter([j] * len(vals), vals, color='k', s=10, zorder=3)
            ax.text(j, np.mean(vals) + 1, f'{np.mean(vals):.1f}', ha='center', fontsize=8)
        if key == 'clip_top1' and results.get('teacher_top1') is not None:
            ax.axhline(results['teacher_top1'], color='#d62728', ls='--', lw=1, label='the MIM teacher')
            ax.legend(fontsize=7, loc='lower right')
        ax.axhline(10, color='k', ls=':', lw=0.8)  # chance: 10 classes
        ax.set_xticks([0, 1], ['from scratch', 'from MIM'], fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"EVA's chain in miniature: {len(seeds)} seeds (dots), mean (bars); chance 10% (dotted)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def plot_sweep(sweep, out):
    """chain.py's fine-tuning sweep ({init: {epochs: {lr: [top-1 per seed]}}}) -> top-1 against the lr, one line
    per arm and budget (the mean over seeds; each seed a dot). -> the file written."""
    fig, ax = plt.subplots(figsize=(5.6, 3.2))
    budgets = list(sweep['mim'])
    for init, colour in (('scratch', '#999999'), ('mim', '#1f77b4')):
        for e, style in zip(budgets, ('--', '-', ':', '-.')):
            lrs = [float(lr) for lr in sweep[init][e]]
            vals = list(sweep[init][e].values())
            label = f"{'from MIM' if init == 'mim' else 'from scratch'}, {e} epochs"
            ax.plot(lrs, [np.mean(v) for v in vals], ls=style, color=colour, marker='o', ms=3, label=label)
            for lr, v in zip(lrs, vals):
                ax.scatter([lr] * len(v), v, color=colour, s=6, alpha=0.5)
    ax.axhline(10, color='k', ls=':', lw=0.8)  # chance: 10 classes
    ax.set_xscale('log')
    ax.set_xlabel('fine-tuning peak lr', fontsize=8)
    ax.set_ylabel('top-1 (%)', fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    ax.set_title('fine-tuning: each arm at each lr and budget (lines: mean over seeds; dots: seeds)', fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


if __name__ == '__main__':
    if len(sys.argv) < 2 or sys.argv[1] in ('-h', '--help'):
        print(__doc__.strip())
        raise SystemExit(0 if len(sys.argv) > 1 else 1)
    for run in sys.argv[1:]:
        if not os.path.isfile(os.path.join(run, 'log.jsonl')):
            raise SystemExit(f"error: {run} has no log.jsonl (give a run's out_dir)")
        print(plot_curves(run))
        if os.path.isfile(os.path.join(run, 'eva_mim.pt')):
            print(plot_mim(run))
