"""
EVA's recipe in miniature, end to end on a CPU: a CLIP trained from scratch is the MIM teacher; MIM pretrains an
encoder against its patch features; that encoder then fine-tunes for classification and initialises a new CLIP,
each against the same run from scratch (same steps, same data), for several seeds (EVA paper, sections 2-3).

    python chain.py                          # about 12 minutes on 2 CPU cores: the table and the pictures
    python chain.py --seeds=1 --jobs=1       # one seed, one run at a time
    python chain.py --seeds=2 --sweep_lrs=1.25e-4,2.5e-4,5e-4,1e-3,2e-3,4e-3 --sweep_epochs=3,9   # ~1.5 h: each
                                             # arm at its own best lr: MIM leads by 17.7 at 3 epochs, by 0.5 at 9

The runs are the stage scripts with their tiny configs (config/clip_tiny.py, pretrain_tiny.py,
finetune_cls_tiny.py), each in its own folder under out_dir, `jobs` at a time (each with its share of the cores):
  teacher/            train_clip.py from scratch, seed `teacher_seed`: the teacher (its clip.pt)
  s{seed}/mim/        pretrain.py --teacher_pretrained=teacher/clip.pt
  s{seed}/cls_scratch, s{seed}/cls_mim     finetune_cls.py from random init / --init_from=s{seed}/mim/eva_mim.pt
  s{seed}/clip_scratch, s{seed}/clip_mim   train_clip.py, the image tower from random init / from eva_mim.pt
Writes out_dir/results.json, out_dir/table.md (printed), out_dir/chain.png (bar chart), curves.png in every run's
folder and s{first seed}/mim/mim.png (plot.py). A finished run is not redone: after Ctrl-C the same command goes on
(the interrupted runs resume from their checkpoints).
Expected (README, measured on 2 cores, 12 minutes): fine-tune top-1 13.4% from scratch, 35.0% from MIM (mean of 3
seeds); CLIP zero-shot 17.9% / 21.7%; the teacher 18.6%. Chance: 10%.
"""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from statistics import mean

import plot

# -----------------------------------------------------------------------------
# config
out_dir = 'out/chain'  # one folder per run below it, and the results
seeds = 3  # seeds 0 .. seeds-1 of every run after the teacher
jobs = 2  # runs at once; each takes cores / jobs intra-op threads (tiny models use a second core poorly)
teacher_seed = 0  # the teacher CLIP's seed: with teacher_args '' the teacher is the README's CLIP demo (its seed 0)
clip_config = 'config/clip_tiny.py'  # the teacher and both CLIPs of each seed
mim_config = 'config/pretrain_tiny.py'  # MIM pretraining
cls_config = 'config/finetune_cls_tiny.py'  # fine-tuning
teacher_args = ''  # more --key=value settings for the teacher's train_clip.py run
# the student is eva_mini (4 blocks; the teacher is the 2-block CLIP demo): a deeper ViT learns slowly from scratch,
# which is where pretraining shows (README: at 2 blocks fine-tuning from MIM led by 5-6 points, at 4 blocks by 15-26).
# MIM runs 384 steps of 64 images (the MIM demo: 256 of 32); fine-tuning and CLIP are shorter than their demos
# (3 of 5 epochs; 200 of 600 steps), so that the 16 runs take about 11 minutes on 2 cores. Fine-tuning's lr is 2e-3
# for both runs (the demo's 1e-3 doubled: from MIM, seed 0, 2 epochs, 28.8 -> 32.0; 4e-3 diverged; from scratch,
# 3 epochs, 13.0 -> 11.6)
mim_args = '--model_size=eva_mini --batch_size=64 --micro_batch=64 --synthetic_size=12288'  # more pretrain.py settings
cls_args = '--model_size=eva_mini --epochs=3 --lr=2e-3'  # more settings for both finetune_cls.py runs of a seed
clip_args = '--model_size=eva_mini --samples_seen=12800 --eval_interval=200'  # both train_clip.py runs of a seed
# the fine-tuning sweep (README: "which gain survives"): both arms of every seed fine-tuned at each of sweep_lrs for
# each of sweep_epochs (on top of cls_args), so that each arm is read at its own best lr and at a longer budget
sweep_lrs = ''  # fine-tuning lrs joined by ',' ('' = no sweep); README's: 1.25e-4,2.5e-4,5e-4,1e-3,2e-3,4e-3
sweep_epochs = '3,9'  # the sweep's budgets in epochs, joined by ','
pictures = True  # curves.png per run, mim.png, chain.png (and sweep.png with a sweep)
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
config = {k: globals()[k] for k in _keys}  # noqa: F821 (_keys comes from configurator.py)
# -----------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.abspath(__file__))


