"""Small drawing helpers for the book's concept diagrams.

The chapters draw their diagrams with matplotlib in cells the reader does
not see (`#| echo: false`), from the real objects where possible (a mask
from the mask function, shapes from a config), so a diagram cannot drift
from the code. This module only keeps their look consistent: one palette,
one font size, boxes, arrows and labelled grids. Notebooks import it with

    import sys; sys.path.insert(0, '../book'); from diagrams import *
"""
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

__all__ = ['PALETTE', 'canvas', 'box', 'arrow', 'label', 'grid', 'done']

# colour-blind-safe fills (Okabe-Ito, lightened) and their edge colours
PALETTE = dict(blue=('#d6e6f5', '#1f4e79'), orange=('#fde3c8', '#b35900'),
               green=('#d5efe3', '#1b7a4c'), purple=('#e8dff2', '#5b3a8c'),
               grey=('#eeeeee', '#555555'), red=('#f8d9d9', '#a11d1d'),
               yellow=('#fbf3c8', '#8a7200'), white=('#ffffff', '#555555'))
FONT = 9


def canvas(width, height, scale=1.0):
    "A blank figure of `width` x `height` data units (no axes), 1 unit ~ 1cm."
    fig, ax = plt.subplots(figsize=(width * scale / 2.54,
                                    height * scale / 2.54))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.set_aspect('equal')
    ax.axis('off')
    fig.subplots_adjust(0, 0, 1, 1)
    return fig, ax


def box(ax, x, y, w, h, text='', color='blue', size=FONT, round=0.12,
        weight='normal', ha='center', **kw):
    "A rounded box with lower-left corner (x, y); returns its centre."
    face, edge = PALETTE[color]
    ax.add_patch(FancyBboxPatch((x, y), w, h, linewidth=1.0,
                                boxstyle=f'round,pad=0,rounding_size={round}',
                                facecolor=face, edgecolor=edge, **kw))
    tx = x + w / 2 if ha == 'center' else x + 0.15
    if text:
        ax.text(tx, y + h / 2, text, ha=ha, va='center', fontsize=size,
                weight=weight, color='#222222')
    return x + w / 2, y + h / 2


def arrow(ax, start, end, color='#444444', style='-|>', lw=1.0, rad=0.0,
          text='', size=FONT - 1, **kw):
    "An arrow from point `start` to point `end`, with an optional label."
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style,
                                 mutation_scale=9, color=color, lw=lw,
                                 shrinkA=0, shrinkB=0,
                                 connectionstyle=f'arc3,rad={rad}', **kw))
    if text:
        mx, my = (start[0] + end[0]) / 2, (start[1] + end[1]) / 2
        ax.text(mx + 0.15, my, text, fontsize=size, va='center',
                color='#333333')


def label(ax, x, y, text, size=FONT, color='#222222', **kw):
    "Plain text at (x, y), centred unless `ha`/`va` say otherwise."
    kw.setdefault('ha', 'center')
    kw.setdefault('va', 'center')
    ax.text(x, y, text, fontsize=size, color=color, **kw)


def grid(ax, x, y, values, cell=0.6, fmt='{:.2f}', cmap='Blues',
         vmin=None, vmax=None, rows=None, cols=None, size=FONT - 2,
         masked=None):
    "Draw matrix `values` (list of rows) with cell text; (x, y) is top-left."
    import numpy as np
    v = np.asarray(values, dtype=float)
    finite = v[np.isfinite(v)]
    lo = finite.min() if vmin is None and finite.size else (vmin or 0)
    hi = finite.max() if vmax is None and finite.size else (vmax or 1)
    cm = plt.get_cmap(cmap)
    for i, row in enumerate(v):
        for j, val in enumerate(row):
            cx, cy = x + j * cell, y - (i + 1) * cell
            hidden = masked is not None and masked[i][j]
            if hidden or not np.isfinite(val):
                face, txt = '#f2f2f2', '' if hidden else '−∞'
            else:
                t = 0.15 + 0.7 * (val - lo) / ((hi - lo) or 1)
                face, txt = cm(t), fmt.format(val)
            ax.add_patch(plt.Rectangle((cx, cy), cell, cell, facecolor=face,
                                       edgecolor='white', lw=1))
            if txt:
                dark = np.isfinite(val) and t > 0.6
                ax.text(cx + cell / 2, cy + cell / 2, txt, ha='center',
                        va='center', fontsize=size,
                        color='white' if dark else '#222222')
    for j, c in enumerate(cols or []):
        ax.text(x + (j + .5) * cell, y + 0.15, c, ha='center', va='bottom',
                fontsize=size, rotation=0)
    for i, r in enumerate(rows or []):
        ax.text(x - 0.12, y - (i + .5) * cell, r, ha='right', va='center',
                fontsize=size)


def done(fig):
    "Show `fig` in the notebook output and close it (one image per figure)."
    plt.show()
    plt.close(fig)
