#!/usr/bin/env python3
"""Re-run the book's chapters and compare every output with the stored one.

The outputs stored in the notebooks are what the PDF prints, so they must be
what the code prints today. This re-executes each chapter in a fresh kernel
(cells marked `#| slow`, the book-scale runs, keep their stored outputs unless
`--slow` is given; cells with `eval: false` never run) and compares each
cell's new outputs with the stored ones:

- text (streams, `text/plain`, `text/markdown`, HTML tables) must match after
  masking temporary paths and object addresses, with numbers compared within
  a tolerance (`--rtol`, default 0.002, plus one unit in the last printed
  digit), since float results differ slightly between processors;
- images must still be images (their pixels are not compared);
- a cell with the directive `#| varies` (timings, throughput) is compared by
  the kinds of its outputs only (`#| varies: true` in the preface, which
  Quarto reads unfiltered);
- an error where none was stored, or none where one was, always fails.

A difference fails with the chapter, the cell's first line and a diff. At
the end the chapters are listed by running time, slowest first.

Usage: python book/verify.py [--slow] [--jobs N] [chapter-stem ...]
"""
import argparse
import difflib
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from build import ROOT, BookError, cell_options, load_book  # noqa: E402
from nbfilter import split_cell  # noqa: E402

_ANSI = re.compile(r'\x1b\[[0-9;]*[A-Za-z]')
_TMP = re.compile(r'(/tmp|/var/folders|/private/var)/[^\s\'",)]*')
_ADDR = re.compile(r'0x[0-9a-fA-F]{6,}')
_NUM = re.compile(r'[-−]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?')


def directives(cell):
    "nbdev's bare directives of a code cell (`slow`, `varies`, `export`)."
    d, _, _ = split_cell(cell.get('source', ''))
    return {w[0] for w in d}


def output_kinds(outputs):
    "The kind of each output: stream name, 'image', 'error' or 'text'."
    kinds = []
    for o in outputs:
        t = o.get('output_type')
        if t == 'stream':
            k = o.get('name', 'stdout')
            if not kinds or kinds[-1] != k:   # consecutive streams merge
                kinds.append(k)
        elif t == 'error':
            kinds.append('error')
        elif 'image/png' in o.get('data', {}) or \
                'image/svg+xml' in o.get('data', {}):
            kinds.append('image')
        else:
            kinds.append('text')
    return kinds


def output_text(outputs):
    "All text of `outputs`, normalised for comparison."
    parts = []
    for o in outputs:
        t = o.get('output_type')
        if t == 'stream':
            parts.append(''.join(o.get('text', '')))
        elif t == 'error':
            parts.append(f"{o.get('ename')}: {o.get('evalue')}")
        else:
            data = o.get('data', {})
            if 'image/png' in data or 'image/svg+xml' in data:
                parts.append('<image>')
                continue
            for key in ('text/markdown', 'text/html', 'text/plain'):
                if key in data:
                    parts.append(''.join(data[key]))
                    break
    text = _ANSI.sub('', '\n'.join(parts))
    text = _TMP.sub('<tmp>', text)
    text = _ADDR.sub('0x…', text)
    return '\n'.join(line.rstrip() for line in text.strip().splitlines())


def close(a, b, rtol):
    "Printed numbers `a` and `b` agree within `rtol` or a last-digit unit."
    if a == b:
        return True
    try:
        x, y = float(a.replace('−', '-')), float(b.replace('−', '-'))
    except ValueError:
        return False
    places = max(len(s.split('.')[1]) if '.' in s and 'e' not in s.lower()
                 else 0 for s in (a, b))
    return abs(x - y) <= rtol * max(abs(x), abs(y)) + 10 ** -places + 1e-12


def same_text(old, new, rtol):
    "Equal after masking, numbers within tolerance."
    if old == new:
        return True
    a, b = _NUM.split(old), _NUM.split(new)
    if a != b:
        return False
    return all(close(x, y, rtol) for x, y in zip(_NUM.findall(old),
                                                   _NUM.findall(new)))


def first_line(cell):
    "The first line of code of `cell`, to name it in messages."
    _, _, code = split_cell(cell.get('source', ''))
    lines = [ln for ln in code.splitlines() if ln.strip()]
    return lines[0][:70] if lines else '(empty)'