def config_path(path):
    """A config file as given, else the repository's (chain.py may be started from another folder)."""
    return path if os.path.isfile(path) else os.path.join(ROOT, path)


def runs():
    """-> [(name, command, dependencies)], in the order they may start."""
    def stage(script, config, name, extra, *more):
        run_dir = os.path.join(out_dir, name)
        return [sys.executable, os.path.join(ROOT, script), config_path(config), f'--out_dir={run_dir}', *more,
                *shlex.split(extra)]
    teacher = os.path.join(out_dir, 'teacher', 'clip.pt')
    out = [('teacher', stage('train_clip.py', clip_config, 'teacher', teacher_args, f'--seed={teacher_seed}'), [])]
    # the runs that wait on others first, so that the chain's longest path starts as soon as it can; the scratch
    # runs need nothing and fill the free slots
    for s in range(seeds):
        out.append((f's{s}/mim', stage('pretrain.py', mim_config, f's{s}/mim', mim_args, f'--seed={s}',
                                       f'--teacher_pretrained={teacher}'), ['teacher']))
    for s in range(seeds):
        mim = os.path.join(out_dir, f's{s}', 'mim', 'eva_mim.pt')
        out.append((f's{s}/cls_mim', stage('finetune_cls.py', cls_config, f's{s}/cls_mim', cls_args, f'--seed={s}',
                                           f'--init_from={mim}'), [f's{s}/mim']))
        out.append((f's{s}/clip_mim', stage('train_clip.py', clip_config, f's{s}/clip_mim', clip_args, f'--seed={s}',
                                            f'--init_from={mim}'), [f's{s}/mim']))
    for s in range(seeds):
        out.append((f's{s}/cls_scratch', stage('finetune_cls.py', cls_config, f's{s}/cls_scratch', cls_args,
                                               f'--seed={s}'), []))
        out.append((f's{s}/clip_scratch', stage('train_clip.py', clip_config, f's{s}/clip_scratch', clip_args,
                                                f'--seed={s}'), []))
    for s, init, epochs, lr in sweep_points():  # last: the table above comes first
        mim = os.path.join(out_dir, f's{s}', 'mim', 'eva_mim.pt')
        more = [f'--init_from={mim}'] if init == 'mim' else []
        name = sweep_name(s, init, epochs, lr)
        extra = f'{cls_args} --epochs={epochs} --lr={lr:g}'  # after cls_args: a later --key wins
        out.append((name, stage('finetune_cls.py', cls_config, name, extra, f'--seed={s}', *more),
                    [f's{s}/mim'] if more else []))
    return out


def sweep_points():
    """-> [(seed, init, epochs, lr)] of the sweep, the MIM arm first (it waits on MIM)."""
    lrs = [float(x) for x in sweep_lrs.split(',') if x]
    budgets = [int(x) for x in sweep_epochs.split(',') if x]
    return [(s, init, e, lr) for init in ('mim', 'scratch') for s in range(seeds) for e in budgets for lr in lrs]


def sweep_name(seed, init, epochs, lr):
    return f's{seed}/sweep/{init}_e{epochs}_lr{lr:g}'


def done_file(name):
    return os.path.join(out_dir, name, 'chain_done')


def interrupt(signum, frame):
    raise KeyboardInterrupt


