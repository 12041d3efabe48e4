"""
Every stage's data, in sections by who uses them:

- image decoding (every stage): load_rgb, read_rgb
- the index (every stage's files, lists and jsons): cached_index (built once under a lock, memory-mapped by every
  process), Packer / Strings (string columns), index_folder, index_list (also `python data.py index SOURCE ...`)
- sources (pretrain, finetune_cls, train_clip; plot, bench): ImageFiles (folder trees, path lists, roots merged),
  SyntheticShapes / SyntheticCaptions (the procedural demo data), CaptionFiles, image_source, caption_source,
  recall_at_k
- ImageNet label spaces (finetune_cls, train_clip): imagenet_classes, imagenet_subset, imagenet_real_labels, topk_hits
- masking (pretrain): MaskingGenerator, BEiT's block-wise masks
- the dataset wrapper and sampler (every stage): Samples (per-sample seeds, bad files skipped and counted),
  ResumableSampler (with LVIS's repeat factors), make_loader, train_batches
- image-text tar shards (train_clip): expand_shards, TarShards
- transforms (pretrain, finetune_cls, train_clip): mim_transform, MIMCrop, eval_transform, normalize_batch
- videos (finetune_video): VideoFiles, TSN sampling, crops, decord decoding, VideoClips, write_synthetic_videos,
  build_kinetics_lists (also `python data.py build_kinetics_lists ROOT OUT`)
- detection (det_seg task='det'): CocoDetection (COCO, LVIS, Objects365; polygons: coco_polygons, polygons_rle,
  crop_polygons, polygons_box), LargeScaleJitter, collate_detection,
  write_synthetic_scenes (also the segmentation demo's label PNGs); index_coco
- semantic segmentation (det_seg task='seg'): label_lut, index_pairs, SegFiles, SegAugment, photometric_distortion,
  seg_test_size

decord (videos), av (writing the synthetic videos), timm (ImageNet's class lists) and shapely (cutting polygons to
LSJ's crop) are imported where they are used: the stages that do not need them do not pay their import.

A source has `__len__`, `load(i) -> (PIL RGB image, label)` (raising on a bad file) and `name(i)`. `Samples`
turns a source into a torch Dataset whose i-th sample depends only on (seed, epoch, i): the same on every run,
with any number of workers, before and after a resume.
"""
import array
import bisect
import colorsys
import csv
import fcntl
import glob
import hashlib
import io
import itertools
import json
import math
import os
import pkgutil
import re
import shutil
import socket
import sys
import tarfile
import time
import warnings

import numpy as np
import torch
from faster_coco_eval.core import mask as mask_util
from PIL import Image, ImageDraw, ImageOps
from torchvision import transforms as T, tv_tensors
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from model import CLIP_MEAN, CLIP_STD  # OpenAI CLIP's normalisation: the MIM student sees what its CLIP teacher sees

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff', '.gif', '.ppm', '.pgm')


def load_rgb(path):
    """Any PIL-readable image as 8-bit RGB: grayscale, palette, RGBA, CMYK, 16-bit all convert; turned upright by its
    EXIF orientation (a phone's photo is stored sideways with a tag saying so; detectron2's read_image and mmcv's cv2
    reader apply it too)."""
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode in ('I;16', 'I;16B', 'I', 'F'):  # 16/32-bit grayscale: PIL's RGB conversion would clip
            a = np.asarray(im, dtype=np.float32)
            a = 255.0 * (a - a.min()) / max(float(a.max() - a.min()), 1e-6)
            im = Image.fromarray(a.astype(np.uint8))
        if im.mode == 'P' and 'transparency' in im.info:
            im = im.convert('RGBA')
        return im.convert('RGB')

# torchvision 0.29 marks its image decoders deprecated in favour of TorchCodec (another binary tied to torch's
# version); they are libjpeg-turbo / libpng straight to a tensor and work in the pinned version: keep, stay quiet
warnings.filterwarnings('ignore', message='The image decoding and encoding capabilities of TorchVision',
                        category=DeprecationWarning)


def pil_to_uint8(img):
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()


def read_rgb(path):
    """An image file as a uint8 RGB tensor (3, H, W), upright by its EXIF orientation. JPEG and PNG go straight from
    libjpeg-turbo / libpng into a tensor (torchvision.io: no PIL image in between, the same pixels as PIL's decoder);
    whatever torchvision does not take to 8-bit RGB (other formats, 16-bit PNG, odd JPEGs) goes through load_rgb."""
    if path.lower().endswith(('.jpg', '.jpeg', '.png')):
        try:
            x = decode_image(read_file(path), mode=ImageReadMode.RGB, apply_exif_orientation=True)
            if x.dtype == torch.uint8:
                return x
        except RuntimeError:
            pass  # PIL has the last word, and names the problem if the file is bad
    return pil_to_uint8(load_rgb(path))

# -----------------------------------------------------------------------------
# the index: a list-like source as a few flat arrays, built once and memory-mapped by every process of a node

INDEX_VERSION = 1  # part of every index's key: bumped when a builder's output changes, so an old index is rebuilt


def index_cache():
    """Where indexes are kept: $EVA_INDEX_DIR, else $XDG_CACHE_HOME/eva-index (~/.cache/eva-index). On a file system
    every node sees, one process builds each index and every node reads it; on a node-local disk, each node builds."""
    cache = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.environ.get('EVA_INDEX_DIR') or os.path.join(cache, 'eva-index')


def stamp(path, subfolders=False):
    """What says an input changed: its real path, size and modification time, and a file's content hash up to 64 MB
    (a rewrite within the file system's clock tick); with subfolders, also each first-level subfolder's time (a file
    added to or removed from root/<class>/ changes that folder's). Changes deeper in a tree, or inside a larger file
    with its size and time kept, are not seen: delete the index (the log names it) after such an edit."""
    st = os.stat(path)
    found = [os.path.realpath(path), st.st_size, st.st_mtime_ns]
    if os.path.isfile(path) and st.st_size <= 1 << 26:
        with open(path, 'rb') as f:
            found.append(hashlib.sha1(f.read()).hexdigest())
    if subfolders:
        found += sorted([e.name, e.stat().st_mtime_ns] for e in os.scandir(path) if e.is_dir())
    return found


class Packer:
    """A string column being built: one growing bytes buffer and its int64 end offsets (no Python object kept per
    string). add(str) -> its row; arrays(name) -> {name: uint8 bytes, name + '_at': (n + 1,) int64 offsets}."""

    def __init__(self, strings=()):
        self.data, self.at = bytearray(), array.array('q', [0])
        for s in strings:
            self.add(s)

    def add(self, s):
        self.data += os.fsencode(s)  # file names that are not UTF-8 go through as the file system gives them
        self.at.append(len(self.data))
        return len(self.at) - 2

    def arrays(self, name):
        return {name: np.frombuffer(self.data, np.uint8), name + '_at': np.frombuffer(self.at, np.int64)}


class Strings:
    """A string column of an index, read: s[i] decodes one slice of the shared bytes."""

    def __init__(self, index, name):
        self.data, self.at = index[name], index[name + '_at']

    def __len__(self):
        return len(self.at) - 1

    def __getitem__(self, i):
        return os.fsdecode(self.data[self.at[i]:self.at[i + 1]].tobytes())

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def cached_index(kind, key, build):
    """A source's index: {name: read-only array memory-mapped from the cache}. The folder's name hashes kind,
    INDEX_VERSION and key (the inputs' stamps and the build's settings): a changed input gets a new index. The first
    process to take the lock builds (build() -> {name: array}, written to a temporary folder that is renamed into
    place whole) while the others wait, then all map the same files: a node holds one copy in its page cache for all
    its ranks and DataLoader workers, and no Python object per sample whose reference count would turn the shared
    pages into private copies (PyTorch issue 13246). -> (index, 'index built|read in T s (folder)' for the log)."""
    start, cache = time.time(), index_cache()
    folder = os.path.join(cache, f"{kind}-{hashlib.sha1(json.dumps([INDEX_VERSION, kind, key]).encode()).hexdigest()}")
    try:
        os.makedirs(cache, exist_ok=True)
        lock = open(folder + '.lock', 'a')
    except OSError as e:
        raise OSError(f"cannot write the data index cache {cache} ({e}): set EVA_INDEX_DIR to a writable folder") from e
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:  # a file system without locks: several processes may build, each renames a whole index
            pass
        how = 'read'
        if not os.path.isdir(folder):
            how, tmp, arrays = 'built', f"{folder}.{socket.gethostname()}.{os.getpid()}", build()  # (a failed build
            os.makedirs(tmp, exist_ok=True)                                                     # leaves nothing)
            for name, a in arrays.items():
                np.save(os.path.join(tmp, name + '.npy'), a)
            try:
                os.rename(tmp, folder)
            except OSError:  # another node's build got there first: the same index
                shutil.rmtree(tmp, ignore_errors=True)
    index = {f[:-4]: np.load(os.path.join(folder, f), mmap_mode='r').view(np.ndarray)  # (a plain array slices 5x
             for f in os.listdir(folder) if f.endswith('.npy')}                            # faster than a memmap)
    return index, f"index {how} in {time.time() - start:.1f} s ({folder})"


def synthetic_tmp(folder, what):
    """The temporary folder a synthetic set is written into before its rename (folder.tmp<pid>), said once; those of
    runs that died writing (their process gone) are removed first."""
    for old in glob.glob(glob.escape(folder.rstrip('/')) + '.tmp*'):
        pid = old.rsplit('.tmp', 1)[1]
        if pid.isdigit() and not os.path.exists(f'/proc/{pid}'):
            shutil.rmtree(old, ignore_errors=True)
    say(f"writing {what} to {folder} (once)")
    return folder.rstrip('/') + f'.tmp{os.getpid()}'


def say(message):
    """A line on stdout from the first process only (the index's log: every rank reads the same)."""
    if int(os.environ.get('RANK', '0')) == 0:
        print(message, flush=True)


def index_folder(root, extensions):
    """A folder tree's files with these extensions (os.walk order, names sorted, symlinks followed): each file's
    directory (a row of 'dirs', relative to root) and name, and the first-level folder it is under (a row of
    'folders', sorted; -1: root itself)."""
    folders = sorted(d.name for d in os.scandir(root) if d.is_dir())
    top = {f: i for i, f in enumerate(folders)}
    dirs, files, dir_of, folder_of = Packer(), Packer(), array.array('i'), array.array('i')
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        d = dirs.add('' if rel == '.' else rel)
        names = [f for f in sorted(filenames) if f.lower().endswith(extensions)]
        for f in names:
            files.add(f)
        dir_of.extend([d] * len(names))
        folder_of.extend([top[rel.split(os.sep)[0]] if rel != '.' else -1] * len(names))
    return {**dirs.arrays('dirs'), **files.arrays('files'), **Packer(folders).arrays('folders'),
            'dir': np.frombuffer(dir_of, np.int32), 'label': np.frombuffer(folder_of, np.int32)}


def index_list(path):
    """A list file's lines, 'path' or 'path label' (the label an integer after the last whitespace: the path may hold
    spaces), blank lines skipped: each path's directory (a row of 'dirs') and name, and its label (-1: none)."""
    dirs, files, dir_of, labels, seen = Packer(), Packer(), array.array('i'), array.array('i'), {}
    with open(path, 'rb') as f:
        for line in f:
            parts = line.strip().rsplit(maxsplit=1)
            if not parts:
                continue
            label = -1
            if len(parts) == 2 and parts[1].lstrip(b'-').isdigit():
                label = int(parts[1])
            else:
                parts = [line.strip()]
            head, sep, name = parts[0].rpartition(b'/')
            head = head or sep  # '/x.jpg' is under '/'
            if head not in seen:
                seen[head] = dirs.add(head)
            files.add(name)
            dir_of.append(seen[head])
            labels.append(label)
    return {**dirs.arrays('dirs'), **files.arrays('files'), 'dir': np.frombuffer(dir_of, np.int32),
            'label': np.frombuffer(labels, np.int32)}

# -----------------------------------------------------------------------------
# sources


