"""train_clip.py end to end on the CPU through the real DeepSpeed engine, and the EVA-CLIP pieces of model.py and
data.py: the gathered contrastive loss against the single-process loss, retrieval recall by hand, the open_clip
export against open_clip itself, image-text data with bad rows, members and shards."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common import ROW_FORMAT
from conftest import log_rows, run_stage
from data import CaptionFiles, Samples, SyntheticCaptions, TarShards, eval_transform, expand_shards, recall_at_k
from model import (CLIP, TEXT_SIZES, clip_loss, eva_config, load_text_tower, open_clip_state_dict,
                   register_timm_eva, uses_quick_gelu)



def train_clip(out_dir, *args, nproc=1, config='config/clip_tiny.py'):
    r = run_stage('train_clip.py', config, f'--out_dir={out_dir}', *args, nproc=nproc, timeout=600)
    return r.stdout + r.stderr


def write_pairs(folder, n, seed=5, captions=None):
    """n synthetic images as PNG files and a CSV of (filepath, title) pairs; returns the CSV path."""
    src = SyntheticCaptions(n, 32, seed=seed)
    os.makedirs(folder, exist_ok=True)
    rows = ['filepath,title']
    for i in range(n):
        img, caption = src.load(i)
        img.save(os.path.join(folder, f'{i}.png'))
        rows.append(f'{i}.png,"{captions[i] if captions else caption}"')
    path = os.path.join(folder, 'pairs.csv')
    open(path, 'w').write('\n'.join(rows) + '\n')
    return path


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """The README's tiny config at half its samples (300 steps, as the det and seg tests shorten theirs: measured
    2026-12-03, loss 1.75, zero-shot 17.3% top-1 / 67.7% top-5; the whole demo's figures are README's), once, with a
    retrieval set of 40 held-out pairs evaluated beside zero-shot."""
    tmp = tmp_path_factory.mktemp('clip')
    pairs = write_pairs(str(tmp / 'pairs'), 40, seed=10)  # 40 distinct captions: no two tie in the recounts below
    out = tmp / 'run'
    log = train_clip(out, f'--retrieval_data={pairs}', '--samples_seen=19200')
    return out, pairs, log


def test_tiny_config_learns_zero_shot_above_chance(trained):
    out, _, log = trained
    assert 'training in fp32 instead' in log
    rows = log_rows(out)
    losses = [r['loss'] for r in rows if 'loss' in r]
    assert losses[0] > 3.5 and losses[-1] < 2.0, losses  # ln(64) = 4.16 at chance
    final = [r['eval'] for r in rows if 'eval' in r][-1]
    zs = final['zeroshot']
    # 10 shapes, 1,000 held-out images: chance is 10% +- 0.95% (one standard deviation); 14% is 4 above
    assert zs['images'] == 1000 and zs['top1'] > 14.0 and zs['top5'] > 60.0, zs


def test_eval_only_reproduces_the_training_numbers(trained, tmp_path):
    out, pairs, _ = trained
    final = [r['eval'] for r in log_rows(out) if 'eval' in r][-1]
    train_clip(tmp_path, '--eval_only=True', f'--init_from={out}/clip.pt', f'--retrieval_data={pairs}')
    res = json.load(open(tmp_path / 'eval.json'))
    assert res['zeroshot'] == final['zeroshot']
    assert res['retrieval'] == pytest.approx(final['retrieval'], abs=1e-9)


def test_export_loads_into_open_clip_with_the_same_embeddings_and_retrieval(trained):
    import open_clip
    out, pairs, _ = trained
    ckpt = torch.load(out / 'clip.pt', weights_only=False)
    ours = CLIP(eva_config('eva_tiny', pooling='cls', num_classes=64), TEXT_SIZES['tiny'], 64).eval()
    ours.load_state_dict(ckpt['model'])
    register_timm_eva(str(out / 'open_clip'))
    ref, _, preprocess = open_clip.create_model_and_transforms(f'local-dir:{out}/open_clip')
    tokenizer = open_clip.get_tokenizer(f'local-dir:{out}/open_clip')
    ref.eval()
    rows = [line.rsplit(',', 1) for line in open(pairs).read().splitlines()[1:]]
    images = [os.path.join(os.path.dirname(pairs), r[0]) for r in rows]
    captions = [r[1].strip('"') for r in rows]
    from PIL import Image
    x = torch.stack([preprocess(Image.open(p)) for p in images])
    torch.testing.assert_close(x, torch.stack([eval_transform(32)(Image.open(p).convert('RGB')) for p in images]))
    tokens = tokenizer(captions)
    with torch.no_grad():
        img, txt = ref.encode_image(x, normalize=True), ref.encode_text(tokens, normalize=True)
        torch.testing.assert_close(img, ours.encode_image(x), atol=1e-6, rtol=0)
        torch.testing.assert_close(txt, ours.encode_text(tokens), atol=1e-6, rtol=0)
        assert ref.logit_scale.item() == pytest.approx(ours.logit_scale.item())
    # the retrieval numbers the run logged, recounted by hand from open_clip's embeddings (one caption per image)
    sim = (img @ txt.T).numpy()
    i2t = {k: 100 * np.mean([i in np.argsort(-sim[i])[:k] for i in range(40)]) for k in (1, 5, 10)}
    t2i = {k: 100 * np.mean([i in np.argsort(-sim[:, i])[:k] for i in range(40)]) for k in (1, 5, 10)}
    logged = [r['eval'] for r in log_rows(out) if 'eval' in r][-1]['retrieval']
    for k in (1, 5, 10):
        assert logged[f'i2t_r{k}'] == pytest.approx(i2t[k]) and logged[f't2i_r{k}'] == pytest.approx(t2i[k])
    assert logged['i2t_r10'] > 25.0  # chance: 10 of 40


def _gathered_loss(rank, world, init_file, feats, result_file):
    torch.distributed.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    img, txt, scale = (t.clone().requires_grad_(True) for t in feats)
    b = img.shape[0] // world
    mine = slice(rank * b, (rank + 1) * b)
    loss = clip_loss(img[mine], txt[mine], scale, rank, world)
    loss.backward()
    torch.save({'loss': loss.detach(), 'img': img.grad[mine], 'txt': txt.grad[mine], 'scale': scale.grad},
               f'{result_file}.{rank}')
    torch.distributed.destroy_process_group()


def test_readme_loads_the_tiny_export_into_open_clip(trained, run_readme):
    out, _, _ = trained
    ns = run_readme("create_model_and_transforms", **{'out/clip_tiny': out})  # the README's lines, verbatim
    ours = CLIP(eva_config('eva_tiny', pooling='cls', num_classes=64), TEXT_SIZES['tiny'], 64).eval()
    ours.load_state_dict(torch.load(out / 'clip.pt', weights_only=False)['model'])
    x, tokens = torch.randn(2, 3, 32, 32), ns['tokenizer'](['a small red circle', 'a large blue square'])
    with torch.no_grad():
        torch.testing.assert_close(ns['clip'].eval().encode_image(x, normalize=True), ours.encode_image(x))
        torch.testing.assert_close(ns['clip'].encode_text(tokens, normalize=True), ours.encode_text(tokens))


def test_gathered_loss_and_gradients_equal_the_single_process_loss(tmp_path):
    """Two gloo ranks, each with half of the batch: the mean of their losses is the loss of the whole batch, and
    the gradients (summed over ranks, as the data-parallel mean of rank losses makes them, times world) equal the
    whole batch's. The reference is the plain formula on one process, written out here."""
    torch.manual_seed(0)
    B, E, world = 6, 8, 2
    feats = (F.normalize(torch.randn(B, E), dim=-1), F.normalize(torch.randn(B, E), dim=-1), torch.tensor(7.0))
    torch.multiprocessing.spawn(_gathered_loss, args=(world, str(tmp_path / 'init'), feats, str(tmp_path / 'r')),
                                nprocs=world)
    res = [torch.load(tmp_path / f'r.{r}') for r in range(world)]
    img, txt, scale = (t.clone().requires_grad_(True) for t in feats)
    logits = scale * img @ txt.T
    ref = (F.cross_entropy(logits, torch.arange(B)) + F.cross_entropy(logits.T, torch.arange(B))) / 2
    ref.backward()
    torch.testing.assert_close(sum(r['loss'] for r in res) / world, ref.detach())
    # each rank's gradient on its own rows = d(sum of the ranks' losses)/d(rows) = world * d(ref)/d(rows)
    torch.testing.assert_close(torch.cat([r['img'] for r in res]) / world, img.grad)
    torch.testing.assert_close(torch.cat([r['txt'] for r in res]) / world, txt.grad)
    torch.testing.assert_close(sum(r['scale'] for r in res) / world, scale.grad)


