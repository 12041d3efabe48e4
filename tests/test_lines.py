"""The style limit DESIGN.md sets, checked with the suite (so in CI): no line of the repository's Python files over 120
characters; the commands in README and the files' docstrings name settings and files that exist; the recipe configs
name real data."""
import ast
import glob
import os
import re

from conftest import ROOT


def test_no_line_over_120_characters():
    files = sorted(glob.glob(os.path.join(ROOT, '*.py')) + glob.glob(os.path.join(ROOT, 'config', '*.py')) +
                   glob.glob(os.path.join(ROOT, 'tests', '*.py')))
    assert len(files) > 30  # the stage files, the configs and the tests were found
    long = []
    for path in files:
        for i, line in enumerate(open(path, encoding='utf-8'), 1):
            if len(line.rstrip('\n')) > 120:
                long.append(f"{os.path.relpath(path, ROOT)}:{i}: {len(line.rstrip())} characters")
    assert not long, '\n'.join(long)


def assignments(path):
    """{name: value node} of a file's module-level assignments: a script's settings (and constants), what
    configurator.py accepts; a config file's values."""
    tree = ast.parse(open(os.path.join(ROOT, path), encoding='utf-8').read())
    return {t.id: node.value for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)}


def settings(script):
    return set(assignments(script))


OTHER_FLAGS = {'dist', 'nproc_per_node', 'nnodes', 'node_rank', 'rdzv_backend', 'rdzv_endpoint', 'rdzv_id',
               'max', 'nodes', 'ntasks', 'gpus', 'cpus', 'time',  # pytest's, torchrun's, SBATCH's (--max-restarts)
               'image_size', 'patch_size', 'videos', 'check',  # model.py's and data.py's command lines
               'help', 'key'}  # every script's --help; README's `--key=value`


def test_commands_name_real_settings_and_files():
    """Every `python X.py ...` / `torchrun ... X.py ...` in README and in the files' opening docstrings (continued
    lines joined): each --key is a setting of X.py and each config file exists; every other --key there is some
    script's setting (or pytest's, torchrun's, SLURM's, model.py's and data.py's own): a renamed setting or config
    leaves no stale command behind."""
    scripts = [f for f in os.listdir(ROOT) if f.endswith('.py') and f not in ('configurator.py', 'model.py', 'data.py')]
    known = {f: settings(f) | {'help'} for f in scripts}
    anywhere = set().union(*known.values()) | OTHER_FLAGS
    files = ['README.md'] + sorted(glob.glob('*.py', root_dir=ROOT) + glob.glob('config/*.py', root_dir=ROOT))
    checked, stale = 0, []
    for name in files:
        text = open(os.path.join(ROOT, name), encoding='utf-8').read()
        text = text if name == 'README.md' else ast.get_docstring(ast.parse(text)) or ''
        text, in_commands = text.replace('\\\n', ' '), set()
        for m in re.finditer(r'(?:python|torchrun[^`\n]*?)\s+(\w+\.py)((?:[ \t]+[^\s`|#]+)*)', text):
            script, words = m.group(1), m.group(2).split()
            if script not in known:
                continue  # model.py's and data.py's command lines have their own usage; 'python X.py' in prose
            in_commands.update(range(*m.span()))
            for word in words:
                key = word[2:].split('=')[0]
                if word.startswith('--') and key not in known[script]:
                    stale.append(f"{name}: {script} has no setting {key!r}: {m.group(0)}")
                elif word.endswith('.py') and word[0] != '-' and not os.path.isfile(os.path.join(ROOT, word)):
                    stale.append(f"{name}: no file {word}: {m.group(0)}")
                checked += word.startswith('--')
        for m in re.finditer(r'(?<![\w-])--(\w+)', text):
            checked += m.start() not in in_commands
            if m.start() not in in_commands and m.group(1) not in anywhere:
                stale.append(f"{name}: no setting {m.group(1)!r} in any script: {text[m.start() - 40:m.end() + 20]!r}")
    assert checked > 300, checked  # the commands and settings were found
    assert not stale, '\n'.join(stale)


DATA_KEYS = ('data_path', 'val_data_path', 'train_images', 'val_images', 'train_json', 'val_json', 'train_labels',
             'val_labels', 'train_data', 'zeroshot_data')  # the settings that name a stage's data


def test_recipe_configs_name_real_data():
    """Every recipe config (all but the *_tiny ones) names its dataset's files, in itself or by its script's default:
    run without data, it stops at once naming what is missing, never trains EVA-g on the synthetic shapes."""
    scripts = {'pretrain': 'pretrain.py', 'finetune_in': 'finetune_cls.py', 'finetune_k': 'finetune_video.py',
               'det': 'det_seg.py', 'seg': 'det_seg.py', 'clip': 'train_clip.py'}
    configs = sorted(f for f in glob.glob('config/*.py', root_dir=ROOT) if not f.endswith('_tiny.py'))
    assert len(configs) == 14, configs
    synthetic = []
    for config in configs:
        script = next(s for prefix, s in scripts.items() if os.path.basename(config).startswith(prefix))
        values = {k: ast.literal_eval(v) for k, v in {**assignments(script), **assignments(config)}.items()
                  if k in DATA_KEYS}  # the script's defaults, then the config's values, as configurator.py sets them
        synthetic += [f"{config}: {k} = {v!r}" for k, v in values.items() if str(v).startswith('synthetic')]
    assert not synthetic, '\n'.join(synthetic)
