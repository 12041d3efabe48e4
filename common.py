"""What every stage does the same way, and nothing else (nanochat's common.py): torchrun / DeepSpeed setup, the
one DeepSpeed config, checkpoints, the log. A function enters only when three stages use it unchanged; no loop,
schedule, evaluation or stage-specific branch. Inputs come as arguments; DeepSpeed is imported inside (fast --help).
Stages import it before torch: OpenMP reads its wait policy once, when torch loads it.
"""
import contextlib
import importlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import time
import warnings

# idle OpenMP threads sleep instead of spinning: spinning threads that wait for one descheduled by any other load on
# the machine stall every parallel op
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16, 'fp32': torch.float32}


def print0(*args):
    if int(os.environ.get('RANK', '0')) == 0:
        print(*args, flush=True)


def slurm_env(env):
    """torchrun's variables for a task of a multi-task srun step (`srun python X.py`, which BEiT's and EVA-01's
    init_distributed_mode take through SLURM_PROCID): rank, local rank and world from SLURM_PROCID, SLURM_LOCALID,
    SLURM_NTASKS; the master the first host of the step's node list ('gpu[07-10,12],gpu20' -> gpu07), its port from
    the job id (the same on every task, another for each job); tasks per node from SLURM's '8(x16)' notation. {} when
    torchrun's RANK is set (it wins), outside SLURM, and in an sbatch script's own shell (SLURM_NTASKS is then the
    allocation's, but it is no step of tasks: SLURM_STEP_NUM_TASKS is unset). A step of several tasks without the
    variables to form the group is an error, never a world of one."""
    tasks = int(env.get('SLURM_STEP_NUM_TASKS', '1'))
    if 'RANK' in env or tasks < 2:
        return {}
    needed = ('SLURM_PROCID', 'SLURM_LOCALID', 'SLURM_NTASKS', 'SLURM_JOB_ID', 'SLURM_JOB_NODELIST')
    missing = [k for k in needed if k not in env]
    if missing:
        raise SystemExit(f"error: srun started {tasks} tasks without {', '.join(missing)}: they cannot form one run"
                         if env.get('SLURM_PROCID', '0') == '0' else 1)
    first = re.split(r',(?![^\[]*\])', env.get('SLURM_STEP_NODELIST', env['SLURM_JOB_NODELIST']))[0]
    host = re.sub(r'\[([^\],-]+)[^\]]*\]', r'\1', first)  # each bracket's first host number, its zeros kept
    per_node = []  # '2(x3),1' -> [2, 2, 2, 1]
    for part in env.get('SLURM_STEP_TASKS_PER_NODE', env.get('SLURM_TASKS_PER_NODE', str(tasks))).split(','):
        count, _, times = part.partition('(x')
        per_node += [int(count)] * int(times.rstrip(')') or 1)
    node = min(int(env.get('SLURM_NODEID', '0')), len(per_node) - 1)
    return {'RANK': env['SLURM_PROCID'], 'LOCAL_RANK': env['SLURM_LOCALID'], 'WORLD_SIZE': env['SLURM_NTASKS'],
            'LOCAL_WORLD_SIZE': str(per_node[node]), 'MASTER_ADDR': env.get('MASTER_ADDR', host),
            'MASTER_PORT': env.get('MASTER_PORT', str(15000 + int(env['SLURM_JOB_ID']) % 20000))}


