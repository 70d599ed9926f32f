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

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from nbfilter import filter_nb, split_cell  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = Path('book/llm-from-scratch.pdf')  # the PDF readers download
DIGEST_KEY = 'book-sources-sha256:'
_ANSI = re.compile(r'\x1b\[[0-9;]*[A-Za-z]')
_CITE = re.compile(r'(?<![\w`])@([A-Za-z][\w:.#$%&+?<>~/-]*\w)')
_XREF = ('fig-', 'tbl-', 'sec-', 'eq-', 'lst-')
# math symbols pandoc 3.9 still writes under names Typst 0.15 has dropped
TYPST_RENAMES = {r'\bsect\b': 'inter', r'\b(dot|plus|times)\.circle\b': r'\1.o'}


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
    return dict(root=root, first_appendix=len(chapters) if appendices
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
    files = [root / '_quarto.yml', root / 'settings.ini', *book['chapters'],
             *sorted((root / 'book').glob('*.py')),
             *sorted((root / 'book').glob('*.typ'))]
    if book['bib']:
        files.append(book['bib'])
    h = hashlib.sha256()
    for f in files:
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
    table = find(ast['blocks'])
    ast['blocks'] = [table]
    md = pypandoc.convert_text(json.dumps(ast), 'markdown', format='json')
    if caption or label:
        attr = f' {{#{label}}}' if label else ''
        md = md.rstrip() + f'\n\n: {caption or ""}{attr}\n'
    return md


class ChapterWriter:
    "Turns one filtered notebook into pandoc Markdown, images on disk."

    def __init__(self, name, stem, img_dir):
        self.name, self.stem, self.img_dir = name, stem, img_dir
        self.n_img, self.used_label = 0, False

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
            return text if opts.get('output') == 'asis' else fenced(text)
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
            parts.append(fenced(code, 'python'))
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


def book_markdown(book, nbs, work):
    "All chapters as one pandoc Markdown file in `work`; images beside it."
    img_dir = work / 'img'
    img_dir.mkdir(parents=True, exist_ok=True)
    parts = []
    for i, (path, nb) in enumerate(zip(book['chapters'], nbs)):
        stem = path.resolve().stem
        writer = ChapterWriter(rel(path, book['root']), stem, img_dir)
        if i == book['first_appendix']:
            parts.append(APPENDICES)
        parts.append(writer.write(nb, numbered=i > 0))
    if book['bib']:
        parts.append('# References {.unnumbered}\n\n::: {#refs}\n:::\n')
    md = work / 'book.md'
    md.write_text('\n\n'.join(parts), encoding='utf-8')
    return md


# -- rendering ---------------------------------------------------------------

def git_commit(root):
    "Short commit of `root`, marked `+changes` when sources are edited."
    def git(*args):
        r = subprocess.run(['git', *args], cwd=root, capture_output=True,
                           text=True)
        return r.stdout.strip() if r.returncode == 0 else ''
    sha = git('rev-parse', '--short=10', 'HEAD')
    if not sha:
        return 'none (not a git checkout)'
    dirty = git('status', '--porcelain', '--', 'nbs', '_quarto.yml', 'book')
    return sha + ('+changes' if dirty else '')


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
    meta = dict(title=book['title'], subtitle=book['subtitle'],
                author=book['author'], version=package_version(root),
                commit=git_commit(root),
                date=datetime.date.today().isoformat())
    args = ['--from', 'markdown-auto_identifiers', '--standalone',
            '--template', str(root / 'book' / 'template.typ'),
            '--wrap', 'preserve']
    args += [f'--metadata={k}:{v}' for k, v in meta.items()]
    args.append(f'--variable=author-plain:{book["author"]}')
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
    typ.write_text(text, encoding='utf-8')
    pdf = work / 'book.pdf'
    try:
        typst.compile(str(typ), output=str(pdf), root=str(work))
    except typst.TypstError as e:
        where = getattr(e, 'diagnostic', '') or ''
        raise BookError(f'typst failed on {typ}: {e}\n{where}') from None
    return pdf


def render_quarto(book, work):
    "`quarto render --to typst` from `_quarto.yml`; returns the PDF path."
    root, out_dir = book['root'], work / 'quarto'
    stamp = (f'version {package_version(root)}, git commit '
             f'{git_commit(root)}, {datetime.date.today().isoformat()}')
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


def build_pdf(root=ROOT, publish=False, quarto=None, log=print):
    "Check, export, render; returns the path of the finished PDF."
    book = load_book(root)
    nbs = check_sources(book)
    root = book['root']
    digest = sources_digest(book)
    export_package(root)
    work = root / '_build' / 'book'
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    use_quarto = shutil.which('quarto') if quarto is None else quarto
    log(f'rendering {len(nbs)} chapters with '
        f'{"quarto" if use_quarto else "pandoc + typst"}')
    pdf = render_quarto(book, work) if use_quarto else \
        render_pandoc(book, nbs, work)
    stamp_digest(pdf, digest)
    out = book['out_dir'] / book['out_name']
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
    c = sub.add_parser('check', help='fail if a PDF is stale for the sources')
    c.add_argument('pdf', type=Path, nargs='?', default=None,
                   help=f'the PDF to check (default: {PUBLISHED})')
    e = sub.add_parser('execute', help='re-run chapters, storing outputs')
    e.add_argument('names', nargs='*', help='only these notebooks (stems)')
    args = ap.parse_args(argv)
    try:
        if args.cmd == 'pdf':
            build_pdf(args.root, args.publish,
                      quarto=False if args.no_quarto else None)
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
