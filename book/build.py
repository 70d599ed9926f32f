#!/usr/bin/env python3
"""Build the book "Build a Large Language Model From Scratch" as a PDF.

The book is defined once, in `_quarto.yml`. With Quarto (>= 1.9) on PATH,
`pdf` runs `quarto render --to typst`. Without it, `pdf` does the same job
with small glue around nbdev, pandoc and Typst:

1. read `_quarto.yml` and check every chapter, notebook and citation first,
   so bad input stops the build before anything is written;
2. `nbdev_export` the package;
3. filter each chapter exactly as Quarto would (`book/nbfilter.py`) and
   write it as pandoc Markdown, honouring Quarto's cell options (`include`,
   `echo`, `output`, `label`, `fig-cap`, `tbl-cap`); images and DataFrame
   tables from the stored outputs become numbered figures and tables;
4. pandoc (with citeproc) -> Typst through `book/template.typ`, Typst -> PDF;
5. stamp a digest of the book's sources into the PDF's metadata and move it
   into place; nothing is replaced until the new PDF is complete.

`check` tells whether a PDF is current for the sources (its digest), and
`execute` re-runs every chapter and stores the outputs in the notebooks.
Run `python book/build.py --help` for the options.
"""
import argparse
import base64
import datetime
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import regex
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from nbfilter import filter_nb, split_cell  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = Path('book/llm-from-scratch.pdf')  # the PDF readers download
FONTS = ROOT / 'book' / 'fonts'  # the only fonts besides Typst's own
DIGEST_KEY = 'book-sources-sha256:'
_ANSI = re.compile(r'\x1b\[[0-9;]*[A-Za-z]')
_CITE = re.compile(r'(?<![\w`])@([A-Za-z][\w:.#$%&+?<>~/-]*\w)')
_XREF = ('fig-', 'tbl-', 'sec-', 'eq-', 'lst-')
# math symbols pandoc 3.9 still writes under names Typst 0.15 has dropped
TYPST_RENAMES = {r'\bsect\b': 'inter', r'\b(dot|plus|times)\.circle\b': r'\1.o'}


MAIN_MATTER = ('```{=typst}\n#pagebreak(weak: true)\n'
               '#set page(numbering: "1")\n'
               '#counter(page).update(1)\n```')
APPENDICES = ('```{=typst}\n#in-appendix.update(true)\n'
              '#counter(heading).update(0)\n'
              '#set heading(numbering: "A.1")\n```')


class BookError(Exception):
    "A problem with the book's sources; the message names the file."


def rel(path, root):
    "Path `path` relative to `root` when it lies inside, for messages."
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


# -- reading and checking the sources ----------------------------------------

def load_book(root=ROOT):
    "Read `_quarto.yml` under `root`; check that everything it names exists."
    root = Path(root).resolve()
    cfg_path = root / '_quarto.yml'
    if not cfg_path.exists():
        raise BookError(f'{cfg_path}: no _quarto.yml, the book definition')
    try:
        cfg = yaml.safe_load(cfg_path.read_text(encoding='utf-8')) or {}
    except yaml.YAMLError as e:
        raise BookError(f'_quarto.yml is not valid YAML: {e}') from None
    book = cfg.get('book') or {}
    chapters = book.get('chapters') or []
    appendices = book.get('appendices') or []
    if not chapters:
        raise BookError('_quarto.yml: book: chapters is empty; list the '
                        'chapter notebooks there')
    paths = []
    for ch in chapters + appendices:
        name = ch if isinstance(ch, str) else (ch or {}).get('href', '')
        p = root / name
        if not p.exists():
            raise BookError(f"_quarto.yml lists chapter '{name}', which does "
                            f'not exist: create it or remove it from '
                            f'book: chapters')
        paths.append(p)
    bib = cfg.get('bibliography')
    bib = root / bib if bib else None
    if bib is not None and not bib.exists():
        raise BookError(f"_quarto.yml names bibliography '{rel(bib, root)}',"
                        f' which does not exist')
    return dict(root=root, preface=paths[0], first_appendix=len(chapters) if appendices
                else None, title=book.get('title', ''),
                subtitle=book.get('subtitle', ''),
                author=book.get('author', ''), chapters=paths, bib=bib,
                out_name=book.get('output-file', 'book') + '.pdf',
                out_dir=root / cfg.get('project', {}).get('output-dir',
                                                          '_book'))


