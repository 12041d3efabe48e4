import os
import sys

# the stage files live at the repository root, as in nanoGPT; tests import them from there
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402


@pytest.fixture
def run_readme(monkeypatch, tmp_path):
    """run_readme(marker, **links): runs the README's ```python block that contains `marker`, verbatim, in a fresh
    folder where each link name (e.g. 'out/pretrain_tiny') points at a run's output; -> the block's namespace."""
    def run(marker, **links):
        readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'README.md')).read()
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
    import json

    import plot

    def check(run_dir, *panels):
        rows, bad = plot.read_log(os.path.join(run_dir, 'log.jsonl'))
        got = plot.curves(rows)
        assert bad == 0 and {'training loss', 'lr', *panels} <= set(got), sorted(got)
        assert got['training loss']['loss'][1] == [r['loss'] for r in rows if 'loss' in r]
        assert os.path.getsize(plot.plot_curves(str(run_dir))) > 10_000
        assert len([line for line in open(os.path.join(run_dir, 'log.jsonl')) if json.loads(line).get('eval')]) > 0
    return check
