#!/usr/bin/env python3
"""Make an nbdev notebook valid for Quarto: the one processing step of the book.

Quarto runs this as an `ipynb-filters` entry (see `nbs/_metadata.yml`): the
notebook's JSON arrives on stdin and the filtered JSON leaves on stdout.
`make book` imports `filter_nb` from here, so both ways to build the book see
the same cells.

What it does, cell by cell:

- `#| hide` (nbdev): the cell is dropped, input and output.
- other nbdev directives (`#| export`, `#| exporti`, `#| exports`,
  `#| default_exp name`, `#| slow`, ...): the directive line is removed and
  the code stays (the exported code is the book's content). A cell left with
  no code and no output is dropped.
- Quarto options (`#| key: value`, e.g. `echo: false`, `label: fig-x`,
  `fig-cap: ...`) stay for Quarto to apply.
- sources are written as lists of lines that keep their `\n` (Quarto 1.10
  joins a one-string source without line breaks). Filtering twice gives the
  same notebook, so `_quarto.yml` and `nbs/_metadata.yml` may both name it.

nbdev tells the two kinds apart the same way: a `#|` line with a `key:` is a
Quarto option, any other `#|` line is an nbdev directive
(`nbdev.process.extract_directives`; `tests/test_book.py` checks that this
file agrees with it). Only the standard library is used, so Quarto can run
the filter with whatever Python it finds.
"""
import json
import re
import sys

_OPT = re.compile(r'^\s*#\|')                   # any `#|` line
_QUARTO = re.compile(r'^\s*#\|\s*[\w|-]+\s*:')  # `#| key: value`
_MAGIC = re.compile(r'^\s*%%\w+')               # a cell magic


def _lines(src):
    "Cell source as a list of lines, whether stored as a string or a list."
    return (''.join(src) if isinstance(src, list) else src).splitlines(True)


def split_cell(src):
    "Split code `src` into (nbdev directives, Quarto option lines, code)."
    lines = _lines(src)
    i = 0
    while i < len(lines) and (_OPT.match(lines[i]) or _MAGIC.match(lines[i])
                              or not lines[i].strip()):
        i += 1
    head, code = lines[:i], lines[i:]
    directives, options = [], []
    for ln in head:
        if _QUARTO.match(ln):
            options.append(ln)
        elif _OPT.match(ln):
            words = ln.strip()[2:].strip().rstrip(':').split()
            if words:
                directives.append(words)
    return directives, options, ''.join(code)


def filter_cell(cell):
    "The cell as Quarto should see it, or None to drop it."
    if cell.get('cell_type') != 'code':
        return cell
    directives, options, code = split_cell(cell.get('source', ''))
    names = {d[0] for d in directives}
    if 'hide' in names:
        return None
    if not code.strip() and not cell.get('outputs'):
        return None
    cell = dict(cell)
    # a list of lines that keep their line breaks: Quarto 1.10 renders a
    # source stored as one string on a single line
    cell['source'] = (''.join(options) + code).splitlines(True)
    return cell


def filter_nb(nb):
    "Return a copy of notebook dict `nb` with every cell filtered."
    nb = dict(nb)
    cells = (filter_cell(c) for c in nb.get('cells', []))
    nb['cells'] = [c for c in cells if c is not None]
    return nb


if __name__ == '__main__':
    json.dump(filter_nb(json.load(sys.stdin)), sys.stdout, indent=1,
              ensure_ascii=False)