def read_notebook(path, root):
    "The notebook at `path` as a dict; a clear error if it is not one."
    name = rel(path, root)
    try:
        nb = json.loads(Path(path).read_text(encoding='utf-8'))
    except UnicodeDecodeError as e:
        raise BookError(f'{name} is not UTF-8 text ({e.reason}); '
                        f'restore it from git') from None
    except json.JSONDecodeError as e:
        raise BookError(f'{name} is not valid JSON (line {e.lineno}, '
                        f'column {e.colno}: {e.msg}); fix it or restore it '
                        f'with `git checkout -- {name}`') from None
    if not isinstance(nb, dict) or not isinstance(nb.get('cells'), list):
        raise BookError(f'{name} is not a Jupyter notebook (no "cells" '
                        f'list)')
    return nb


def bib_keys(bib):
    "The citation keys defined in BibTeX file `bib`."
    if bib is None:
        return set()
    text = bib.read_text(encoding='utf-8')
    return set(re.findall(r'@\w+\s*\{\s*([^,\s]+)\s*,', text))


def cited_keys(md):
    "Citation keys used in Markdown `md` (not cross-references, not code)."
    md = re.sub(r'```.*?```|`[^`\n]*`', '', md, flags=re.S)
    keys = set(_CITE.findall(md))
    return {k for k in keys if not k.startswith(_XREF)}


def check_sources(book):
    "Read every chapter and check its citations; return the notebooks."
    root, known = book['root'], bib_keys(book['bib'])
    nbs = []
    for path in book['chapters']:
        nb = read_notebook(path, root)
        for cell in nb['cells']:
            if cell.get('cell_type') != 'markdown':
                continue
            missing = cited_keys(''.join(cell.get('source', ''))) - known
            if missing:
                where = rel(book['bib'], root) if book['bib'] else \
                    'the bibliography (none is set in _quarto.yml)'
                raise BookError(f'{rel(path, root)} cites '
                                f'{", ".join("@" + k for k in sorted(missing))}'
                                f', not found in {where}: add the entry or '
                                f'fix the key')
        nbs.append(nb)
    return nbs


def sources_digest(book):
    "SHA-256 over everything the PDF is made from, to tell a stale PDF."
    root = book['root']
    h = hashlib.sha256()
    for f in source_files(book):
        h.update(rel(f, root).encode() + b'\0' + f.read_bytes() + b'\0')
    return h.hexdigest()


# -- notebooks to pandoc Markdown --------------------------------------------

def cell_options(cell, name):
    "Quarto's `#| key: value` options of a code cell, as a dict."
    _, opts, _ = split_cell(cell.get('source', ''))
    text = ''.join(re.sub(r'^\s*#\|\s?', '', o) for o in opts)
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise BookError(f'{name}: a cell has invalid Quarto options '
                        f'({e}):\n{text}') from None


def fenced(text, lang=''):
    "`text` as a fenced Markdown code block."
    ticks = '`' * max(3, max((len(m) for m in re.findall(r'`+', text)),
                             default=0) + 1)
    return f'{ticks}{lang}\n{text.rstrip()}\n{ticks}'


_NUMERIC = re.compile(r'^[-−+]?(\d{1,3}(,\d{3})+|\d*)(\.\d+)?(e[-+]?\d+)?'
                      r'\s*(%|×|x|k|M|B|G|T|GB|GiB|MB|MiB)?$')


def plain(blocks):
    "The text of pandoc JSON `blocks` (cell contents), without formatting."
    out = []

    def walk(x):
        if isinstance(x, dict):
            if x.get('t') == 'Str':
                out.append(x['c'])
            elif x.get('t') in ('Space', 'SoftBreak'):
                out.append(' ')
            else:
                walk(x.get('c'))
        elif isinstance(x, list):
            for y in x:
                walk(y)
    walk(blocks)
    return ''.join(out).strip()


def tidy_table(table):
    """A pandas table as a reader expects it (pandoc JSON, in place).

    The index name (pandas prints it as a second header row) becomes the
    header of the index column; a bare 0, 1, 2, ... index is dropped; columns
    of numbers are right-aligned."""
    _, _, colspecs, head, bodies, _ = table['c']
    rows = head[1]
    if len(rows) == 2 and not plain(rows[0][1][0][4]) and \
            not any(plain(c[4]) for c in rows[1][1][1:]):
        rows[0][1][0][4] = rows[1][1][0][4]
        head[1] = rows[:1]
    body = [r for b in bodies for r in b[2] + b[3]]
    first = [plain(r[1][0][4]) for r in body if r[1]]
    if (head[1] and not plain(head[1][0][1][0][4]) and
            first == [str(i) for i in range(len(body))]):
        del colspecs[0]
        for r in head[1] + body:
            del r[1][0]
        for b in bodies:
            b[1] = max(0, b[1] - 1)
    for j, spec in enumerate(colspecs):
        cells = [plain(r[1][j][4]) for r in body if j < len(r[1])]
        cells = [c for c in cells if c not in ('', '–', '—', '-', 'n/a')]
        if cells and all(_NUMERIC.match(c) for c in cells):
            spec[0] = {'t': 'AlignRight'}
            for r in head[1]:
                if j < len(r[1]):
                    r[1][j][1] = {'t': 'AlignRight'}
    return table


