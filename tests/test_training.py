"""Training: loss falls, exact resume, checkpoints, locks, bad input."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llm_from_scratch import training
from llm_from_scratch.data import BatchLoader, load_split, prepare_data
from llm_from_scratch.data import shakespeare
from llm_from_scratch.model import GPT, preset
from llm_from_scratch.training import (TrainConfig, check_train_config,
                                       evaluate, latest_checkpoint,
                                       load_checkpoint, model_from_checkpoint,
                                       peak_flops, read_checkpoint_meta,
                                       read_log, resume_config,
                                       save_checkpoint, train)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp('train') / 'data'
    prepare_data(shakespeare()[:80], out, vocab_size=512, processes=1)
    return out


def config(data, out, **kw):
    base = TrainConfig(data=str(data), out=str(out), block_size=32,
                       batch_size=4, max_steps=8, warmup_steps=2,
                       eval_every=4, eval_batches=2, save_every=4, keep=3)
    return replace(base, **kw)


def test_loss_decreases(data, tmp_path):
    log = train(config(data, tmp_path / 'run', max_steps=60, lr=1e-2,
                       warmup_steps=5, eval_every=30, save_every=60),
                progress=False)
    first = sum(r['loss'] for r in log[:5]) / 5
    last = sum(r['loss'] for r in log[-5:]) / 5
    assert last < first - 0.4, (first, last)
    assert log[-1]['val_loss'] is not None
    assert (tmp_path / 'run' / 'samples.txt').read_text().count(
        '--- step') == 2  # before and after


def test_grad_accumulation_equals_big_batch(data):
    torch.manual_seed(0)
    model = GPT(preset('tiny', vocab_size=512, block_size=32))
    _, shards = load_split(data, 'train')
    x, y = BatchLoader(shards, 12, 32).batch(0)

    def grads(k):
        model.zero_grad()
        for xs, ys in zip(x.chunk(k), y.chunk(k)):
            (model(xs, ys)[1] / k).backward()
        return [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads(1), grads(3)):
        assert torch.allclose(a, b, atol=1e-6)


# -- runs in real processes ---------------------------------------------------

RUN = """
import json, sys
from dataclasses import replace
from llm_from_scratch.training import TrainConfig, train
fields = dict(block_size=32, batch_size=4, warmup_steps=2, eval_every=4,
              eval_batches=2, save_every=4, keep=3, max_steps=8)
fields.update(json.loads(sys.argv[5]) if len(sys.argv) > 5 else {})
c = TrainConfig(data=sys.argv[1], out=sys.argv[2], **fields)
stop = int(sys.argv[3])
train(c, resume=sys.argv[4] == 'resume', progress=False,
      stop_after=stop if stop < c.max_steps else None)