def test_two_ranks_train_as_one(tmp_path):
    """The whole step through DeepSpeed: 2 ranks x 8 pairs and 1 rank x 16 give the same losses and weights
    (the 2 ranks also recompute both towers' blocks in backward: gradient checkpointing changes nothing)."""
    common = ['--zeroshot_data=', '--batch_size=16', '--max_steps=3', '--warmup_steps=1', '--log_interval=1',
              '--eval_interval=3']
    train_clip(tmp_path / 'one', *common, '--micro_batch=16')
    train_clip(tmp_path / 'two', *common, '--micro_batch=8', '--grad_checkpointing=True', nproc=2)
    one, two = ({r['step']: r['loss'] for r in log_rows(tmp_path / d) if 'loss' in r} for d in ('one', 'two'))
    assert sorted(one) == [1, 2, 3]
    for s in one:
        assert two[s] == pytest.approx(one[s], rel=1e-5)
    a = torch.load(tmp_path / 'one' / 'clip.pt', weights_only=False)['model']
    b = torch.load(tmp_path / 'two' / 'clip.pt', weights_only=False)['model']
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=k)


def test_resume_is_exact(tmp_path, zero_stage=1):
    # ZeRO-1 as the configs run it; test_common resumes each of ZeRO 0 / 1 / 2 exactly on 2 ranks
    # warmup_steps 10 > the run's 6 steps: the warmup is cut at 6 (lr 2e-3 (s - 1) / 6 at step s)
    common = ['--zeroshot_data=', '--batch_size=16', '--micro_batch=16', '--samples_seen=96', '--warmup_steps=10',
              '--log_interval=1', '--eval_interval=100', '--drop_path=0.1', '--synthetic_size=40',
              f'--zero_stage={zero_stage}']
    train_clip(tmp_path / 'full', *common)
    train_clip(tmp_path / 'cut', *common, '--stop_step=3')
    train_clip(tmp_path / 'cut', *common)
    full, cut = ({r['step']: r['loss'] for r in log_rows(tmp_path / d) if 'loss' in r} for d in ('full', 'cut'))
    assert sorted(cut) == sorted(full) == [1, 2, 3, 4, 5, 6]
    for s in full:
        assert cut[s] == pytest.approx(full[s], rel=1e-6), (s, full, cut)
    rows = [r for r in log_rows(tmp_path / 'cut') if 'loss' in r]
    assert [r['lr'] for r in rows] == pytest.approx([2e-3 * s / 6 for s in range(6)])
    assert set(ROW_FORMAT) - {'img_s'} <= set(rows[-1]) and rows[-1]['samples'] == 96
    a = torch.load(tmp_path / 'full' / 'clip.pt', weights_only=False)['model']
    b = torch.load(tmp_path / 'cut' / 'clip.pt', weights_only=False)['model']
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_recall_at_k_by_hand():
    # 3 queries x 4 candidates; query 0's positive ranks 1st, query 1's 3rd, query 2 has two positives ranked 2nd
    # and 4th
    scores = torch.tensor([[0.9, 0.1, 0.2, 0.3],
                           [0.8, 0.7, 0.1, 0.6],
                           [0.5, 0.9, 0.1, 0.7]])
    positives = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 1]], dtype=torch.bool)
    positives[1] = torch.tensor([0, 1, 0, 0], dtype=torch.bool)  # 0.7 ranks 2nd of 0.8, 0.7, 0.6, 0.1
    r = recall_at_k(scores, positives, ks=(1, 2, 3))
    assert r[1] == pytest.approx(100 / 3) and r[2] == pytest.approx(100.0) and r[3] == pytest.approx(100.0)
    r = recall_at_k(scores, torch.tensor([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]], dtype=torch.bool), ks=(1, 2, 3, 4))
    # positive ranks: 4th, 4th, 3rd
    assert [r[k] for k in (1, 2, 3, 4)] == pytest.approx([0.0, 0.0, 100 / 3, 100.0])


