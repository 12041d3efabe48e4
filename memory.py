"""
The GPU memory of a training step, projected on a CPU (the study behind it: DESIGN.md's
research/memory_projection.md). A step runs on the meta device (shapes, no data, no GPU), and a dispatch mode counts
the bytes of every storage alive as the CUDA caching allocator would (each block rounded up to 512 B), so that its
peak is what torch.cuda.max_memory_allocated would report. What the meta device runs differently from a GPU is put
in by hand, each piece here:
  LiveMemory          the counter: live storages by identity (views share one), their kind (weights, gradients,
                      activations, ...), the peak, the peak of each phase, the largest storages at the peak; .item()
                      of a meta tensor answers as a healthy step would (0: no overflow, no stop signal); what the
                      values would decide: a mask's count of True (from the data it was copied from, carried
                      through casts, | and cat; else a policy, selecting()), unique's count, NMS's boxes kept
  cuda_attention      F.scaled_dot_product_attention replaced by what the CUDA flash / memory-efficient kernels
                      allocate (on meta and CPU the math fallback would keep an fp32 N x N softmax)
  deepspeed_on_meta   DeepSpeed's own ZeRO code on meta tensors, as any rank of any world in one process (torch's
                      fake process group): nothing of ZeRO re-implemented, so nothing to drift from DeepSpeed

    python -m pytest tests/test_memory.py   # against torch's MemTracker, CPU tensors, aten's attention, DeepSpeed

Only the CPU (for deepspeed_on_meta: DeepSpeed's CPU accelerator, which asks no device) is needed. bench.py's memory
mode runs each stage script under these (memory_worker), with det's and seg's counts as named policies.
"""
import contextlib
import heapq
import importlib
import os
import weakref
from collections import Counter

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GiB = 2 ** 30
BLOCK = 512  # the CUDA caching allocator's smallest block: every allocation is rounded up to it


# .item() / bool() of a meta tensor (the values are not there) is 0: no gradient overflow (DeepSpeed), no stop
# signal summed over ranks (the stages), a zero norm, so that the step goes the way of a healthy one
META_SCALARS = {False: 0, True: 0.0}
aten = torch.ops.aten
BOOL_INDEXED = (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default)
PUTS = BOOL_INDEXED[1:]  # x[mask] = values: the count of True is values' length, unless values broadcast
UNIQUE = (aten._unique2.default, aten.unique_dim.default, aten._unique.default)
# a count of True carried from masks to what is made of them: a cast keeps it, | and cat add them up (| of the
# disjoint positive and negative samples of a sampler, cat of images' masks)
COUNT_KEPT, COUNT_ADDED = (aten._to_copy.default, aten.clone.default), (aten.bitwise_or.Tensor, aten.cat.default)
NMS = 'torchvision::nms'  # (torchvision's, by name: this file needs no torchvision) its meta kernel wants fake tensors


def is_meta_mask(t):
    return isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) and t.device.type == 'meta'


