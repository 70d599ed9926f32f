"""The GPU checklist (benchmarks/gpu.sh) in its dry mode: the same code on
the CPU at toy sizes, so that the script a GPU machine runs cannot rot."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def dry_run(tmp_path_factory):
    "(exit status, report.json, stdout) of `bash benchmarks/gpu.sh --dry`."
    out = tmp_path_factory.mktemp('gpu-report')
    env = {**os.environ, 'OUT': str(out), 'PYTHON': sys.executable}
    r = subprocess.run(['bash', str(ROOT / 'benchmarks' / 'gpu.sh'),
                        '--dry'], capture_output=True, text=True, env=env,
                       cwd=out, timeout=600)
    report = json.loads((out / 'report.json').read_text())
    return r, report, out


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_every_part_finishes(dry_run):
    r, report, out = dry_run
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert report['failed'] == [] and report['dry'] is True
    assert set(report['status']) == {
        'env', 'prepare', 'train-bare-eager', 'train-ours-eager', 'fsdp',
        'decode', 'train-bare-compiled', 'train-ours-compiled'}
    assert (out / 'report.md').read_text() in r.stdout  # printed, too


def test_env(dry_run):
    env = dry_run[1]['parts']['env']
    assert env['torch'] and env['devices'] and env['n_devices'] == 0
    assert positive(env['matmul_flops'])
    assert env['datasheet'] is None  # no GPU data sheet in a dry run
    assert list(dry_run[1]['peaks']) == ['measured peak']


@pytest.mark.parametrize('loop', ['bare', 'ours'])
@pytest.mark.parametrize('mode', ['eager', 'compiled'])
def test_training(dry_run, loop, mode):
    r = dry_run[1]['parts'][f'train-{loop}-{mode}']
    assert (r['loop'], r['mode'], r['preset']) == (loop, mode, 'tiny')
    for k in ('tokens_per_s', 'flops_per_token', 'params', 'peak_mem_gb',
              'final_loss'):
        assert positive(r[k]), (k, r[k])
    assert r['timed_steps'] >= 2


def test_same_loss(dry_run):
    "Bare and ours train the same model on the same batches."
    parts = dry_run[1]['parts']
    losses = [parts[f'train-{loop}-eager']['final_loss']
              for loop in ('bare', 'ours')]
    assert losses[0] == pytest.approx(losses[1], abs=1e-3)


def test_fsdp_and_resume(dry_run):
    f = dry_run[1]['parts']['fsdp']
    assert f['processes'] == 2 and 'accelerate launch' in f['command']
    assert positive(f['tokens_per_s']) and positive(f['peak_mem_gb'])
    assert f['checkpoint']['step'] == f['resume_from']
    assert f['checkpoint']['safetensors'] >= 1
    assert f['resume_ok']
    assert f['resumed_steps'][0] > f['resume_from']
    assert f['resumed_steps'][-1] == f['steps']
    assert all(math.isfinite(x) for x in f['resumed_losses'])
    assert f['max_loss_diff'] < 1e-4  # the same steps again, on CPU


def test_decode(dry_run):
    d = dry_run[1]['parts']['decode']
    got = {(r['who'], r['precision'], r['batch']) for r in d['rows']}
    assert got == {(w, p, b) for w in ('ours', 'transformers')
                   for p in ('fp32', 'bf16') for b in (1, 8)}
    assert all(positive(r['tokens_per_s']) and positive(r['gb_per_s'])
               for r in d['rows'])
    assert d['greedy_tokens_match_transformers'] is True


def test_report_names_no_gpu_peak(dry_run):
    "A dry run prints no MFU against a GPU data sheet."
    md = (dry_run[2] / 'report.md').read_text()
    assert 'data sheet' not in md.split('## 1.')[1].split('## 2.')[0]
    assert 'MFU (measured peak)' in md


def test_no_gpu_refused(tmp_path):
    "Without --dry on a machine without GPUs: a clear message, status 2."
    if subprocess.run('command -v nvidia-smi', shell=True).returncode == 0:
        pytest.skip('this machine has nvidia-smi')
    r = subprocess.run(['bash', str(ROOT / 'benchmarks' / 'gpu.sh')],
                       capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, 'OUT': str(tmp_path / 'o')})
    assert r.returncode == 2 and '--dry' in r.stderr


def test_a_folder_of_other_files_is_refused(tmp_path):
    "OUT holding someone's files: refused, nothing in it touched."
    logs = tmp_path / 'logs'
    logs.mkdir()
    (logs / 'mine.log').write_text('keep me')
    r = subprocess.run(['bash', str(ROOT / 'benchmarks' / 'gpu.sh'),
                        '--dry'], capture_output=True, text=True,
                       env={**os.environ, 'OUT': str(tmp_path)})
    assert r.returncode == 2 and 'new or empty folder' in r.stderr
    assert (logs / 'mine.log').read_text() == 'keep me'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['logs']
