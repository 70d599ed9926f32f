"""The import graph: each chapter's module imports only earlier chapters."""
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'llm_from_scratch'


def chapters():
    "Module name -> chapter number, from each notebook's default_exp."
    out = {}
    for nb in sorted((ROOT / 'nbs').glob('[0-9][0-9]_*.ipynb')):
        text = '\n'.join(''.join(c['source']) for c in
                       json.loads(nb.read_text())['cells'])
        m = re.search(r'#\|\s*default_exp\s+(\w+)', text)
        if m:
            out[m.group(1)] = int(nb.name[:2])
    return out


def imported(module):
    "Every module of the package that `module` imports, at any depth."
    tree = ast.parse((PACKAGE / f'{module}.py').read_text())
    out = set()
    for node in ast.walk(tree):  # inside functions too: lazy imports count
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                names = [node.module] if node.module else \
                    [a.name for a in node.names]
            elif (node.module or '').startswith('llm_from_scratch'):
                rest = node.module.split('.')[1:]
                names = rest[:1] or [a.name for a in node.names]
            else:
                names = []
            out.update(n.split('.')[0] for n in names)
        elif isinstance(node, ast.Import):
            out.update(a.name.split('.')[1] for a in node.names
                       if a.name.startswith('llm_from_scratch.'))
    return out - {module}


def test_every_module_is_a_chapter():
    order = chapters()
    assert len(order) >= 13 and order['training'] == 5
    modules = {p.stem for p in PACKAGE.glob('*.py')
               if not p.stem.startswith('_')}
    assert modules == set(order)


@pytest.mark.parametrize('module', sorted(chapters()))
def test_a_chapter_imports_only_earlier_chapters(module):
    order = chapters()
    later = {m for m in imported(module) if m in order
             and order[m] >= order[module]}
    assert not later, f'{module} (chapter {order[module]}) imports {later}'


def test_the_walk_sees_lazy_imports():
    "cli (chapter 90) imports later chapters inside its functions."
    assert {'finetuning', 'lora', 'serving', 'portable'} <= imported('cli')
    assert 'training' in imported('generation')  # inside load_for_...


LONE = """
from llm_from_scratch.training import TrainConfig, train
from llm_from_scratch import training
try:
    training.extension('ChatLoader', 'finetuning', 'chat data')
except RuntimeError as e:
    print(e)
import llm_from_scratch.finetuning, llm_from_scratch.lora
print(sorted(training.EXTENSIONS))
"""


def test_later_chapters_lend_the_loop_their_functions():
    r = subprocess.run([sys.executable, '-c', LONE], capture_output=True,
                       text=True, check=True)
    first, second = r.stdout.strip().split('\n')
    assert first == ('chat data needs ChatLoader: import '
                     'llm_from_scratch.finetuning first')
    assert eval(second) == ['CHAT_TEMPLATE', 'ChatLoader', 'add_lora',
                            'as_classifier', 'grow_vocab', 'merge_lora',
                            'train_rows']