def html_table_md(html, label, caption):
    "The first table of `html` as pandoc Markdown, with caption and label."
    import pypandoc
    ast = json.loads(pypandoc.convert_text(html, 'json', format='html'))

    def find(blocks):
        for b in blocks:
            if b['t'] == 'Table':
                return b
            if b['t'] == 'Div':
                t = find(b['c'][1])
                if t:
                    return t
    table = tidy_table(find(ast['blocks']))
    ast['blocks'] = [table]
    md = pypandoc.convert_text(json.dumps(ast), 'markdown', format='json')
    if caption or label:
        attr = f' {{#{label}}}' if label else ''
        md = md.rstrip() + f'\n\n: {caption or ""}{attr}\n'
    return md


class ChapterWriter:
    "Turns one filtered notebook into pandoc Markdown, images on disk."

    def __init__(self, name, stem, img_dir, public=()):
        self.name, self.stem, self.img_dir = name, stem, img_dir
        self.n_img, self.used_label = 0, False
        self.public = set(public)  # names to mark for the index

    def index_marks(self, code):
        "Invisible Typst labels where this cell defines public names."
        found = [n.strip() for m in _DEF.finditer(code)
                 for n in (m.group(1) or m.group(2)).split(',')]
        found = [n for n in found if n in self.public]
        self.public -= set(found)
        marks = ''.join(f'#metadata("{n}") <idx:{n}>\n' for n in found)
        return f'```{{=typst}}\n{marks}```' if marks else ''

    def image(self, b64, opts):
        "Save a PNG output and return its Markdown figure."
        self.n_img += 1
        fname = f'{self.stem}-{self.n_img}.png'
        (self.img_dir / fname).write_bytes(base64.b64decode(b64))
        label = str(opts.get('label', ''))
        cap = opts.get('fig-cap', '')
        attrs = [f'#{label}'] if label.startswith('fig-') and \
            not self.used_label else []
        if attrs:
            self.used_label = True
        attrs.append(f'width={opts.get("out-width", "80%")}')
        return f'![{cap}](img/{fname}){{{" ".join(attrs)}}}'

    def output(self, out, opts):
        "One output of a code cell as Markdown ('' for nothing shown)."
        kind = out.get('output_type')
        if kind == 'stream':
            text = _ANSI.sub('', ''.join(out.get('text', '')))
            return xrefs(text) if opts.get('output') == 'asis' \
                else fenced(text)
        if kind == 'error':
            tb = _ANSI.sub('', '\n'.join(out.get('traceback', [])))
            return fenced(tb or f"{out.get('ename')}: {out.get('evalue')}")
        data = out.get('data', {})
        if 'image/png' in data:
            return self.image(''.join(data['image/png']), opts)
        html = ''.join(data.get('text/html', ''))
        if '<table' in html:
            label = str(opts.get('label', ''))
            label = label if label.startswith('tbl-') else ''
            return html_table_md(html, label, opts.get('tbl-cap', ''))
        if 'text/markdown' in data:
            return ''.join(data['text/markdown'])
        if 'text/latex' in data:
            return ''.join(data['text/latex'])
        if 'text/plain' in data:
            return fenced(_ANSI.sub('', ''.join(data['text/plain'])))
        return ''

    def code_cell(self, cell):
        "A code cell: its code (unless `echo: false`), then its outputs."
        opts = cell_options(cell, self.name)
        if opts.get('include') is False:
            return []
        _, _, code = split_cell(cell.get('source', ''))
        parts = []
        if code.strip() and opts.get('echo', True) is not False:
            # the index points at code the reader sees
            parts += [self.index_marks(code), fenced(code, 'python')]
        if opts.get('output', True) is not False:
            self.used_label = False
            merged = merge_streams(cell.get('outputs', []))
            parts += [self.output(o, opts) for o in merged]
        return [p for p in parts if p.strip()]

    def write(self, nb, numbered=True):
        "The whole notebook as Markdown."
        parts = []
        for cell in filter_nb(nb)['cells']:
            kind = cell.get('cell_type')
            src = ''.join(cell.get('source', ''))
            if kind == 'markdown':
                parts.append(xrefs(src if numbered else unnumbered(src)))
            elif kind == 'code':
                parts += self.code_cell(cell)
        return '\n\n'.join(parts) + '\n'


