"""What the test files share: the repository root on sys.path (the stage files live there, as in nanoGPT's), one
launcher of the repository's scripts (`from conftest import run_stage, log_rows`: pytest puts tests/ on sys.path),
one reader of a run's log.jsonl, and the README and curve fixtures."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pytest  # noqa: E402

# two test files run at a time on a 2-core machine (-n 2): one OpenMP thread per process, torch's and the scripts'
# (a stage script takes all the cores it sees when this is unset), so that two runs do not oversubscribe the cores
os.environ.setdefault('OMP_NUM_THREADS', '1')


def run_stage(script, *args, nproc=1, env=None, timeout=900, cwd=ROOT, check=True):
    """`python script args` from the repository root, or with nproc > 1 the same under `torchrun --standalone
    --nproc_per_node nproc`; env: variables set for it on top of this process's. -> the finished process (output
    captured as text); check: its exit status must be 0, else the test fails with the end of its output."""
    launch = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
    r = subprocess.run((launch if nproc > 1 else [sys.executable]) + [str(script), *map(str, args)], cwd=cwd,
                       env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r


def log_rows(run_dir):
    """The rows of a run's log.jsonl, in order."""
    return [json.loads(line) for line in open(os.path.join(run_dir, 'log.jsonl'))]


@pytest.fixture(autouse=True, scope='session')
def index_cache(tmp_path_factory):
    """The suite's data indexes (data.cached_index) in a folder of its own, for its runs too, not in ~/.cache."""
    os.environ['EVA_INDEX_DIR'] = str(tmp_path_factory.mktemp('eva-index'))


@pytest.fixture
def run_readme(monkeypatch, tmp_path):
    """run_readme(marker, **links): runs the README's ```python block that contains `marker`, verbatim, in a fresh
    folder where each link name (e.g. 'out/pretrain_tiny') points at a run's output; -> the block's namespace."""
    def run(marker, **links):
        readme = open(os.path.join(ROOT, 'README.md')).read()
        blocks = [b.split('```', 1)[0] for b in readme.split('```python\n')[1:]]
        code = [b for b in blocks if marker in b]
        assert len(code) == 1, f"{len(code)} README python blocks contain {marker!r}"
        for name, target in links.items():
            os.makedirs(tmp_path / os.path.dirname(name), exist_ok=True)
            os.symlink(target, tmp_path / name)
        monkeypatch.chdir(tmp_path)
        namespace = {}
        exec(code[0], namespace)
        return namespace
    return run


@pytest.fixture
def check_curves():
    """check_curves(run_dir, *panels): plot.py draws a stage's real log.jsonl: curves.png written, the training loss,
    lr and the given panels (evaluation groups) among its curves, each loss value the one in the log."""
    import plot  # matplotlib: only the tests that draw pay its import

    def check(run_dir, *panels):
        rows, bad = plot.read_log(os.path.join(run_dir, 'log.jsonl'))
        got = plot.curves(rows)
        assert bad == 0 and {'training loss', 'lr', *panels} <= set(got), sorted(got)
        assert got['training loss']['loss'][1] == [r['loss'] for r in rows if 'loss' in r]
        assert os.path.getsize(plot.plot_curves(str(run_dir))) > 10_000
        assert len([line for line in open(os.path.join(run_dir, 'log.jsonl')) if json.loads(line).get('eval')]) > 0
    return check
