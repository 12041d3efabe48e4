"""data.py and configurator.py: masking statistics, sampler splits and resumption, image sources and bad files,
the synthetic dataset, config overrides."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from conftest import ROOT, run_stage
from data import (CLIP_MEAN, CLIP_STD, ImageFiles, MaskingGenerator, ResumableSampler, Samples, SyntheticShapes,
                  load_rgb, mim_transform, normalize_batch, read_rgb)



def components(mask):
    """Sizes of the 4-connected components of a bool grid (a plain flood fill, independent of data.py)."""
    seen, sizes = np.zeros_like(mask), []
    for i, j in zip(*np.nonzero(mask)):
        if seen[i, j]:
            continue
        stack, n = [(i, j)], 0
        seen[i, j] = True
        while stack:
            a, b = stack.pop()
            n += 1
            for x, y in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                if 0 <= x < mask.shape[0] and 0 <= y < mask.shape[1] and mask[x, y] and not seen[x, y]:
                    seen[x, y] = True
                    stack.append((x, y))
        sizes.append(n)
    return np.array(sizes)


def test_mask_statistics_16x16_105():
    gen = MaskingGenerator((16, 16), 105)
    rng = np.random.default_rng(0)
    masks = [gen(rng) for _ in range(400)]
    counts = np.array([m.sum() for m in masks])
    assert all(m.dtype == bool and m.shape == (16, 16) for m in masks)
    assert counts.max() <= 105 and counts.mean() > 103  # never over, on average close to 105 (BEiT: ~104.5)
    in_blocks = []
    for m in masks:
        sizes = components(m)
        assert sizes.max() >= 16
        in_blocks.append(sizes[sizes >= 16].sum() / sizes.sum())
    # blocks of >= 16 patches hold almost every masked patch; only the last top-up rectangles may be smaller
    assert np.mean(in_blocks) > 0.95 and np.min(in_blocks) >= 0.75
    # the same rng state gives the same mask
    assert np.array_equal(gen(np.random.default_rng(5)), gen(np.random.default_rng(5)))


def test_sampler_disjoint_complete_and_resumable():
    n = 23
    ranks = [ResumableSampler(n, 2, r, seed=3) for r in range(2)]
    for s in ranks:
        s.set_epoch(1)
    a, b = list(ranks[0]), list(ranks[1])
    assert len(a) == len(b) == 12 and set(a) | set(b) == set(range(n))
    assert len(set(a) & set(b)) == 1  # the one padding repeat, as DistributedSampler pads
    full = list(ranks[0])
    ranks[0].set_epoch(1, start=5, stop=10)
    assert list(ranks[0]) == full[5:10] and len(ranks[0]) == 5
    ranks[0].set_epoch(2)
    assert list(ranks[0]) != full  # a new order each epoch
    # evaluation: no padding, every sample exactly once over an odd-sized set
    ev = [list(ResumableSampler(n, 2, r, shuffle=False, pad=False)) for r in range(2)]
    assert sorted(ev[0] + ev[1]) == list(range(n))


def save_images(folder):
    os.makedirs(folder / 'cls_b' / 'deep', exist_ok=True)
    os.makedirs(folder / 'cls_a', exist_ok=True)
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    rgb.save(folder / 'cls_a' / 'rgb.jpg')
    rgb.convert('CMYK').save(folder / 'cls_a' / 'cmyk.jpg')
    rgb.convert('L').save(folder / 'cls_b' / 'gray.png')
    rgb.convert('P').save(folder / 'cls_b' / 'deep' / 'palette.png')
    rgb.convert('RGBA').save(folder / 'cls_b' / 'rgba.png')
    Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 100).save(folder / 'cls_b' / 'gray16.png')
    (folder / 'cls_b' / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0 this is not a jpeg')
    (folder / 'cls_b' / 'notes.txt').write_text('not an image')


def test_image_folder_modes_labels_and_bad_file(tmp_path, capsys):
    save_images(tmp_path)
    src = ImageFiles(str(tmp_path))
    names = [os.path.relpath(src.name(i), tmp_path) for i in range(len(src))]
    assert names == ['cls_a/cmyk.jpg', 'cls_a/rgb.jpg', 'cls_b/corrupt.jpg', 'cls_b/gray.png', 'cls_b/gray16.png',
                     'cls_b/rgba.png', 'cls_b/deep/palette.png']
    assert src.labels.tolist() == [0, 0, 1, 1, 1, 1, 1]
    for i, name in enumerate(names):
        if 'corrupt' not in name:
            im, _ = src.load(i)
            assert im.mode == 'RGB' and im.size == (30, 20), name
    assert np.asarray(src.load(4)[0]).max() == 255  # 16-bit gray rescaled, not clipped to white
    ds = Samples(src, mim_transform(16), seed=0)
    s = ds[2]  # the corrupt file: replaced by the next image, counted, named
    assert s['skipped'] == 1 and s['index'] == 2 and s['label'] == 1 and s['image'].shape == (3, 16, 16)
    assert 'corrupt.jpg' in capsys.readouterr().err
    loader = torch.utils.data.DataLoader(ds, batch_size=7)
    assert int(next(iter(loader))['skipped'].sum()) == 1


def test_a_photo_is_read_upright_by_its_exif_orientation(tmp_path):
    """A phone stores a portrait photo as landscape pixels with EXIF orientation 6 (rotate 90 clockwise to view):
    every reader (PIL's for classification, torchvision's for detection and segmentation, PIL's fallback) turns it
    upright, as ImageOps.exif_transpose does."""
    from data import load_rgb, read_rgb
    pixels = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    for name in ('phone.jpg', 'phone.png', 'phone.webp'):
        pixels.save(tmp_path / name, exif=exif, **({'lossless': True} if name.endswith('webp') else {}))
        with Image.open(tmp_path / name) as im:
            upright = np.asarray(ImageOps.exif_transpose(im).convert('RGB'))
        assert upright.shape == (30, 20, 3)  # portrait
        assert np.array_equal(np.asarray(load_rgb(str(tmp_path / name))), upright), name
        assert np.array_equal(read_rgb(str(tmp_path / name)).permute(1, 2, 0).numpy(), upright), name


def test_path_list_and_merged_roots(tmp_path):
    save_images(tmp_path / 'a')
    (tmp_path / 'list.txt').write_text('a/cls_a/rgb.jpg 4\n\na/cls_b/gray.png\n')
    src = ImageFiles(f"{tmp_path / 'list.txt'},{tmp_path / 'a' / 'cls_a'}")
    assert len(src) == 4 and (src.name(0), src.label(0)) == (str(tmp_path / 'a/cls_a/rgb.jpg'), 4)
    assert src.label(1) == -1 and src.load(1)[0].mode == 'RGB'


def test_index_is_mapped_rebuilt_on_a_change_and_built_once_by_two_processes(tmp_path, capsys):
    """A list's index: memory-mapped arrays (no Python object per entry); read back from the cache the second time;
    rebuilt when the list changes, even at the same size within the file system's clock tick; two processes
    started together build it once (the second waits for the first's lock and reads it) and see the same entries."""
    lst = tmp_path / 'list.txt'
    lst.write_text('a/x.jpg 1\nb c/y z.jpg 22\n/abs/top.png\n')
    src = ImageFiles(str(lst))
    assert 'index built' in capsys.readouterr().out
    index = src.parts[0][1]
    assert all(isinstance(a.base, np.memmap) for a in index.values()) and len(index['dir']) == 3
    assert [src.name(i) for i in range(3)] == [str(tmp_path / 'a/x.jpg'), str(tmp_path / 'b c/y z.jpg'), '/abs/top.png']
    assert src.labels.tolist() == [1, 22, -1]
    ImageFiles(str(lst))
    assert 'index read' in capsys.readouterr().out
    lst.write_text('a/x.jpg 1\nb c/y z.jpg 23\n/abs/top.png\n')  # same size, same clock tick
    assert ImageFiles(str(lst)).labels.tolist() == [1, 23, -1] and 'index built' in capsys.readouterr().out
    lst.write_text(''.join(f'img/{i}.jpg {i}\n' for i in range(20000)))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from data import ImageFiles; "
            "s = ImageFiles(sys.argv[2]); print(len(s), s.name(19999), s.labels.sum())")
    procs = [subprocess.Popen([sys.executable, '-c', code, ROOT, str(lst)], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert sorted(re.search('index (built|read)', o).group(1) for o in outs) == ['built', 'read'], outs
    assert {o.splitlines()[-1] for o in outs} == {f"20000 {tmp_path / 'img/19999.jpg'} {sum(range(20000))}"}


def test_missing_or_empty_root_named(tmp_path):
    with pytest.raises(FileNotFoundError, match='nowhere'):
        ImageFiles(str(tmp_path / 'nowhere'))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match='empty'):
        ImageFiles(str(tmp_path / 'empty'))


def test_samples_are_seeded_by_index_and_epoch():
    src = SyntheticShapes(50, 32, seed=0)
    ds = Samples(src, mim_transform(32), seed=0, mask_generator=MaskingGenerator(8, 26, min_num_patches=4))
    a = ds[7]
    torch.manual_seed(999)  # the global RNG does not matter, and is not consumed
    state = torch.get_rng_state()
    b = ds[7]
    assert torch.equal(torch.get_rng_state(), state)
    assert set(a) == {'image', 'label', 'mask', 'index', 'skipped'} and a['mask'].shape == (64,)
    assert torch.equal(a['image'], b['image']) and torch.equal(a['mask'], b['mask'])
    ds.epoch = 1
    assert not torch.equal(ds[7]['image'], a['image'])  # another epoch, another crop


def test_synthetic_shapes_learnable_but_not_by_colour():
    src = SyntheticShapes(600, 32, seed=0)
    assert np.array_equal(np.asarray(src.load(3)[0]), np.asarray(SyntheticShapes(600, 32, seed=0).load(3)[0]))
    assert not np.array_equal(np.asarray(src.load(3)[0]), np.asarray(SyntheticShapes(600, 32, seed=1).load(3)[0]))
    labels = np.array([src.load(i)[1] for i in range(600)])
    assert set(labels) == set(range(10))
    # a nearest-class-mean classifier on mean colour, fit on 400 images and tested on 200, is near chance
    feats = np.array([np.asarray(src.load(i)[0], dtype=np.float32).mean((0, 1)) for i in range(600)])
    means = np.stack([feats[:400][labels[:400] == c].mean(0) for c in range(10)])
    pred = ((feats[400:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == labels[400:]).mean() < 0.25
    d = src.describe(5)
    x0, y0, x1, y1 = d['box']
    assert d['mask'][y0:y1, x0:x1].sum() == d['mask'].sum() > 0
    assert src.SHAPES[d['label']] in d['caption']


# ---- configurator -------------------------------------------------------------------------------------------

def run_config(tmp_path, *args):
    script = tmp_path / 'stage.py'
    script.write_text(
        "import json, os\n"
        "MEAN = (0.5, 0.5)  # a constant, not a setting\n"
        "lr = 1e-3  # peak learning rate\n"
        "batch_size = 4096  # global batch\n"
        "crop_scale = (0.2, 1.0)  # crop scale range\n"
        "# config, a block of its own (det_seg.py: the det keys)\n"
        "use_ema = False  # keep an EMA\n"
        "init_from = None  # checkpoint to start from\n"
        "out_dir = 'out'  # where to write, a comment\n"
        "#   that goes on over a second line\n"
        "# a section header\n"
        f"exec(open({os.path.join(ROOT, 'configurator.py')!r}).read())\n"
        "print(json.dumps({k: globals()[k] for k in _keys}))\n")
    return run_stage(script, *args, cwd=tmp_path, check=False)


def test_configurator_overrides_and_types(tmp_path):
    (tmp_path / 'cfg.py').write_text("import math\nlr = 5e-4\ncrop_scale = [0.5, 1.0]\n")
    r = run_config(tmp_path, 'cfg.py', '--batch_size=512', '--init_from=ckpt/a=b.pt', '--use_ema=True', '--lr=1',
                   '--out_dir=2017')
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    assert cfg == {'lr': 1.0, 'batch_size': 512, 'crop_scale': [0.5, 1.0], 'use_ema': True,
                   'init_from': 'ckpt/a=b.pt', 'out_dir': '2017'}  # a string setting keeps digits as typed


def test_configurator_errors_and_help(tmp_path):
    r = run_config(tmp_path, '--batch_sise=8')
    assert r.returncode != 0 and "unknown config key 'batch_sise'" in r.stderr and 'batch_size' in r.stderr
    r = run_config(tmp_path, '--batch_size=1.5')
    assert r.returncode != 0 and "'batch_size'" in r.stderr and 'int' in r.stderr
    r = run_config(tmp_path, '--use_ema=1')
    assert r.returncode != 0 and "'use_ema'" in r.stderr
    (tmp_path / 'bad.py').write_text("learning_rate = 1.0\n")
    r = run_config(tmp_path, 'bad.py')
    assert r.returncode != 0 and 'learning_rate' in r.stderr and 'bad.py' in r.stderr
    r = run_config(tmp_path, 'missing.py')
    assert r.returncode != 0 and 'missing.py' in r.stderr
    r = run_config(tmp_path, '--help')
    assert r.returncode == 0 and 'peak learning rate' in r.stdout and '4096' in r.stdout and 'MEAN' not in r.stdout
    assert '# where to write, a comment that goes on over a second line\n' in r.stdout and 'header' not in r.stdout
    lines = r.stdout.splitlines()  # a '# config...' line heads its block, right above the block's first key
    block = lines.index('# config, a block of its own (det_seg.py: the det keys)')
    assert lines[block + 1].startswith('  use_ema') and lines[block - 1].startswith('  crop_scale')


def test_read_rgb_gives_the_pixels_of_load_rgb_for_every_mode(tmp_path, capsys):
    save_images(tmp_path)
    src = ImageFiles(str(tmp_path), tensors=True)
    for i in range(len(src)):
        if 'corrupt' in src.name(i):
            with pytest.raises(OSError):
                read_rgb(src.name(i))
            continue
        x, _ = src.load(i)
        ref = torch.from_numpy(np.array(load_rgb(src.name(i)))).permute(2, 0, 1)
        assert x.dtype == torch.uint8 and torch.equal(x, ref), src.name(i)
    ds = Samples(src, mim_transform(16, uint8=True), seed=0)
    s = ds[2]  # the corrupt file, skipped and counted on this path too
    assert s['skipped'] == 1 and s['image'].dtype == torch.uint8 and s['image'].shape == (3, 16, 16)
    assert 'corrupt.jpg' in capsys.readouterr().err


def test_uint8_mim_pipeline_matches_the_pil_pipeline_sample_by_sample(tmp_path):
    """The fast path (read_rgb + uint8 crop/flip + normalize_batch) against the PIL path (load_rgb + PIL bicubic +
    ToTensor + Normalize) on JPEG files, same seeds: the same crops, flips and masks, and the same pixels up to
    rounding."""
    rng = np.random.default_rng(0)
    src = SyntheticShapes(12, 128, seed=4)
    os.makedirs(tmp_path / 'c')
    for i in range(12):  # ImageNet-like sizes and detail: upscaled shapes with noise
        w, h = (200, 150) if i % 2 else (150, 200)
        a = np.asarray(src.load(i)[0].resize((w, h), Image.BICUBIC)).astype(np.float32)
        Image.fromarray(np.clip(a + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)).save(
            tmp_path / 'c' / f'{i}.jpg', quality=90)
    masks = MaskingGenerator(7, 20, min_num_patches=4)
    fast = Samples(ImageFiles(str(tmp_path), tensors=True), mim_transform(112, uint8=True), 7, masks)
    slow = Samples(ImageFiles(str(tmp_path)), mim_transform(112), 7, masks)
    diffs = []
    for i in range(12):
        xf, mf = fast[i]['image'], fast[i]['mask']
        xs, ms = slow[i]['image'], slow[i]['mask']
        assert xf.dtype == torch.uint8 and torch.equal(mf, ms)
        levels = xs * torch.tensor(CLIP_STD).view(3, 1, 1) * 255 + torch.tensor(CLIP_MEAN).view(3, 1, 1) * 255
        diffs.append(xf.float() - levels)
        torch.testing.assert_close(normalize_batch(xf[None])[0], (xf.float() / 255 - torch.tensor(CLIP_MEAN).view(
            3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1))  # = ToTensor + Normalize
    d = torch.stack(diffs)
    # two bicubic implementations round differently: ~1 pixel in 10 is 1 level off, a few in 10^4 up to 4; no bias
    a = d.abs()
    assert a.max() <= 6.01 and a.mean() < 0.15 and (a > 1.01).float().mean() < 1e-3, (a.max(), a.mean())
    assert abs(d.mean()) < 0.02, d.mean()


def test_a_synthetic_set_written_once_and_the_leftovers_of_a_killed_writer_removed(tmp_path, capsys):
    """A writer killed mid-way (Ctrl-C) leaves folder.tmp<pid>: the next writer removes it when that process is gone
    (a live one's is left alone); 'writing' is said only when the set is written, not on every run."""
    from data import write_synthetic_scenes
    folder = str(tmp_path / 'scenes')
    dead, live = tmp_path / 'scenes.tmp999999999', tmp_path / f'scenes.tmp{os.getppid()}'
    dead.mkdir()
    live.mkdir()
    write_synthetic_scenes(folder, 2, 2, img_size=32)
    assert not dead.exists() and live.exists() and os.path.exists(os.path.join(folder, 'meta.json'))
    assert f"writing synthetic scenes to {folder}" in capsys.readouterr().out
    write_synthetic_scenes(folder, 2, 2, img_size=32)
    assert 'writing' not in capsys.readouterr().out