def unnumbered(md):
    "Mark every heading of Markdown `md` (outside code) `.unnumbered`."
    out, fence = [], None
    for line in md.splitlines():
        m = re.match(r'\s*(`{3,}|~{3,})', line)
        if m and (fence is None or m.group(1).startswith(fence)):
            fence = None if fence else m.group(1)
        elif fence is None and re.match(r'#{1,6} \S', line):
            line = line.rstrip()
            if line.endswith('}'):
                line = line[:-1] + ' .unnumbered}'
            else:
                line += ' {.unnumbered}'
        out.append(line)
    return '\n'.join(out)


def apostrophes(md):
    """Typographic apostrophes after digits outside code and math (Typst
    sets 2's as 2′s). Applied to the Typst source, since pandoc writes ’
    back as '; Typst marks raw text and math as Markdown does."""
    parts = re.split(r'(```.*?```|`[^`\n]*`|\$\$.*?\$\$|\$[^$\n]*\$)', md,
                     flags=re.S)
    return ''.join(p if i % 2 else re.sub(r"(?<=\d)'(?=[A-Za-z])", '’', p)
                   for i, p in enumerate(parts))


typst_apostrophes = apostrophes


def merge_streams(outputs):
    "Join consecutive stream outputs of the same name into one."
    merged = []
    for o in outputs:
        if (merged and o.get('output_type') == 'stream'
                and merged[-1].get('output_type') == 'stream'
                and merged[-1].get('name') == o.get('name')):
            merged[-1] = dict(merged[-1], text=''.join(merged[-1]['text'])
                              + ''.join(o.get('text', '')))
        else:
            merged.append(o)
    return merged


def xrefs(md):
    "Quarto cross-references (`@fig-x`) as Typst references."
    def sub(m):
        return f'`@{m.group(1)}`{{=typst}}'
    return re.sub(r'(?<![\w`])@((?:fig|tbl|sec|eq|lst)-[\w-]*\w)', sub, md)


_DEF = re.compile(r'^(?:async\s+)?(?:def|class)\s+(\w+)'
                  r'|^(\w+(?:\s*,\s*\w+)*)\s*(?::[^=\n]*)?=', re.M)


def public_names(root):
    "{notebook stem: the names its module exports in `__all__`}."
    import ast
    names = {}
    for nb in sorted((root / 'nbs').glob('*.ipynb')):
        m = re.search(r'#\|\s*default_exp\s+(\w+)', nb.read_text('utf-8'))
        mod = root / 'llm_from_scratch' / f'{m.group(1)}.py' if m else None
        if not mod or not mod.exists():
            continue
        for node in ast.parse(mod.read_text('utf-8')).body:
            if isinstance(node, ast.Assign) and any(
                    getattr(t, 'id', '') == '__all__' for t in node.targets):
                names[nb.stem] = set(ast.literal_eval(node.value))
    return names


def index_of_names(public):
    "An index of the package's public names: name, module, page."
    entries = sorted((n, stem) for stem, ns in public.items() for n in ns)
    rows = []
    for name, stem in sorted(entries, key=lambda e: e[0].lower()):
        module = stem.split('_', 1)[1]
        rows.append(f'  index-entry("{name}", "{module}", <idx:{name}>),')
    return ('# Index of the package\'s names {.unnumbered}\n\n'
            'Every public name of the package `llm_from_scratch`, the module '
            'that defines it and the page where its code is explained.\n\n'
            '```{=typst}\n#let index-entry(name, module, target) = context {'
            '\n  let found = query(target)\n  if found.len() == 0 { return }'
            '\n  let loc = found.first().location()\n'
            '  block(spacing: 0.45em, [#raw(name) #text(fill: luma(110), '
            'size: 8pt, module) #box(width: 1fr, repeat[.]) '
            '#link(loc, numbering("1", ..counter(page).at(loc)))])\n}\n'
            '#set text(size: 9pt)\n#columns(2, gutter: 1.2em)[\n#(\n'
            + '\n'.join(rows) + '\n).join()\n]\n```\n')