def init_distributed(num_workers=0):
    """torchrun's env (RANK, LOCAL_RANK, WORLD_SIZE; multi-node through its rendezvous), SLURM's for `srun python
    X.py` (slurm_env), or a world of one for a plain `python X.py`; one GPU per process, NCCL on GPUs, gloo on a CPU;
    as many intra-op threads as this process's share of the cores leaves beside its DataLoader workers.
    -> rank, local_rank, world, device."""
    if not torch.cuda.is_available():
        os.environ.setdefault('DS_ACCELERATOR', 'cpu')  # else DeepSpeed warns on every rank that it found no GPU
    import deepspeed
    # on a CPU DeepSpeed compiles a shared-memory all-reduce (~35 s at the first start, again after another
    # virtualenv built it) that only its inference all-reduce uses: not built
    importlib.import_module('deepspeed.comm.torch').build_shm_op = lambda: None
    warnings.filterwarnings('ignore', '`torch.distributed.all_gather_into_tensor` is deprecated')  # DeepSpeed's call
    slurm = slurm_env(os.environ)
    os.environ.update(slurm)
    if 'RANK' not in os.environ:
        os.environ.update(RANK='0', LOCAL_RANK='0', WORLD_SIZE='1', MASTER_ADDR='127.0.0.1')
        os.environ.setdefault('MASTER_PORT', str(29500 + os.getpid() % 1000))
    rank, local_rank, world = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
    if 'OMP_NUM_THREADS' not in os.environ:  # more would oversubscribe the cores (OpenMP waits on them)
        own = int(os.environ.get('SLURM_CPUS_PER_TASK', '0')) if slurm else 0  # srun's share of this task
        cores = own or len(os.sched_getaffinity(0)) // int(os.environ.get('LOCAL_WORLD_SIZE', '1'))
        torch.set_num_threads(max(1, cores - num_workers))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    # what runs in float32 (the losses, the EMA, evaluation of fp32 weights) may use TF32 matmuls (A100 and later)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    backend = 'nccl' if cuda else 'gloo'
    if os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True':  # torchrun: its agent hosts the group's store
        # a group restarted by --max-restarts would read the keys of the attempt before, left in the agent's store
        # under the same names: the dead ranks' addresses, refused (gloo and NCCL alike; PyTorch issue 167288).
        # One prefix an attempt; DeepSpeed then takes the group as it finds it
        store = dist.TCPStore(os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']), world, is_master=False)
        attempt = os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')
        dist.init_process_group(backend, store=dist.PrefixStore(f'attempt{attempt}/', store), rank=rank,
                                world_size=world)
    deepspeed.init_distributed(dist_backend=backend)
    return rank, local_rank, world, torch.device('cuda', local_rank) if cuda else torch.device('cpu')


GPU_TYPES = {'cuda'}  # the device types a stage makes a GPU's choices for; bench.py's memory projection adds 'meta'


def on_gpu(device):
    """Whether a stage makes a GPU's choices for `device` (fp16, fused AdamW, an fp16 teacher, pinned memory): a
    CUDA device, or the meta device on which bench.py's memory projection runs the stage in a GPU's place."""
    return device.type in GPU_TYPES


def resolve_dtype(dtype, cuda):
    """-> (name, torch dtype); DeepSpeed runs fp16 only on CUDA, so a CPU trains in fp32 instead (said once)."""
    require_choice('dtype', dtype, DTYPES)
    if dtype == 'fp16' and not cuda:
        print0("no GPU: DeepSpeed runs fp16 only on CUDA, training in fp32 instead")
        dtype = 'fp32'
    return dtype, DTYPES[dtype]


def config_error(message):
    """A bad setting: one line from rank 0 and exit status 1 on every rank (no traceback per rank)."""
    raise SystemExit(f"error: {message}" if int(os.environ.get('RANK', '0')) == 0 else 1)


@contextlib.contextmanager
def input_errors():
    """Around reading what a setting names (init_from, data folders, lists): a file that is missing, is not a
    checkpoint, or holds another model or a class folder the run does not know (OSError or ValueError from the
    readers) stops the run with one error line, the reader's first (not a traceback per rank)."""
    try:
        yield
    except (OSError, ValueError) as e:
        config_error(str(e).splitlines()[0].rstrip(':'))


def require_choice(key, value, choices):
    """A setting that names a key of a table (model_size, dtype): one error line that lists them, not a traceback."""
    if value not in choices:
        config_error(f"{key} must be one of {', '.join(choices)}, got {value!r}")


def require_files(**paths):
    """Settings that name files: one error line for those set but missing, before anything is built."""
    missing = [f"{k}={v!r}" for k, v in paths.items() if v and not os.path.isfile(v)]
    if missing:
        config_error(f"no such file: {', '.join(missing)}")


def batch_split(batch_size, micro_batch, world):
    """-> (micro_batch, grad_accum), micro_batch x grad_accum x world = batch_size: the configured micro-batch or,
    where it does not divide a process's share, the largest that does (said once); any world dividing batch_size."""
    if micro_batch < 1 or batch_size % world:
        config_error(f"batch_size {batch_size} does not split into micro-batches of {micro_batch} on {world} processes")
    share = batch_size // world
    fit = max(m for m in range(1, min(micro_batch, share) + 1) if share % m == 0)
    if fit != micro_batch:
        print0(f"micro_batch {micro_batch} -> {fit}: {world} processes x {fit} x {share // fit} accumulation steps")
    return fit, share // fit


def deepspeed_engine(model, optimizer, batch_size, micro_batch, grad_clip, zero_stage, dtype):
    """The one DeepSpeed config (a dict, never a file on disk), its engine, and fuse_zero_grad_checks; DeepSpeed
    derives the gradient accumulation from batch_size / (micro_batch x world). -> (engine, its optimizer)."""
    import deepspeed
    ds_config = {'train_batch_size': batch_size, 'train_micro_batch_size_per_gpu': micro_batch,
                 'gradient_clipping': grad_clip, 'steps_per_print': 1 << 30,  # the stage logs, DeepSpeed not
                 # overlap_comm reduces gradients during the backward on GPUs. EVA-01's reduce buckets held 5e8
                 # elements, two of them in fp16 from a micro-step's first gradient to the step: 1.9 GiB on every
                 # GPU. 1e8 lowers the peak at 16 ranks by 0.25-1.5 GiB (bench.py --mode=memory: MIM 1.5, seg 0.8,
                 # CLIP 0.25: the gradient partition is then made earlier in the backward) for 8 more reductions
                 # of EVA-g's 1B per step, each still 190 MB, where NCCL runs at full bandwidth (~10-100 us more a
                 # call: not measured here)
                 'zero_optimization': {'stage': zero_stage, 'contiguous_gradients': True, 'reduce_bucket_size': 1e8,
                                       'allgather_bucket_size': 5e8, 'overlap_comm': torch.cuda.is_available()},
                 # EVA-01's fp16 loss scale (its create_ds_config): dynamic from 2^16, halved after 2 overflowing
                 # steps in a row (hysteresis), doubled after 500 clean ones; an overflowing step is skipped
                 'fp16': {'enabled': dtype == 'fp16', 'loss_scale': 0, 'initial_scale_power': 16,
                          'loss_scale_window': 500, 'hysteresis': 2, 'min_loss_scale': 1},
                 'bf16': {'enabled': dtype == 'bf16'}}
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine, fuse_zero_grad_checks(optimizer)


def fuse_zero_grad_checks(opt):
    """DeepSpeed's ZeRO-1/2 optimizer tests each gradient tensor for inf/NaN (6 kernels) and takes its float64 norm:
    for EVA-g's 529 tensors ~8,600 tiny kernels a step, a third of the MIM step on an H200. Here both are one float32
    torch._foreach_norm (inf/NaN make a norm non-finite), reduced over ranks as DeepSpeed does; patched in place."""
    from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    if not isinstance(opt, DeepSpeedZeroOptimizer) or opt.cpu_offload:
        return opt

    def l2_norms(grads):  # (a rank may own no gradient of a group)
        grads = [g for g in grads if g is not None]
        return torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)) if grads else \
            torch.zeros(1, device=opt.device)

    def has_overflow():  # for has_overflow_partitioned_grads_serial: a (1,) bool tensor on the device
        grads = [g for i in range(len(opt.bit16_groups)) for g in (opt.averaged_gradients[i] or [])]
        return (~l2_norms(grads).isfinite()).any().reshape(1)

    def grad_norm(gradients, params, norm_type=2):  # for get_grad_norm_direct (ZeRO asks it for L2 norms only)
        total = l2_norms(g for g in gradients if not getattr(g, '_zero_padding', False)).square().sum()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=opt.dp_process_group)
        opt._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
        total = total.sqrt()
        mask_nan_or_inf_with_val_inplace(total, device=opt.device)  # as DeepSpeed: a non-finite norm -> -1
        return total

    opt.has_overflow_partitioned_grads_serial, opt.get_grad_norm_direct = has_overflow, grad_norm
    return opt


