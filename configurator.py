"""
Config overrides, nanoGPT's way. A stage script defines its config as plain globals (each with an inline
comment), then runs `exec(open('configurator.py').read())`. Arguments, in order:

    python pretrain.py config/pretrain_eva_g.py --batch_size=2048 --out_dir=out/run2
    python pretrain.py --help          # every setting with its default and its comment

A config file is plain Python run in its own namespace; a --key=value value is read with ast.literal_eval
(numbers, tuples, lists, True/None) and is kept as a string when that fails (paths) or when the key's default is a
string (--data_path=2017 is the folder '2017'). An unknown key fails naming
the close matches; a value of the wrong type fails naming the key (ints are accepted for floats, lists for
tuples; any value for a None default). The config keys are the script's globals of plain types defined before
this file runs, but for UPPER_CASE constants.
"""
import ast as _ast
import difflib as _difflib
import re as _re
import sys as _sys

_TYPES = (bool, int, float, str, tuple, list, type(None))
_keys = [k for k, v in list(globals().items())  # constants (CLIP_MEAN, ROOT) are not settings
         if not k.startswith('_') and not k.isupper() and isinstance(v, _TYPES)]


def _cfg_set(key, value, where):
    if key not in _keys:
        close = _difflib.get_close_matches(key, _keys, n=3, cutoff=0.5)
        raise SystemExit(f"unknown config key '{key}' ({where})" +
                         (f"; did you mean {', '.join(close)}?" if close else "; see --help for the keys"))
    default = globals()[key]
    if default is not None:
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        if type(value) is not type(default):
            raise SystemExit(f"config key '{key}' ({where}) wants {type(default).__name__} "
                             f"like its default {default!r}, got {type(value).__name__} {value!r}")
    globals()[key] = value


def _cfg_help():
    # the comment of each key is read from the script's own source: `name = value  # comment`
    src = open(_sys.argv[0]).read().splitlines()
    comments, headers, last, header = {}, {}, None, None
    for line in src:  # a comment goes on over the lines after it that hold an indented comment ('#   ...')
        m, more = _re.match(r'^(\w+)\s*=.*?#\s*(.*)$', line), _re.match(r'^\s*#\s\s+(.*)$', line)
        if m and m.group(1) in _keys and m.group(1) not in comments:
            comments[last := m.group(1)] = m.group(2)
            if header:  # a block's '# config...' line, shown before its first key (det_seg.py: det / seg keys)
                headers[last], header = header, None
        elif more and last:
            comments[last] += ' ' + more.group(1)
        else:
            last = None
            if line.startswith('# config'):
                header = line
    print(f"usage: python {_sys.argv[0]} [config/file.py ...] [--key=value ...]\n")
    width = max(len(k) for k in _keys)
    for k in _keys:
        if k in headers:
            print(headers[k])
        print(f"  {k:<{width}} = {globals()[k]!r:<24}  # {comments.get(k, '')}")


for _arg in _sys.argv[1:]:
    if _arg in ('-h', '--help'):
        _cfg_help()
        raise SystemExit(0)
    if not _arg.startswith('--'):
        try:
            _src = open(_arg).read()
        except OSError as _e:
            raise SystemExit(f"cannot read config file {_arg}: {_e.strerror}")
        _ns = {}
        exec(compile(_src, _arg, 'exec'), _ns)
        for _k, _v in _ns.items():
            if not _k.startswith('_') and isinstance(_v, _TYPES):
                _cfg_set(_k, _v, _arg)
    else:
        if '=' not in _arg:
            raise SystemExit(f"expected --key=value, got '{_arg}'")
        _k, _raw = _arg[2:].split('=', 1)  # split once: a value may contain '='
        try:
            _v = _ast.literal_eval(_raw)
        except (ValueError, SyntaxError):
            _v = _raw  # a bare string such as a path
        if isinstance(globals().get(_k), str) and not isinstance(_v, str):
            _v = _raw  # a string setting takes the text as typed: --data_path=2017, --rows=1e6,1e7
        _cfg_set(_k, _v, _arg)