def book_markdown(book, nbs, work):
    "All chapters as one pandoc Markdown file in `work`; images beside it."
    img_dir = work / 'img'
    img_dir.mkdir(parents=True, exist_ok=True)
    parts, main_started = [], False
    public = public_names(book['root'])
    for i, (path, nb) in enumerate(zip(book['chapters'], nbs)):
        stem = path.resolve().stem
        writer = ChapterWriter(rel(path, book['root']), stem, img_dir,
                               public.get(stem, ()))
        if i == book['first_appendix']:
            parts.append(APPENDICES)
        if path != book['preface'] and not main_started:
            parts.append(MAIN_MATTER)
            main_started = True
        parts.append(writer.write(nb, numbered=path != book['preface']))
    if book['bib']:
        parts.append('# References {.unnumbered}\n\n::: {#refs}\n:::\n')
    parts.append(index_of_names(public))
    md = work / 'book.md'
    md.write_text('\n\n'.join(parts), encoding='utf-8')
    return md


# -- rendering ---------------------------------------------------------------

def source_files(book):
    "Every file the PDF is made from."
    root = book['root']
    files = [root / '_quarto.yml', root / 'settings.ini', *book['chapters'],
             *sorted((root / 'book').glob('*.py')),
             *sorted((root / 'book').glob('*.typ')),
             *sorted((root / 'book' / 'fonts').glob('*'))]
    return files + ([book['bib']] if book['bib'] else [])


def source_date(book):
    """(YYYY-MM-DD, Unix time) of the sources, so builds are repeatable:
    `SOURCE_DATE_EPOCH` if set; else the last commit's time, or today's
    date when sources differ from it; else the newest source file."""
    root = book['root']

    def git(*args):
        r = subprocess.run(['git', *args], cwd=root, capture_output=True,
                           text=True)
        return r.stdout.strip() if r.returncode == 0 else ''
    committed = git('log', '-1', '--format=%ct')
    edited = committed and git('status', '--porcelain', '--',
                               *[rel(f, root) for f in source_files(book)])
    if os.environ.get('SOURCE_DATE_EPOCH'):
        ts = int(os.environ['SOURCE_DATE_EPOCH'])
    elif edited:
        today = datetime.datetime.now(datetime.timezone.utc).date()
        ts = int(datetime.datetime.combine(
            today, datetime.time(), datetime.timezone.utc).timestamp())
    elif committed:
        ts = int(committed)
    else:
        ts = int(max(f.stat().st_mtime for f in source_files(book)))
    day = datetime.datetime.fromtimestamp(ts, datetime.timezone.utc)
    return day.date().isoformat(), ts


def package_version(root):
    "The version in settings.ini."
    m = re.search(r'^version\s*=\s*(\S+)', (root / 'settings.ini')
                  .read_text(encoding='utf-8'), re.M)
    return m.group(1) if m else 'unknown'


def export_package(root):
    "Run nbdev_export in `root` (notebooks -> llm_from_scratch/)."
    exe = Path(sys.executable).parent / 'nbdev_export'
    r = subprocess.run([str(exe) if exe.exists() else 'nbdev_export'],
                       cwd=root, capture_output=True, text=True)
    if r.returncode != 0:
        raise BookError(f'nbdev_export failed:\n{r.stdout}{r.stderr}')


def render_pandoc(book, nbs, work):
    "Markdown -> Typst -> PDF with pandoc and typst; returns the PDF path."
    import pypandoc
    import typst
    root = book['root']
    md = book_markdown(book, nbs, work)
    day, ts = source_date(book)
    meta = dict(title=book['title'], subtitle=book['subtitle'],
                author=book['author'], version=package_version(root),
                digest=sources_digest(book)[:16], date=day)
    args = ['--from', 'markdown-auto_identifiers', '--standalone',
            '--template', str(root / 'book' / 'template.typ'),
            '--wrap', 'preserve']
    args += [f'--metadata={k}:{v}' for k, v in meta.items()]
    args.append(f'--variable=author-plain:{book["author"]}')
    # the sources' digest, which `pdf_digest` reads back from the PDF
    args.append(f'--variable=keywords:{DIGEST_KEY}{sources_digest(book)}')
    if book['bib']:
        args += ['--citeproc', '--bibliography', str(book['bib'])]
    typ = work / 'book.typ'
    try:
        pypandoc.convert_file(str(md), 'typst', outputfile=str(typ),
                              extra_args=args, cworkdir=str(work))
    except RuntimeError as e:
        raise BookError(f'pandoc failed on {md}: {e}') from None
    text = typ.read_text(encoding='utf-8')
    for old, new in TYPST_RENAMES.items():
        text = re.sub(old, new, text)
    text = apostrophes(text)
    typ.write_text(text, encoding='utf-8')
    pdf = work / 'book.pdf'
    try:
        typst.compile(str(typ), output=str(pdf), root=str(work),
                      font_paths=[str(root / 'book' / 'fonts')],
                      ignore_system_fonts=True,
                      timestamp=ts)
    except typst.TypstError as e:
        where = getattr(e, 'diagnostic', '') or ''
        raise BookError(f'typst failed on {typ}: {e}\n{where}') from None
    lacking = pages_without_glyphs(pdf)
    if lacking:
        raise BookError(f'PDF page(s) {", ".join(map(str, lacking))} print '
                        f'characters that no font of the book has (they '
                        f'would show as boxes): run `python book/fonts.py` '
                        f'to add them to book/fonts/, or use other '
                        f'characters')
    return pdf