"""


def run_process(*args, check=True):
    r = subprocess.run([sys.executable, '-c', RUN, *map(str, args)],
                       capture_output=True, text=True)
    if check:
        assert r.returncode == 0, r.stderr[-2000:]
    return r


def start_process(data, out, **fields):
    "A training process in the background (10,000 steps: stop it)."
    fields = {'max_steps': 10_000, 'save_every': 10_000, **fields}
    return subprocess.Popen([sys.executable, '-c', RUN, str(data), str(out),
                             '10000', 'fresh', json.dumps(fields)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for_rows(run, n, proc, timeout=120):
    "Wait until `run`'s log has `n` rows."
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        if (run / 'log.csv').exists() and len(read_log(run)) >= n:
            return
        time.sleep(0.1)
    raise TimeoutError(f'{run} has fewer than {n} rows')


def test_log_every_logs_the_same_run(data, tmp_path):
    "log_every=3: fewer rows, each the mean (max norm) of its steps."
    every = train(config(data, tmp_path / 'a'), progress=False)
    third = train(config(data, tmp_path / 'b', log_every=3), progress=False)
    # rows at steps 3 and 6, and at 4 and 8 where it evaluates and saves
    assert [r['step'] for r in third] == [3, 4, 6, 8]
    loss = {r['step']: r['loss'] for r in every}
    norm = {r['step']: r['grad_norm'] for r in every}
    for r, first in zip(third, (1, 4, 5, 7)):
        steps = range(first, int(r['step']) + 1)
        assert r['loss'] == pytest.approx(
            sum(loss[s] for s in steps) / len(steps), rel=1e-6)
        assert r['grad_norm'] == pytest.approx(max(norm[s] for s in steps),
                                               rel=1e-6)
    assert third[-1]['val_loss'] == pytest.approx(every[-1]['val_loss'],
                                                  rel=1e-6)


@pytest.mark.parametrize('dropout', [0.0, 0.1])
def test_resume_is_exact(data, tmp_path, dropout):
    "8 steps straight == stop after 4, new process, resume: bit for bit."
    straight, split = tmp_path / 'straight', tmp_path / 'split'
    extra = json.dumps(dict(dropout=dropout))
    run_process(data, straight, 8, 'fresh', extra)
    run_process(data, split, 4, 'fresh', extra)
    run_process(data, split, 8, 'resume', extra)
    a, b = read_log(straight), read_log(split)
    assert [r['step'] for r in b] == list(range(1, 9))
    for key in ('loss', 'lr', 'grad_norm', 'val_loss'):
        assert [r[key] for r in a] == [r[key] for r in b], key
    wa, wb = (shard_tensors(latest_checkpoint(r)) for r in (straight, split))
    assert wa.keys() == wb.keys() and any('exp_avg' in k for k in wa)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # weights, moments


def shard_tensors(ckpt):
    "Every tensor in a checkpoint's shard files, by name."
    out = {}
    for f in sorted((ckpt / 'shards').iterdir()):
        out.update(load_file(f))
    return out


def shard_bytes(ckpt):
    return {f.name: f.read_bytes() for f in (ckpt / 'shards').iterdir()}


def test_two_trainers_cannot_share_a_run_folder(data, tmp_path):
    out = tmp_path / 'run'
    first = start_process(data, out)
    try:
        wait_for_rows(out, 2, first)
        for resume in (False, True):
            t0 = time.time()
            with pytest.raises(RuntimeError, match=f'{out}.* in use .*pid '
                               f'{first.pid}'):
                train(config(data, out), resume=resume, progress=False)
            assert time.time() - t0 < 30  # refused at once, not queued
        second = run_process(data, out, 8, 'resume', check=False)
        assert second.returncode != 0 and 'in use' in second.stderr
    finally:
        first.kill()
        first.communicate()
    steps = [r['step'] for r in read_log(out)]
    assert steps == list(range(1, len(steps) + 1))  # one writer only


def test_ctrl_c_saves_a_checkpoint_and_resumes(data, tmp_path):
    out = tmp_path / 'run'
    proc = start_process(data, out)
    wait_for_rows(out, 3, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    step = int(read_log(out)[-1]['step'])
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and read_checkpoint_meta(ckpt)['step'] == step
    assert str(ckpt) in err and 'resume' in err
    log = train(config(data, out, max_steps=step + 2, save_every=10_000,
                       eval_every=10_000), resume=True, progress=False)
    assert [r['step'] for r in log] == list(range(1, step + 3))


# -- checkpoints --------------------------------------------------------------

def tiny_state(data):
    model = GPT(preset('tiny', vocab_size=512, block_size=32))
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    loader = BatchLoader(load_split(data, 'train')[1], 4, 32)
    return model, opt, sched, loader


def test_checkpoints_are_ordered_by_step(data, tmp_path):
    state = tiny_state(data)
    for step in (9_999_999, 10_000_000):
        save_checkpoint(tmp_path, step, *state, keep=5)
    root = tmp_path / 'checkpoints'
    (root / 'step-best').mkdir()  # the user's own folders
    (root / 'step-0000001').mkdir()
    assert latest_checkpoint(tmp_path).name == 'step-10000000'
    new = save_checkpoint(tmp_path, 10_000_001, *state, keep=2)
    assert latest_checkpoint(tmp_path) == new
    assert sorted(p.name for p in root.iterdir()) == [
        'step-0000001', 'step-10000000', 'step-10000001', 'step-best']


def test_crash_while_saving_keeps_the_last_checkpoint(data, tmp_path,
                                                      monkeypatch):
    out = tmp_path / 'run'
    train(config(data, out, max_steps=4), progress=False)
    good = latest_checkpoint(out)
    before = shard_bytes(good)

    def crash(tensors, folder):
        folder.mkdir()
        (folder / 'shard-00001.safetensors').write_bytes(b'half a file')
        raise KeyboardInterrupt('power cut')
    monkeypatch.setattr(training, '_save_tensors', crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(out, 8, *tiny_state(data))
    assert latest_checkpoint(out) == good
    assert shard_bytes(good) == before
    assert sorted(p.name for p in (out / 'checkpoints').iterdir()) == \
        [good.name]  # no partial folder left behind
    monkeypatch.undo()
    fresh = GPT(preset('tiny', vocab_size=512, block_size=32))
    assert load_checkpoint(good, fresh) == 4


def test_disk_full_while_saving_says_so(data, tmp_path, monkeypatch):
    "Simulated: a shard write fails as it does on a full disk."
    out = tmp_path / 'run'
    train(config(data, out, max_steps=4), progress=False)

    def full(tensors, folder):
        folder.mkdir()
        (folder / 'shard-00001.safetensors').write_bytes(b'x' * 100)
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(training, '_save_tensors', full)
    monkeypatch.setattr(training.shutil, 'disk_usage',
                        lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))
    with pytest.raises(OSError, match=f'no space left on .*{out.name}') as e:
        train(config(data, out), resume=True, progress=False)
    assert e.value.errno == errno.ENOSPC
    assert [p.name for p in (out / 'checkpoints').iterdir()] == \
        ['step-0000004']
    monkeypatch.undo()
    log = train(config(data, out), resume=True, progress=False)
    assert [r['step'] for r in log] == list(range(1, 9))


@pytest.fixture
def small_disk(tmp_path):
    "A 16 MiB tmpfs, where mounting is permitted."
    disk = tmp_path / 'disk'
    disk.mkdir()
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=16m', 'tmpfs',
                        str(disk)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f'cannot mount a small tmpfs here ({r.stderr.strip()})'
                    f': the simulated disk-full test covers this')
    yield disk
    subprocess.run(['umount', '-l', str(disk)])


def test_disk_full_on_a_real_small_disk(data, small_disk):
    out = small_disk / 'run'  # one checkpoint (~11 MB) fits, two do not
    with pytest.raises(OSError, match=f'no space left on {small_disk}'):
        train(config(data, out), progress=False)
    assert [p.name for p in (out / 'checkpoints').iterdir()] == \
        ['step-0000004']
    subprocess.run(['mount', '-o', 'remount,size=64m', str(small_disk)],
                   check=True)
    log = train(config(data, out), resume=True, progress=False)
    assert [r['step'] for r in log] == list(range(1, 9))


def test_checkpoints_hold_no_pickle(trained):
    "Every file of a checkpoint is safetensors or JSON, whatever wrote it."
    ckpt = latest_checkpoint(trained)
    files = [f for f in ckpt.rglob('*') if f.is_file()]
    assert {f.suffix for f in files} == {'.safetensors', '.json'}
    for f in files:
        assert not f.read_bytes().startswith(b'\x80')  # pickle's magic
        assert not zipfile_like(f)  # torch.save's format


def zipfile_like(f):
    return f.read_bytes()[:4] == b'PK\x03\x04'


def old_checkpoint(trained, tmp_path):
    "A version-2 checkpoint as the previous release wrote it in 1 process."
    ckpt = tmp_path / 'checkpoints' / 'step-0000008'
    shutil.copytree(latest_checkpoint(trained), ckpt)
    model = model_from_checkpoint(ckpt)
    shutil.rmtree(ckpt / 'shards')
    from safetensors.torch import save_model
    save_model(model, str(ckpt / 'model.safetensors'))

    class Payload:
        def __reduce__(self):
            return (print, ('this ran from a checkpoint',))
    torch.save({'optimizer': Payload()}, ckpt / 'optim.pt')
    meta = json.loads((ckpt / 'state.json').read_text())
    del meta['sharded']
    (ckpt / 'state.json').write_text(json.dumps(dict(meta, version=2)))
    return ckpt, model


def test_old_checkpoints_load_weights_but_never_resume(data, trained,
                                                       tmp_path, capsys):
    ckpt, model = old_checkpoint(trained, tmp_path)
    again = model_from_checkpoint(ckpt)
    assert all(torch.equal(a, b) for a, b in
               zip(model.state_dict().values(), again.state_dict().values()))
    opt = torch.optim.AdamW(again.parameters())
    with pytest.raises(ValueError, match='older llm_from_scratch.*init_from'):
        load_checkpoint(ckpt, again, opt)
    run = tmp_path / 'run'
    shutil.copytree(trained, run)
    shutil.rmtree(run / 'checkpoints')
    shutil.copytree(ckpt.parent, run / 'checkpoints')
    with pytest.raises(ValueError, match='not a run to resume'):
        train(config(data, run), resume=True, progress=False)
    assert 'this ran' not in capsys.readouterr().out  # optim.pt never read


def test_checkpoint_stands_alone(data, tmp_path):
    old = os.umask(0o022)
    try:
        train(config(data, tmp_path / 'run', max_steps=4), progress=False)
    finally:
        os.umask(old)
    ckpt = latest_checkpoint(tmp_path / 'run')
    meta = read_checkpoint_meta(ckpt)
    tok = (ckpt / 'tokenizer.json').read_bytes()
    assert tok == (data / 'tokenizer.json').read_bytes()
    import hashlib
    assert meta['tokenizer_sha256'] == hashlib.sha256(tok).hexdigest()
    for f in [ckpt, *ckpt.iterdir()]:
        mode = 0o755 if f.is_dir() else 0o644
        assert f.stat().st_mode & 0o777 == mode, f


def test_loading_for_inference_keeps_the_callers_rng(data, tmp_path):
    train(config(data, tmp_path / 'run', max_steps=4), progress=False)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    model_from_checkpoint(latest_checkpoint(tmp_path / 'run'))
    assert torch.equal(torch.get_rng_state(), before)


def test_peak_flops_probe_is_quick_and_leaves_the_rng(monkeypatch):
    monkeypatch.setattr(training, '_MEASURED', {})
    before = torch.get_rng_state()
    t0 = time.perf_counter()
    flops = peak_flops('cpu', torch.bfloat16)
    assert time.perf_counter() - t0 < 2.0
    assert flops > 0
    assert torch.equal(torch.get_rng_state(), before)
    t0 = time.perf_counter()
    assert peak_flops('cpu', torch.bfloat16) == flops  # measured once
    assert time.perf_counter() - t0 < 0.01


def test_nan_loss_stops_and_keeps_last_good(data, tmp_path, monkeypatch):
    out = tmp_path / 'run'
    forward = GPT.forward
    calls = {'n': 0}

    def poisoned(self, idx, targets=None, **kw):
        logits, loss = forward(self, idx, targets, **kw)
        if self.training:
            calls['n'] += 1
            if calls['n'] > 5:
                loss = loss * float('nan')
        return logits, loss
    monkeypatch.setattr(GPT, 'forward', poisoned)
    with pytest.raises(FloatingPointError, match='loss became nan at '
                       'step 6.*step-0000004'):
        train(config(data, out, save_every=2), progress=False)
    assert latest_checkpoint(out).name == 'step-0000004'


def test_a_run_that_failed_before_its_first_checkpoint_restarts(
        data, tmp_path, monkeypatch):
    out = tmp_path / 'run'
    forward = GPT.forward
    calls = {'n': 0}

    def poisoned(self, idx, targets=None, **kw):
        logits, loss = forward(self, idx, targets, **kw)
        calls['n'] += self.training
        if self.training and calls['n'] == 3:
            loss = loss * float('nan')
        return logits, loss
    monkeypatch.setattr(GPT, 'forward', poisoned)
    with pytest.raises(FloatingPointError):
        train(config(data, out), progress=False)
    monkeypatch.undo()
    assert latest_checkpoint(out) is None and len(read_log(out)) == 2
    with pytest.raises(FileExistsError, match='resume.*step 0'):
        train(config(data, out), progress=False)
    log = train(config(data, out), resume=True, progress=False)
    assert [r['step'] for r in log] == list(range(1, 9))


# -- bad input ---------------------------------------------------------------

def test_data_folder_without_shards(tmp_path):
    with pytest.raises(FileNotFoundError, match='prepare'):
        train(config(tmp_path / 'empty', tmp_path / 'run'), progress=False)


def test_checkpoint_from_another_model_or_version(data, tmp_path):
    out = tmp_path / 'run'
    train(config(data, out, max_steps=4), progress=False)
    ckpt = latest_checkpoint(out)
    other = GPT(preset('tiny', vocab_size=512, block_size=32, n_layer=2))
    with pytest.raises(ValueError, match="n_layer"):
        load_checkpoint(ckpt, other)
    meta = json.loads((ckpt / 'state.json').read_text())
    (ckpt / 'state.json').write_text(json.dumps(dict(meta, version=99)))
    with pytest.raises(ValueError, match='newer llm_from_scratch'):
        load_checkpoint(ckpt, GPT(preset('tiny', vocab_size=512,
                                         block_size=32)))


@pytest.fixture(scope='module')
def trained(data, tmp_path_factory):
    "A finished 8-step run (checkpoints at 4 and 8)."
    out = tmp_path_factory.mktemp('trained') / 'run'
    train(config(data, out), progress=False)
    return out


def corrupt(trained, tmp_path, change):
    "A copy of `trained` whose newest state.json is changed by `change`."
    out = tmp_path / 'run'
    shutil.copytree(trained, out)
    state = latest_checkpoint(out) / 'state.json'
    state.write_text(change(json.loads(state.read_text())))
    return out, state


@pytest.mark.parametrize('change, message', [
    (lambda m: json.dumps(dict(m, step=-5)), 'step must be'),
    (lambda m: json.dumps(dict(m, step='8')), 'step must be'),
    (lambda m: json.dumps(dict(m, step=4)), 'step 4 .*step-0000008'),
    (lambda m: '{"format": "llm_from_scratch.checkpoint", "st', 'JSON'),
    (lambda m: json.dumps(dict(m, model_config=dict(
        m['model_config'], n_layer='4'))), 'n_layer'),
    (lambda m: json.dumps(dict(m, model_config=dict(
        m['model_config'], layers=4))), 'layers'),
    (lambda m: json.dumps(dict(m, model_config=[])), 'model_config'),
    (lambda m: json.dumps(dict(m, loader=dict(step=-1))), 'loader'),
    (lambda m: json.dumps(dict(m, version='1')), 'version'),
])
def test_corrupt_state_json_is_refused(data, trained, tmp_path, change,
                                       message):
    out, state = corrupt(trained, tmp_path, change)
    with pytest.raises(ValueError, match=message) as e:
        read_checkpoint_meta(state.parent)
    assert str(state) in str(e.value)
    with pytest.raises(ValueError, match=message):
        train(config(data, out), resume=True, progress=False)
    assert len(read_log(out)) == 8  # nothing deleted


def test_absurd_config_is_refused_before_building(trained, tmp_path):
    out, state = corrupt(trained, tmp_path, lambda m: json.dumps(dict(
        m, model_config=dict(m['model_config'], n_layer=10**6))))
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match='n_layer'):
        model_from_checkpoint(state.parent)
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize('fields, message', [
    (dict(batch_size=0), 'batch_size must be at least 1'),
    (dict(grad_accum=0), 'grad_accum must be at least 1'),
    (dict(warmup_steps=8), 'warmup_steps'),
    (dict(block_size=10_000), 'exceeds the context'),
    (dict(precision='fp8'), 'precision'),
    (dict(grad_clip=-1.0), 'grad_clip'),
    (dict(save_every=0), 'save_every must be at least 1'),
    (dict(eval_every=-1), 'eval_every must be at least 1'),
    (dict(seed=-1), 'seed'),
    (dict(dropout=1.0), 'dropout'),
    (dict(dropout=-0.1), 'dropout'),
    (dict(lr=float('inf')), 'lr'),
    (dict(lr=float('nan')), 'lr'),
    (dict(sample_every=-1), 'sample_every'),
    (dict(max_steps='8'), 'max_steps'),
    (dict(max_steps=8.0), 'max_steps'),
    (dict(log_with='csv'), 'log_with'),
    (dict(betas=(0.9, 1.5)), 'betas'),
    (dict(min_lr_ratio=2.0), 'min_lr_ratio'),
    (dict(weight_decay=-0.1), 'weight_decay'),
])
def test_impossible_settings(data, tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        check_train_config(config(data, tmp_path / 'run', **fields))
    with pytest.raises(ValueError, match=message):
        train(config(data, tmp_path / 'run', **fields), progress=False)
    assert not (tmp_path / 'run').exists()


def test_default_warmup_fits_short_runs(data, tmp_path):
    c = TrainConfig(data=str(data), out=str(tmp_path / 'run'), block_size=32,
                    batch_size=4, max_steps=5, eval_batches=1)
    assert [r['step'] for r in train(c, progress=False)] == [1, 2, 3, 4, 5]


def test_log_csv_is_written_whatever_the_trackers(data, tmp_path):
    log = train(config(data, tmp_path / 'run', max_steps=4, log_with=()),
                progress=False)
    assert [r['step'] for r in log] == [1, 2, 3, 4]


def test_grad_clip_zero_turns_clipping_off(data, tmp_path):
    off, huge = (train(config(data, tmp_path / name, max_steps=3,
                              grad_clip=clip), progress=False)
                 for name, clip in (('off', 0.0), ('huge', 1e9)))
    assert [r['loss'] for r in off] == [r['loss'] for r in huge]


def test_refuses_to_mix_runs(data, tmp_path):
    out = tmp_path / 'run'
    train(config(data, out, max_steps=4), progress=False)
    with pytest.raises(FileExistsError, match='resume'):
        train(config(data, out, max_steps=4), progress=False)
    with pytest.raises(FileNotFoundError, match='no checkpoint'):
        train(config(data, tmp_path / 'new'), resume=True, progress=False)


# -- evaluation ---------------------------------------------------------------

class UnevenLoader:
    "Batches of 1 and 3 sequences from one batch of 4."

    def __init__(self, x, y):
        self.parts = [(x[:1], y[:1]), (x[1:], y[1:])]

    def batch(self, step):
        return self.parts[step]


def test_evaluate_weights_batches_by_tokens(data):
    torch.manual_seed(0)
    model = GPT(preset('tiny', vocab_size=512, block_size=32))
    x, y = BatchLoader(load_split(data, 'val')[1], 4, 32).batch(0)
    whole = evaluate(model, UnevenLoader(x, y), 2)
    with torch.no_grad():
        ref = model.eval()(x, y)[1].item()
    assert abs(whole['loss'] - ref) < 1e-5
    assert whole['tokens'] == y.numel()


def test_validation_loss_is_weighted_across_processes(data):
    "Two processes with 1 and 3 sequences: weighted by tokens, not ranks."
    torch.manual_seed(0)
    model = GPT(preset('tiny', vocab_size=512, block_size=32)).eval()
    x, y = BatchLoader(load_split(data, 'val')[1], 4, 32).batch(0)
    with torch.no_grad():
        other = model(x[1:], y[1:])[1].item() * y[1:].numel()
        ref = model(x, y)[1].item()

    class TwoRanks:  # this process holds 1 sequence, "the other" 3
        device = 'cpu'

        def reduce(self, t, reduction):
            assert reduction == 'sum'
            return t + torch.tensor([other, y[1:].numel()], dtype=t.dtype)
    loader = UnevenLoader(x, y)
    loader.parts = loader.parts[:1]
    row = training._evaluate(TwoRanks(), model, loader, 1)
    assert abs(row['val_loss'] - ref) < 1e-5


# -- what the command line needs ----------------------------------------------

def test_progress_lines_and_summary(data, tmp_path, capsys):
    train(config(data, tmp_path / 'run'), progress='lines')
    out = capsys.readouterr().out
    for text in ('parameters', str(data), 'tokens per step',
                 'measuring peak FLOP/s', str(tmp_path / 'run'),
                 'step 8/8', 'val loss'):
        assert text in out, text
    assert len(out.splitlines()) < 25
    train(config(data, tmp_path / 'quiet'), progress=False)
    assert capsys.readouterr().out == ''
    train(config(data, tmp_path / 'run', max_steps=10), resume=True,
          progress='lines')
    assert 'step 8' in capsys.readouterr().out  # where it resumes


def test_resume_config(data, trained):
    c = resume_config(trained, max_steps=12, eval_every=6)
    assert (c.max_steps, c.eval_every, c.lr, c.out) == \
        (12, 6, 3e-3, str(trained))
    assert c.betas == (0.9, 0.95)  # a tuple again, as saved
    with pytest.raises(ValueError, match=r'(?s)trained with lr 0.003 and '
                       r'block_size 32.*gives lr 0.01 and block_size 16'):
        resume_config(trained, lr=0.01, block_size=16, max_steps=12)
    with pytest.raises(ValueError, match='unknown'):
        resume_config(trained, learning_rate=0.01)
    with pytest.raises(FileNotFoundError, match='no checkpoint'):
        resume_config(trained.parent / 'nothing')


def test_resume_refuses_a_changed_setting(data, trained, tmp_path):
    out = tmp_path / 'run'
    shutil.copytree(trained, out)
    with pytest.raises(ValueError, match='lr'):
        train(config(data, out, lr=0.01, max_steps=10), resume=True,
              progress=False)


def test_data_is_verified_at_the_start(data, tmp_path):
    copy = tmp_path / 'data'
    shutil.copytree(data, copy)
    meta = json.loads((copy / 'metadata.json').read_text())
    shard = copy / meta['splits']['train']['shards'][0]['file']
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 1
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=shard.name):
        train(config(copy, tmp_path / 'run'), progress=False)


def test_init_from_a_run_starts_from_its_weights(data, trained, tmp_path):
    fresh = train(config(data, tmp_path / 'fresh', max_steps=2,
                         warmup_steps=0),
                  progress=False)
    tuned = train(config(data, tmp_path / 'tuned', max_steps=2,
                         warmup_steps=0, init_from=str(trained), lr=1e-4,
                         dropout=0.1),
                  progress=False)
    assert tuned[0]['loss'] < read_log(trained)[-1]['loss'] + 0.3
    assert tuned[0]['loss'] < fresh[0]['loss'] - 0.3
    meta = read_checkpoint_meta(latest_checkpoint(tmp_path / 'tuned'))
    assert meta['model_config']['dropout'] == 0.1


def test_init_from_needs_the_same_tokenizer(data, trained, tmp_path):
    other = tmp_path / 'other'
    prepare_data(shakespeare()[80:160], other, vocab_size=512, processes=1)
    with pytest.raises(ValueError, match='another tokenizer'):
        train(config(other, tmp_path / 'a', init_from=str(trained)),
              progress=False)
    bigger = tmp_path / 'bigger'
    prepare_data(shakespeare()[:80], bigger, vocab_size=600, processes=1)
    old, state = corrupt(trained, tmp_path, lambda m: json.dumps(
        {k: v for k, v in m.items() if k != 'tokenizer_sha256'}))
    with pytest.raises(ValueError, match='has 512 token ids, the '
                       'tokenizer of .* has 600'):  # no sha to compare
        train(config(bigger, tmp_path / 'b', init_from=str(state.parent)),
              progress=False)


def test_evals_are_measured_at_each_evaluation(data, tmp_path, capsys):
    seen = []

    def probe(model):
        seen.append((model.training, torch.is_grad_enabled()))
        return len(seen) / 10

    c = config(data, tmp_path / 'run')
    log = train(c, progress='lines', evals={'probe': probe})
    assert seen == [(False, False)] * 2  # steps 4 and 8, in eval mode
    assert [r['probe'] for r in log] == [None] * 3 + [0.1] + \
        [None] * 3 + [0.2]
    assert [r['val_loss'] is None for r in log] == \
        [r['probe'] is None for r in log]
    assert 'probe 0.2' in capsys.readouterr().out
    with pytest.raises(ValueError, match='the same evals'):
        train(replace(c, max_steps=12), resume=True, progress=False)
    assert len(read_log(c.out)) == 8  # nothing appended, nothing lost
    assert latest_checkpoint(c.out).name.endswith('8')  # none written
    for bad in ({'loss': probe}, {'x': 1.0}):
        with pytest.raises(ValueError, match='evals must map new names'):
            train(replace(c, out=str(tmp_path / 'bad')), evals=bad)
        assert not (tmp_path / 'bad').exists()


def test_the_cuda_lines_run_with_a_stand_in(monkeypatch, tmp_path):
    "The few lines that ask CUDA something, run here against a stand-in."
    cuda = torch.cuda
    state = torch.arange(16, dtype=torch.uint8)
    got = {}
    monkeypatch.setattr(cuda, 'is_available', lambda: True)
    monkeypatch.setattr(cuda, 'is_initialized', lambda: True)
    monkeypatch.setattr(cuda, 'is_bf16_supported', lambda: True)
    monkeypatch.setattr(cuda, 'get_rng_state', lambda: state)
    monkeypatch.setattr(cuda, 'set_rng_state', lambda s: got.update(s=s))
    monkeypatch.setattr(cuda, 'get_device_name', lambda d: 'NVIDIA H200')
    monkeypatch.setattr(cuda, 'max_memory_allocated', lambda d: 3 * 2**30)
    monkeypatch.setattr(torch, 'manual_seed', lambda s: got.update(seed=s))
    states = training._rng_states(rank=1)
    assert torch.equal(states['cuda.1'], state)
    from safetensors.torch import save_file
    save_file({'cpu.0': torch.get_rng_state(), 'cuda.0': state * 2},
              str(tmp_path / 'rng.safetensors'))
    training._restore_rng(tmp_path, {'step': 3})  # rank 0
    assert torch.equal(got['s'], state * 2)
    assert training._precision(TrainConfig(precision='auto')) == 'bf16'
    assert training.peak_flops(torch.device('cuda'), torch.bfloat16) == \
        training.PEAK_FLOPS['H200']
    assert training.peak_memory_gb('cuda') == 3
    monkeypatch.setenv('LOCAL_RANK', '0')
    assert not training._cpu_launch()  # GPUs: Accelerate picks them


def test_a_process_the_checkpoint_lacks_gets_a_stream_of_its_own(
        monkeypatch, tmp_path):
    from safetensors.torch import save_file
    save_file({'cpu.0': torch.get_rng_state()},
              str(tmp_path / 'rng.safetensors'))
    monkeypatch.setattr(training, '_rank', lambda: 1)
    seeds = []
    monkeypatch.setattr(torch, 'manual_seed', seeds.append)
    training._restore_rng(tmp_path, {'step': 3,
                                     'train_config': {'seed': 7}})
    assert seeds == [7 + 1 + (3 << 20)]  # not process 0's stream


def test_a_failed_run_still_ends_accelerate(data, tmp_path, monkeypatch):
    "The log is closed and the process group ended after an error too."
    from accelerate import Accelerator
    ended = []
    monkeypatch.setattr(Accelerator, 'end_training',
                        lambda self: ended.append(True))

    def fail(*args):
        raise RuntimeError('a step failed')
    monkeypatch.setattr(training, '_run', fail)
    with pytest.raises(RuntimeError, match='a step failed'):
        train(config(data, tmp_path / 'run'), progress=False)
    assert ended == [True]
