#!/usr/bin/env python3
"""Make the book's fallback fonts: small subsets of Noto, kept in book/fonts/.

The PDF is built with Typst's own fonts (Libertinus Serif, New Computer
Modern Math, DejaVu Sans Mono, pinned by the `typst` package) and the files
in book/fonts/, with the build machine's fonts ignored, so every build of the
same sources gives the same PDF. Those fonts lack CJK characters and emoji,
which the tokenizer chapters print on purpose; this script cuts the glyphs
the book uses out of the Noto fonts (SIL Open Font License 1.1, see
book/fonts/OFL.txt) and symbols the text font lacks (the replacement
character, arrows) out of DejaVu Sans (book/fonts/DejaVu-LICENSE.txt), and
writes them to book/fonts/.

Run it when a chapter starts using a new CJK character or emoji (the book's
build stops and says so). It needs Debian's `fonts-noto-cjk` and
`fonts-noto-color-emoji` (or the same files from googlefonts/noto-cjk and
noto-emoji) and fontTools:

    apt-get install fonts-noto-cjk fonts-noto-color-emoji fonts-dejavu-core
    .venv/bin/python book/fonts.py
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / 'book' / 'fonts'
CJK = Path('/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc')
CJK_INDEX = 7                     # "Noto Sans Mono CJK SC" in that file
EMOJI = Path('/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf')
SYMBOLS = Path('/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf')
FILES = {'cjk': 'NotoSansMonoCJKsc-book.otf',
         'emoji': 'NotoColorEmoji-book.ttf',
         'symbols': 'DejaVuSans-book.ttf'}
# always present, so a short demo can use them without a rebuild
BASE = '語言模型日本中文한국어あいうえおアイウエオ🙂👋🚀✅❌🤖'
# symbols the text font may lack (the replacement character, arrows, math)
SYMBOL_BASE = ('\ufffd⏎→←↑↓↔⇒≈≠≤≥×÷−±√∑∏∞∈∂∇·…–—‘’“”•′″°²³ᵀ'
               '─│┌┐└┘├┤┬┴┼█▁▂▃▄▅▆▇▏▕■□▪▫●○◆◇★☆✓✗')


def is_cjk(ch):
    "CJK ideographs, kana, hangul and CJK punctuation."
    o = ord(ch)
    return (0x2E80 <= o <= 0x9FFF or 0xAC00 <= o <= 0xD7AF
            or 0xF900 <= o <= 0xFAFF or 0xFF00 <= o <= 0xFFEF
            or 0x20000 <= o <= 0x2FA1F)


def is_emoji(ch):
    "Pictographs and the joiners and selectors emoji sequences use."
    o = ord(ch)
    return (0x1F000 <= o <= 0x1FAFF or 0x2600 <= o <= 0x27BF
            or o in (0x200D, 0xFE0F, 0x2B50, 0x2B55, 0x2705, 0x274C))


def book_characters(root=ROOT):
    "Every character in the notebooks' sources and stored text outputs."
    chars = set()
    for path in sorted((root / 'nbs').glob('*.ipynb')):
        nb = json.loads(path.read_text(encoding='utf-8'))
        for cell in nb.get('cells', []):
            chars |= set(''.join(cell.get('source', '')))
            for out in cell.get('outputs', []):
                chars |= set(''.join(out.get('text', '')))
                for key, val in out.get('data', {}).items():
                    if key.startswith('text/'):
                        chars |= set(''.join(val))
    return chars


def subset(src, index, chars, dest):
    "Write the glyphs of `chars` from font `src` (collection `index`)."
    from fontTools import subset as ftsubset
    from fontTools.ttLib import TTFont
    font = TTFont(src, fontNumber=index, lazy=False)
    opts = ftsubset.Options()
    opts.layout_features = ['*']
    opts.name_IDs = ['*']
    opts.name_languages = ['*']
    opts.notdef_outline = True
    sub = ftsubset.Subsetter(opts)
    sub.populate(unicodes=sorted(ord(c) for c in chars))
    sub.subset(font)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + '.tmp')
    font.save(tmp)
    tmp.replace(dest)
    return dest


def main():
    missing = [p for p in (CJK, EMOJI, SYMBOLS) if not p.exists()]
    if missing:
        print(f'fonts: {", ".join(map(str, missing))} not found: install '
              f"Debian's fonts-noto-cjk, fonts-noto-color-emoji and "
              f'fonts-dejavu-core',
              file=sys.stderr)
        return 1
    chars = book_characters() | set(BASE) | set(SYMBOL_BASE)
    cjk = sorted(c for c in chars if is_cjk(c))
    emoji = sorted(c for c in chars if is_emoji(c))
    symbols = sorted(c for c in chars if ord(c) > 0xff and not is_cjk(c)
                     and not is_emoji(c))
    for kind, src, index, cs in (('cjk', CJK, CJK_INDEX, cjk),
                                 ('emoji', EMOJI, 0, emoji),
                                 ('symbols', SYMBOLS, 0, symbols)):
        dest = subset(src, index, cs, OUT / FILES[kind])
        print(f'wrote {dest.relative_to(ROOT)}: {len(cs)} characters, '
              f'{dest.stat().st_size / 1024:.0f} KiB')
    return 0


if __name__ == '__main__':
    sys.exit(main())