# what the glyph check reads in a page's content stream: `/font size Tf`,
# text shown with TJ (an array of strings) or Tj, and any other string (so
# that the scan never starts inside one). A literal string may hold
# balanced parentheses unescaped: the quick pattern allows them six deep,
# the exact one (recursive, ten times slower) to any depth.


def _content_pattern(literal, define=b''):
    string = rb"(?:" + literal + rb"|<[0-9A-Fa-f\s]*>)"
    return regex.compile(
        define + rb"/(?P<font>[^\s/\[\]()<>{}%]+)\s+[-+.\d]+\s+Tf"
        rb"|(?P<shown>\[(?:" + string + rb"|[^\]()<])*\]\s*TJ|" + string +
        rb"\s*Tj)|" + string, regex.S)


_NESTED = rb"[^\\()]"
for _ in range(6):
    _NESTED = rb"\((?:\\.|[^\\()]|" + _NESTED + rb")*\)"
_LITERAL = rb"(?(DEFINE)(?P<lit>\((?:\\.|[^\\()]|(?&lit))*\)))"
CONTENT = _content_pattern(_NESTED)
CONTENT_EXACT = _content_pattern(rb"(?&lit)", _LITERAL)
# where text is shown: a TJ or Tj after its operand (and, rarely, the same
# bytes inside a string); fewer matches of `shown` mean deeper parentheses
_SHOW_OPS = regex.compile(rb"[\])>]\s*T[Jj]\b")
_UNIT = re.compile(rb"\\[0-7]{1,3}|\\\r?\n|\\.|[^\\]", re.S)
_UNITS = {bytes([b]): bytes([b]) for b in range(256)}  # a byte as itself,
_UNITS.update({b'\\' + bytes([b]): bytes([b]) for b in range(256)})
_UNITS.update({b'\\' + oct(n)[2:].zfill(k).encode(): bytes([n & 255])
               for n in range(512) for k in (1, 2, 3)
               if len(oct(n)) - 2 <= k})  # \ooo, and the escapes below
_UNITS.update({b'\\n': b'\n', b'\\r': b'\r', b'\\t': b'\t', b'\\b': b'\b',
               b'\\f': b'\f', b'\\\n': b'', b'\\\r\n': b'',
               b'\\\r': b''})  # a backslash at a line's end: nothing


def string_bytes(token):
    "The bytes of a PDF string token, `(literal)` or `<hex>`."
    if token.startswith(b'<'):
        digits = re.sub(rb'\s', b'', token[1:-1])
        return bytes.fromhex((digits + b'0' * (len(digits) % 2)).decode())
    return b''.join(map(_UNITS.__getitem__, _UNIT.findall(token[1:-1])))


_ZERO = rb"(?:\\(?:000|00(?![0-7])|0(?![0-7]))|\x00)"  # a zero byte
_TWO_ZEROS = re.compile(_ZERO + rb"(?:\\\r?\n)*" + _ZERO)
_STRINGS = regex.compile(_LITERAL + rb"(?&lit)|<[0-9A-Fa-f\s]*>", regex.S)
_ZEROS_AT = re.compile(b'(?=\0\0)')


def shows_glyph_zero(shown):
    "Whether a TJ/Tj operand shows glyph 0 (two-byte glyph ids)."
    if b'<' not in shown and not _TWO_ZEROS.search(shown):
        return False  # no two zero bytes in a row: the common, quick case
    return any(m.start() % 2 == 0 for token in _STRINGS.finditer(shown)
               for m in _ZEROS_AT.finditer(string_bytes(token[0])))


def shown_strings(data):
    "(font, operand) of each text-showing operator of a content stream."
    matches = list(CONTENT.finditer(data))
    if sum(1 for m in matches if m['shown']) != len(_SHOW_OPS.findall(data)):
        matches = list(CONTENT_EXACT.finditer(data))  # deeper parentheses
    font = None
    for m in matches:
        if m['font']:
            font = '/' + m['font'].decode()
        elif m['shown']:
            yield font, m['shown']