def stop_signal():
    """From now on SIGINT (Ctrl-C) and SIGTERM (a scheduler's notice before it kills a job) do not kill the run at
    once: -> stop(), 1.0 once one came to this process. Training sums it over ranks with its log statistics, so that
    all ranks stop after the same step, save a checkpoint and exit 0; an evaluation under way stops at its next batch
    and is not reported (cut_short). A repeat within 2 s is the same signal (torchrun passes a Ctrl-C on to workers
    that had it already); a later one ends the process at once, without a checkpoint."""
    got, pid = [], os.getpid()

    def note(signum, frame):  # DataLoader workers inherit it: they go on, quietly, until the loader ends them
        if os.getpid() != pid:
            return
        name = signal.Signals(signum).name
        if got and time.time() - got[0] >= 2:
            print(f"{name} again: exiting now, without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        if not got:
            print0(f"{name}: stopping at the next log step, with a checkpoint (an evaluation: at its next batch); "
                   f"again to exit at once")
            got.append(time.time())
    signal.signal(signal.SIGINT, note)
    signal.signal(signal.SIGTERM, note)
    return lambda: float(bool(got))


def cut_short(stop, device):
    """After an evaluation whose loops break on stop(): whether a signal cut it short on any rank (a collective, so
    every rank answers the same); its numbers are then partial, and not reported."""
    flag = torch.tensor([stop()], device=device)
    dist.all_reduce(flag)
    if flag.item() > 0:
        print0("the evaluation was cut short by the signal: its numbers are not reported")
    return flag.item() > 0


def engine_stats(engine):
    """The engine's part of a log row (grad_norm is None without ZeRO in fp32, where DeepSpeed takes none)."""
    norm, cuda = engine.get_global_grad_norm(), torch.cuda.is_available()
    return {'grad_norm': None if norm is None else float(norm), 'skipped': engine.skipped_steps,
            'loss_scale': engine.optimizer.cur_scale if engine.fp16_enabled() else None,
            'mem_gb': round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            'reserved_gb': round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None}  # (+ fragments)


def atomic_save(obj, path):
    """torch.save (a str: the text) under a temporary name, then a rename: a crash never leaves half a file."""
    if isinstance(obj, str):
        with open(path + '.tmp', 'w') as f:
            f.write(obj)
    else:
        with open(path + '.tmp', 'wb') as f:
            torch.save(obj, f)
    os.replace(path + '.tmp', path)


def write_eval(out_dir, results, eval_only=False):
    """out_dir/eval.json from rank 0: what an evaluation of a checkpoint (eval_only, a stage's final one) found. An
    eval_only run does not overwrite a training run's eval.json: beside one it writes eval_<init_from's name>.json."""
    if dist.get_rank() != 0:
        return
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, 'eval.json')
    if eval_only and os.path.exists(path) and not json.load(open(path)).get('eval_only'):
        stem = os.path.splitext(os.path.basename(results['init_from']))[0]
        path = os.path.join(out_dir, f'eval_{stem}.json')
        print(f"{out_dir}/eval.json holds the training run's evaluation; this one goes to {path}")
    atomic_save(json.dumps({**results, 'eval_only': eval_only}, indent=1), path)


