"""The book: its build, its PDF, the Quarto filter, and bad input."""
import copy
import functools
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
            m = re.search(r'^# (.+?)\s*(\{[^}]*\})?$', ''.join(cell['source']),
                          re.M)
            if m:
                return m.group(1).strip()
    raise AssertionError(f'{path} has no "# Title" heading')


def code_cells(path):
    nb = json.loads(path.read_text(encoding='utf-8'))
    return [c for c in nb['cells'] if c['cell_type'] == 'code']


def pdf_text(pdf):
    "The PDF's text; Typst's non-breaking spaces read as plain ones."
    return _pdf_text(str(pdf), pdf.stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _pdf_text(path, mtime):
    import pypdfium2   # PDFium reads text 10x faster than pypdf
    pages = []
    doc = pypdfium2.PdfDocument(path)
    for page in doc:
        text = page.get_textpage()
        pages.append(text.get_text_range())
        text.close()
        page.close()
    doc.close()
    return '\n'.join(pages).replace('\r\n', '\n').replace('\xa0', ' ')


def image_count(page):
    "Images a PDF page draws (its image XObjects; none is decoded)."
    xobjects = page.get('/Resources', {}).get('/XObject', {}) or {}
    return sum(xobjects[k].get_object().get('/Subtype') == '/Image'
               for k in xobjects)


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


def test_title_page_names_version_and_sources(built_book):
    "The title page names the digest of the sources that built it."
    root, pdf = built_book
    first = ' '.join(PdfReader(pdf).pages[0].extract_text().split())
    assert build.package_version(root) in first
    digest = build.sources_digest(build.load_book(root))
    assert digest[:16] in first
    assert build.pdf_digest(pdf) == digest
    assert 'Build a Large Language Model' in first


def test_missing_glyphs_are_found(tmp_path):
    """The glyph check sees a box: a character that no shipped font has.
    Every build runs this check and fails on a box, so `built_book` having
    been built means the book has none."""
    import typst
    src = tmp_path / 'x.typ'
    src.write_text('Hello \u0d9e', encoding='utf-8')   # Sinhala: no font
    typst.compile(str(src), output=str(tmp_path / 'x.pdf'),
                  ignore_system_fonts=True,
                  font_paths=[str(ROOT / 'book' / 'fonts')])
    assert build.pages_without_glyphs(tmp_path / 'x.pdf') == [1]


def test_glyph_check_reads_pdf_strings():
    "Escapes decode to the bytes they stand for; glyph 0 only at a glyph."
    assert build.string_bytes(rb'(\000\0006\(a\)\\\n\7)') == \
        b'\0\x006(a)\\\n\x07'
    assert build.string_bytes(b'<00 0A1>') == b'\x00\x0a\x10'
    assert build.shows_glyph_zero(rb'[(\000\000)]TJ')      # glyph 0
    assert build.shows_glyph_zero(b'<0041 0000> Tj')
    assert not build.shows_glyph_zero(rb'[(\0006\001\000\000\005)]TJ')
    assert not build.shows_glyph_zero(rb'[(\001\000)-7(\000\002)]TJ')
    # balanced parentheses may stand unescaped in a string (glyphs 40, 41)
    shown = rb'[(\000(\000\000\000))]TJ'
    assert build.CONTENT.fullmatch(shown)['shown'] == shown
    assert build.shows_glyph_zero(shown)
    assert build.string_bytes(b'(a\\\rb)') == b'ab'  # a line continued
    deep = rb'[(\000' + b'(' * 9 + rb'\000\000' + b')' * 9 + rb')]TJ'
    stream = b'BT /f0 8 Tf 1 0 0 -1 0 0 Tm ' + deep + b' ET'
    assert build.CONTENT.search(deep)['shown'] != deep  # too deep for it,
    assert list(build.shown_strings(stream)) == [('/f0', deep)]  # not this
    assert build.shows_glyph_zero(deep)


def test_builds_are_repeatable(built_book, tmp_path):
    "Two builds of the same sources give the same bytes (no system fonts,"
    " dates from git)."
    root, pdf = built_book
    first = pdf.read_bytes()
    again = build.build_pdf(root, quarto=False, log=lambda *a: None,
                            only=None, out=tmp_path / 'again.pdf')
    assert again.read_bytes() == first


def test_apostrophes_are_not_primes(built_book):
    _, pdf = built_book
    primes = re.findall(r'\w+′s\b', pdf_text(pdf))
    assert not primes, f'primes for apostrophes: {primes[:5]}'


def test_front_matter_is_roman_and_index_lists_names(built_book):
    root, pdf = built_book
    pages = PdfReader(pdf).pages
    contents = ' '.join(pages[1].extract_text().split())
    assert contents.startswith('Contents')
    assert pages[1].extract_text().strip().splitlines()[-1].strip() == 'i'
    text = pdf_text(pdf)
    index = text[text.index('Every public name of the package'):]
    public = build.public_names(root)
    for name in ['Tokenizer', 'train', 'generate', 'GPT']:
        assert any(name in ns for ns in public.values())
        assert re.search(rf'\b{name}\b.*?\d', index), name


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
    text = re.sub(r'\s+', ' ', pdf_text(pdf))  # justified: 'Table\xa0 25'
    for kind, n in [('Figure', n_fig), ('Table', n_tbl)]:
        for i in range(1, n + 1):
            assert f'{kind} {i}' in text, f'{kind} {i} not in the PDF'
    images = sum(image_count(p) for p in PdfReader(pdf).pages)
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
            # Quarto 1.10 joins a one-string source without line breaks
            assert isinstance(cell['source'], list), path.name
            assert all(ln.endswith('\n') for ln in cell['source'][:-1])
            _, opts, _ = split_cell(cell['source'])
            source = ''.join(cell['source'])
            directives = [ln for ln in source.splitlines()
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
    assert [c['source'] for c in cells] == [['#| echo: false\n', 'x = 1'],
                                            '# Title']
    again = filter_nb(filter_nb(nb))
    assert again == filter_nb(nb), 'filtering twice changes the notebook'


def test_what_quarto_needs_from_the_sources():
    "The preface is unnumbered; Quarto's files are ignored; the filter runs."
    pre = json.loads((ROOT / 'index.ipynb').read_text(encoding='utf-8'))
    first = next(''.join(c['source']) for c in pre['cells']
                 if c['cell_type'] == 'markdown')
    heading = re.search(r'^# .*$', first, re.M).group(0)
    assert '.unnumbered' in heading, heading
    ignored = (ROOT / '.gitignore').read_text().splitlines()
    assert '/.quarto/' in ignored and '**/*.quarto_ipynb' in ignored
    cfg = yaml.safe_load((ROOT / '_quarto.yml').read_text())
    assert cfg['ipynb-filters'] == ['book/nbfilter.py']
    assert cfg['format']['typst']['font-paths'] == ['book/fonts']
    meta = yaml.safe_load((ROOT / 'nbs' / '_metadata.yml').read_text())
    assert meta['ipynb-filters'] == ['../book/nbfilter.py']
    assert 'Quarto 1.10' in (ROOT / 'README.md').read_text()


@pytest.mark.parametrize('path', chapter_paths(), ids=lambda p: p.name)
def test_math_that_typst_can_set(path):
    "No math symbol that pandoc 3.9 names in a way Typst 0.15 rejects."
    md = ''.join(''.join(c['source']) for c in json.loads(
        path.read_text(encoding='utf-8'))['cells']
        if c['cell_type'] == 'markdown')
    math = ' '.join(re.findall(r'\$\$.*?\$\$|\$[^$\n]+\$', md, re.S))
    bad = re.findall(r'\\(?:odot|otimes|oplus|ominus)\b|[⊙⊗⊕⊖]', math)
    assert not bad, (f'{path.name}: {bad}: Typst 0.15 has no dot.circle; '
                     f'write the Hadamard product as \\circ')


def test_tables_read_as_tables():
    "Index name in the header row, bare 0..n index dropped, numbers right."
    import pandas as pd
    import pypandoc
    df = pd.DataFrame({'params': ['124,439,808', '891,648'],
                       'name': ['gpt2', 'tiny']},
                      index=pd.Index(['a', 'b'], name='model'))

    def table(frame):
        ast = json.loads(pypandoc.convert_text(frame.to_html(), 'json',
                                               format='html'))
        t = build.tidy_table(ast['blocks'][0])
        head = [build.plain(c[4]) for c in t['c'][3][1][0][1]]
        return head, [spec[0]['t'] for spec in t['c'][2]]
    head, align = table(df)
    assert head == ['model', 'params', 'name']
    assert align == ['AlignDefault', 'AlignRight', 'AlignDefault']
    head, align = table(df.reset_index(drop=True))
    assert head == ['params', 'name'] and align[0] == 'AlignRight'
    md = build.html_table_md(df.to_html(), 'tbl-x', 'Two models.')
    assert md.strip().splitlines()[0].split() == ['model', 'params', 'name']
    assert '{#tbl-x}' in md


def test_apostrophes_after_digits():
    "GPT-2's keeps an apostrophe (Typst would print a prime); code untouched."
    out = build.apostrophes("GPT-2's head and `x = '2's'`")
    assert out == "GPT-2’s head and `x = '2's'`"
    typ = build.typst_apostrophes("fp32's range, `raw '2's'`\n```\n'3's'\n```")
    assert typ == "fp32’s range, `raw '2's'`\n```\n'3's'\n```"


def test_no_number_in_prose_repeats_an_output():
    "Numbers that code printed are printed into the prose by that code."
    import typed_numbers
    found = {p.name: typed_numbers.find_repeats(json.loads(
        p.read_text(encoding='utf-8'))) for p in chapter_paths()}
    found = {k: v for k, v in found.items() if v}
    assert not found, f'typed numbers that outputs print: {found}'


def test_typed_number_check_finds_a_copy():
    import typed_numbers
    nb = {'cells': [
        {'cell_type': 'code', 'source': 'print(x)', 'outputs': [
            {'output_type': 'stream', 'name': 'stdout',
             'text': ['loss 2.6437 after 1,500 steps\n']}]},
        {'cell_type': 'markdown', 'source': 'The loss fell to 2.64 in 1500 '
         'steps; GPT-2 has 50,257 tokens, SHA-256.'},
        {'cell_type': 'markdown', 'source': '<!-- not-from-output: 1,500 -->'
         'We ran 1,500 steps.'}]}
    found = {n for _, n, _ in typed_numbers.find_repeats(nb)}
    assert found == {'2.64', '1500'}


def test_output_comparison():
    "Numbers within tolerance pass; other text, or kinds, do not."
    import verify
    assert verify.same_text('loss 2.6437 (12 s)', 'loss 2.6438 (12 s)', 2e-3)
    assert not verify.same_text('loss 2.64', 'loss 2.91', 2e-3)
    assert not verify.same_text('shakespeare-8k', 'shakespeare-2k', 2e-3)
    img = {'output_type': 'display_data', 'data': {'image/png': 'x'}}
    err = {'output_type': 'error', 'ename': 'ValueError', 'evalue': 'bad'}
    assert verify.output_kinds([img, err]) == ['image', 'error']
    tmp = {'output_type': 'stream', 'name': 'stdout',
           'text': 'saved /tmp/tmpab12x/run at 0x7f3a2b1c9d\n'}
    assert verify.output_text([tmp]) == 'saved <tmp> at 0x…'


def test_verify_catches_a_stale_output(tmp_path):
    "A stored output that the code no longer prints fails, naming the cell."
    import verify
    nb = {'cells': [
        {'cell_type': 'code', 'metadata': {}, 'execution_count': None,
         'source': 'print(6 * 7)', 'outputs': [
             {'output_type': 'stream', 'name': 'stdout', 'text': '42\n'}]},
        {'cell_type': 'code', 'metadata': {}, 'execution_count': None,
         'source': '#| varies\nimport time; print(time.time())',
         'outputs': [{'output_type': 'stream', 'name': 'stdout',
                      'text': '1.0\n'}]},
        {'cell_type': 'code', 'metadata': {}, 'execution_count': None,
         'source': '#| slow\nprint("never run here")', 'outputs': []},
        {'cell_type': 'code', 'metadata': {}, 'execution_count': None,
         'source': 'print("new")', 'outputs': [
             {'output_type': 'stream', 'name': 'stdout', 'text': 'old\n'}]}],
        'metadata': {}, 'nbformat': 4, 'nbformat_minor': 5}
    path = tmp_path / 'demo.ipynb'
    path.write_text(json.dumps(nb))
    _, problems = verify.run_chapter(path)
    assert len(problems) == 1, problems
    assert 'cell 3 (print("new"))' in problems[0]
    assert '-old' in problems[0] and '+new' in problems[0]


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
    # a draft of the new chapter alone: the same export and renderer as
    # the whole book, in a fraction of the time
    quiet = dict(quarto=False, log=lambda *a: None, only=['01_demo'],
                 out=project / 'demo.pdf')

    pdf = build.build_pdf(project, **quiet)
    module = (project / 'llm_from_scratch' / 'demo.py').read_text()
    assert 'def greet(name)' in module
    text = pdf_text(pdf)
    assert 'A demo chapter' in text
    demo_pages = text[text.index('Exports one function'):]
    assert 'def greet(name)' in demo_pages
    assert '#| export' not in demo_pages

    demo['cells'][3]['source'] = demo['cells'][3]['source'].replace(
        'greet', 'salute')
    nb_path.write_text(json.dumps(demo))
    pdf = build.build_pdf(project, **quiet)
    module = (project / 'llm_from_scratch' / 'demo.py').read_text()
    assert 'def salute(name)' in module and 'def greet' not in module
    text = pdf_text(pdf)
    assert 'def salute(name)' in text and 'def greet' not in text


def test_execute_clears_outputs_of_silent_cells(tmp_path):
    "A cell that now prints nothing loses the output it printed before."
    (tmp_path / '_quarto.yml').write_text(
        'book:\n  chapters:\n    - nbs/01_x.ipynb\n')
    (tmp_path / 'nbs').mkdir()
    (tmp_path / 'book').mkdir()
    stale = [dict(name='stdout', output_type='stream', text=['old\n'])]
    cells = [dict(cell_type='code', id='a1', metadata={}, execution_count=None,
                  outputs=stale, source=['x = 1']),
             dict(cell_type='code', id='a2', metadata={}, execution_count=None,
                  outputs=[], source=['print(x + 1)'])]
    nb = dict(cells=cells, metadata={}, nbformat=4, nbformat_minor=5)
    path = tmp_path / 'nbs' / '01_x.ipynb'
    path.write_text(json.dumps(nb))
    build.execute_chapters(tmp_path, log=lambda *a: None)
    got = json.loads(path.read_text())['cells']
    assert got[0]['outputs'] == []
    assert ''.join(got[1]['outputs'][0]['text']) == '2\n'
