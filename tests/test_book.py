"""The book: its build, its PDF, the Quarto filter, and bad input."""
import copy
import json
import re
import subprocess
import sys

import pytest
import yaml
from pypdf import PdfReader

import build
from conftest import ROOT
from nbfilter import filter_nb, split_cell


def chapter_paths(root=ROOT):
    return build.load_book(root)['chapters']


def chapter_title(path):
    "The `# Title` of a chapter notebook."
    nb = json.loads(path.read_text(encoding='utf-8'))
    for cell in nb['cells']:
        if cell['cell_type'] == 'markdown':
            m = re.search(r'^# (.+)$', ''.join(cell['source']), re.M)
            if m:
                return m.group(1).strip()
    raise AssertionError(f'{path} has no "# Title" heading')


def code_cells(path):
    nb = json.loads(path.read_text(encoding='utf-8'))
    return [c for c in nb['cells'] if c['cell_type'] == 'code']


def pdf_text(pdf):
    "The PDF's text; Typst's non-breaking spaces read as plain ones."
    text = '\n'.join(p.extract_text() or '' for p in PdfReader(pdf).pages)
    return text.replace('\xa0', ' ')


# -- the built PDF -----------------------------------------------------------

def test_pdf_has_every_chapter_and_no_directives(built_book):
    root, pdf = built_book
    text = pdf_text(pdf)
    squashed = ' '.join(text.split())
    for path in chapter_paths(root):
        title = ' '.join(chapter_title(path).split())
        assert title in squashed, f'chapter "{title}" missing from the PDF'
    for word in ['Contents', 'References']:
        assert word in text
    bad = [ln for ln in text.splitlines() if ln.strip().startswith('#|')]
    assert not bad, f'directive lines leaked into the PDF: {bad[:3]}'


def test_pdf_page_count_is_sane(built_book):
    root, pdf = built_book
    n_chapters = len(chapter_paths(root))
    n_pages = len(PdfReader(pdf).pages)
    assert 2 + 2 * n_chapters <= n_pages <= 2 + 60 * n_chapters, n_pages


def test_title_page_names_version_and_commit(built_book):
    root, pdf = built_book
    first = PdfReader(pdf).pages[0].extract_text()
    assert build.package_version(root) in first
    assert 'git commit' in first
    assert 'Build a Large Language Model' in first


def test_figures_and_tables_are_numbered(built_book):
    "Every `fig-`/`tbl-` labelled cell appears as a numbered figure/table."
    root, pdf = built_book
    n_fig = n_tbl = 0
    for path in chapter_paths(root):
        for cell in code_cells(path):
            opts = build.cell_options(cell, path.name)
            label = str(opts.get('label', ''))
            n_fig += label.startswith('fig-')
            n_tbl += label.startswith('tbl-')
    text = pdf_text(pdf)
    for kind, n in [('Figure', n_fig), ('Table', n_tbl)]:
        for i in range(1, n + 1):
            assert f'{kind} {i}' in text, f'{kind} {i} not in the PDF'
    images = sum(len(p.images) for p in PdfReader(pdf).pages)
    assert images >= n_fig


def test_pdf_records_its_sources(built_book):
    root, pdf = built_book
    assert build.check_pdf(pdf, root) == []


def test_published_pdf_is_current():
    "The PDF readers download must match the notebooks: run `make book`."
    pdf = ROOT / build.PUBLISHED
    assert pdf.exists(), f'{build.PUBLISHED} is missing: run `make book`'
    assert build.check_pdf(pdf, ROOT) == []


# -- the sources -------------------------------------------------------------

def test_book_lists_every_notebook_in_order():
    listed = [p.resolve() for p in chapter_paths()]
    on_disk = sorted(p.resolve() for p in (ROOT / 'nbs').glob('*.ipynb')
                     if not p.name.startswith('_'))
    assert listed == on_disk