class ImageFiles:
    """Images from one or more roots, merged in the order given (the paper merges six datasets):
    a folder (searched at any depth for common extensions) or a .txt file of paths, one per line, optionally
    followed by an integer label; relative paths are relative to the list's folder. Roots may be a list or a
    string joined by ','. In a folder, the label is the index of the first-level subfolder (sorted), else -1.
    With `classes` (e.g. imagenet_classes()), a subfolder's label is its index in that list instead, so that a
    variant holding a subset of the classes (ImageNet-A, -R) keeps the labels of the full head; all-digit folder
    names are taken as the label itself (ImageNet-V2's '0' ... '999', which sort as strings otherwise).
    Each root is read through its cached index (index_folder, index_list): a folder is walked once, not at every
    start by every rank, and 30M paths take ~40 bytes each, shared by the node's processes."""

    EXTENSIONS, root = IMAGE_EXTENSIONS, ''  # root: what a list's relative paths are under ('': the list's folder)

    def __init__(self, roots, classes=None, tensors=False):
        self.tensors = tensors  # load() gives uint8 tensors (read_rgb) instead of PIL images
        roots = [r for r in (roots.split(',') if isinstance(roots, str) else roots) if r]
        if not roots:
            raise ValueError("no image root given")
        self.class_list = classes  # None: the sorted folder names of each root
        # per root: its path; (base, index, dirs, files, label lookup or None); its first sample's number
        self.roots, self.parts, self.starts = roots, [], [0]
        for root in roots:
            if os.path.isdir(root):
                index, how = cached_index('folder', [stamp(root, subfolders=True), self.EXTENSIONS],
                                          lambda: index_folder(root, self.EXTENSIONS))
                base, lookup = root, self._folder_labels(root, list(Strings(index, 'folders')))
            elif os.path.isfile(root):
                index, how = cached_index('list', [stamp(root)], lambda: index_list(root))
                base, lookup = self.root or os.path.dirname(os.path.abspath(root)), None
            else:
                raise FileNotFoundError(f"image root not found: {root}")
            if len(index['dir']) == 0:
                raise FileNotFoundError(f"no files ({', '.join(self.EXTENSIONS)}) under {root}")
            say(f"{root}: {len(index['dir']):,} files, {how}")
            self.parts.append((base, index, Strings(index, 'dirs'), Strings(index, 'files'), lookup))
            self.starts.append(self.starts[-1] + len(index['dir']))

    def _folder_labels(self, root, folders):
        """The label of each first-level folder (and -1 last, for the files in root itself: index -1)."""
        self.classes = folders
        if self.class_list is None:
            index = {c: i for i, c in enumerate(folders)}
        elif folders and all(f.isdigit() for f in folders):
            index = {f: int(f) for f in folders}
        else:
            index = {c: i for i, c in enumerate(self.class_list)}
        unknown = [f for f in folders if f not in index or index[f] >= len(self.class_list or folders)]
        if unknown:
            raise ValueError(f"{root}: class folders not in the class list: {', '.join(unknown[:5])}")
        present = set(folders)
        lacking = [c for c in self.class_list or () if c not in present]
        if lacking and not all(f.isdigit() for f in folders):  # a split missing classes: its labels kept, said
            say(f"{root}: no folder for {len(lacking)} of the {len(self.class_list)} classes: {', '.join(lacking[:5])}")
        return np.array([index[f] for f in folders] + [-1], dtype=np.int64)

    def __len__(self):
        return self.starts[-1]

    def _find(self, i):
        r = bisect.bisect_right(self.starts, i) - 1
        return self.parts[r], i - self.starts[r]

    def name(self, i):
        (base, index, dirs, files, _), j = self._find(i)
        return os.path.join(base, dirs[index['dir'][j]], files[j])

    def label(self, i):
        (_, index, _, _, lookup), j = self._find(i)
        return int(index['label'][j] if lookup is None else lookup[index['label'][j]])

    @property
    def labels(self):
        """(n,) int64 every file's label (a new array: 8 bytes per file)."""
        return np.concatenate([np.asarray(p[1]['label'], np.int64) if p[4] is None else p[4][p[1]['label']]
                               for p in self.parts])

    def load(self, i):
        path, label = self.name(i), self.label(i)
        return (read_rgb(path) if self.tensors else load_rgb(path)), label

    def check_labels(self, num_classes):
        """Every file's label in 0 ... num_classes - 1, checked before a run starts (one byte a file): else one
        ValueError naming the list file and line (or the folder), the label (none: a line without one, a file
        outside the class folders), the file, and how many such files there are."""
        for (base, index, _, _, lookup), root, start in zip(self.parts, self.roots, self.starts):
            labels = index['label'] if lookup is None else lookup
            bad = (labels < 0) | (labels >= num_classes)
            bad = bad if lookup is None else bad[index['label']]  # a folder's files by their folder's label
            if not bad.any():
                continue
            j = int(np.argmax(bad))
            where = root
            if lookup is None:  # the j-th non-blank line of the list
                with open(root, 'rb') as f:
                    lines = (n for n, line in enumerate(f, 1) if line.strip())
                    where = f"{root} line {next(itertools.islice(lines, j, None))}"
            label = self.label(start + j)
            what = f"label {label}" if label != -1 else 'no label' if lookup is None else 'no class folder'
            raise ValueError(f"{where}: {what} for {self.name(start + j)}, not one of the {num_classes} classes "
                             f"({int(bad.sum())} such files)")


class SyntheticShapes:
    """Procedural images, deterministic by (seed, index), made on the fly: one shape of 10 kinds on a textured
    background, with random colour, size and position, so the class is in the shape, not in the colours.
    `describe(i)` gives the label, a caption, the box and the shape's mask (for CLIP and detection stages);
    `render(i, shift)` draws the shape moved by `shift` pixels (for videos)."""

    SHAPES = ('circle', 'square', 'triangle', 'plus', 'ring', 'diamond', 'wide bar', 'tall bar', 'cross', 'two dots')
    TEXTURES = ('striped', 'checkered', 'noisy', 'gradient')
    COLOURS = ('red', 'orange', 'yellow', 'green', 'cyan', 'blue', 'purple', 'pink')

    def __init__(self, size, img_size=224, seed=0, num_classes=10, tensors=False):
        assert 2 <= num_classes <= len(self.SHAPES), f"num_classes must be 2..{len(self.SHAPES)}"
        self.size, self.img_size, self.seed, self.num_classes = size, img_size, seed, num_classes
        self.tensors = tensors  # load() gives uint8 tensors instead of PIL images

    def __len__(self):
        return self.size

    def name(self, i):
        return f"synthetic[{i}]"

    def _params(self, i):
        rng = np.random.default_rng([self.seed, i, 7])
        S = self.img_size
        label = int(rng.integers(self.num_classes))
        r = rng.uniform(0.18, 0.34) * S  # half-size of the shape
        return dict(label=label, r=r, cx=rng.uniform(r, S - r), cy=rng.uniform(r, S - r),
                    hue=rng.uniform(0, 1), value=rng.uniform(0.55, 1.0), texture=int(rng.integers(4)),
                    bg=rng.uniform(0, 1, (2, 3)), freq=rng.uniform(2, 6), angle=rng.uniform(0, np.pi),
                    noise_seed=int(rng.integers(2 ** 31)))

    def _background(self, p):
        S = self.img_size
        y, x = np.mgrid[0:S, 0:S] / S
        t = p['texture']
        if t == 0:    # stripes at a random angle
            w = (np.sin(2 * np.pi * p['freq'] * (x * np.cos(p['angle']) + y * np.sin(p['angle']))) > 0)
        elif t == 1:  # checkerboard
            w = ((np.floor(x * p['freq']) + np.floor(y * p['freq'])) % 2) > 0
        elif t == 2:  # blocky noise
            w = np.random.default_rng(p['noise_seed']).uniform(0, 1, (8, 8))
            w = np.kron(w, np.ones((S // 8 + 1, S // 8 + 1)))[:S, :S]
        else:         # smooth gradient
            w = x * np.cos(p['angle']) + y * np.sin(p['angle'])
            w = (w - w.min()) / max(w.max() - w.min(), 1e-6)
        w = w.astype(np.float32)[..., None]
        # a low-contrast texture in the middle of the range: a distractor that does not drown a 32 px shape
        bg = (p['bg'][0] * (1 - w) + p['bg'][1] * w) * 0.3 + 0.35
        return Image.fromarray((bg * 255).astype(np.uint8))

    def _draw(self, draw, p, cx, cy, fill):
        r, kind = p['r'], self.SHAPES[p['label']]
        if kind == 'circle':
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif kind == 'square':
            draw.rectangle([cx - 0.8 * r, cy - 0.8 * r, cx + 0.8 * r, cy + 0.8 * r], fill=fill)
        elif kind == 'triangle':
            draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)
        elif kind == 'plus':
            draw.rectangle([cx - r, cy - 0.3 * r, cx + r, cy + 0.3 * r], fill=fill)
            draw.rectangle([cx - 0.3 * r, cy - r, cx + 0.3 * r, cy + r], fill=fill)
        elif kind == 'ring':
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, int(0.35 * r)))
        elif kind == 'diamond':
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
        elif kind == 'wide bar':
            draw.rectangle([cx - r, cy - 0.3 * r, cx + r, cy + 0.3 * r], fill=fill)
        elif kind == 'tall bar':
            draw.rectangle([cx - 0.3 * r, cy - r, cx + 0.3 * r, cy + r], fill=fill)
        elif kind == 'cross':
            draw.line([cx - r, cy - r, cx + r, cy + r], fill=fill, width=max(2, int(0.45 * r)))
            draw.line([cx - r, cy + r, cx + r, cy - r], fill=fill, width=max(2, int(0.45 * r)))
        else:  # two dots
            d = 0.45 * r
            draw.ellipse([cx - r, cy - r, cx - r + 2 * d, cy - r + 2 * d], fill=fill)
            draw.ellipse([cx + r - 2 * d, cy + r - 2 * d, cx + r, cy + r], fill=fill)

    def render(self, i, shift=(0.0, 0.0)):
        """-> (RGB image, L mask of the shape) with the shape moved by shift (dx, dy) pixels."""
        p = self._params(i)
        im = self._background(p)
        mask = Image.new('L', im.size, 0)
        cx, cy = p['cx'] + shift[0], p['cy'] + shift[1]
        colour = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(p['hue'], 0.9, p['value']))
        self._draw(ImageDraw.Draw(im), p, cx, cy, colour)
        self._draw(ImageDraw.Draw(mask), p, cx, cy, 255)
        return im, mask

    def load(self, i):
        img = self.render(i)[0]
        return (pil_to_uint8(img) if self.tensors else img), self._params(i)['label']

    def caption(self, i):
        """'a {size} {colour} {shape} on a {texture} background', from the drawing parameters."""
        p = self._params(i)
        size = 'small' if p['r'] < 0.24 * self.img_size else 'large'
        colour = self.COLOURS[int(p['hue'] * len(self.COLOURS)) % len(self.COLOURS)]
        return f"a {size} {colour} {self.SHAPES[p['label']]} on a {self.TEXTURES[p['texture']]} background"

    def describe(self, i):
        p = self._params(i)
        _, mask = self.render(i)
        ys, xs = np.nonzero(np.asarray(mask))
        return dict(label=p['label'], caption=self.caption(i), mask=np.asarray(mask) > 0,
                    box=(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))


class SyntheticCaptions(SyntheticShapes):
    """SyntheticShapes as image-text pairs: load(i) -> (image, caption)."""

    def load(self, i):
        return self.render(i)[0], self.caption(i)


class CaptionFiles:
    """Image-text pairs from a CSV or TSV file with a header (open_clip's --csv-img-key / --csv-caption-key
    layout): load(i) -> (image, caption). Paths are relative to the file's folder unless absolute. A missing or
    unreadable image and an empty caption raise on load, so Samples skips and counts them. Read through a cached
    index (two string columns), as ImageFiles."""

    def __init__(self, path, img_key='filepath', caption_key='title', sep=''):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"caption file not found: {path}")
        sep = sep or ('\t' if path.endswith('.tsv') else ',')
        index, how = cached_index('captions', [stamp(path), img_key, caption_key, sep],
                                  lambda: index_captions(path, img_key, caption_key, sep))
        self.images, self.captions = Strings(index, 'images'), Strings(index, 'captions')
        if not len(self.images):
            raise ValueError(f"{path}: no rows")
        say(f"{path}: {len(self.images):,} pairs, {how}")
        self.path, self.base = path, os.path.dirname(os.path.abspath(path))

    def __len__(self):
        return len(self.images)

    def image(self, i):
        return os.path.join(self.base, self.images[i])

    def name(self, i):
        return f"{self.path} row {i + 2} ({self.image(i)})"

    def load(self, i):
        caption = self.captions[i]
        if not caption.strip():
            raise ValueError("empty caption")
        return load_rgb(self.image(i)), caption


