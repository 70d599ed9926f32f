"""The package as a user meets it: the wheel installed into a fresh venv
with nothing but its declared requirements, then the README's quick start
run through the installed `llm-from-scratch` program."""
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def run(*cmd, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                       **kw)
    assert r.returncode == 0, f'{cmd}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}'
    return r


def quick_start():
    "The commands of the README's quick start, as a user would type them."
    readme = (ROOT / 'README.md').read_text()
    block = readme.split('## Quick start', 1)[1].split('```sh', 1)[1]
    block = block.split('```', 1)[0]
    return [shlex.split(line.split('#')[0]) for line in block.splitlines()
            if line.startswith('llm-from-scratch ')]


@pytest.fixture(scope='module')
def venv(tmp_path_factory):
    "A fresh venv holding the wheel and its unpinned requirements."
    tmp = tmp_path_factory.mktemp('wheel')
    dist = tmp / 'dist'
    run(sys.executable, '-m', 'build', '--wheel', '--no-isolation',
        '--outdir', dist, ROOT, cwd=tmp)
    wheel, = dist.glob('llm_from_scratch-*.whl')
    venv = tmp / 'venv'
    run(sys.executable, '-m', 'venv', venv)
    py = venv / 'bin' / 'python'
    # torch first, alone, as PyTorch's instructions say (its CPU build on
    # machines without an NVIDIA driver); then the wheel with no pins at
    # all: pip picks the newest release of every other requirement
    torch_pin = re.search(r'^torch==\S+', (ROOT / 'requirements-dev.txt')
                          .read_text(), re.M).group(0)
    # (--no-compile: the same files, without byte-compiling torch's
    # thousands of modules, which only saves time at their first import)
    index = os.environ.get('TORCH_INDEX')
    pip = [py, '-m', 'pip', 'install', '--quiet', '--no-compile']
    run(*pip, torch_pin, *(['--extra-index-url', index] if index else []))
    run(*pip, wheel)
    return venv, wheel


def test_wheel_installs_into_a_fresh_venv(venv, tmp_path):
    venv, wheel = venv
    version = re.search(r'^version\s*=\s*(\S+)',
                        (ROOT / 'settings.ini').read_text(), re.M).group(1)
    assert version in wheel.name
    modules = sorted(p.stem for p in (ROOT / 'llm_from_scratch').glob('*.py')
                     if not p.stem.startswith('_'))
    imports = ''.join(f'import llm_from_scratch.{m}; ' for m in modules)
    out = run(venv / 'bin' / 'python', '-c', f'{imports}import '
              'llm_from_scratch as m; print(m.__version__, m.__file__)',
              cwd=tmp_path).stdout
    got_version, where = out.split()
    assert got_version == version
    assert str(venv) in where, 'imported from the wrong place'
    # the server's web stack comes with the wheel, and so does its page
    run(venv / 'bin' / 'python', '-c', 'import fastapi, uvicorn; from '
        'llm_from_scratch.serving import PAGE; assert "<html" in PAGE',
        cwd=tmp_path)


def test_readme_quick_start(venv, tmp_path):
    "prepare, a short train, generate, help and export, as the README says."
    venv, _ = venv
    commands = quick_start()
    assert [c[1] for c in commands] == ['prepare', 'train', 'generate',
                                        'finetune', 'chat', 'eval',
                                        'export', 'COMMAND'], commands
    env = {**os.environ, 'PATH': f'{venv / "bin"}:{os.environ["PATH"]}'}
    for cmd in commands:
        if cmd[1] == 'COMMAND':  # every command's --help
            for name in ('prepare', 'train', 'generate', 'finetune', 'chat',
                         'serve', 'eval', 'export'):
                r = run(cmd[0], name, '--help', cwd=tmp_path, env=env)
                assert '--' in r.stdout
            continue
        if cmd[1] == 'train':  # a short run: the README's is 1,500 steps
            i = cmd.index('--max_steps')
            cmd = cmd[:i + 1] + ['12'] + cmd[i + 2:]
        if cmd[1] == 'generate':
            cmd = cmd + ['--max_new_tokens', '20', '--seed', '0']
        if cmd[1] == 'finetune':  # a short run, on a few chats
            cmd = cmd + ['--max_steps', '6', '--eval_every', '3',
                         '--eval_batches', '2']
        if cmd[1] == 'eval':  # a few items of each task
            cmd = cmd + ['--limit', '10']
        talk = 'What is 2 plus 3?\n' if cmd[1] == 'chat' else None
        r = run(*cmd, cwd=tmp_path, env=env, input=talk)
        if cmd[1] == 'generate':
            assert r.stdout.startswith('ROMEO:') and 'tokens/s' in r.stderr
        if cmd[1] == 'chat':
            assert r.stdout.count('assistant> ') == 1, r.stdout
        if cmd[1] == 'eval':
            assert '| next_word ' in r.stdout and 'bits_per_byte' in r.stdout
    exported = tmp_path / 'runs' / 'tiny-export'
    assert {'model.safetensors', 'tokenizer.json'} <= {
        p.name for p in exported.iterdir()}
    r = run(venv / 'bin' / 'llm-from-scratch', 'generate', '--checkpoint',
            exported, '--max_new_tokens', '5', cwd=tmp_path, env=env)
    assert r.stdout.startswith('ROMEO:')