class LiveMemory(TorchDispatchMode):
    """Counts the storages that ops under it create (and those given to track), by identity, until they are freed:
    a weakref.finalize on the storage, so a view keeps its base counted as the allocator keeps the block. Each new
    storage gets the kind that was set last (kind('activations'), or a phase's), or the one track() gives it.
    -> .peak (bytes), .peak_kinds and .peak_phase at it, .phase_peaks, .top (the largest storages at the peak)."""

    def __init__(self, device='meta', explain=0, block=BLOCK, fraction=None, unique=None):
        super().__init__()
        self.device = torch.device(device)  # the one counted: the GPU's stand-in (not the host's, e.g. Adam's steps)
        self.block = block  # 1: bytes as they are (torch's MemTracker off CUDA)
        self.live = {}  # storage key -> [bytes, kind, what made it]
        self.hosted = set()  # storage keys never counted (host)
        self.counts = {}  # meta mask storage key -> (its count of True, its elements): from data, a policy, its inputs
        # the policies for what the values would decide (None: an error names the op): the share of a mask made on
        # the device that is True (and of boxes NMS keeps), as selecting() sets it; the values unique() finds
        self.fraction, self.unique_count = fraction, unique
        self.now, self.peak, self.peak_phase = 0, 0, None
        self.kinds, self.peak_kinds = Counter(), {}
        self.phase, self.current_kind, self.phase_peaks = 'setup', 'other', {}
        self.explain, self.top, self.top_at = explain, [], 0  # top: the `explain` largest at the peak

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        on_meta = bool(args) and isinstance(args[0], torch.Tensor) and args[0].device.type == 'meta'
        if func is aten._local_scalar_dense.default and on_meta:
            return META_SCALARS[args[0].dtype.is_floating_point]
        if func is aten._to_copy.default and on_meta and torch.device(kwargs.get('device') or 'meta').type != 'meta':
            # copied out to the host (.cpu(), for host-side work such as the Hungarian matching): zeros
            return torch.zeros(args[0].shape, dtype=kwargs.get('dtype') or args[0].dtype, device=kwargs['device'])
        if func is aten.nonzero.default and on_meta:
            return self.nonzero(args[0])
        if func in UNIQUE and on_meta:
            return self.unique(func, *args)
        if on_meta and func.name() == NMS:  # the boxes kept: the policy's share of them, the highest scored first
            return self.made(torch.empty(self.selected(len(args[0]), 'NMS of boxes'), dtype=torch.long,
                                         device='meta'), 'nms')
        if func in BOOL_INDEXED and any(is_meta_mask(i) for i in args[1]):  # x[mask], x[mask] = y, their grads
            # x[mask] = values: as many True as values has rows (unless they broadcast)
            rows = func in PUTS and len(args[1]) == 1 and args[2].dim() == args[0].dim() - args[1][0].dim() + 1
            n = len(args[2]) if rows else None
            indices = [j for i in args[1] for j in (self.nonzero(i, n).unbind(1) if is_meta_mask(i) else [i])]
            args = (args[0], indices, *args[2:])
        out = func(*args, **kwargs)
        if func in COUNT_KEPT and is_meta_mask(out):
            if args[0].device.type != 'meta' and out.dtype == torch.bool:  # a bool mask from the data (MIM's): its
                self.count(out, int(args[0].sum()))  # count of True is known (not summed for a batch's uint8 images)
            elif (n := self.count_of(args[0])) is not None:
                self.count(out, n)
        if func in COUNT_ADDED and is_meta_mask(out):
            counts = [self.count_of(m) for m in (args[0] if func is aten.cat.default else args[:2])]
            if None not in counts:
                self.count(out, min(sum(counts), out.numel()))
        if func is torch.ops.aten.lift_fresh.default:  # torch.tensor(python values): made on the host, where a GPU
            self.host(out)  # run keeps it (Adam's step counts) unless it is copied to the device (a new storage)
            return out
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t, self.current_kind, func.__name__, retag=False)
        return out

    def made(self, t, what):
        """t, made here for an op (not by it), counted as the op's output would be."""
        self.add(t, self.current_kind, what, retag=False)
        return t

    def count(self, mask, n):
        """The meta mask `mask` holds n True (from the data, a policy, or the masks it was made of)."""
        self.counts[mask.untyped_storage()._cdata] = (n, mask.numel())

    def count_of(self, t):
        """The count of True a meta mask is known to hold, or None."""
        count = self.counts.get(t.untyped_storage()._cdata) if is_meta_mask(t) else None
        return count[0] if count is not None and count[1] == t.numel() else None

    def selected(self, n, what):
        """How many of n elements a mask made on the device selects: the policy's share (selecting())."""
        if self.fraction is None:
            raise NotImplementedError(f"memory projection: the count of True in {what} is not known (only masks "
                                      f"copied from data to the device are counted; no selecting() policy is set)")
        return min(n, round(self.fraction * n))

    @contextlib.contextmanager
    def selecting(self, fraction):
        """Inside, a mask made on the device (whose count of True is not known) selects `fraction` of its elements,
        and NMS keeps that share of its boxes: a policy for what the values would decide (det's proposals)."""
        before, self.fraction = self.fraction, fraction
        try:
            yield self
        finally:
            self.fraction = before

    def nonzero(self, mask, n=None):
        """A meta mask's nonzero(), (count of True, mask.dim()) long, counted: the count is the one its data had
        when it was copied to the device, or the one carried from the masks it was made of, else n (the rows of
        x[mask] = values), else the selecting() policy's."""
        known = self.count_of(mask)
        if known is not None:
            n = known
        elif n is None:
            n = self.selected(mask.numel(), f"a {tuple(mask.shape)} mask")
        return self.made(torch.empty(n, mask.dim(), dtype=torch.long, device='meta'), 'nonzero')

    def unique(self, func, x, sorted=True, return_inverse=False, return_counts=False, *rest):
        """x.unique() on meta: the policy's count of distinct values (e.g. the classes in a segmentation crop)."""
        if self.unique_count is None:
            raise NotImplementedError(f"memory projection: the distinct values of a {tuple(x.shape)} tensor are not "
                                      f"known (no unique count set)")
        n = min(x.numel(), self.unique_count)
        values = self.made(x.new_empty(n), 'unique')
        inverse = self.made(x.new_empty(x.shape if return_inverse else 0, dtype=torch.long), 'unique')
        if func is aten._unique.default:
            return values, inverse
        return values, inverse, self.made(x.new_empty(n if return_counts else 0, dtype=torch.long), 'unique')

    def add(self, t, kind, what, retag=True):
        """Count t's storage (once) as `kind`; retag: a storage already counted takes this kind."""
        if t.device != self.device:
            return
        s = t.untyped_storage()
        key = s._cdata
        if key in self.hosted:
            return
        entry = self.live.get(key)
        if entry is not None:
            if retag and entry[1] != kind:
                self.kinds[entry[1]] -= entry[0]
                self.kinds[kind] += entry[0]
                entry[1] = kind
            return
        n = round_up(s.nbytes(), self.block)
        self.live[key] = [n, kind, what]
        weakref.finalize(s, self.free, key)
        self.now += n
        self.kinds[kind] += n
        self.phase_peaks[self.phase] = max(self.phase_peaks.get(self.phase, 0), self.now)
        if self.now > self.peak:
            self.peak, self.peak_phase, self.peak_kinds = self.now, self.phase, dict(self.kinds)
            if self.explain and self.now > self.top_at * 1.001:  # a list per new peak would be quadratic
                self.top = heapq.nlargest(self.explain, self.live.values(), key=lambda e: e[0])
                self.top = [list(e) for e in self.top]
                self.top_at = self.now

    def reset_peaks(self):
        """Peaks from here on (what is live now is counted in them)."""
        self.peak, self.peak_phase, self.peak_kinds = self.now, self.phase, dict(self.kinds)
        self.phase_peaks, self.top, self.top_at = {self.phase: self.now}, [], 0

    def host(self, t):
        """t's storage is host memory, never counted (a CPU run's stand-in for what a GPU run keeps on the host)."""
        s = t.untyped_storage()
        self.hosted.add(s._cdata)
        weakref.finalize(s, self.hosted.discard, s._cdata)

    def free(self, key):
        self.counts.pop(key, None)  # (a new storage may take its key)
        entry = self.live.pop(key, None)  # (None: forgotten)
        if entry is not None:
            self.now -= entry[0]
            self.kinds[entry[1]] -= entry[0]

    def forget(self, tensors):
        """Tensors that are no GPU memory (DeepSpeed's own shape-only meta copies) from now on."""
        for t in tensors:
            self.free(t.untyped_storage()._cdata)

    def track(self, tensors, kind, what=''):
        """Tensors made outside the mode (a model built before it), or a new kind for ones counted already."""
        for t in tensors:
            if t is not None:
                self.add(t, kind, what or kind)

    def kind(self, kind):
        """New storages from here on are `kind` (the phase's default until the next phase)."""
        self.current_kind = kind

    @contextlib.contextmanager
    def in_phase(self, phase, kind=None):
        """A phase of the step (forward, backward, step, ...): its peak is kept apart; its storages are `kind`."""
        before = self.phase, self.current_kind
        self.phase, self.current_kind = phase, kind or phase
        self.phase_peaks[phase] = max(self.phase_peaks.get(phase, 0), self.now)
        try:
            yield self
        finally:
            self.phase, self.current_kind = before

    def summary(self):
        """-> a dict of plain numbers (GiB): the peak, its phase, the kinds live at it, each phase's peak."""
        gib = lambda b: round(b / GiB, 4)  # noqa: E731
        return {'peak_gib': gib(self.peak), 'peak_phase': self.peak_phase,
                'at_peak': {k: gib(v) for k, v in sorted(self.peak_kinds.items(), key=lambda kv: -kv[1]) if v},
                'at_peak_bytes': {k: v for k, v in self.peak_kinds.items() if v},
                'phase_peaks': {k: gib(v) for k, v in self.phase_peaks.items()},
                'largest': [f'{gib(n)} GiB {kind} ({what})' for n, kind, what in self.top]}