def pages_without_glyphs(pdf):
    """Pages of `pdf` that show a missing glyph (glyph 0, a box): a pair of
    zero bytes in a string shown in a font with two-byte glyph ids
    (Identity-H, as Typst writes every outline font)."""
    from pypdf import PdfReader
    reader, bad = PdfReader(pdf), []
    for n, page in enumerate(reader.pages, 1):
        fonts = page.get('/Resources', {}).get('/Font', {})
        two_byte = {name: fonts[name].get_object().get('/Encoding') ==
                    '/Identity-H' for name in fonts}
        data = page.get_contents().get_data()
        if any(two_byte.get(font) and shows_glyph_zero(shown)
               for font, shown in shown_strings(data)):
            bad.append(n)
    return bad


def render_quarto(book, work):
    "`quarto render --to typst` from `_quarto.yml`; returns the PDF path."
    root, out_dir = book['root'], work / 'quarto'
    stamp = (f'version {package_version(root)}, sources '
             f'{sources_digest(book)[:16]}, {source_date(book)[0]}')
    r = subprocess.run(['quarto', 'render', '--to', 'typst', '--output-dir',
                        str(out_dir), f'--metadata=date:{stamp}'], cwd=root)
    pdf = out_dir / book['out_name']
    if r.returncode != 0 or not pdf.exists():
        raise BookError(f'quarto render failed (exit {r.returncode}); see '
                        f'its messages above')
    return pdf


def stamp_digest(pdf, digest):
    "Record the sources' digest in the PDF's Keywords metadata."
    from pypdf import PdfReader, PdfWriter
    writer = PdfWriter(clone_from=PdfReader(pdf))
    writer.add_metadata({'/Keywords': DIGEST_KEY + digest})
    with open(pdf, 'wb') as f:
        writer.write(f)


def pdf_digest(pdf):
    "The sources' digest stamped into `pdf`, or None."
    from pypdf import PdfReader
    kw = (PdfReader(pdf).metadata or {}).get('/Keywords', '') or ''
    return kw[len(DIGEST_KEY):] if kw.startswith(DIGEST_KEY) else None


def replace_atomic(src, dest):
    "Copy `src` over `dest` so that `dest` is never half-written."
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + '.tmp')
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def only_chapters(book, names):
    "`book` reduced to the chapters whose stems are in `names` (a draft)."
    keep = [i for i, p in enumerate(book['chapters'])
            if p.resolve().stem in names or p.name in names]
    if len(keep) != len(set(names)):
        raise BookError(f'--only {" ".join(names)}: not all are chapters '
                        f'in _quarto.yml')
    first = book['first_appendix']
    book = dict(book, chapters=[book['chapters'][i] for i in keep])
    later = [j for j, i in enumerate(keep) if first is not None and i >= first]
    book['first_appendix'] = later[0] if later else None
    return book


def build_pdf(root=ROOT, publish=False, quarto=None, log=print, only=None,
              out=None):
    """Check, export, render; returns the path of the finished PDF.

    `only` (chapter stems) renders a draft of those chapters to `out`
    without touching the book's own output; drafts never publish."""
    book = load_book(root)
    if only:
        book, publish, quarto = only_chapters(book, only), False, False
    nbs = check_sources(book)
    root = book['root']
    digest = sources_digest(book)
    export_package(root)
    work = root / '_build' / ('book-' + '-'.join(only) if only else 'book')
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    use_quarto = shutil.which('quarto') if quarto is None else quarto
    log(f'rendering {len(nbs)} chapters with '
        f'{"quarto" if use_quarto else "pandoc + typst"}')
    pdf = render_quarto(book, work) if use_quarto else \
        render_pandoc(book, nbs, work)
    if use_quarto:  # pandoc's template writes it (keywords)
        stamp_digest(pdf, digest)
    out = Path(out) if out else book['out_dir'] / book['out_name']
    replace_atomic(pdf, out)
    log(f'wrote {rel(out, root)}')
    if publish:
        published = root / PUBLISHED
        if published.exists() and pdf_digest(published) == digest:
            log(f'{PUBLISHED} is current for these sources: left as is')
        else:
            replace_atomic(pdf, published)
            log(f'wrote {PUBLISHED} (commit it: readers download this file)')
    return out


def check_pdf(pdf, root=ROOT):
    "Problems of `pdf` for the book under `root`, as a list of messages."
    book = load_book(root)
    problems = []
    if pdf_digest(pdf) != sources_digest(book):
        problems.append(f'{rel(pdf, book["root"])} is stale: the notebooks, '
                        f'_quarto.yml or book/ changed since it was built; '
                        f'run `make book` and commit it')
    return problems