def test_csv_with_a_missing_image_and_an_empty_caption_is_skipped_and_counted(tmp_path, capfd):
    path = write_pairs(str(tmp_path), 6, captions=['a red circle', '', 'a blue square', 'x', 'y', 'z'])
    os.remove(tmp_path / '3.png')
    ds = Samples(CaptionFiles(path), eval_transform(32), text_transform=lambda c: c)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=6)))
    err = capfd.readouterr().err
    assert 'row 3 ' in err and 'empty caption' in err and '3.png' in err
    assert list(batch['text']) == ['a red circle', 'a blue square', 'a blue square', 'y', 'y', 'z']  # the next row's
    assert batch['skipped'].tolist() == [0, 1, 0, 1, 0, 0] and int(batch['skipped'].sum()) == 2
    with pytest.raises(ValueError, match=r"pairs.csv: no column 'caption'.*\['filepath', 'title'\]"):
        CaptionFiles(path, caption_key='caption')
    with pytest.raises(FileNotFoundError, match='nope.csv'):
        CaptionFiles(str(tmp_path / 'nope.csv'))


def _member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder, n_shards, per_shard, bad=False):
    """img2dataset-style shards: KEY.jpg, KEY.txt, KEY.json. With bad: shard 0 gets a corrupt JPEG, a sample
    without caption, an empty caption and one without image; the last shard is cut off mid-archive."""
    src = SyntheticCaptions(n_shards * per_shard, 32, seed=3)
    os.makedirs(folder, exist_ok=True)
    for s in range(n_shards):
        with tarfile.open(os.path.join(folder, f'{s:05d}.tar'), 'w') as tar:
            for i in range(s * per_shard, (s + 1) * per_shard):
                img, caption = src.load(i)
                buf = io.BytesIO()
                img.save(buf, 'JPEG')
                _member(tar, f'{i:09d}.jpg', buf.getvalue())
                _member(tar, f'{i:09d}.txt', caption.encode())
                _member(tar, f'{i:09d}.json', b'{}')
            if bad and s == 0:
                _member(tar, 'bad_jpeg.jpg', b'\xff\xd8 not a jpeg')
                _member(tar, 'bad_jpeg.txt', b'a caption')
                _member(tar, 'no_caption.jpg', buf.getvalue())
                _member(tar, 'empty_caption.jpg', buf.getvalue())
                _member(tar, 'empty_caption.txt', b'  \n')
                _member(tar, 'no_image.txt', b'a caption without image')
    if bad:
        last = os.path.join(folder, f'{n_shards - 1:05d}.tar')
        data = open(last, 'rb').read()
        open(last, 'wb').write(data[:len(data) // 2])


def stream(folder, **kw):
    """Captions and the skipped count of one pass, over every rank and its 2 workers."""
    out, skipped = [], 0
    for rank in range(kw['world']):
        ds = TarShards(folder, eval_transform(32), lambda c: c, rank=rank, **{'passes': 1, **kw})
        dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        for sample in dl:
            assert sample['image'].shape == (3, 32, 32) and set(sample) == {'image', 'text', 'index', 'skipped'}
            out.append(sample['text'])
            skipped += sample['skipped']
    return out, skipped


def test_tar_shards_split_across_ranks_and_workers_exactly_once(tmp_path):
    write_shards(str(tmp_path), 5, 6)
    src = SyntheticCaptions(30, 32, seed=3)
    expected = sorted(src.caption(i) for i in range(30))
    for world in (1, 2):  # 5 shards over 2 and 4 units: whole shards each
        caps, skipped = stream(str(tmp_path), world=world)
        assert sorted(caps) == expected and skipped == 0
    caps, _ = stream(str(tmp_path), world=3)  # 5 shards < 6 units: each unit keeps its share of the samples
    assert sorted(caps) == expected
    assert expand_shards(str(tmp_path / '{00001..00003}.tar')) == [str(tmp_path / f'0000{i}.tar') for i in (1, 2, 3)]
    with pytest.raises(FileNotFoundError, match=r'5 shard\(s\) .* not found, e.g. .*00005.tar'):
        expand_shards(str(tmp_path / '{00000..00009}.tar'))


def test_tar_shards_skip_and_count_bad_members_and_a_broken_shard(tmp_path, capfd):
    write_shards(str(tmp_path), 3, 6, bad=True)
    caps, skipped = stream(str(tmp_path), world=1, shuffle_buffer=4)
    err = capfd.readouterr().err
    # shard 0: 6 good + 4 bad (corrupt JPEG, no caption, empty caption, no image); shard 1: 6 good; shard 2 cut in
    # half: the samples before the cut are read, then one count for the broken archive
    assert 'bad_jpeg' in err and 'no_caption' in err and 'empty caption' in err and 'no_image' in err
    assert 'the shard breaks after this sample' in err and '00002.tar' in err
    assert 12 <= len(caps) < 18 and skipped == 4 + 1, (len(caps), skipped)
    # three passes over the same shards: every good sample three times, each bad one named and counted once
    caps3, skipped3 = stream(str(tmp_path), world=1, shuffle_buffer=4, passes=3)
    assert sorted(caps3) == sorted(caps * 3) and skipped3 == 5 and capfd.readouterr().err.count('bad_jpeg') == 1


def test_text_tower_from_an_open_clip_checkpoint(tmp_path):
    import open_clip
    from open_clip.transformer import TextTransformer
    src = open_clip.create_model('ViT-B-32')
    torch.save(src.state_dict(), tmp_path / 'b32.pt')
    text = TextTransformer(context_length=77, vocab_size=49408, width=512, heads=8, layers=12, output_dim=64)
    before = text.text_projection.detach().clone()
    load_text_tower(text, 'ViT-B-32', str(tmp_path / 'b32.pt'))
    ref = src.state_dict()
    for k, v in text.state_dict().items():
        if k == 'text_projection':  # 512 x 512 in the file, 512 x 64 here: stays as initialised
            assert torch.equal(v, before)
        elif k != 'attn_mask':
            assert torch.equal(v, ref[k]), k
    bad = TextTransformer(context_length=77, vocab_size=49408, width=512, heads=8, layers=11, output_dim=64)
    bad.transformer.resblocks[0].mlp.c_fc = torch.nn.Linear(512, 1024)
    with pytest.raises(ValueError, match='resblocks.0.mlp.c_fc.weight'):
        load_text_tower(bad, 'ViT-B-32', str(tmp_path / 'b32.pt'))
    with pytest.raises(OSError, match=r"open_clip model 'ViT-B-32', pretrained '.*/no\.pt': Pretrained value"):
        load_text_tower(text, 'ViT-B-32', str(tmp_path / 'no.pt'))  # the stage's input_errors: one line
    assert uses_quick_gelu('ViT-L-14', 'openai') and not uses_quick_gelu('ViT-L-14', '')


def test_eva_g_clip_has_open_clip_eva01_g_keys():
    """EVA-g + CLIP-L text: after the export's renaming, the same keys and shapes as open_clip's EVA01-g-14, the
    released EVA-CLIP g/14 layout (built on the meta device: no memory, no download)."""
    import open_clip
    with torch.device('meta'):
        ours = CLIP(eva_config('eva_g', pooling='cls', num_classes=1024), TEXT_SIZES['clip_l'], 1024)
        from open_clip.model import CustomTextCLIP
        cfg = open_clip.get_model_config('EVA01-g-14')
        cfg.pop('custom_text', None)
        ref = CustomTextCLIP(**cfg)
    mine = {k: tuple(v.shape) for k, v in open_clip_state_dict(ours.state_dict()).items()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert mine == theirs


def test_script_trains_from_a_csv_and_from_tar_shards_counting_bad_samples(tmp_path):
    # a CSV of 8 rows, one with a missing image and one with an empty caption: one epoch = one batch of 8, so each
    # bad row is met exactly once, skipped, and counted in the log
    path = write_pairs(str(tmp_path / 'csv'), 8, captions=['a red circle', '', 'a blue square', 'x', 'y', 'z', 'u',
                                                              'v'])
    os.remove(tmp_path / 'csv' / '3.png')
    common = ['--zeroshot_data=', '--batch_size=8', '--micro_batch=8', '--log_interval=1', '--eval_interval=100']
    train_clip(tmp_path / 'run_csv', *common, f'--train_data={path}', '--samples_seen=8')
    rows = [r for r in log_rows(tmp_path / 'run_csv') if 'loss' in r]
    assert len(rows) == 1 and rows[0]['bad_samples'] == 2 and np.isfinite(rows[0]['loss'])
    # tar shards with bad members and a broken shard, 2 workers; stopped after step 2 and resumed (a new stream)
    write_shards(str(tmp_path / 'shards'), 3, 6, bad=True)
    args = [*common, f'--train_data={tmp_path}/shards', '--samples_seen=32', '--num_workers=2', '--shuffle_buffer=4']
    train_clip(tmp_path / 'run_tar', *args, '--stop_step=2')
    log = train_clip(tmp_path / 'run_tar', *args)
    assert 'resumed from' in log and '3 tar shards' in log
    rows = [r for r in log_rows(tmp_path / 'run_tar') if 'loss' in r]
    assert [r['step'] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r['loss']) for r in rows)
    assert 0 < sum(r['bad_samples'] for r in rows) and (tmp_path / 'run_tar' / 'open_clip').is_dir()
    # a missing file or folder, a CSV without the columns, an unknown size: one error line each, no traceback
    for arg, error in ((f'--train_data={tmp_path}/no.csv', f'caption file not found: {tmp_path}/no.csv'),
                       (f'--train_data={path}', f"{path}: no column 'caption'"),
                       (f'--zeroshot_data={tmp_path}/nodir', f'zeroshot_data: no such folder: {tmp_path}/nodir'),
                       ('--text_size=clip_x', "text_size must be one of clip_l, clip_b, tiny, got 'clip_x'")):
        r = run_stage('train_clip.py', 'config/clip_tiny.py', f'--out_dir={tmp_path}/bad', '--csv_caption_key=caption',
                      arg, check=False)
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 1 and last.startswith(f'error: {error}'), (arg, r.stderr[-2000:])
        assert 'Traceback' not in r.stderr, (arg, r.stderr[-2000:])


def test_zero_shot_on_class_folders_against_a_count_by_hand(trained, tmp_path):
    """eval_only on a class-folder set ('auto': the folder names are the class names) with a prompt file, against
    the prompt-ensemble classifier computed here from the same weights."""
    out, _, _ = trained
    src = SyntheticCaptions(60, 32, seed=9)
    shapes = SyntheticCaptions.SHAPES
    for i in range(60):
        img, _ = src.load(i)
        folder = tmp_path / 'zs' / shapes[src._params(i)['label']].replace(' ', '_')
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f'{i}.png')
    prompts = ['a small red {} on a noisy background', 'a large blue {} on a striped background']
    (tmp_path / 'prompts.txt').write_text('\n'.join(prompts) + '\n')
    train_clip(tmp_path / 'ev', '--eval_only=True', f'--init_from={out}/clip.pt', f'--zeroshot_data={tmp_path}/zs',
               f'--zeroshot_templates={tmp_path}/prompts.txt')
    res = json.load(open(tmp_path / 'ev' / 'eval.json'))['zeroshot']
    classes = sorted(p.name for p in (tmp_path / 'zs').iterdir())
    model = CLIP(eva_config('eva_tiny', pooling='cls', num_classes=64), TEXT_SIZES['tiny'], 64).eval()
    model.load_state_dict(torch.load(out / 'clip.pt', weights_only=False)['model'])
    import open_clip
    from PIL import Image
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    hits, n = 0, 0
    with torch.no_grad():
        w = torch.stack([F.normalize(model.encode_text(tok([p.format(c.replace('_', ' ')) for p in prompts])).mean(0),
                                     dim=0) for c in classes])
        for label, c in enumerate(classes):
            for f in sorted((tmp_path / 'zs' / c).iterdir()):
                x = eval_transform(32)(Image.open(f).convert('RGB'))[None]
                hits += int((model.encode_image(x) @ w.T).argmax() == label)
                n += 1
    assert res['images'] == n == 60 and res['top1'] == pytest.approx(100 * hits / n)


def test_script_starts_the_text_tower_from_an_open_clip_file_on_two_ranks(tmp_path):
    """text_init_from through the script (each node's first rank reads first, the others after a barrier): after
    one step at the warmup's lr of 0 the text tower is the file's, but for the projection of another width."""
    import open_clip
    src = open_clip.create_model('ViT-B-32')
    torch.save(src.state_dict(), tmp_path / 'b32.pt')
    log = train_clip(tmp_path / 'run', '--zeroshot_data=', '--text_size=clip_b', f'--text_init_from={tmp_path}/b32.pt',
                     '--text_init_model=ViT-B-32', '--batch_size=8', '--micro_batch=4', '--samples_seen=8',
                     '--warmup_steps=1', '--eval_interval=1', nproc=2)
    assert 'load_text_tower: ' in log and 'text_projection (512, 512) -> (512, 64)' in log
    sd = torch.load(tmp_path / 'run' / 'clip.pt', weights_only=False)['model']
    ref = src.state_dict()
    text = {k[len('text.'):]: v for k, v in sd.items() if k.startswith('text.')}
    assert len(text) == len([k for k in ref if k.startswith(('token_embedding', 'positional_embedding',
                                                             'transformer.', 'ln_final', 'text_projection'))])
    for k, v in text.items():
        if k != 'text_projection':
            assert torch.equal(v, ref[k]), k
