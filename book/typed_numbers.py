#!/usr/bin/env python3
"""Find numbers typed into a chapter's prose that a computation produced.

A number in the prose that one of the chapter's code cells printed must come
from that cell, or it goes stale the next time the chapter runs. The way to
write such a sentence is a code cell with the Quarto option `output: asis`
that prints Markdown (both renderers place it as prose):

    #| echo: false
    #| output: asis
    print(f'The run took {hours:.1f} hours on {n_gpu} GPUs.')

This check reads each chapter's Markdown cells and flags every number (three
or more digits, or a decimal with two or more significant digits) that also
appears in one of the same notebook's outputs, rounding included (prose 2.64
for an output of 2.6437). A number that is a fact and not a result (GPT-2's
50,257 tokens, a year) is declared in an HTML comment in that cell, which
neither renderer shows:

    <!-- not-from-output: 50,257 2017 -->

Usage: python book/typed_numbers.py [notebook ...]   (default: every chapter)
"""
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_NUM = re.compile(r'(?<![\w.])(?<![A-Za-z]-)(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?![\d])')
_ALLOW = re.compile(r'<!--\s*not-from-output:(.*?)-->', re.S)
_ANSI = re.compile(r'\x1b\[[0-9;]*[A-Za-z]')


def numbers(text):
    "The numbers in `text` as normalised strings ('50257', '2.64')."
    return [m.group(1).replace(',', '') + (m.group(2) or '')
            for m in _NUM.finditer(text)]


def significant(num):
    "Worth checking: three or more digits, or a decimal with two or more."
    digits = num.replace('.', '').lstrip('0')
    return len(digits) >= 3 if '.' not in num else len(digits) >= 2


def roundings(num):
    "`num` and its roundings that keep two or more significant digits."
    out = {num}
    if '.' in num:
        value, places = float(num), len(num.split('.')[1])
        for p in range(places):
            r = f'{value:.{p}f}'
            if significant(r) or (p == 0 and len(r) >= 3):
                out.add(r)
    return out


def prose(md):
    "Markdown `md` without code, math commands, links, citations, comments."
    md = re.sub(r'<!--.*?-->', '', md, flags=re.S)
    md = re.sub(r'```.*?```|`[^`\n]*`', ' ', md, flags=re.S)
    md = re.sub(r'\]\([^)]*\)|https?://\S+|@[\w:-]+', ' ', md)
    md = re.sub(r'\{#[^}]*\}', ' ', md)
    md = re.sub(r'\b(Exercise|Section|Chapter|Figure|Table)\s+[\d.]+', ' ', md)
    return md


def output_text(cell):
    "Everything a code cell printed, as one string."
    parts = []
    for out in cell.get('outputs', []):
        if out.get('output_type') == 'stream':
            parts.append(''.join(out.get('text', '')))
        for key in ('text/plain', 'text/markdown', 'text/html'):
            parts.append(''.join(out.get('data', {}).get(key, '')))
        parts.append(''.join(out.get('evalue', '')))
    return _ANSI.sub('', '\n'.join(parts))


def sections(nb):
    """The notebook's cells as one group, or one group per `## ` section
    when its first cell says `<!-- typed-numbers: per-section -->` (the
    solutions appendix, whose sections answer different chapters)."""
    cells = list(enumerate(nb['cells']))
    first = ''.join(cells[0][1].get('source', '')) if cells else ''
    if 'typed-numbers: per-section' not in first:
        return [cells]
    groups = [[]]
    for i, cell in cells:
        src = ''.join(cell.get('source', ''))
        if cell.get('cell_type') == 'markdown' and src.startswith('## '):
            groups.append([])
        groups[-1].append((i, cell))
    return groups


def find_repeats(nb):
    "[(cell index, number, sentence)] for prose numbers found in outputs."
    found = []
    for group in sections(nb):
        found += _repeats(group)
    return sorted(found)


def _repeats(cells):
    printed = set()
    for _, cell in cells:
        if cell.get('cell_type') == 'code':
            for n in numbers(output_text(cell)):
                printed |= roundings(n)
    found = []
    for i, cell in cells:
        if cell.get('cell_type') != 'markdown':
            continue
        src = ''.join(cell.get('source', ''))
        allowed = set()
        for m in _ALLOW.finditer(src):
            allowed |= set(numbers(m.group(1)))
        text = prose(src)
        for m in _NUM.finditer(text):
            n = m.group(1).replace(',', '') + (m.group(2) or '')
            if significant(n) and n in printed and n not in allowed:
                a, b = max(0, m.start() - 50), m.end() + 30
                found.append((i, m.group(0),
                              ' '.join(text[a:b].split())))
    return found


def chapters(root=ROOT):
    "The notebooks of the book, from `_quarto.yml`."
    import yaml
    cfg = yaml.safe_load((root / '_quarto.yml').read_text(encoding='utf-8'))
    book = cfg['book']
    names = book.get('chapters', []) + book.get('appendices', [])
    return [(root / n).resolve() for n in names]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    paths = [Path(a) for a in argv] or chapters()
    problems = 0
    for path in paths:
        nb = json.loads(path.read_text(encoding='utf-8'))
        for i, num, where in find_repeats(nb):
            problems += 1
            print(f'{path.name}: cell {i}: {num} is typed in the prose but '
                  f'an output of this notebook prints it: "…{where}…"; '
                  f'print the sentence from code (output: asis) or declare '
                  f'it with <!-- not-from-output: {num} -->')
    if problems:
        print(f'{problems} number(s) in the prose repeat outputs',
              file=sys.stderr)
    return 1 if problems else 0


if __name__ == '__main__':
    sys.exit(main())