def run_chapter(path, slow=False, rtol=0.002, threads=None):
    "Execute chapter `path`; return (seconds, [problem messages])."
    if threads:
        os.environ['OMP_NUM_THREADS'] = str(threads)
    os.environ.setdefault('MPLBACKEND', 'agg')
    from execnb.nbio import read_nb
    from execnb.shell import CaptureShell
    path = Path(path)
    nb = read_nb(path)
    stored = [dict(outputs=list(c.get('outputs', []))) for c in nb.cells]

    def skip(cell):
        if cell.cell_type != 'code':
            return True
        if cell_options(cell, path.name).get('eval') is False:
            return True
        return 'slow' in directives(cell) and not slow
    shell = CaptureShell(path)
    cwd, start = os.getcwd(), time.time()
    os.chdir(path.parent)
    problems = []
    try:
        for i, cell in enumerate(nb.cells):
            if skip(cell):
                continue
            cell['outputs'] = []
            shell.cell(cell)
            old, new = stored[i]['outputs'], cell.get('outputs', [])
            where = f'{path.name}, cell {i} ({first_line(cell)})'
            if 'error' in output_kinds(new) and \
                    'error' not in output_kinds(old):
                tb = _ANSI.sub('', '\n'.join(new[-1].get('traceback', [])))
                problems.append(f'{where} raised an error:\n{tb[-2000:]}')
                break       # later cells depend on this one
            if output_kinds(old) != output_kinds(new):
                problems.append(f'{where}: outputs were '
                                f'{output_kinds(old)}, now '
                                f'{output_kinds(new)}')
                continue
            if 'varies' in directives(cell) or \
                    cell_options(cell, path.name).get('varies'):
                continue
            a, b = output_text(old), output_text(new)
            if not same_text(a, b, rtol):
                diff = difflib.unified_diff(a.splitlines(), b.splitlines(),
                                            'stored', 'now', lineterm='',
                                            n=1)
                problems.append(f'{where}: output changed:\n'
                                + '\n'.join(list(diff)[:40]))
    finally:
        os.chdir(cwd)
    return time.time() - start, problems


def main(argv=None):
    ap = argparse.ArgumentParser(
        description='Re-run the chapters and compare outputs with the '
                    'stored ones (see the module docstring).')
    ap.add_argument('names', nargs='*', help='only these chapters (stems)')
    ap.add_argument('--slow', action='store_true',
                    help='also re-run the book-scale cells marked slow')
    ap.add_argument('--jobs', type=int, default=2,
                    help='chapters run at once (default 2)')
    ap.add_argument('--rtol', type=float, default=0.002,
                    help='relative tolerance for printed numbers')
    args = ap.parse_args(argv)
    try:
        book = load_book(ROOT)
    except BookError as e:
        print(f'verify: {e}', file=sys.stderr)
        return 1
    paths = [p.resolve() for p in book['chapters']]
    if args.names:
        paths = [p for p in paths if p.stem in args.names]
        if len(paths) != len(set(args.names)):
            print(f'verify: not all of {" ".join(args.names)} are chapters '
                  f'in _quarto.yml', file=sys.stderr)
            return 1
    threads = max(1, (os.cpu_count() or 2) // max(1, args.jobs))
    results = {}
    # one fresh process per chapter (a kernel replaces __main__), imported
    # by name so that the worker finds the function
    import multiprocessing
    import verify as this
    with ProcessPoolExecutor(max_workers=args.jobs, max_tasks_per_child=1,
                             mp_context=multiprocessing.get_context('spawn')
                             ) as pool:
        futures = {p: pool.submit(this.run_chapter, p, args.slow, args.rtol,
                                  threads) for p in paths}
        for p, f in futures.items():
            try:
                results[p] = f.result()
            except Exception as e:   # the kernel itself failed
                results[p] = (0.0, [f'{p.name}: {type(e).__name__}: {e}'])
            secs, problems = results[p]
            status = 'ok' if not problems else f'{len(problems)} problem(s)'
            print(f'verify: {p.name}: {status} ({secs:.0f} s)', flush=True)
            for msg in problems:
                print(msg, flush=True)
    print('verify: chapters by running time:')
    for p, (secs, _) in sorted(results.items(), key=lambda r: -r[1][0]):
        print(f'  {secs:7.1f} s  {p.name}')
    failed = sum(bool(r[1]) for r in results.values())
    recorded = ROOT / 'book' / 'executed.json'
    if failed and recorded.exists():
        import json
        from build import environment
        envs = json.loads(recorded.read_text())
        print(f'verify: this run: {environment()}')
        for p, (_, problems) in results.items():
            if problems and p.stem in envs:
                print(f'verify: {p.stem} was executed on {envs[p.stem]}')
    if failed:
        print(f'verify: {failed} chapter(s) print something else than the '
              f'book shows: re-run them (`python book/build.py execute '
              f'NAME`) if the change is intended, and commit', file=sys.stderr)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