def index_captions(path, img_key, caption_key, sep):
    """A CSV / TSV's image and caption columns as two string columns, 'images' and 'captions'."""
    images, captions = Packer(), Packer()
    with open(path, newline='', encoding='utf-8') as f:
        reader = csv.DictReader(f, delimiter=sep)
        missing = [k for k in (img_key, caption_key) if k not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: no column {', '.join(map(repr, missing))}; its columns are "
                             f"{reader.fieldnames} (set the image and caption column names)")
        for row in reader:
            images.add(row[img_key] or '')
            captions.add(row[caption_key] or '')
    return {**images.arrays('images'), **captions.arrays('captions')}


def image_source(path, img_size=224, synthetic_size=10_000, seed=0, classes=None, tensors=False):
    """'synthetic' (or 'synthetic:SEED') -> SyntheticShapes; anything else -> ImageFiles(path, classes). With
    tensors, images load as uint8 tensors (for the uint8 transforms) instead of PIL images."""
    if path.startswith('synthetic'):
        seed = int(path.split(':')[1]) if ':' in path else seed
        return SyntheticShapes(synthetic_size, img_size, seed=seed, tensors=tensors)
    return ImageFiles(path, classes, tensors)

def caption_source(path, img_size=224, synthetic_size=10_000, seed=0, img_key='filepath', caption_key='title',
                   sep=''):
    """Image-text pairs with random access: 'synthetic[:SEED]' -> SyntheticCaptions; a .csv / .tsv -> CaptionFiles.
    (Tar shards stream instead: TarShards.)"""
    if path.startswith('synthetic'):
        seed = int(path.split(':')[1]) if ':' in path else seed
        return SyntheticCaptions(synthetic_size, img_size, seed=seed)
    return CaptionFiles(path, img_key, caption_key, sep)


def recall_at_k(scores, positives, ks=(1, 5, 10)):
    """Retrieval recall: scores (Q, C) of every query against every candidate, positives (Q, C) bool. A query
    counts as found at k when any of its positives is among its k best candidates. -> {k: recall in %}"""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hit = positives.gather(1, top)
    return {k: 100.0 * hit[:, :k].any(1).float().mean().item() for k in ks}

# -----------------------------------------------------------------------------
# ImageNet label spaces: the class lists timm ships (timm/data/_info), never hand-typed copies


def imagenet_classes(name='imagenet-1k'):
    """WordNet ids in the order of released heads: 'imagenet-1k' (1000, sorted ids), 'imagenet-21k' (timm's
    21,843 Google synsets)."""
    from timm.data import ImageNetInfo
    return list(ImageNetInfo(name).label_names())


def _timm_info(filename):
    return pkgutil.get_data('timm.data', f'_info/{filename}').decode()


def imagenet_subset(name):
    """The 200 classes of ImageNet-A ('a') or ImageNet-R ('r') as indices into the 1000."""
    return [int(i) for i in _timm_info(f'imagenet_{name}_indices.txt').split()]


def imagenet_real_labels():
    """ImageNet-ReaL (Beyer et al. 2020): val file name -> list of correct 1000-class indices (empty for the
    3,163 images ReaL judged to have none; those are not scored)."""
    labels = json.loads(_timm_info('imagenet_real_labels.json'))
    return {f'ILSVRC2012_val_{i + 1:08d}.JPEG': lab for i, lab in enumerate(labels)}


def topk_hits(logits, targets, k=5, classes=None):
    """logits (B, C); targets (B, C) bool, every correct class marked (one for plain labels, several for ReaL or
    ObjectNet); classes: indices into C that predictions are restricted to (IN-A / IN-R's 200), or None.
    -> (top-1 hits, top-k hits, images scored): images with no correct class are not scored."""
    if classes is not None:
        keep = torch.full_like(logits, float('-inf'))
        keep[:, classes] = 0
        logits = logits + keep
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    hit = targets.gather(1, top)
    scored = targets.any(1)
    return int((hit[:, 0] & scored).sum()), int((hit.any(1) & scored).sum()), int(scored.sum())

# -----------------------------------------------------------------------------
# masking


