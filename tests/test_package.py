"""The package: built as a wheel, installed into a fresh venv, imported."""
import os
import re
import subprocess
import sys

from conftest import ROOT


def run(*cmd, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                       **kw)
    assert r.returncode == 0, f'{cmd}:\n{r.stdout}\n{r.stderr}'
    return r.stdout


def test_wheel_installs_into_a_fresh_venv(tmp_path):
    version = re.search(r'^version\s*=\s*(\S+)',
                        (ROOT / 'settings.ini').read_text(), re.M).group(1)
    dist = tmp_path / 'dist'
    run(sys.executable, '-m', 'build', '--wheel', '--no-isolation',
        '--outdir', dist, ROOT, cwd=tmp_path)
    wheel, = dist.glob('llm_from_scratch-*.whl')
    assert version in wheel.name

    venv = tmp_path / 'venv'
    run(sys.executable, '-m', 'venv', venv)
    py = venv / 'bin' / 'python'
    # torch first, alone, as the Makefile installs it (PyTorch's CPU index
    # on machines without an NVIDIA driver); then the wheel, with the dev
    # pins as constraints, so no multi-GB CUDA build is pulled in
    reqs = (ROOT / 'requirements-dev.txt').read_text()
    torch_pin = re.search(r'^torch==\S+', reqs, re.M).group(0)
    index = os.environ.get('TORCH_INDEX')
    run(py, '-m', 'pip', 'install', '--quiet', '--no-deps', torch_pin,
        *(['--extra-index-url', index] if index else []))
    run(py, '-m', 'pip', 'install', '--quiet', '-c',
        ROOT / 'requirements-dev.txt', wheel)
    # every chapter module imports with only the declared requirements
    modules = sorted(p.stem for p in (ROOT / 'llm_from_scratch').glob('*.py')
                     if not p.stem.startswith('_'))
    imports = ''.join(f'import llm_from_scratch.{m}; ' for m in modules)
    out = run(py, '-c', f'{imports}import llm_from_scratch as m; '
              'print(m.__version__, m.__file__)', cwd=tmp_path)
    got_version, where = out.split()
    assert got_version == version
    assert str(venv) in where, 'imported from the wrong place'