def full_state_dict(engine):
    """The fp32 weights by name on rank 0, None elsewhere: a collective (ZeRO partitions the master copies). Without
    one (frozen; no ZeRO: in fp32 the weights are the master, in fp16 it is one flat buffer) the weights, in fp32.
    Persistent buffers (BatchNorm's running statistics) are rank 0's, floating ones in fp32."""
    from deepspeed.utils import safe_get_full_fp32_param
    sd, rank0 = {}, dist.get_rank() == 0
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p) if p.requires_grad else None
        sd[name] = (full if full is not None else p.detach()).float().cpu().clone() if rank0 else None
    if rank0:
        persistent = engine.module.state_dict().keys()
        for n, b in engine.module.named_buffers():
            if n in persistent:
                sd[n] = (b.float() if b.is_floating_point() else b).cpu().clone()
    return sd if rank0 else None


def save_checkpoint(engine, out_dir, step, client_state, files=None, keep=2):
    """DeepSpeed's states (all ranks) + client_state in out_dir/ckpt/step{step}/ with each rank's torch, cuda and
    numpy RNG states; then rank 0's export files ({name in out_dir: object}) and 'latest', each atomic, 'latest' last
    (a crash before it resumes the previous checkpoint); the newest `keep` step folders kept. Refused (nothing
    written) if the ranks' weights differ: ZeRO-1/2 keep a full copy on every rank."""
    rank, ckpt_dir, tag = dist.get_rank(), os.path.join(out_dir, 'ckpt'), f'step{step}'
    checksum = sum(p.detach().double().sum() for p in engine.module.parameters()).reshape(1)
    sums = [torch.zeros_like(checksum) for _ in range(dist.get_world_size())]
    dist.all_gather(sums, checksum)
    assert all(float(s) == float(sums[0]) for s in sums), f"the ranks' weights diverged: checksums {sums}"
    # a step saved again (redone after a resume from an earlier one) is not complete until its new files are
    stale = os.path.join(ckpt_dir, tag, MANIFEST)
    if rank == 0 and os.path.exists(stale):
        os.remove(stale)
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state={**client_state, 'step': step}, save_latest=False)
    atomic_save({'torch': torch.get_rng_state(), 'numpy': np.random.get_state(), 'cuda': torch.cuda.get_rng_state()
                 if torch.cuda.is_available() else None}, os.path.join(ckpt_dir, tag, f'rng_rank{rank}.pt'))
    dist.barrier()  # every rank's files are written
    if rank == 0:
        for name, obj in (files or {}).items():
            atomic_save(obj, os.path.join(out_dir, name))
        folder = os.path.join(ckpt_dir, tag)  # its files and sizes, checked at resume: a crash or a full disk shows
        sizes = {f: os.path.getsize(os.path.join(folder, f)) for f in sorted(os.listdir(folder))}
        atomic_save(json.dumps(sizes), os.path.join(folder, MANIFEST))
        atomic_save(tag, os.path.join(ckpt_dir, 'latest'))
        older = checkpoint_steps(ckpt_dir)
        for s in [s for s in older if s != step][:max(len(older) - max(keep, 1), 0)]:
            shutil.rmtree(os.path.join(ckpt_dir, f'step{s}'), ignore_errors=True)
    print0(f"saved {ckpt_dir}/{tag}" + ''.join(f", {out_dir}/{n}" for n in files or {}) +
           (f" (weights equal on all {len(sums)} ranks)" if len(sums) > 1 else ''))
    dist.barrier()