def test_index_link_points_at_the_preface():
    link = ROOT / 'index.ipynb'
    assert link.is_symlink()
    assert link.resolve() == (ROOT / 'nbs' / '00_index.ipynb').resolve()


def test_preface_needs_no_filter():
    "Quarto reads index.ipynb unfiltered: only Quarto options allowed."
    for cell in code_cells(ROOT / 'index.ipynb'):
        directives, _, _ = split_cell(cell['source'])
        assert not directives, f'nbdev directive in the preface: {directives}'


@pytest.mark.parametrize('path', chapter_paths(), ids=lambda p: p.name)
def test_code_fits_the_page(path):
    "Printed code lines are at most 79 columns (PDF code does not wrap)."
    for cell in code_cells(path):
        _, _, code = split_cell(cell['source'])
        for ln in code.splitlines():
            assert len(ln) <= 79, f'{path.name}: {len(ln)} columns: {ln}'


@pytest.mark.parametrize('path', chapter_paths(), ids=lambda p: p.name)
def test_filter_agrees_with_nbdev(path):
    "book/nbfilter.py splits directives exactly as nbdev does."
    from execnb.nbio import read_nb
    from nbdev.process import extract_directives
    for cell in read_nb(path).cells:
        if cell.cell_type != 'code':
            continue
        ours, opts, code = split_cell(cell.source)
        theirs = extract_directives(cell, remove=True)  # edits cell.source
        # nbdev keys Quarto options as 'key:'; directives have no colon
        assert {d[0] for d in ours} == {k for k in theirs
                                        if not k.endswith(':')}
        # what is left for Quarto: its options, then the code (nbdev leaves
        # a directive-only cell, like `#| default_exp`, for a later step)
        if code.strip():
            assert ''.join(opts) + code == cell.source


def test_filter_output_is_valid_for_quarto():
    "Run the filter as Quarto does; every `#|` line left is a YAML option."
    for path in chapter_paths():
        r = subprocess.run([sys.executable, str(ROOT / 'book/nbfilter.py')],
                           input=path.read_text(encoding='utf-8'),
                           capture_output=True, text=True, check=True)
        nb = json.loads(r.stdout)
        for cell in nb['cells']:
            if cell['cell_type'] != 'code':
                continue
            _, opts, _ = split_cell(cell['source'])
            directives = [ln for ln in cell['source'].splitlines()
                          if ln.startswith('#|') and ln + '\n' not in opts]
            assert not directives, f'{path.name}: {directives}'
            text = ''.join(ln.lstrip()[2:] for ln in opts)
            assert isinstance(yaml.safe_load(text) or {}, dict)


def test_filter_drops_hidden_and_strips_directives():
    nb = {'cells': [
        {'cell_type': 'code', 'source': '#| hide\nimport secret',
         'outputs': []},
        {'cell_type': 'code', 'source': '#| default_exp demo', 'outputs': []},
        {'cell_type': 'code', 'source': '#| export\n#| echo: false\nx = 1',
         'outputs': []},
        {'cell_type': 'markdown', 'source': '# Title'}]}
    cells = filter_nb(nb)['cells']
    assert [c['source'] for c in cells] == ['#| echo: false\nx = 1',
                                            '# Title']


def test_xrefs_and_citations_are_told_apart():
    md = 'See @fig-loss and [@vaswani2017attention]; mail a@b.org; `@x`.'
    assert build.cited_keys(md) == {'vaswani2017attention'}
    assert '`@fig-loss`{=typst}' in build.xrefs(md)


# -- bad input: a clear error that names the file, nothing lost --------------

def _fails(project, capsys, *words):
    "Building `project` fails, naming `words`; return the message."
    rc = build.main(['--root', str(project), 'pdf', '--no-quarto'])
    err = capsys.readouterr().err
    assert rc == 1
    for w in words:
        assert w in err, f'{w!r} not in error: {err}'
    return err