# -----------------------------------------------------------------------------
# the CUDA attention kernels' allocations


def round_up(n, m):
    return -(-n // m) * m


class CudaAttention(torch.autograd.Function):
    """What F.scaled_dot_product_attention allocates on a GPU in fp16 / bf16 (torch 2.x, sm80+), not its values:
    flash attention without a mask, the memory-efficient kernel with one (ViTDet's relative-position bias, a causal
    text mask). Both write the output as (B, N, H, hd) and return its transpose, so that EVA's
    x.transpose(1, 2).flatten(2) is a view (the meta kernel's contiguous (B, H, N, hd) would make it a copy), and
    keep an fp32 log-sum-exp per query (efficient: padded to 32) for the backward, with q, k, v and the output."""

    @staticmethod
    def forward(ctx, q, k, v, mask):
        B, H, N, hd = q.shape
        out = q.new_zeros(B, N, H, v.shape[-1]).transpose(1, 2)  # zeros: finite values on a CPU
        lse = q.new_zeros(B, H, N if mask is None else round_up(N, 32), dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.mask_grad = mask is not None and mask.requires_grad
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, mask = ctx.saved_tensors
        B, H, N, hd = q.shape
        # the gradients in the kernel's (B, N, H, hd) layout, then its fp32 workspaces, freed on return: FA2's
        # dq_accum (B, N rounded to 128, H, hd rounded to 32) and softmax_d (B, H, N rounded to 128); the
        # memory-efficient kernel's are of the same order and taken to be these
        dq, dk, dv = (t.new_zeros(t.shape[0], t.shape[2], t.shape[1], t.shape[3]).transpose(1, 2) for t in (q, k, v))
        dq_accum = q.new_empty(B, round_up(N, 128), H, round_up(hd, 32), dtype=torch.float32)
        softmax_d = q.new_empty(B, H, round_up(N, 128), dtype=torch.float32)
        del dq_accum, softmax_d
        dmask = mask.new_zeros(B, H, N, k.shape[2]) if ctx.mask_grad else None  # (not a view of the mask: its own)
        return dq, dk, dv, dmask


def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    """F.scaled_dot_product_attention's signature; what the CUDA kernels allocate (CudaAttention)."""
    if dropout_p or kw:
        raise NotImplementedError(f"memory projection of attention with dropout or {sorted(kw)}")
    if is_causal:  # the efficient kernel's causal path keeps no mask; its lse is padded as with one
        attn_mask = q.new_empty(0)
    return CudaAttention.apply(q, k, v, attn_mask)


@contextlib.contextmanager
def cuda_attention():
    """F.scaled_dot_product_attention is what the CUDA kernels allocate, inside. Patched as the module attribute
    (model.py, det_model.py, open_clip and torch's MultiheadAttention look it up at each call), not with a
    TorchFunctionMode: such a mode is not active in torch.utils.checkpoint's recompute, whose tensors would then
    differ from the forward's and fail checkpoint's metadata check."""
    real = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


# -----------------------------------------------------------------------------
# DeepSpeed's own ZeRO code on meta tensors, as one rank of any world


def deepspeed_shapes(optimizer):
    """The meta tensors DeepSpeed's ZeRO-1/2 optimizer keeps of its own, as shapes only: no memory on a GPU, but
    on the meta device like everything else here (LiveMemory.forget them after deepspeed.initialize)."""
    return [t for group in getattr(optimizer, 'round_robin_bit16_meta', []) for t in group]


@contextlib.contextmanager
def deepspeed_on_meta(world, rank):
    """Inside, deepspeed.initialize and the engine's forward / backward / step run DeepSpeed's own code (the config
    a stage builds, its flat buffers, partitions, reduce buckets, fp32 master and optimizer states) on meta
    tensors, as rank `rank` of `world` ranks in this one process: torch's fake process group answers every
    collective at once without data, and DeepSpeed's accelerator names the meta device as its own. Nothing of
    ZeRO is re-implemented here, so a DeepSpeed upgrade is projected as it behaves (tests/test_memory.py compares
    this with DeepSpeed on CPU tensors over gloo, 1 and 2 ranks)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    os.environ['DS_ACCELERATOR'] = 'cpu'  # the one accelerator without a device to ask (its Stream is a no-op)
    # (deepspeed.comm wraps the group made below); its CPU all-reduce kernel is not built, as in common.init_distributed
    importlib.import_module('deepspeed.comm.torch').build_shm_op = lambda: None
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    saved = {k: getattr(acc, k) for k in ('current_device_name', 'device_name', 'is_fp16_supported')}
    env = {k: os.environ.get(k) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE')}
    acc.current_device_name = lambda: 'meta'
    acc.device_name = lambda device_index=None: 'meta'
    acc.is_fp16_supported = lambda: True  # a GPU's; the CPU accelerator's answer depends on the host CPU
    os.environ.update(RANK=str(rank), LOCAL_RANK='0', WORLD_SIZE=str(world))
    dist.init_process_group('fake', rank=rank, world_size=world, store=FakeStore())
    # the fake group moves no data, and an object collective would unpickle garbage: each rank keeps its own objects
    # (a fresh run's ranks hold the same ones) and hears its own from every rank
    objects = dist.broadcast_object_list, dist.all_gather_object
    dist.broadcast_object_list = lambda object_list, src=0, group=None, device=None, group_src=None: None
    dist.all_gather_object = lambda object_list, obj, group=None: object_list.__setitem__(slice(None),
                                                                                          [obj] * len(object_list))
    try:
        yield
    finally:
        dist.broadcast_object_list, dist.all_gather_object = objects
        dist.destroy_process_group()
        for k, v in saved.items():
            setattr(acc, k, v)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