MANIFEST = 'complete.json'  # a checkpoint folder's list of files and sizes, written once all of them are


def checkpoint_steps(ckpt_dir):
    """The steps of ckpt_dir's step<N> folders, ascending."""
    return sorted(int(d[4:]) for d in os.listdir(ckpt_dir) if d.startswith('step') and d[4:].isdigit())


def check_shared(out_dir):
    """Every rank must see what rank 0 writes in out_dir (checkpoints are written by all ranks, 'latest' and the
    exports by rank 0, and read back by all): one file written by rank 0, read by each; else one error."""
    token, path = [f"{socket.gethostname()} {os.getpid()} {time.time()}"], os.path.join(out_dir, '.shared')
    dist.broadcast_object_list(token, src=0)
    if dist.get_rank() == 0:
        os.makedirs(out_dir, exist_ok=True)
        atomic_save(token[0], path)
    dist.barrier()
    seen = os.path.exists(path) and open(path).read() == token[0]
    blind = [None] * dist.get_world_size()
    dist.all_gather_object(blind, None if seen else f"rank {dist.get_rank()} on {socket.gethostname()}")
    blind = [b for b in blind if b]
    if blind:
        config_error(f"out_dir {out_dir} is not shared: {', '.join(blind[:4])} cannot see what rank 0 writes there. "
                     f"Put out_dir on a file system every node sees")