# -- executing the chapters --------------------------------------------------

def execute_chapters(root=ROOT, names=None, log=print):
    "Re-run chapter notebooks in place, storing the outputs they produce."
    from execnb.nbio import read_nb, write_nb
    from execnb.shell import CaptureShell
    book = load_book(root)
    paths = [p.resolve() for p in book['chapters']]
    if names:
        unknown = [n for n in names if not any(n in (p.stem, p.name)
                                                for p in paths)]
        if unknown:
            raise BookError(f'no chapter named {", ".join(unknown)} in '
                            f'_quarto.yml (chapters: '
                            f'{", ".join(p.stem for p in paths)})')
        paths = [p for p in paths if p.stem in names or p.name in names]
    for path in paths:
        read_notebook(path, book['root'])
        nb = read_nb(path)

        def skip(cell):
            if cell.cell_type != 'code':
                return True
            opts = cell_options(cell, path.name)
            return opts.get('eval') is False
        for cell in nb.cells:  # execnb keeps old outputs of a silent cell
            if not skip(cell):
                cell.outputs = []
        log(f'executing {rel(path, book["root"])}')
        shell = CaptureShell(path)
        cwd = os.getcwd()
        os.chdir(path.parent)
        try:
            shell.run_all(nb, exc_stop=True, preproc=skip)
        except Exception:
            raise BookError(f'{rel(path, book["root"])} failed:\n'
                            + shell.prettytb(fname=path)) from None
        finally:
            os.chdir(cwd)
        tmp = path.with_name(path.name + '.tmp')
        write_nb(nb, tmp)
        os.replace(tmp, path)
        record_environment(book['root'], path.stem)


ENVIRONMENTS = Path('book') / 'executed.json'


def environment():
    "The machine and versions that produce outputs now, in a few words."
    import platform
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                cpu = line.split(':', 1)[1].strip()
                break
    except OSError:
        pass
    try:
        from importlib.metadata import version
        torch = version('torch')
    except Exception:
        torch = 'not installed'
    return dict(cpu=cpu, cores=os.cpu_count(),
                python=platform.python_version(), torch=torch,
                date=datetime.date.today().isoformat())


def record_environment(root, stem):
    "Note in book/executed.json where chapter `stem` was last executed."
    import fcntl
    path = Path(root) / ENVIRONMENTS
    with open(path.with_suffix('.lock'), 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(path.read_text()) if path.exists() else {}
        data[stem] = environment()
        tmp = path.with_suffix('.tmp')
        tmp.write_text(json.dumps(dict(sorted(data.items())), indent=1)
                       + '\n')
        os.replace(tmp, path)


# -- command line ------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(
        description='Build the book from _quarto.yml (see module docstring).')
    ap.add_argument('--root', type=Path, default=ROOT,
                    help='project folder holding _quarto.yml (default: '
                         'this repository)')
    sub = ap.add_subparsers(dest='cmd', required=True)
    p = sub.add_parser('pdf', help='export the package and build the PDF')
    p.add_argument('--publish', action='store_true',
                   help=f'also refresh the committed {PUBLISHED}')
    p.add_argument('--no-quarto', action='store_true',
                   help='use pandoc + typst even when quarto is on PATH')
    p.add_argument('--only', nargs='+', metavar='STEM',
                   help='draft: render only these chapters (stems such as '
                        '03_attention); needs --out')
    p.add_argument('--out', type=Path, help='where to write the draft PDF')
    c = sub.add_parser('check', help='fail if a PDF is stale for the sources')
    c.add_argument('pdf', type=Path, nargs='?', default=None,
                   help=f'the PDF to check (default: {PUBLISHED})')
    e = sub.add_parser('execute', help='re-run chapters, storing outputs')
    e.add_argument('names', nargs='*', help='only these notebooks (stems)')
    args = ap.parse_args(argv)
    try:
        if args.cmd == 'pdf':
            if args.only and not args.out:
                raise BookError('--only needs --out FILE.pdf for the draft')
            build_pdf(args.root, args.publish,
                      quarto=False if args.no_quarto else None,
                      only=args.only, out=args.out)
        elif args.cmd == 'check':
            pdf = args.pdf or args.root / PUBLISHED
            if not pdf.exists():
                raise BookError(f'{pdf} does not exist: run `make book`')
            problems = check_pdf(pdf, args.root)
            for msg in problems:
                print(msg, file=sys.stderr)
            return 1 if problems else 0
        elif args.cmd == 'execute':
            execute_chapters(args.root, args.names)
    except BookError as e:
        print(f'book: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
