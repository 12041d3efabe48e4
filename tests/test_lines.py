"""The style limit DESIGN.md sets, checked with the suite (so in CI): no line of the repository's Python files over 120
characters."""
import glob
import os

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