class MaskingGenerator:
    """BEiT's block-wise masking (beit/masking_generator.py), as EVA uses it: rectangles of random area
    (>= min_num_patches) and log-uniform aspect are added until num_masking_patches are masked or no rectangle
    fits. Returns a bool array of shape input_size. Randomness from `rng` (a numpy Generator) when given."""

    def __init__(self, input_size, num_masking_patches, min_num_patches=16, max_num_patches=None,
                 min_aspect=0.3, max_aspect=None):
        self.height, self.width = (input_size, input_size) if isinstance(input_size, int) else input_size
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.rng = np.random.default_rng()

    def _mask(self, mask, max_mask_patches, rng):
        delta = 0
        for _ in range(10):  # BEiT tries 10 rectangles before giving up on this round
            # python's random.uniform as in BEiT: when fewer than min_num_patches are left to mask, the area is
            # drawn between the two (numpy's uniform refuses low > high)
            target_area = self.min_num_patches + (max_mask_patches - self.min_num_patches) * rng.random()
            aspect = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < self.width and h < self.height:
                top = int(rng.integers(0, self.height - h + 1))
                left = int(rng.integers(0, self.width - w + 1))
                block = mask[top:top + h, left:left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_mask_patches:  # never overshoot the target count
                    block[...] = True
                    delta += new
            if delta > 0:
                break
        return delta

    def __call__(self, rng=None):
        rng = self.rng if rng is None else rng
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < self.num_masking_patches:
            delta = self._mask(mask, min(self.num_masking_patches - count, self.max_num_patches), rng)
            if delta == 0:
                break
            count += delta
        return mask

# -----------------------------------------------------------------------------
# dataset wrapper and sampler


def sample_seeds(*key):
    """The seeds of one sample, from its key (seed, epoch, index): (torch's, for the transform; numpy's, for the
    mask)."""
    torch_seed, np_seed = np.random.SeedSequence(list(key)).generate_state(2, dtype=np.uint64)
    return int(torch_seed) & ((1 << 63) - 1), int(np_seed)


def seeded(fn, x, torch_seed):
    """fn(x) with torch's CPU generator seeded (torchvision draws from it), then restored. The CPU generator only:
    torch.manual_seed also queues a seed for every lazy accelerator module, with a stack trace each (a third of a
    millisecond per sample in a DataLoader worker)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(torch_seed)
        return fn(x)


class Samples(torch.utils.data.Dataset):
    """source + transform (+ mask generator) -> a sample as named fields: {'image': tensor, 'label': class index
    (-1: none), 'index': i, 'skipped': bad files passed over}, plus 'mask' (N,) bool with a mask generator; an
    image-text source gives 'text' (the caption after text_transform: token ids) instead of 'label'. The
    DataLoader batches each field; stages read the fields they need.
    Sample i of epoch e is drawn with its own seeds from (seed, e, i), so it is the same whatever the worker,
    the number of workers or a resume. An unreadable file is skipped: named in a warning, replaced by the next
    index, and counted in `skipped` (the training loop sums and reports it); the run goes on."""

    def __init__(self, source, transform, seed=0, mask_generator=None, max_skips=100, text_transform=None, joint=False):
        self.source, self.transform, self.seed, self.joint = source, transform, seed, joint
        self.mask_generator, self.max_skips = mask_generator, max_skips
        self.text_transform = text_transform  # caption -> token ids, for image-text sources
        self.epoch = 0  # set before each epoch's DataLoader is made: workers copy the dataset at that point

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        torch_seed, np_seed = sample_seeds(self.seed, self.epoch, i)
        for skipped in range(self.max_skips):
            j = (i + skipped) % len(self.source)
            try:
                img, label = self.source.load(j)
                if self.text_transform is not None:
                    label = self.text_transform(label)
                if self.joint:  # detection: the transform takes and gives (image, target)
                    x, label = seeded(self.transform, (img, label), torch_seed)
                else:
                    x = seeded(self.transform, img, torch_seed)  # in the try: an image a transform chokes on is skipped
                break
            except Exception as e:  # corrupt, truncated, unreadable: the run must not die on one file
                print(f"warning: skipping unreadable sample {self.source.name(j)}: {e}", file=sys.stderr)
        else:
            raise RuntimeError(f"{self.max_skips} unreadable images in a row from {self.source.name(i)} on")
        sample = {'image': x, 'text' if self.text_transform is not None else 'label': label, 'index': i,
                  'skipped': skipped}
        if self.mask_generator is not None:
            sample['mask'] = torch.from_numpy(self.mask_generator(np.random.default_rng(np_seed))).flatten()
        return sample


class ResumableSampler(torch.utils.data.Sampler):
    """DistributedSampler's split (a seeded permutation per epoch, padded by wrapping to a multiple of the
    world size, rank r takes every world-th index from r) that can start mid-epoch and stop early:
    set_epoch(epoch, start, stop) yields this rank's indices [start, stop) of that epoch. With pad=False (for
    evaluation) nothing is repeated: the ranks together see each sample exactly once, the last ranks one fewer.
    repeat_factors (n,): LVIS's repeat-factor sampling (detectron2's RepeatFactorTrainingSampler): each epoch sample i
    comes floor(r_i) times plus once more with probability frac(r_i), drawn from the epoch's seed; an epoch is
    round(sum r) samples (the draw cut or wrapped to it), so that epochs keep one length and a resume its place."""

    def __init__(self, n, num_replicas=1, rank=0, seed=0, shuffle=True, pad=True, repeat_factors=None):
        self.n, self.num_replicas, self.rank, self.seed, self.shuffle = n, num_replicas, rank, seed, shuffle
        self.pad, self.repeat_factors = pad, repeat_factors
        if repeat_factors is not None:
            self.n = round(float(repeat_factors.sum()))
        self.per_rank = math.ceil(self.n / num_replicas) if pad else len(range(rank, self.n, num_replicas))
        self.set_epoch(0)

    def set_epoch(self, epoch, start=0, stop=None):
        self.epoch, self.start = epoch, start
        self.stop = self.per_rank if stop is None else min(stop, self.per_rank)

    def indices(self):
        """This rank's indices of the epoch, [start, stop), as a tensor: the epoch's order stays one int64 tensor
        (240 MB at 30M images, where a list of Python ints would be ~1 GB) and is sliced before anything is a
        Python int."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.repeat_factors is not None:
            r = self.repeat_factors
            reps = r.floor().long() + (torch.rand(len(r), generator=g) < r - r.floor()).long()
            drawn = torch.repeat_interleave(torch.arange(len(r)), reps)
            drawn = drawn[torch.randperm(len(drawn), generator=g)]
            order = drawn.repeat(self.n // max(len(drawn), 1) + 1)[:self.n]
        elif self.shuffle:
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        if self.pad:  # pad by wrapping, as DistributedSampler
            order = torch.cat([order, order[:self.per_rank * self.num_replicas - self.n]])
        return order[self.rank::self.num_replicas][self.start:self.stop]

    def __iter__(self):
        for chunk in self.indices().split(1 << 16):  # Python ints a chunk at a time
            yield from chunk.tolist()

    def __len__(self):
        return max(self.stop - self.start, 0)

def make_loader(dataset, sampler, batch_size, num_workers=0, pin_memory=False, timeout=0, collate_fn=None):
    """A DataLoader with a generator of its own: a DataLoader otherwise draws its workers' base seed from the
    global RNG, which would shift the model's random draws (drop path, mixup) after a resume. The samples are
    seeded per index (Samples) and need no worker seeds. timeout: seconds a worker may take for a batch before the
    loader raises (a video reader stuck in native code, decord #373, would hang the run instead)."""
    return torch.utils.data.DataLoader(dataset, batch_size, sampler=sampler, num_workers=num_workers,
                                       pin_memory=pin_memory, prefetch_factor=4 if num_workers else None,
                                       generator=torch.Generator(), timeout=timeout if num_workers else 0,
                                       collate_fn=collate_fn)


def train_batches(dataset, sampler, micro_batch, grad_accum, steps_per_epoch, step, num_workers=0, pin_memory=False,
                  timeout=0, collate_fn=None):
    """Training micro-batches from the data position of optimizer step `step` on, forever. Each epoch has its own
    seeded order: the dataset's and the sampler's epoch are set before that epoch's loader is made (workers copy
    the dataset then), and an epoch ends after exactly steps_per_epoch steps on every rank."""
    per_step = micro_batch * grad_accum
    while True:
        epoch, within = divmod(step, steps_per_epoch)
        dataset.epoch = epoch
        sampler.set_epoch(epoch, start=within * per_step, stop=steps_per_epoch * per_step)
        yield from make_loader(dataset, sampler, micro_batch, num_workers, pin_memory, timeout, collate_fn)
        step = (epoch + 1) * steps_per_epoch

# -----------------------------------------------------------------------------
# image-text tar shards (webdataset layout, as img2dataset writes them), streamed


def expand_shards(spec):
    """Shard files from a spec: a folder (its .tar files), brace ranges as img2dataset names them
    ('laion/{00000..41407}.tar', zero padding kept), globs; several specs joined with ','. Sorted, checked."""
    files = []
    for part in filter(None, spec.split(',')):
        if os.path.isdir(part):
            found = sorted(os.path.join(part, f) for f in os.listdir(part) if f.endswith('.tar'))
        else:
            names = [part]
            while any(re.search(r'\{(\d+)\.\.(\d+)\}', n) for n in names):
                expanded = []
                for n in names:
                    m = re.search(r'\{(\d+)\.\.(\d+)\}', n)
                    if not m:
                        expanded.append(n)
                        continue
                    a, b, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
                    expanded += [n[:m.start()] + str(k).zfill(width) + n[m.end():] for k in range(a, b + 1)]
                names = expanded
            found = [f for n in names for f in (sorted(glob.glob(n)) if glob.has_magic(n) else [n])]
        missing = [f for f in found if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} shard(s) of {part!r} not found, e.g. {missing[0]}")
        if not found:
            raise FileNotFoundError(f"no .tar shards in {part!r}")
        files += found
    return files


class TarShards(torch.utils.data.IterableDataset):
    """Image-text pairs streamed from tar shards in img2dataset's webdataset layout ('KEY.jpg' (.jpeg/.png/.webp)
    beside 'KEY.txt'; other members ignored), for LAION-scale data: nothing is indexed, there is no length.
    Pass p reads the shards in a permutation seeded by (seed, start_step, p), whole shards per (rank, DataLoader
    worker), or, with fewer shards than those, every sample-th share of all; the stream never ends unless
    `passes` > 0. Raw bytes go through a shuffle buffer and are decoded after it (webdataset's order), each sample
    with its own seed. Samples without image or caption, undecodable images, empty captions and broken shards are
    skipped, named on stderr and counted in the next sample's `skipped`. Yields {'image', 'text' (token ids),
    'index' (sample number), 'skipped'} like Samples. A resume sets `start_step`: a new order, not the old one's
    continuation (as open_clip's resampled webdataset)."""

    IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp')

    def __init__(self, spec, transform, text_transform, seed=0, rank=0, world=1, shuffle_buffer=1000, passes=0):
        self.shards = expand_shards(spec)
        self.transform, self.text_transform = transform, text_transform
        self.seed, self.rank, self.world = seed, rank, world
        self.shuffle_buffer, self.passes, self.start_step = max(shuffle_buffer, 1), passes, 0

    def _read(self, shard):
        """-> (key, {extension: bytes}) per sample in a shard; (last key, the exception) where the shard breaks."""
        key, files = None, {}
        try:
            with tarfile.open(shard, 'r|*') as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    base = os.path.basename(member.name)
                    k, _, ext = base.partition('.')
                    k = os.path.join(os.path.dirname(member.name), k)
                    if k != key:
                        if key is not None:
                            yield key, files
                        key, files = k, {}
                    files[ext.lower()] = tar.extractfile(member).read()
        except Exception as e:  # truncated or corrupt archive: keep what was read, go on with the next shard
            yield key, e
            return
        if key is not None:
            yield key, files

    def _raw(self, unit, units):
        """This unit's raw samples, (name, image bytes, caption bytes, first pass?), or (name, None, why, first
        pass?) for a bad one. Each sample comes once per pass, in some unit: bad ones are reported in the first."""
        p = 0
        while not self.passes or p < self.passes:
            order = np.random.default_rng([self.seed, self.start_step, p]).permutation(len(self.shards))
            split_shards = len(self.shards) >= units
            mine = order[unit::units] if split_shards else order
            count = 0
            for s in mine:
                for j, (key, files) in enumerate(self._read(self.shards[s])):
                    if not split_shards and j % units != unit:
                        continue
                    name = f"{self.shards[s]}:{key}"
                    if isinstance(files, Exception):
                        yield name, None, f"the shard breaks after this sample: {files}", p == 0
                        continue
                    image = next((files[e] for e in self.IMAGE_EXTS if e in files), None)
                    if image is None or 'txt' not in files:
                        yield name, None, (f"no {'image' if image is None else 'caption'} "
                                           f"(members: {', '.join(sorted(files))})"), p == 0
                        continue
                    count += 1
                    yield name, image, files['txt'], p == 0
            if count == 0:
                raise RuntimeError(f"a whole pass over {len(mine)} shard(s), e.g. {self.shards[mine[0]]}, gave no "
                                   f"usable sample to rank {self.rank}")
            p += 1

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        unit, units = self.rank * nw + wid, self.world * nw
        rng = np.random.default_rng([self.seed, self.start_step, unit, 1])

        def shuffled():  # webdataset's buffer: full, each new sample swaps out a random one; the rest at the end
            buffer = []
            for item in self._raw(unit, units):
                if item[1] is not None and len(buffer) < self.shuffle_buffer:
                    buffer.append(item)
                    continue
                if item[1] is not None:  # (a bad sample passes straight through, to be counted)
                    i = int(rng.integers(len(buffer)))
                    item, buffer[i] = buffer[i], item
                yield item
            rng.shuffle(buffer)  # only reached with passes > 0
            yield from buffer

        n, skipped = 0, 0
        for name, image, caption, first in shuffled():
            try:
                if image is None:
                    raise ValueError(caption)
                text = caption.decode('utf-8').strip()
                if not text:
                    raise ValueError("empty caption")
                img = load_rgb(io.BytesIO(image))
                x = seeded(self.transform, img, sample_seeds(self.seed, self.start_step, unit, n)[0])
            except Exception as e:
                if first:  # a bad sample comes round again with every pass: said and counted once
                    print(f"warning: skipping {name}: {e}", file=sys.stderr)
                    skipped += 1
                continue
            yield {'image': x, 'text': self.text_transform(text), 'index': n, 'skipped': skipped}
            n, skipped = n + 1, 0

# -----------------------------------------------------------------------------
# transforms


def mim_transform(img_size=224, scale=(0.2, 1.0), mean=CLIP_MEAN, std=CLIP_STD, uint8=False):
    """EVA-01 pretraining: RandomResizedCrop (bicubic) + flip, no colour jitter; CLIP normalisation.
    uint8=True: for uint8 tensors (read_rgb) and returning uint8, normalised later on the GPU (normalize_batch):
    the same crop and flip draws from the same seed, torch's antialiased bicubic (PIL's filter, AVX2 on uint8;
    pixels within 2 levels of PIL's), no per-image float conversion on the CPU, a 4x smaller batch to ship."""
    if uint8:
        return MIMCrop(img_size, scale)
    return T.Compose([
        T.RandomResizedCrop(img_size, scale=scale, ratio=(3 / 4, 4 / 3), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


class MIMCrop:
    """RandomResizedCrop (bicubic) + horizontal flip of a uint8 tensor, returning uint8 (3, S, S): torchvision's crop
    and flip draws, in the same order from the same generator, so a seed gives the crop and flip of the PIL
    pipeline; the resize is torch's antialiased bicubic (PIL's filter, with an AVX2 uint8 kernel). (Decoding JPEGs
    at 1/2 scale for large crops was tried: on photo-like files the Huffman decoding dominates, the gain was ~5% and
    the pixels moved by a level on average, so it is not used.)"""

    def __init__(self, size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = size, scale, ratio

    def __call__(self, img):
        # get_params reads only the shape: an uninitialised 1-channel stand-in of the image's size
        top, left, h, w = T.RandomResizedCrop.get_params(
            torch.empty((1, *img.shape[-2:]), dtype=torch.uint8), self.scale, self.ratio)
        x = TF.resized_crop(img, top, left, h, w, [self.size, self.size], interpolation=T.InterpolationMode.BICUBIC,
                            antialias=True)
        return x.flip(-1) if torch.rand(1) < 0.5 else x


def eval_transform(img_size=224, crop_pct=1.0, mean=CLIP_MEAN, std=CLIP_STD):
    """Shorter side to img_size / crop_pct (bicubic), then a center crop of img_size."""
    return T.Compose([
        T.Resize(int(math.floor(img_size / crop_pct)), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(img_size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def normalize_batch(x, mean=CLIP_MEAN, std=CLIP_STD):
    """A uint8 batch (B, 3, ...) -> float32 normalised, on x's device: ToTensor + Normalize in one pass,
    (x - 255 mean) / (255 std). A float batch (already normalised) is returned as it is."""
    if x.dtype != torch.uint8:
        return x
    shape = (1, 3) + (1,) * (x.ndim - 2)  # images (B, 3, H, W), clips (B, 3, T, H, W)
    m = torch.tensor(mean, device=x.device).view(shape) * 255
    s = torch.tensor(std, device=x.device).view(shape) * 255
    return (x.float() - m) / s

# -----------------------------------------------------------------------------
# videos (EVA-01 video, an mmaction pipeline): Kinetics lists, decord decoding, TSN sampling, the augmentation

VIDEO_EXTENSIONS = ('.mp4', '.avi', '.mkv', '.webm', '.mov', '.m4v', '.flv', '.mpg', '.mpeg')


class VideoFiles(ImageFiles):
    """Videos from Kinetics list files ('k400/train/<class>/<id>.mp4 label' per line: the label last, the path may
    hold spaces, relative to `root` or else to the list's folder) or class folders, several merged (',' joined).
    load(i) -> (path, label): the seeded transform (VideoClips) chooses the frames and decodes them, in the worker."""
    EXTENSIONS = VIDEO_EXTENSIONS

    def __init__(self, roots, root=''):
        self.root = root
        super().__init__(roots)

    def load(self, i):
        return self.name(i), self.label(i)


def tsn_indices(n, num_frames, train=True, clip=0, clips=1):
    """One clip's frame indices, mmaction's SampleFrames(clip_len=1, num_clips=num_frames) as EVA-01 video samples:
    the n frames cut into num_frames equal segments. train: one random frame per segment (torch's generator) or, in a
    video shorter than the clip, round(k n / T) half to even (frames repeat). Else the segments' centres,
    int((k + 1/2) n / T) (its test mode); with clips > 1, clip `clip` at offset (clip + 1/2) / clips of each segment.
    -> (T,) int64, mod n."""
    if n < 1:
        raise ValueError("the video has no frames")
    k = np.arange(num_frames)
    if train:
        seg = n // num_frames
        idx = k * seg + torch.randint(seg, (num_frames,)).numpy() if seg > 0 else np.around(k * (n / num_frames))
    else:
        seg = n / num_frames
        idx = k * seg + seg * (clip + 0.5) / clips
    return torch.from_numpy(idx.astype(np.int64) % n)


def multiscale_crop_box(h, w, size, scales=(1, .875, .75, .66)):
    """mmaction's MultiScaleCrop(size, scales, max_wh_scale_gap=1, random_crop=False, num_fixed_crops=5), EVA-01 video's
    training crop: sides int(min(h, w) x scale); a (w, h) pair of scale levels at most one apart, one of the 10 drawn
    uniformly; a side within 3 px of `size` snapped to it; one of 5 fixed places (4 corners, the centre) on a grid of
    steps (w - crop_w) // 4, (h - crop_h) // 4. Drawn from torch's generator -> (top, left, crop_h, crop_w)."""
    sides = [int(min(h, w) * s) for s in scales]
    pairs = [(sides[j], sides[i]) for i in range(len(sides)) for j in range(len(sides)) if abs(i - j) <= 1]
    cw, ch = (size if abs(s - size) < 3 else s for s in pairs[int(torch.randint(len(pairs), ()))])
    ws, hs = (w - cw) // 4, (h - ch) // 4
    left, top = [(0, 0), (4 * ws, 0), (0, 4 * hs), (4 * ws, 4 * hs), (2 * ws, 2 * hs)][int(torch.randint(5, ()))]
    return top, left, ch, cw


def three_crop_offsets(h, w, size):
    """mmaction's ThreeCrop (EVA-01 video's 3-crop test) of frames whose short side is `size`: squares at 0,
    (long - size) // 2 and twice that along the long side -> [(top, left)] x 3."""
    if h == size:
        return [(0, 0), (0, (w - size) // 2), (0, 2 * ((w - size) // 2))]
    return [(0, 0), ((h - size) // 2, 0), (2 * ((h - size) // 2), 0)]


def resize_short(frames, short):
    """(K, 3, H, W) uint8 -> the short side `short`: bilinear without antialiasing (mmcv's cv2 INTER_LINEAR), the
    sizes rounded half up (mmcv.rescale_size)."""
    h, w = frames.shape[-2:]
    s = short / min(h, w)
    return TF.resize(frames, [int(h * s + 0.5), int(w * s + 0.5)], T.InterpolationMode.BILINEAR, antialias=False)


def open_video(path):
    """A decord reader with one thread, made where it is used: in the DataLoader worker, one per sample as the official
    code (a reader made before the workers fork breaks, decord #294; one thread is the faster, #63)."""
    import decord
    decord.logging.set_level(decord.logging.QUIET)  # not ffmpeg's lines per bad file: our warning names it (decord's
    return decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)  # own one-line C++ log cannot be silenced)


def read_frames(video, indices):
    """Frames of a video (a path or an open_video reader): the unique indices decoded once, in order, then gathered
    (decord #195). -> (len(indices), 3, H, W) uint8."""
    vr = open_video(video) if isinstance(video, str) else video
    unique, inverse = indices.unique(sorted=True, return_inverse=True)
    return torch.from_numpy(vr.get_batch(unique.tolist()).asnumpy())[inverse].permute(0, 3, 1, 2)


class VideoClips:
    """A video path -> uint8 clips, EVA-01 video's pipelines (Samples seeds torch's generator per sample: every draw
    is reproducible). train: TSN frames, short side to size x 256/224, MultiScaleCrop, resize to size (bilinear), flip,
    colour jitter (p 0.8; brightness .4, contrast .4, saturation .2, hue .1, drawn anew for every frame as the
    official) and grayscale (p 0.2) -> (3, T, size, size); multiscale=False: the centre crop below instead. eval,
    crops=1: the segments' centres, short side to size x 256/224, centre crop -> (1, 3, T, size, size); crops=3: short
    side to size, 3 crops along the long side x `clips` clips (TSN training draws, as EVA-01's 4-clip test;
    random_clips=False: evenly offset clips), crop-major -> (3 x clips, 3, T, size, size)."""

    def __init__(self, num_frames, size=224, train=True, clips=1, crops=1, random_clips=True, color_jitter=0.8,
                 grayscale=0.2, multiscale=True):
        assert crops in (1, 3), "crops: 1 (centre) or 3 (along the long side)"
        self.num_frames, self.size, self.train, self.clips, self.crops = num_frames, size, train, clips, crops
        self.random_clips, self.color_jitter, self.grayscale = random_clips, color_jitter, grayscale
        self.multiscale = multiscale  # False: training crops the centre, as a single-view evaluation does
        self.jitter = T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)

    def __call__(self, path):
        vr = open_video(path)
        n, S, clips = len(vr), self.size, self.clips
        if self.train or (clips > 1 and self.random_clips):
            idx = [tsn_indices(n, self.num_frames) for _ in range(1 if self.train else clips)]
        else:
            idx = [tsn_indices(n, self.num_frames, train=False, clip=c, clips=clips) for c in range(clips)]
        x = read_frames(vr, torch.cat(idx))  # (clips x T, 3, H, W)
        if self.train:
            x = resize_short(x, int(256 / 224 * S))
            H, W = x.shape[-2:]
            top, left, h, w = multiscale_crop_box(H, W, S) if self.multiscale else ((H - S) // 2, (W - S) // 2, S, S)
            x = TF.resize(x[..., top:top + h, left:left + w], [S, S], T.InterpolationMode.BILINEAR, antialias=False)
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
            if torch.rand(()) < self.color_jitter:  # on PIL images, as the official: 8x faster than on tensors
                x = torch.stack([pil_to_uint8(self.jitter(TF.to_pil_image(frame))) for frame in x])
            if torch.rand(()) < self.grayscale:
                x = TF.rgb_to_grayscale(x, num_output_channels=3)
            return x.transpose(0, 1)
        x = resize_short(x, S if self.crops == 3 else int(256 / 224 * S))
        H, W = x.shape[-2:]
        places = three_crop_offsets(H, W, S) if self.crops == 3 else [((H - S) // 2, (W - S) // 2)]
        x = x.unflatten(0, (clips, self.num_frames))
        return torch.stack([x[c, :, :, t:t + S, l:l + S] for t, l in places for c in range(clips)]).transpose(1, 2)


def write_synthetic_videos(folder, train_size=1024, val_size=256, num_classes=8, frames=(6, 32), size=(56, 40),
                           seed=0):
    """The synthetic video set, written once as H.264 mp4 files (PyAV) under folder/{train,val}/<class>/ with
    Kinetics-style lists (train.txt, val.txt: 'train/cyan moving up/00012.mp4 3') and classes.txt: one of the
    SyntheticShapes shapes in one of num_classes / 2 colours moving up or down at a constant speed over a plain
    background; class = colour x direction, so that one frame tells the colour but not where the shape goes (a model
    blind to motion tops out at 50%). 6-32 frames a video (some fewer than a clip has), (w, h) = size. Skipped when
    folder/meta.json says it holds this set. -> folder."""
    import av
    meta = dict(train_size=train_size, val_size=val_size, num_classes=num_classes, frames=list(frames),
                size=list(size), seed=seed)
    if os.path.exists(os.path.join(folder, 'meta.json')) and json.load(open(os.path.join(folder, 'meta.json'))) == meta:
        return folder
    if num_classes % 2 or not 2 <= num_classes <= 24:
        raise ValueError(f"the synthetic videos have 2 x 1..12 colours: num_classes {num_classes} is not one of them")
    wheel = ('red', 'orange', 'yellow', 'chartreuse', 'green', 'spring green', 'cyan', 'azure', 'blue', 'violet',
             'magenta', 'rose')  # hues 0, 1/12, ...: num_classes / 2 of them evenly spaced, as far apart as can be
    hues = num_classes // 2
    colours = [(wheel[round(12 * k / hues) % 12], k / hues) for k in range(hues)]
    classes = sorted(f"{c} moving {d}" for c, _ in colours for d in ('up', 'down'))
    W, H = size
    shapes, tmp = SyntheticShapes(1, img_size=W), synthetic_tmp(folder, "synthetic videos (~20 s per 1,000 on 2 cores)")
    for split, n in (('train', train_size), ('val', val_size)):
        shapes.seed, lines = seed + (split == 'val'), []
        for i in range(n):
            p, rng = shapes._params(i), np.random.default_rng([seed, split == 'val', i, 11])
            colour, hue = colours[int(rng.integers(len(colours)))]
            p['r'] = rng.uniform(0.2, 0.25) * H  # smaller than an image's shape: it moves within the frame
            down, length, travel = bool(rng.integers(2)), int(rng.integers(frames[0], frames[1] + 1)), 0.5 * H
            pan = int(travel)  # scene rows the view slides over; the shape stays in view all along
            cx, cy = rng.uniform(p['r'], W - p['r']), rng.uniform(pan + p['r'], H - p['r'])
            name = f"{colour} moving {'down' if down else 'up'}"
            path = os.path.join(split, name, f'{i:05d}.mp4')
            os.makedirs(os.path.join(tmp, split, name), exist_ok=True)
            # the camera pans: a blocky-noise scene (not periodic: no aliasing between sampled frames) and the shape
            # on it move together, so every patch of a frame moves, not only the shape's
            scene = np.kron(rng.uniform(0.3, 0.6, (H // 5 + pan // 5 + 2, W // 5 + 1)), np.ones((5, 5)))
            scene = Image.fromarray((np.repeat(scene[..., None], 3, 2)[:H + pan, :W] * 255).astype(np.uint8))
            rgb = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.9, rng.uniform(0.7, 1.0)))
            shapes._draw(ImageDraw.Draw(scene), p, cx, cy, rgb)
            with av.open(os.path.join(tmp, path), 'w') as out:
                stream = out.add_stream('libx264', rate=12, options={'crf': '18', 'preset': 'veryfast'})
                stream.width, stream.height, stream.pix_fmt = W, H, 'yuv420p'
                for t in range(length):
                    top = round(pan * t / max(length - 1, 1))  # the view slides down: the scene moves up
                    top = pan - top if down else top
                    im = scene.crop((0, top, W, top + H))
                    out.mux(stream.encode(av.VideoFrame.from_ndarray(np.asarray(im), format='rgb24')))
                out.mux(stream.encode())
            lines.append(f"{path} {classes.index(name)}\n")
        with open(os.path.join(tmp, f'{split}.txt'), 'w') as f:
            f.writelines(lines)
    with open(os.path.join(tmp, 'classes.txt'), 'w') as f:
        f.writelines(c + '\n' for c in classes)
    json.dump(meta, open(os.path.join(tmp, 'meta.json'), 'w'))
    if os.path.exists(folder):
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


# K400 / K600 class names that later releases renamed; EVA-01's 722 classes use the newer names (its label CSVs: the
# union of the three sets' names is 725 without these, 722 with them)
KINETICS_ALIASES = {'changing wheel': 'changing wheel (not on bike)',
                    'cooking sausages': 'cooking sausages (not on barbeque)',
                    'passing american football (not in game)': 'passing American football (not in game)'}


def build_kinetics_lists(root, out, check=False):
    """EVA-01's Kinetics-722 lists (its notebook build_file_list.ipynb) from root/k{400,600,700}/{train,val}/<class>/
    <video>, the YouTube id being a file name's first 11 characters. Each set's classes are its sorted val folder names
    (aliased), K722's the sorted union. K722 train: the three train sets in the order K400, K600, K700, deduplicated by
    id (K400's copy kept), then every id of any val set removed; K722 val: the val sets deduplicated. K600 / K700 train:
    deduplicated, their own val ids removed; K400 train only deduplicated (the notebook's quirk, kept). check: open
    every video with decord, the failures listed in out/<list>_error.txt instead. Writes out/k{722,400,600,700}_
    {train,val}.txt ('k600/train/<class folder>/<file> label', the label in the set's class order), kXXX_classes.txt
    and k722_to_kXXX_mapping.npy (the K722 index of each class). -> {list name: videos}"""
    sets, rows = ('k400', 'k600', 'k700'), {}
    for s in sets:
        for split in ('train', 'val'):
            d = os.path.join(root, s, split)
            if not os.path.isdir(d):
                raise FileNotFoundError(f"{d} not found: the lists are built from ROOT/k400|k600|k700/train|val/"
                                        f"<class>/<video>")
            rows[s, split] = []  # (path under root, class name, YouTube id)
            for c in sorted(c for c in os.listdir(d) if os.path.isdir(os.path.join(d, c))):
                videos = [f for f in sorted(os.listdir(os.path.join(d, c)))
                          if len(f) >= 2 and not f.startswith('.') and not f.endswith('tar.gz')]  # the notebook's
                rows[s, split] += [(f"{s}/{split}/{c}/{f}", KINETICS_ALIASES.get(c, c), f[:11]) for f in videos]
    classes = {s: sorted({c for _, c, _ in rows[s, 'val']}) for s in sets}
    for s in sets:
        extra = {c for _, c, _ in rows[s, 'train']} - set(classes[s])
        if extra:
            raise ValueError(f"{root}/{s}/train has classes its val set lacks: {', '.join(sorted(extra)[:5])}")
    classes['k722'] = sorted(set().union(*(classes[s] for s in sets)))

    def dedup(items, drop=()):  # the first row of each YouTube id, none of those in drop
        seen, kept = set(drop), []
        for r in items:
            if r[2] not in seen:
                seen.add(r[2])
                kept.append(r)
        return kept
    val_ids = {s: {r[2] for r in rows[s, 'val']} for s in sets}
    lists = {'k722_train': dedup([r for s in sets for r in rows[s, 'train']], set().union(*val_ids.values())),
             'k722_val': dedup([r for s in sets for r in rows[s, 'val']])}
    for s in sets:
        lists[f'{s}_train'] = dedup(rows[s, 'train'], val_ids[s] if s != 'k400' else ())
        lists[f'{s}_val'] = dedup(rows[s, 'val'])
    os.makedirs(out, exist_ok=True)
    counts = {}
    for name, items in lists.items():
        s, bad = name.split('_')[0], {}
        if check:  # an open-only check, as the notebook's: it misses a frame count that is too high (decord #373)
            for path, _, _ in items:
                try:
                    open_video(os.path.join(root, path))
                except Exception as e:
                    bad[path] = str(e).replace('\n', ' ')
            if bad:
                with open(os.path.join(out, f'{name}_error.txt'), 'w') as f:
                    f.writelines(f"{p}\t{e}\n" for p, e in bad.items())
        index = {c: i for i, c in enumerate(classes[s])}
        with open(os.path.join(out, f'{name}.txt'), 'w') as f:
            f.writelines(f"{p} {index[c]}\n" for p, c, _ in items if p not in bad)
        counts[name] = len(items) - len(bad)
    for s in ('k722',) + sets:
        with open(os.path.join(out, f'{s}_classes.txt'), 'w') as f:
            f.writelines(c + '\n' for c in classes[s])
        if s != 'k722':
            rows = np.array([classes['k722'].index(c) for c in classes[s]])  # each class's K722 index
            np.save(os.path.join(out, f'k722_to_{s}_mapping.npy'), rows)
    return counts

# -----------------------------------------------------------------------------
# detection (EVA-01 det, a detectron2 pipeline): COCO-format instances, large-scale jitter, synthetic scenes


def coco_rle(segm, h, w):
    """A COCO segmentation (polygons, uncompressed or compressed RLE) -> one compressed RLE (faster-coco-eval's mask
    API, pycocotools's); a polygon of fewer than 3 points, or nothing left, is an error."""
    if isinstance(segm, list):
        return polygons_rle(coco_polygons(segm), h, w)
    if isinstance(segm, dict) and isinstance(segm.get('counts'), list):
        return mask_util.frPyObjects(segm, h, w)
    if isinstance(segm, dict) and 'counts' in segm:
        return segm
    raise ValueError(f"segmentation is neither polygons nor RLE: {str(segm)[:60]}")


def coco_polygons(segm):
    """A COCO polygon segmentation -> its polygons as (k, 2) float64 (x, y) arrays, those of an odd length or of fewer
    than 3 points left out, as detectron2's load_coco_json; none left is an error."""
    polys = [np.asarray(p, np.float64).reshape(-1, 2) for p in segm if len(p) % 2 == 0 and len(p) >= 6]
    if not polys:
        raise ValueError("no polygon of 3 points or more")
    return polys


def polygons_rle(polygons, h, w):
    """(k, 2) polygons -> the RLE of their union rasterised on an h x w grid (COCO's rasteriser, pycocotools's)."""
    return mask_util.merge(mask_util.frPyObjects([p.ravel().tolist() for p in polygons], h, w))


def crop_polygons(polygons, left, top, size):
    """An instance's polygons cut to the window (left, top, left + size, top + size) and shifted to its corner, as
    detectron2's LSJ crop (fvcore's CropTransform.apply_polygons): each polygon repaired by shapely's buffer(0), its
    intersection with the window split into its pieces (a concave polygon can leave several), lines and points
    dropped, each piece's exterior ring without the closing vertex. shapely is imported here, its only user."""
    import shapely.geometry as geometry
    window = geometry.box(left, top, left + size, top + size).buffer(0.0)
    out = []
    for p in polygons:
        cut = geometry.Polygon(p).buffer(0.0).intersection(window)
        for piece in getattr(cut, 'geoms', [cut]):
            if isinstance(piece, geometry.Polygon) and not piece.is_empty and piece.is_valid:
                out.append(np.asarray(piece.exterior.coords)[:-1] - (left, top))
    return out


def polygons_box(polygons):
    """x1y1x2y2 (4,) float32 around an instance's polygons, (inf, inf, 0, 0) when none: detectron2's
    PolygonMasks.get_bounding_boxes (its max starts at 0)."""
    if not polygons:
        return torch.tensor([math.inf, math.inf, 0.0, 0.0])
    xy = torch.from_numpy(np.concatenate(polygons)).float()
    return torch.cat([xy.min(0).values, xy.max(0).values.clamp(min=0)])


def index_coco(json_path):
    """A COCO-format instances json as columns, parsed with a hook that moves each image and annotation into flat
    arrays as the parser makes it (json.load's dicts of all 25M Objects365 boxes would hold ~1 KB each at once):
    images ('image_ids', 'files': file_name, or for LVIS its coco_url's last two parts), annotations sorted by image
    id, the json's order kept within an image ('ann_images', 'ann_ids', 'ann_cats', 'ann_crowd', 'ann_boxes' (n, 4)
    float64 as written, 'ann_segms': the row in 'segms' of its segmentation as json text, '' when none) and the
    categories as json text."""
    images, files, segms = array.array('q'), Packer(), Packer()
    anns = {k: array.array(t) for k, t in (('image', 'q'), ('id', 'q'), ('cat', 'i'), ('crowd', 'b'), ('box', 'd'))}

    def hook(d):  # every json object, innermost first: an annotation or an image leaves only a None behind
        if 'image_id' in d:  # an annotation; one without a bbox of 4 numbers gets NaNs, skipped and counted at load
            box = d.get('bbox') if isinstance(d.get('bbox'), list) and len(d['bbox']) == 4 else [math.nan] * 4
            for k, v in (('image', d['image_id']), ('id', d.get('id', -1)), ('cat', d.get('category_id', -1)),
                         ('crowd', bool(d.get('iscrowd', 0)))):
                anns[k].append(v)
            try:
                anns['box'].extend([float(v) for v in box])
            except (TypeError, ValueError):
                anns['box'].extend([math.nan] * 4)
            segms.add(json.dumps(d['segmentation'], separators=(',', ':')) if d.get('segmentation') else '')
            return None
        if 'id' in d and ('file_name' in d or 'coco_url' in d):
            images.append(d['id'])
            files.add(d.get('file_name') or os.path.join(*d['coco_url'].split('/')[-2:]))
            return None
        return d
    try:
        with open(json_path, encoding='utf-8') as f:  # text: the parser holds the str only, not its bytes too
            d = json.load(f, object_hook=hook)
    except (ValueError, TypeError, OverflowError) as e:
        raise ValueError(f"{json_path}: not a readable COCO-format json ({e})") from e
    missing = [k for k in ('images', 'annotations', 'categories') if k not in (d if isinstance(d, dict) else {})]
    if missing:
        raise ValueError(f"{json_path} is not a COCO-format instances json (no {', '.join(missing)})")
    for k, what in (('images', "an id and a file_name or coco_url"), ('annotations', "an image_id")):
        odd = next((x for x in d[k] if x is not None), None)
        if odd is not None:
            raise ValueError(f"{json_path}: an entry of '{k}' without {what}: {str(odd)[:100]}")
    ann_images = np.frombuffer(anns['image'], np.int64)
    order = np.argsort(ann_images, kind='stable')
    return {'image_ids': np.frombuffer(images, np.int64), **files.arrays('files'), 'ann_images': ann_images[order],
            'ann_ids': np.frombuffer(anns['id'], np.int64)[order],
            'ann_cats': np.frombuffer(anns['cat'], np.int32)[order],
            'ann_crowd': np.frombuffer(anns['crowd'], np.int8)[order] != 0,
            'ann_boxes': np.frombuffer(anns['box'], np.float64).reshape(-1, 4)[order],
            'ann_segms': order, **segms.arrays('segms'),  # segms stay in the json's order: 'ann_segms' is each row's
            'categories': np.frombuffer(json.dumps(d['categories']).encode(), np.uint8)}


class CocoDetection:
    """A COCO-format instances json and its image folder (COCO, LVIS v1, Objects365): load(i) -> (uint8 image (3, H, W),
    target {'boxes' (n, 4) x1y1x2y2 float32 pixels, 'labels' (n,) int64, 'image_id', 'dropped': bad annotations
    skipped; with masks=True 'polygons' (n lists of (k, 2) float64 arrays) when every instance is polygons, as COCO's
    and LVIS's are (detectron2's default format: transformed as coordinates, rasterised per proposal), else 'masks'
    (n, H, W) bool (an RLE among them, detectron2's 'bitmask' format)}). Class ids: the json's categories sorted by
    id, 0 ... K-1 (detectron2's contiguous ids), or in the order of `classes` (names: a val json numbered as its
    training json).
    Crowd regions are not trained on (COCOeval ignores detections in them); an annotation with an empty box, an
    unknown category or an unreadable segmentation is skipped with a warning naming it, and counted. train=True keeps
    the images with an annotation (detectron2 drops the others from training). LVIS v1 names no file: its coco_url's
    last two parts (train2017/xxx.jpg) under image_root. Read through a cached index (index_coco: ~60 bytes a box,
    shared by the node's processes, as detectron2 serialises its dataset dicts)."""

    def __init__(self, json_path, image_root, masks=True, train=True, classes=None):
        if not os.path.isfile(json_path):
            raise FileNotFoundError(f"annotation json not found: {json_path}")
        self.index, how = cached_index('coco', [stamp(json_path)], lambda: index_coco(json_path))
        self.json_path, self.root, self.masks = json_path, image_root, masks
        self.categories = sorted(json.loads(self.index['categories'].tobytes()), key=lambda c: c['id'])
        if classes is not None:  # another split's class names in label order: the same name, the same label
            by_name = {c['name']: c for c in self.categories}
            if len(by_name) != len(self.categories) or set(by_name) != set(classes):
                other = sorted(set(by_name) ^ set(classes))[:5]
                raise ValueError(f"its category names are not the training json's (differing: {', '.join(other)})")
            self.categories = [by_name[n] for n in classes]
        self.cat_index = {c['id']: i for i, c in enumerate(self.categories)}
        self.files, self.segms = Strings(self.index, 'files'), Strings(self.index, 'segms')
        ids, anns = self.index['image_ids'], self.index['ann_images']
        self.rows = np.flatnonzero(np.isin(ids, anns[~self.index['ann_crowd']])) if train else np.arange(len(ids))
        say(f"{json_path}: {len(self.rows):,} images of {len(ids):,}, {len(anns):,} annotations, {how}")

    def __len__(self):
        return len(self.rows)

    def path(self, i):
        return os.path.join(self.root, self.files[self.rows[i]])

    def name(self, i):
        return self.path(i)

    def annotations(self, image_id):
        """The rows of an image's annotations in the index (a slice: they are sorted by image id)."""
        anns = self.index['ann_images']
        return slice(int(np.searchsorted(anns, image_id)), int(np.searchsorted(anns, image_id, side='right')))

    def load(self, i):
        img = read_rgb(self.path(i))
        return img, self.target(i, *img.shape[1:])

    def target(self, i, h, w):
        """Image i's target for an image of h x w pixels."""
        image_id = int(self.index['image_ids'][self.rows[i]])
        boxes, labels, shapes, dropped = [], [], [], 0
        rows = self.annotations(image_id)
        columns = [self.index[k][rows].tolist() for k in ('ann_crowd', 'ann_boxes', 'ann_cats', 'ann_segms', 'ann_ids')]
        for crowd, (x, y, bw, bh), category, segm, ann_id in zip(*columns):
            if crowd:
                continue
            box = [max(x, 0), max(y, 0), min(x + bw, w), min(y + bh, h)]
            try:
                if not all(map(math.isfinite, (x, y, bw, bh))):
                    raise ValueError("no bbox of 4 numbers")
                if not (box[2] > box[0] and box[3] > box[1]):
                    raise ValueError(f"empty box {[x, y, bw, bh]} in a {w}x{h} image")
                if category not in self.cat_index:
                    raise ValueError(f"category {category} is not in the json's categories")
                if self.masks:
                    shapes.append(self.shape(json.loads(self.segms[segm] or 'null'), h, w))
            except Exception as e:
                print(f"warning: skipping annotation {ann_id} of {self.path(i)}: {e}", file=sys.stderr)
                dropped += 1
                continue
            boxes.append(box)
            labels.append(self.cat_index[category])
        target = {'boxes': torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                  'labels': torch.tensor(labels, dtype=torch.int64), 'image_id': image_id, 'dropped': dropped}
        if self.masks and all(isinstance(m, list) for m in shapes):
            target['polygons'] = shapes
        elif self.masks:  # an RLE among them: the image's instances all as bitmaps (detectron2 would stop)
            masks = [torch.from_numpy(mask_util.decode(polygons_rle(m, h, w))) if isinstance(m, list) else m
                     for m in shapes]
            target['masks'] = torch.stack(masks).bool()
        return target

    @staticmethod
    def shape(segm, h, w):
        """An annotation's segmentation -> its polygons ((k, 2) float64 arrays) or, from RLE, its (h, w) bitmap."""
        if isinstance(segm, list):
            return coco_polygons(segm)
        m = mask_util.decode(coco_rle(segm, h, w))
        if m.shape != (h, w) or not m.any():
            raise ValueError(f"mask of {m.shape} with {int(m.sum())} pixels for a {w}x{h} image")
        return torch.from_numpy(m)

    def image_classes(self):
        """(image ids, classes): each (image, class) pair an annotation shows, once (unknown categories left out)."""
        if not self.cat_index:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        ids = np.array(sorted(self.cat_index), dtype=np.int64)
        cats = np.asarray(self.index['ann_cats'])
        pos = np.searchsorted(ids, cats).clip(max=len(ids) - 1)
        known = ids[pos] == cats
        cls = np.array([self.cat_index[i] for i in ids.tolist()])[pos]  # the label of each id
        pairs = np.unique(np.stack([self.index['ann_images'][known], cls[known]], axis=1), axis=0)
        return pairs[:, 0], pairs[:, 1]

    def repeat_factors(self, threshold=0.001):
        """(n,) LVIS's repeat factor per image (Gupta et al. 2019; detectron2's repeat_factors_from_category_frequency):
        the max over its classes of max(1, sqrt(threshold / f_c)), f_c the fraction of these images showing class c."""
        ids = self.index['image_ids'][self.rows]
        img, cls = self.image_classes()
        shown = np.isin(img, ids)
        img, cls = img[shown], cls[shown]
        freq = torch.from_numpy(np.bincount(cls, minlength=len(self.categories))).float()
        rc = (threshold / (freq / len(ids)).clamp(min=1e-12)).sqrt().clamp(min=1.0)
        order = np.argsort(ids, kind='stable')
        factors = np.ones(len(ids), np.float32)
        np.maximum.at(factors, order[np.searchsorted(ids, img, sorter=order)], rc.numpy()[cls])
        return torch.from_numpy(factors)

    def image_counts(self):
        """Images per class (LVIS's categories carry image_count; else counted): the federated loss's frequencies."""
        if all('image_count' in c for c in self.categories):
            return torch.tensor([c['image_count'] for c in self.categories], dtype=torch.float32)
        return torch.from_numpy(np.bincount(self.image_classes()[1], minlength=len(self.categories))).float()


class LargeScaleJitter:
    """(uint8 image (3, H, W), target) -> the same, as EVA-01's det pipeline (detectron2's LSJ, coco_loader_lsj.py):
    flip (p 0.5); ResizeScale: s ~ U(0.1, 2.0), the image scaled by min(size s / H, size s / W), bilinear;
    FixedSizeCrop(size) without padding at offset round((new - crop) u) with one u ~ U(0, 1) for both axes
    (detectron2's quirk, kept); boxes recomputed from the cropped instances (recompute_boxes), empty ones dropped.
    Polygons are transformed as coordinates and cut to the crop window (crop_polygons); bitmaps (from RLE) are resized
    with PIL's nearest and sliced. train=False: the test resize, longest side = size (ResizeShortestEdge(size,
    max_size=size)); target gets 'scale' to map predictions back. Padding to size x size happens when batching
    (collate_detection)."""

    def __init__(self, size=1024, scale=(0.1, 2.0), train=True):
        self.size, self.scale, self.train = size, scale, train

    def __call__(self, sample):
        img, t = sample
        H, W = img.shape[1:]
        masks, polygons = t.get('masks'), t.get('polygons')
        boxes = tv_tensors.BoundingBoxes(t['boxes'], format='XYXY', canvas_size=(H, W))
        if self.train and torch.rand(()) < 0.5:
            img, boxes = TF.horizontal_flip(img), TF.horizontal_flip(boxes)
            masks = masks.flip(-1) if masks is not None else None
            polygons = polygons and [[np.stack([W - p[:, 0], p[:, 1]], 1) for p in ps] for ps in polygons]
        if self.train:
            s = self.scale[0] + (self.scale[1] - self.scale[0]) * torch.rand(()).item()
            r = min(self.size * s / H, self.size * s / W)
            h, w = round(H * r), round(W * r)  # np.round in detectron2: half to even, as Python's round
        else:
            r = min(self.size / H, self.size / W)
            h, w = int(H * r + 0.5), int(W * r + 0.5)
        img = TF.resize(img, [h, w], antialias=True)  # bilinear with antialiasing, as PIL's (detectron2's) resize
        boxes = TF.resize(boxes, [h, w])
        if masks is not None:  # PIL's NEAREST per mask, as detectron2's apply_segmentation (torch's nearest differs)
            resized = [np.asarray(Image.fromarray(m).resize((w, h), Image.NEAREST)) for m in masks.byte().numpy()]
            masks = torch.from_numpy(np.stack(resized)).bool() if resized else torch.zeros(0, h, w, dtype=torch.bool)
        if polygons is not None:
            polygons = [[p * (w / W, h / H) for p in ps] for ps in polygons]
        out = {k: v for k, v in t.items() if k not in ('boxes', 'masks', 'polygons')}
        if self.train:
            ch, cw = min(h, self.size), min(w, self.size)
            u = torch.rand(()).item()
            top, left = round((h - ch) * u), round((w - cw) * u)
            img, boxes = img[:, top:top + ch, left:left + cw], TF.crop(boxes, top, left, ch, cw)
            if masks is not None:
                masks = masks[:, top:top + ch, left:left + cw]
                boxes = torch.stack([masks_to_box(m) for m in masks]) if len(masks) else boxes
            elif polygons is not None:  # the window is size x size even past the image's edge, as detectron2's
                polygons = [crop_polygons(ps, left, top, self.size) for ps in polygons]
                boxes = torch.stack([polygons_box(ps) for ps in polygons]) if polygons else boxes
            keep = (boxes[:, 2] - boxes[:, 0] > 1e-5) & (boxes[:, 3] - boxes[:, 1] > 1e-5)  # detectron2's nonempty
            out['labels'] = t['labels'][keep]
            boxes = boxes[keep]
            masks = masks[keep] if masks is not None else None
            polygons = [ps for ps, k in zip(polygons, keep.tolist()) if k] if polygons is not None else None
        out['boxes'] = boxes.as_subclass(torch.Tensor).float()
        if masks is not None:
            out['masks'] = masks
        if polygons is not None:
            out['polygons'] = polygons
        out['scale'], out['orig_size'] = (h / H, w / W), (H, W)
        return img, out


def masks_to_box(m):
    """m (H, W) bool -> x1y1x2y2 (4,) of its pixels (x2 = last column + 1; zeros if empty): detectron2's
    BitMasks.get_bounding_boxes."""
    ys, xs = m.any(1).nonzero(), m.any(0).nonzero()
    if len(ys) == 0:
        return torch.zeros(4)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def collate_detection(samples, size):
    """Samples of (image, target) -> {'image': (B, 3, size, size) uint8 zero-padded at the bottom right (detectron2's
    square_pad; the stage zeroes the padding again after normalising, so it is the mean colour's 0), 'sizes' (B, 2) the
    images' own (h, w), 'targets': list, 'index', 'skipped'}."""
    images = torch.zeros(len(samples), 3, size, size, dtype=torch.uint8)
    for i, s in enumerate(samples):
        h, w = s['image'].shape[1:]
        images[i, :, :h, :w] = s['image']
    return {'image': images, 'sizes': torch.tensor([s['image'].shape[1:] for s in samples]),
            'targets': [s['label'] for s in samples], 'index': torch.tensor([s['index'] for s in samples]),
            'skipped': torch.tensor([s['skipped'] for s in samples])}


def write_synthetic_scenes(folder, train_size=512, val_size=64, img_size=128, num_classes=4, seed=0):
    """The synthetic detection and segmentation set, written once: folder/{train,val}/NNNNN.png, instances_{train,val}
    .json (COCO format, RLE masks) and {train,val}_labels/NNNNN.png (semantic labels: 0 background, shape k -> k + 1).
    A scene is 1-4 shapes of SyntheticShapes' first num_classes kinds, each of its own colour and size, on a textured
    background; later shapes occlude earlier ones, whose mask and box keep only the visible pixels (an instance with
    under a quarter of itself left is dropped; the label map keeps every visible pixel). More classes than the 10 kinds
    (a recipe's 80, 365 or 1203, for bench.py's memory projection) are categories no scene shows; each category's
    image_count is the split's images showing it, at least 1 (LVIS's field: the federated loss draws unseen classes
    too). Skipped when folder/meta.json says it holds this set. -> folder."""
    meta = dict(train_size=train_size, val_size=val_size, img_size=img_size, num_classes=num_classes, seed=seed,
                labels=True)
    if os.path.exists(os.path.join(folder, 'meta.json')) and json.load(open(os.path.join(folder, 'meta.json'))) == meta:
        return folder
    S, tmp = img_size, synthetic_tmp(folder, "synthetic scenes")
    kinds = min(num_classes, len(SyntheticShapes.SHAPES))
    shapes = SyntheticShapes(1, img_size=S, num_classes=kinds)
    names = [*SyntheticShapes.SHAPES[:kinds], *(f'class {k}' for k in range(kinds, num_classes))]
    for split, n in (('train', train_size), ('val', val_size)):
        shown = np.zeros(num_classes, np.int64)  # images showing each class
        os.makedirs(os.path.join(tmp, split))
        os.makedirs(os.path.join(tmp, split + '_labels'))
        images, anns, shapes.seed = [], [], seed + 1000 * (split == 'val')
        for i in range(n):
            rng = np.random.default_rng([seed, split == 'val', i, 13])
            img, objs = shapes._background(shapes._params(i)), []
            label = np.zeros((S, S), np.uint8)
            for _ in range(int(rng.integers(1, 5))):
                p = dict(label=int(rng.integers(kinds)), r=rng.uniform(0.1, 0.22) * S)
                cx, cy = rng.uniform(p['r'], S - p['r'], 2)
                m = Image.new('L', (S, S), 0)
                shapes._draw(ImageDraw.Draw(m), p, cx, cy, 255)
                m = np.asarray(m) > 0
                colour = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(rng.uniform(), 0.9, rng.uniform(0.6, 1.0)))
                shapes._draw(ImageDraw.Draw(img), p, cx, cy, colour)
                for o in objs:  # the new shape hides what it covers of the earlier ones
                    o['mask'] &= ~m
                objs.append({'label': p['label'], 'mask': m, 'full': m.sum()})
                label[m] = p['label'] + 1
            name = os.path.join(split, f'{i:05d}.png')
            img.save(os.path.join(tmp, name))
            Image.fromarray(label).save(os.path.join(tmp, split + '_labels', f'{i:05d}.png'))
            images.append({'id': i + 1, 'file_name': name, 'height': S, 'width': S})
            kept = [o for o in objs if o['mask'].sum() >= 0.25 * o['full']]
            for k in {o['label'] for o in kept}:
                shown[k] += 1
            for o in kept:
                rle = mask_util.encode(np.asfortranarray(o['mask'].astype(np.uint8)))
                x1, y1, x2, y2 = masks_to_box(torch.from_numpy(o['mask'])).tolist()
                anns.append({'id': len(anns) + 1, 'image_id': i + 1, 'category_id': o['label'] + 1, 'iscrowd': 0,
                             'bbox': [x1, y1, x2 - x1, y2 - y1], 'area': int(o['mask'].sum()),
                             'segmentation': {'size': [S, S], 'counts': rle['counts'].decode()
                                              if isinstance(rle['counts'], bytes) else rle['counts']}})
        categories = [{'id': k + 1, 'name': name, 'image_count': max(int(shown[k]), 1)} for k, name in enumerate(names)]
        with open(os.path.join(tmp, f'instances_{split}.json'), 'w') as f:
            json.dump({'images': images, 'annotations': anns, 'categories': categories}, f)
    json.dump(meta, open(os.path.join(tmp, 'meta.json'), 'w'))
    if os.path.exists(folder):
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder

# -----------------------------------------------------------------------------
# semantic segmentation (EVA-01 seg, an mmseg 0.20 pipeline): image + label-PNG folders, the training augmentation

# COCO-Stuff-164K's raw label PNGs (stuffthingmaps_trainval2017) hold ids 0-181, 255 unlabeled; 11 thing ids are never
# used (COCO's missing 12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91, 1-based): mmseg's convert_datasets/coco_stuff164k.py
# maps the other 171 in order to train ids 0-170, the rest to 255
COCO_STUFF_UNUSED = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)


def label_lut(mode):
    """A 256-entry table from a label PNG's values to train ids (255: ignored): None identity, 'reduce_zero_label'
    (ADE20K: 0 'other' -> 255, k -> k - 1, as mmseg), 'cocostuff' (the 182 raw ids -> 171)."""
    lut = torch.arange(256, dtype=torch.uint8)
    if mode == 'reduce_zero_label':
        lut = torch.cat((torch.tensor([255]), torch.arange(255))).to(torch.uint8)
        lut[255] = 255
    elif mode == 'cocostuff':
        used = [i for i in range(182) if i not in COCO_STUFF_UNUSED]
        lut = torch.full((256,), 255, dtype=torch.uint8)
        lut[used] = torch.arange(len(used), dtype=torch.uint8)
    elif mode is not None:
        raise ValueError(f"label_map must be '' (none), 'reduce_zero_label' or 'cocostuff', got {mode!r}")
    return lut


def index_pairs(img_dir, ann_dir, ann_suffix):
    """Images and their labels, paired by name (the path under its folder without the extension): 'names' sorted,
    'images' and 'labels' (paths under img_dir, ann_dir), and 'unpaired' (the names with an image or a label only)."""
    def scan(root, keep):
        return [os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files if keep(f)]
    imgs = {os.path.splitext(k)[0]: k for k in scan(img_dir, lambda f: f.lower().endswith(IMAGE_EXTENSIONS))}
    anns = {k[:-len(ann_suffix)]: k for k in scan(ann_dir, lambda f: f.endswith(ann_suffix))}
    names = sorted(imgs.keys() & anns.keys())
    return {**Packer(names).arrays('names'), **Packer(imgs[n] for n in names).arrays('images'),
            **Packer(anns[n] for n in names).arrays('labels'),
            **Packer(sorted(imgs.keys() ^ anns.keys())).arrays('unpaired'), 'counts': np.array([len(imgs), len(anns)])}


class SegFiles:
    """Semantic segmentation as mmseg's CustomDataset lays it out: img_dir/<name>.<jpg, png, ...> with
    ann_dir/<name><ann_suffix> (one class index per pixel, 255 ignored; ADE20K '.png', mmseg-converted COCO-Stuff
    '_labelTrainIds.png', raw COCO-Stuff '.png' with label_map='cocostuff'), subfolders included. load(i) -> (uint8
    image (3, H, W), uint8 label (H, W) in train ids). An image without its label, or a label without its image, is
    left out, named and counted (`unpaired`); a label of another size than its image, not single-channel, or with
    class ids >= num_classes other than 255 is an error for Samples to skip and count. Read through a cached index
    (index_pairs), as ImageFiles."""

    def __init__(self, img_dir, ann_dir, num_classes, label_map=None, ann_suffix='.png'):
        for d in (img_dir, ann_dir):
            if not os.path.isdir(d):
                raise FileNotFoundError(f"segmentation folder not found: {d}")
        index, how = cached_index('pairs', [stamp(img_dir, True), stamp(ann_dir, True), ann_suffix],
                                  lambda: index_pairs(img_dir, ann_dir, ann_suffix))
        self.names, self.unpaired = Strings(index, 'names'), list(Strings(index, 'unpaired'))
        if not len(self.names):
            raise ValueError(f"no image in {img_dir} has a label {ann_dir}/<name>{ann_suffix} ({index['counts'][0]} "
                             f"images, {index['counts'][1]} labels)")
        if self.unpaired:
            print(f"warning: {len(self.unpaired)} of {img_dir} / {ann_dir} have no image or no label, left out: "
                  f"{', '.join(self.unpaired[:5])}" + (' ...' if len(self.unpaired) > 5 else ''), file=sys.stderr)
        say(f"{img_dir}: {len(self.names):,} labelled images, {how}")
        self.img_dir, self.ann_dir, self.index = img_dir, ann_dir, index
        self.images, self.anns = Strings(index, 'images'), Strings(index, 'labels')
        self.num_classes, self.lut = num_classes, label_lut(label_map)

    def __len__(self):
        return len(self.names)

    def name(self, i):
        return os.path.join(self.img_dir, self.images[i])

    def load(self, i):
        img, path = read_rgb(self.name(i)), os.path.join(self.ann_dir, self.anns[i])
        with Image.open(path) as im:
            if im.mode not in ('L', 'P'):
                raise ValueError(f"label {path} is {im.mode}, not single-channel class indices")
            label = self.lut[torch.from_numpy(np.array(im, dtype=np.uint8)).long()]
        if label.shape != img.shape[1:]:
            raise ValueError(f"label {path} is {tuple(label.shape)}, its image {tuple(img.shape[1:])}")
        bad = label.unique()
        bad = bad[(bad >= self.num_classes) & (bad != 255)]
        if len(bad):
            raise ValueError(f"label {path} has class ids {bad.tolist()[:5]} >= num_classes {self.num_classes}")
        return img, label

    def check(self, n=8):
        """Reads n labels spread over the set; if none loads the set itself is wrong (a wrong folder, label_map or
        num_classes): one error naming the first problem, before training starts."""
        errors = []
        for i in np.linspace(0, len(self) - 1, min(n, len(self))).round().astype(int):
            try:
                return self.load(int(i))
            except Exception as e:
                errors.append(e)
        raise ValueError(f"none of {len(errors)} samples loads: {errors[0]}")


class SegAugment:
    """(uint8 image (3, H, W), uint8 label (H, W)) -> the same at crop x crop: EVA-01 seg's training pipeline (mmseg
    0.20). Resize: r ~ U(ratio), the image scaled by min(scale[0] r / long side, scale[1] r / short side) (mmcv's
    keep-ratio rescale), bilinear without antialiasing (cv2's), labels nearest; RandomCrop: offsets uniform, redrawn up
    to 10 times while one class covers >= cat_max_ratio of the crop's labelled pixels (or it shows a single class);
    flip (p 0.5); PhotoMetricDistortion; padding to crop x crop (image: the mean colour, label 255). The colour steps
    round to uint8 after each, as mmseg; saturation is torchvision's blend with the grey image where mmseg scales S in
    HSV."""

    def __init__(self, crop=896, scale=(3584, 896), ratio=(0.5, 2.0), cat_max_ratio=0.75):
        self.crop, self.scale, self.ratio, self.cat_max_ratio = crop, scale, ratio, cat_max_ratio

    def __call__(self, sample):
        img, label = sample
        H, W = img.shape[1:]
        r = self.ratio[0] + (self.ratio[1] - self.ratio[0]) * torch.rand(()).item()
        f = min(int(self.scale[0] * r) / max(H, W), int(self.scale[1] * r) / min(H, W))
        h, w = int(H * f + 0.5), int(W * f + 0.5)
        img = TF.resize(img, [h, w], antialias=False)
        label = TF.resize(label[None], [h, w], InterpolationMode.NEAREST)[0]
        c = self.crop
        for attempt in range(11):  # mmseg: 10 tries, then the 11th draw whatever it shows
            top, left = (int(torch.randint(max(s - c, 0) + 1, ())) for s in (h, w))
            if attempt == 10 or self.cat_max_ratio >= 1:
                break
            counts = label[top:top + c, left:left + c].flatten().bincount(minlength=256)[:255]
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() < self.cat_max_ratio * counts.sum():
                break
        img, label = img[:, top:top + c, left:left + c], label[top:top + c, left:left + c]
        if torch.rand(()) < 0.5:
            img, label = img.flip(-1), label.flip(-1)
        img = photometric_distortion(img)
        # mmseg pads after Normalize with 0, i.e. the mean colour: the uint8 mean here (normalised: 0 within 1/255)
        mean = torch.tensor([round(255 * m) for m in IMAGENET_MEAN], dtype=torch.uint8)
        out_img = mean[:, None, None].repeat(1, c, c)
        out_label = torch.full((c, c), 255, dtype=torch.uint8)
        out_img[:, :img.shape[1], :img.shape[2]] = img
        out_label[:label.shape[0], :label.shape[1]] = label
        return out_img, out_label


def photometric_distortion(img):
    """mmseg's PhotoMetricDistortion on a uint8 (3, H, W) image, each step with p 0.5: brightness + U(-32, 32); contrast
    x U(0.5, 1.5) (before or after the next two, p 0.5); saturation x U(0.5, 1.5); hue + U{-18 ... 17} of OpenCV's
    180-step circle."""

    def coin():
        return torch.rand(()) < 0.5

    def uniform(a, b):
        return a + (b - a) * torch.rand(()).item()

    def convert(x, alpha=1.0, beta=0.0):  # mmseg's convert: float, clip to 0-255, truncate to uint8
        return (x.float() * alpha + beta).clamp(0, 255).to(torch.uint8)
    if coin():
        img = convert(img, beta=uniform(-32, 32))
    contrast_first = coin()
    if contrast_first and coin():
        img = convert(img, alpha=uniform(0.5, 1.5))
    if coin():
        img = TF.adjust_saturation(img, uniform(0.5, 1.5))
    if coin():
        img = TF.adjust_hue(img, int(torch.randint(-18, 18, ())) / 180)
    if not contrast_first and coin():
        img = convert(img, alpha=uniform(0.5, 1.5))
    return img


def seg_test_size(h, w, scale=(3584, 896), ratio=1.0, divisor=32):
    """The test input size of an (h, w) image (mmseg's keep-ratio Resize at scale x ratio, then ResizeToMultiple: up
    to a multiple of divisor)."""
    f = min(int(scale[0] * ratio) / max(h, w), int(scale[1] * ratio) / min(h, w))
    return tuple(math.ceil(int(s * f + 0.5) / divisor) * divisor for s in (h, w))

# -----------------------------------------------------------------------------
# command line: python data.py build_kinetics_lists ROOT OUT [--check=True] | index SOURCE ... [--videos=True]

if __name__ == '__main__':
    args = [a for a in sys.argv[2:] if not a.startswith('--')]
    options = set(sys.argv[2:]) - set(args)
    usage = ("usage: python data.py build_kinetics_lists ROOT OUT [--check=True]\n"
             "  ROOT holds k400/, k600/, k700/, each with train/ and val/ class folders of videos; OUT gets the\n"
             "  K722 / K400 / K600 / K700 lists, class names and K722 mappings; --check opens every video\n"
             "usage: python data.py index SOURCE [SOURCE ...] [--videos=True]\n"
             "  builds (or finds) the cached index of each image folder, path list or COCO-format .json in\n"
             "  $EVA_INDEX_DIR (else ~/.cache/eva-index), e.g. on a login node before the job; --videos: video folders")
    if {'-h', '--help'} & set(sys.argv[1:]):
        print(usage)
        sys.exit(0)
    if sys.argv[1:2] == ['index'] and args and not options - {'--videos=True', '--videos=False'}:
        for path in args:
            try:
                if path.endswith('.json'):
                    CocoDetection(path, '')
                else:
                    (VideoFiles if '--videos=True' in options else ImageFiles)(path)
            except (OSError, ValueError) as e:
                sys.exit(f"error: {e}")
        sys.exit(0)
    if sys.argv[1:2] != ['build_kinetics_lists'] or len(args) != 2 or options - {'--check=True', '--check=False'}:
        sys.exit(usage)
    try:
        counts = build_kinetics_lists(*args, check='--check=True' in options)
    except (OSError, ValueError) as e:  # no such folder, a class missing from a split: one line
        sys.exit(f"error: {e}")
    print('\n'.join(f"{args[1]}/{name}.txt: {n:,} videos" for name, n in counts.items()))