def complete_checkpoint(ckpt_dir):
    """The newest checkpoint folder of ckpt_dir, from the one 'latest' names down, whose files are all there with the
    sizes its manifest lists (one that a crash or a full disk cut short is passed over) -> (tag or None, what was
    passed over and why)."""
    if not os.path.exists(os.path.join(ckpt_dir, 'latest')):
        return None, []
    latest = open(os.path.join(ckpt_dir, 'latest')).read().strip()
    passed = []
    for tag in [latest] + [f'step{s}' for s in reversed(checkpoint_steps(ckpt_dir)) if f'step{s}' != latest]:
        manifest = os.path.join(ckpt_dir, tag, MANIFEST)
        if not os.path.exists(manifest):  # the one 'latest' names: written before manifests, taken unchecked
            if tag == latest and os.path.isdir(os.path.join(ckpt_dir, tag)):
                return tag, passed
            passed.append(f"{tag}: unfinished")
            continue
        bad = []
        for f, size in json.load(open(manifest)).items():
            path = os.path.join(ckpt_dir, tag, f)
            if not os.path.exists(path) or os.path.getsize(path) != size:
                bad.append(f"{f} {'truncated' if os.path.exists(path) else 'missing'}")
        if not bad:
            return tag, passed
        passed.append(f"{tag}: {', '.join(bad[:3])}")
    return None, passed


def resume(engine, out_dir, seed, config):
    """DeepSpeed's and this rank's RNG states from out_dir/ckpt's newest complete checkpoint -> (step, client_state),
    saying which settings changed since that run (its out_dir/config.json); a checkpoint of another model, or of
    another number of processes, is a config error. With none there, torch and numpy seeded with seed + rank (drop
    path, augmentation differ across ranks) -> (0, {}). All ranks take the checkpoint rank 0 chose, in an out_dir
    they all see (check_shared)."""
    rank, world, ckpt_dir = dist.get_rank(), dist.get_world_size(), os.path.join(out_dir, 'ckpt')
    if world > 1:
        check_shared(out_dir)
    choice = [complete_checkpoint(ckpt_dir) if rank == 0 else None]
    dist.broadcast_object_list(choice, src=0)
    tag, passed = choice[0]
    if tag is None and passed:
        config_error(f"{ckpt_dir} holds no complete checkpoint ({'; '.join(passed)}): move it away to start afresh")
    if passed:
        print0(f"warning: {ckpt_dir}: passed over {'; '.join(passed)}: resuming from {tag}")
    if tag is None:
        torch.manual_seed(seed + rank)
        np.random.seed(seed + rank)
        return 0, {}
    saved = len([f for f in os.listdir(os.path.join(ckpt_dir, tag)) if f.startswith('rng_rank')])
    if saved != world and engine.zero_optimization_stage() > 0:
        config_error(f"{ckpt_dir}/{tag} was written by {saved} processes, this run has {world}: ZeRO splits the "
                     f"optimizer state by process. Resume with {saved}, or start another out_dir from its weights "
                     f"(init_from= the weights file this out_dir exports)")
    old = os.path.join(out_dir, 'config.json')
    old = json.load(open(old)) if os.path.exists(old) else {}
    changed = [f"{k} {old[k]!r} -> {v!r}" for k, v in json.loads(json.dumps(config)).items()
               if k in old and old[k] != v and k != 'stop_step']
    changed = ', '.join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else '')
    try:
        path, client = engine.load_checkpoint(ckpt_dir, tag=tag)
    except RuntimeError as e:  # e.g. 'size mismatch for pos_embed', once per tensor; or every key of another head
        detail = str(e).strip().splitlines()[-1].strip()
        detail = detail if len(detail) <= 200 else detail[:200] + ' ...'  # one line to read, not kilobytes of keys
        if 'PytorchStreamReader' in str(e):  # a file that changed after its manifest was written
            config_error(f"{ckpt_dir}/{tag} has an unreadable file ({detail})")
        config_error(f"{ckpt_dir}/{tag} holds another model ({detail}); settings changed since it was written: "
                     f"{changed or 'none'}. Use another out_dir to start afresh")
    if path is None:
        config_error(f"{ckpt_dir}/latest names {tag}, which DeepSpeed cannot load")
    rng = torch.load(os.path.join(ckpt_dir, tag, f'rng_rank{rank}.pt'), weights_only=False)
    torch.set_rng_state(rng['torch'])
    np.random.set_state(rng['numpy'])
    if rng['cuda'] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng['cuda'])
    print0(f"resumed from {ckpt_dir}/{tag} at step {client['step']}" +
           (f"; warning, settings changed since: {changed}" if changed else ''))
    return client['step'], client