def run_all():
    """Start each run when its dependencies are done, `jobs` at a time; a failed run stops the chain (its log
    named). Ctrl-C reaches the runs too (same process group): they save and exit, and the chain stops."""
    pending = [r for r in runs() if not os.path.exists(done_file(r[0]))]
    finished = {name for name, _, _ in runs() if os.path.exists(done_file(name))}
    threads = max(1, len(os.sched_getaffinity(0)) // jobs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    active, t0 = {}, time.time()
    signal.signal(signal.SIGTERM, interrupt)
    try:
        while pending or active:
            for name, cmd, deps in list(pending):
                if len(active) < jobs and all(d in finished for d in deps):
                    os.makedirs(os.path.join(out_dir, name), exist_ok=True)
                    log = open(os.path.join(out_dir, name, 'stdout.log'), 'a')
                    print(f"[{time.time() - t0:5.0f}s] start {name}: {shlex.join(cmd[1:])}", flush=True)
                    active[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env),
                                    log, time.time())
                    pending.remove((name, cmd, deps))
            time.sleep(0.2)
            for name, (proc, log, start) in list(active.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del active[name]
                if proc.returncode != 0:
                    for other, _, _ in active.values():
                        other.terminate()
                    raise SystemExit(f"error: {name} failed (exit {proc.returncode}); its output: "
                                     f"{os.path.join(out_dir, name, 'stdout.log')}")
                open(done_file(name), 'w').close()
                finished.add(name)
                print(f"[{time.time() - t0:5.0f}s] done  {name} ({time.time() - start:.0f} s)", flush=True)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM to the chain alone: passed on (a stage ignores a repeat)
        for proc, _, _ in active.values():
            proc.send_signal(signal.SIGTERM)
        for proc, _, _ in active.values():
            proc.wait()  # each saves a checkpoint at its next log step and exits
        raise SystemExit("interrupted: the same command goes on from here")
    return time.time() - t0


def last_eval(name):
    """The last evaluation row of a run's log.jsonl (lines that do not parse skipped)."""
    rows, _ = plot.read_log(os.path.join(out_dir, name, 'log.jsonl'))
    evals = [r for r in rows if 'eval' in r or 'val_loss' in r]
    if not evals:
        raise ValueError(f"{out_dir}/{name}/log.jsonl has no evaluation row")
    return evals[-1]


def results():
    """Per seed: fine-tune top-1 / top-5 of the final model (not the best epoch, not the EMA), zero-shot top-1 /
    top-5 of the final CLIP, the MIM validation loss; their means; the teacher's zero-shot."""
    seeds_out = []
    for s in range(seeds):
        r = {'seed': s, 'mim_val_loss': last_eval(f's{s}/mim')['val_loss']}
        for init in ('scratch', 'mim'):
            cls = last_eval(f's{s}/cls_{init}')['eval']['model']['val']
            clip = last_eval(f's{s}/clip_{init}')['eval']['zeroshot']
            r.update({f'cls_top1_{init}': cls['top1'], f'cls_top5_{init}': cls['top5'],
                      f'clip_top1_{init}': clip['top1'], f'clip_top5_{init}': clip['top5']})
        seeds_out.append(r)
    means = {k: mean(r[k] for r in seeds_out) for k in seeds_out[0] if k != 'seed'}
    teacher = last_eval('teacher')['eval']['zeroshot']
    out = {'seeds': seeds_out, 'mean': means, 'teacher_top1': teacher['top1'], 'teacher_top5': teacher['top5']}
    if sweep_points():  # {init: {epochs: {lr: [top-1 per seed]}}}, final weights as above
        sweep = {}
        for s, init, epochs, lr in sweep_points():
            top1 = last_eval(sweep_name(s, init, epochs, lr))['eval']['model']['val']['top1']
            sweep.setdefault(init, {}).setdefault(str(epochs), {}).setdefault(f'{lr:g}', []).append(top1)
        out['sweep'], out['sweep_best'] = sweep, sweep_best(sweep)
    return out


def table(res):
    lines = ['| seed | fine-tune top-1 / top-5, scratch | from MIM | gain top-1 | CLIP zero-shot top-1 / top-5, '
             'scratch | from MIM | gain top-1 | MIM val loss |', '|---|---|---|---|---|---|---|---|']
    for r in res['seeds'] + [dict(res['mean'], seed='mean')]:
        lines.append(f"| {r['seed']} | {r['cls_top1_scratch']:.1f} / {r['cls_top5_scratch']:.1f} | "
                     f"{r['cls_top1_mim']:.1f} / {r['cls_top5_mim']:.1f} | "
                     f"{r['cls_top1_mim'] - r['cls_top1_scratch']:+.1f} | "
                     f"{r['clip_top1_scratch']:.1f} / {r['clip_top5_scratch']:.1f} | "
                     f"{r['clip_top1_mim']:.1f} / {r['clip_top5_mim']:.1f} | "
                     f"{r['clip_top1_mim'] - r['clip_top1_scratch']:+.1f} | {r['mim_val_loss']:.3f} |")
    lines.append(f"\nThe teacher (CLIP from scratch, seed {teacher_seed}): zero-shot top-1 {res['teacher_top1']:.1f} / "
                 f"top-5 {res['teacher_top5']:.1f}. Chance: 10 / 50.")
    return '\n'.join(lines)


def sweep_best(sweep):
    """-> {epochs: {init: {'lr', 'top1'}, 'gain'}}: each arm's best lr by its mean top-1 over seeds, and the gain
    of MIM's best over scratch's best."""
    out = {}
    for e in sweep['mim']:
        out[e] = {}
        for init in ('scratch', 'mim'):
            means = {lr: mean(v) for lr, v in sweep[init][e].items()}
            lr = max(means, key=means.get)
            out[e][init] = {'lr': lr, 'top1': means[lr]}
        out[e]['gain'] = out[e]['mim']['top1'] - out[e]['scratch']['top1']
    return out


def sweep_table(sweep):
    """Fine-tune top-1, mean over seeds (each seed in brackets), per budget, arm and lr; each arm's best lr and the
    gain of MIM's best over scratch's best."""
    budgets, best = list(sweep['mim']), sweep_best(sweep)
    lrs = list(sweep['mim'][budgets[0]])
    lines = ['| epochs | init | ' + ' | '.join(f'lr {lr}' for lr in lrs) + ' | best | gain at the best lrs |',
             '|---|---|' + '---|' * len(lrs) + '---|---|']
    for e in budgets:
        for init in ('scratch', 'mim'):
            runs = sweep[init][e]
            cells = ' | '.join(f"{mean(runs[lr]):.1f} (" + ', '.join(f'{x:.1f}' for x in runs[lr]) +
                               ')' for lr in lrs)
            b = best[e][init]
            gain = f"{best[e]['gain']:+.1f}" if init == 'mim' else ''
            lines.append(f"| {e} | {'from MIM' if init == 'mim' else 'scratch'} | {cells} | {b['top1']:.1f} at "
                         f"{b['lr']} | {gain} |")
    n = len(sweep['mim'][budgets[0]][lrs[0]])
    lines.append(f"\nFine-tune top-1 (%): the mean over {n} seeds (each seed in brackets), final weights.")
    return '\n'.join(lines)


if __name__ == '__main__':
    for f in (clip_config, mim_config, cls_config):
        if not os.path.isfile(config_path(f)):
            raise SystemExit(f"error: config file not found: {f}")
    os.makedirs(out_dir, exist_ok=True)
    wall = run_all()
    res = dict(results(), wall_s=round(wall), config=config)
    with open(os.path.join(out_dir, 'results.json'), 'w') as f:
        json.dump(res, f, indent=1)
    text = table(res) + ('\n\n' + sweep_table(res['sweep']) if 'sweep' in res else '')
    with open(os.path.join(out_dir, 'table.md'), 'w') as f:
        f.write(text + '\n')
    print(f"\n{text}\n\n{len(runs())} runs, {wall:.0f} s in this start; {out_dir}/results.json, {out_dir}/table.md")
    if pictures:
        print(plot.plot_chain(res, os.path.join(out_dir, 'chain.png')))
        for name, _, _ in runs():
            print(plot.plot_curves(os.path.join(out_dir, name)))
        print(plot.plot_mim(os.path.join(out_dir, 's0', 'mim')))
        if 'sweep' in res:
            print(plot.plot_sweep(res['sweep'], os.path.join(out_dir, 'sweep.png')))
