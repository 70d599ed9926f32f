"""Shared fixtures: a throw-away copy of the project to build and break."""
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'book'))

# what a book build reads and writes; tests copy these, never the .venv
PROJECT_FILES = ['_quarto.yml', 'settings.ini', 'setup.py', 'pyproject.toml',
                 'README.md', 'index.ipynb', 'nbs', 'book',
                 'llm_from_scratch']


def copy_project(dest):
    "Copy the book's sources into `dest` (links stay links)."
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_symlink() or src.is_file():
            shutil.copy2(src, dest / name, follow_symlinks=False)
        else:
            shutil.copytree(src, dest / name, symlinks=True,
                            ignore=shutil.ignore_patterns('__pycache__',
                                                          '*.pdf'))
    return dest


@pytest.fixture
def project(tmp_path):
    "A fresh copy of the project in a temporary folder."
    return copy_project(tmp_path / 'project')


@pytest.fixture(scope='session')
def built_book(tmp_path_factory):
    "The book built once, with pandoc + typst, from a copy of the project."
    import build
    root = copy_project(tmp_path_factory.mktemp('book') / 'project')
    pdf = build.build_pdf(root, quarto=False, log=lambda *a: None)
    return root, pdf