# the log row every stage writes, in print order, and its format; a stage's own keys follow as `key value`
ROW_FORMAT = {'epoch': 'ep {:.2f}', 'loss': 'loss {:.4f}', 'lr': 'lr {:.2e}', 'grad_norm': 'gnorm {:.3f}',
              'loss_scale': 'loss scale {:g}', 'skipped': 'skipped {}', 'img_s': '{:.1f} img/s',
              'samples_s': '{:.1f} samples/s', 'mfu': 'mfu {:.1%}', 'mem_gb': 'mem {:.1f} GiB',
              'reserved_gb': 'reserved {:.1f} GiB', 'bad_samples': 'bad {}', 'eta_h': 'eta {}'}


def hms(seconds):
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def format_row(row, total_steps=None):
    """A log row as one line: 'step 10/100 | ep 0.10 | loss 0.1234 | ... | eta 1:02:03'; None values left out."""
    parts = [f"step {row['step']}" + (f"/{total_steps}" if total_steps else '')]
    parts += [ROW_FORMAT[k].format(hms(row[k] * 3600) if k == 'eta_h' else row[k]) for k in ROW_FORMAT
              if row.get(k) is not None]
    return ' | '.join(parts + [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                               if k not in ROW_FORMAT and k != 'step' and v is not None and not isinstance(v, dict)])


def _row_step(line):
    """A log line's step (0 for a header); a line that does not parse (the run was killed while writing it): inf,
    so that it is dropped."""
    try:
        return json.loads(line).get('step', 0)
    except json.JSONDecodeError:
        return math.inf


def open_log(out_dir, header, wandb_project='', wandb_run_name=''):
    """Makes out_dir. Rank 0 writes header['config'] to out_dir/config.json, drops from out_dir/log.jsonl the rows of
    steps after header['start_step'] (a resumed run redoes them), appends `header`, starts wandb if wandb_project.
    -> log(row, echo=True): rank 0 appends the row, sends it to wandb, prints it (format_row) when echo."""
    if wandb_project and importlib.util.find_spec('wandb') is None:
        config_error(f"wandb_project={wandb_project!r} needs wandb: pip install wandb (or leave wandb_project empty)")
    os.makedirs(out_dir, exist_ok=True)
    if int(os.environ.get('RANK', '0')) != 0:
        return lambda row, echo=True: None
    atomic_save(json.dumps(header['config'], indent=1) + '\n', os.path.join(out_dir, 'config.json'))
    path, wandb = os.path.join(out_dir, 'log.jsonl'), None
    rows = open(path).readlines() if os.path.exists(path) else []
    lost = max((_row_step(r) for r in rows if _row_step(r) < math.inf), default=0) - header['start_step']
    if lost > 0:
        print0(f"{lost} steps lost: the log went on to step {header['start_step'] + lost}, redone from its checkpoint")
    atomic_save(''.join(r for r in rows if _row_step(r) <= header['start_step']), path)
    f = open(path, 'a')
    print(json.dumps(header), file=f, flush=True)
    print0(f"settings: {out_dir}/config.json; log: {path}")
    if wandb_project:
        import wandb
        wandb.init(project=wandb_project, name=wandb_run_name, config=header['config'], resume='allow')

    def log(row, echo=True):
        print(json.dumps(row), file=f, flush=True)
        if wandb is not None:
            wandb.log(row, step=row['step'])
        if echo:
            print(format_row(row, header.get('total_steps')), flush=True)
    return log