@pytest.fixture
def earlier_pdf(project):
    "A PDF from an earlier build, which a failed build must leave in place."
    out = project / '_book' / 'llm-from-scratch.pdf'
    out.parent.mkdir()
    out.write_bytes(b'%PDF-1.4 earlier build')
    return out


def test_missing_chapter(project, earlier_pdf, capsys):
    cfg = project / '_quarto.yml'
    data = yaml.safe_load(cfg.read_text())
    data['book']['chapters'].append('nbs/99_missing.ipynb')
    cfg.write_text(yaml.safe_dump(data))
    _fails(project, capsys, 'nbs/99_missing.ipynb', 'does not exist')
    assert earlier_pdf.read_bytes() == b'%PDF-1.4 earlier build'


def test_notebook_that_is_not_json(project, earlier_pdf, capsys):
    nb = project / 'nbs' / '00_index.ipynb'
    nb.write_text(nb.read_text()[:-40])
    _fails(project, capsys, 'index.ipynb', 'not valid JSON', 'line')
    assert earlier_pdf.read_bytes() == b'%PDF-1.4 earlier build'


def test_missing_bibliography_key(project, earlier_pdf, capsys):
    nb_path = project / 'nbs' / '00_index.ipynb'
    nb = json.loads(nb_path.read_text())
    nb['cells'].append({'cell_type': 'markdown', 'metadata': {},
                        'source': 'As shown by [@nobody2099].'})
    nb_path.write_text(json.dumps(nb))
    _fails(project, capsys, 'index.ipynb', '@nobody2099',
           'nbs/references.bib')
    assert earlier_pdf.read_bytes() == b'%PDF-1.4 earlier build'


def test_missing_quarto_yml(project, capsys):
    (project / '_quarto.yml').unlink()
    _fails(project, capsys, '_quarto.yml')


# -- the edit cycle: a notebook change reaches the package and the PDF ------

DEMO = {'cells': [
    {'cell_type': 'markdown', 'metadata': {},
     'source': '# A demo chapter\n\n> Exports one function.'},
    {'cell_type': 'code', 'metadata': {}, 'outputs': [],
     'execution_count': None, 'source': '#| default_exp demo'},
    {'cell_type': 'markdown', 'metadata': {},
     'source': 'We define a function:'},
    {'cell_type': 'code', 'metadata': {}, 'outputs': [],
     'execution_count': None,
     'source': '#| export\ndef greet(name):\n    "Say hello."\n'
               '    return f"hello {name}"'}],
    'metadata': {}, 'nbformat': 4, 'nbformat_minor': 5}


def test_edit_cycle_updates_package_and_pdf(project):
    "Editing an exported function changes llm_from_scratch/ and the PDF."
    demo = copy.deepcopy(DEMO)
    nb_path = project / 'nbs' / '01_demo.ipynb'
    nb_path.write_text(json.dumps(demo))
    cfg = project / '_quarto.yml'
    data = yaml.safe_load(cfg.read_text())
    data['book']['chapters'].append('nbs/01_demo.ipynb')
    cfg.write_text(yaml.safe_dump(data))
    quiet = dict(quarto=False, log=lambda *a: None)

    pdf = build.build_pdf(project, **quiet)
    module = (project / 'llm_from_scratch' / 'demo.py').read_text()
    assert 'def greet(name)' in module
    text = pdf_text(pdf)
    assert 'Chapter 1' in text and 'A demo chapter' in text
    assert 'def greet(name)' in text and '#| export' not in text

    demo['cells'][3]['source'] = demo['cells'][3]['source'].replace(
        'greet', 'salute')
    nb_path.write_text(json.dumps(demo))
    pdf = build.build_pdf(project, **quiet)
    module = (project / 'llm_from_scratch' / 'demo.py').read_text()
    assert 'def salute(name)' in module and 'def greet' not in module
    text = pdf_text(pdf)
    assert 'def salute(name)' in text and 'def greet' not in text
