"""Training: loss falls, accumulation, exact resume, safe checkpoints, errors."""
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llm_from_scratch import training
from llm_from_scratch.data import BatchLoader, load_split, prepare_data
from llm_from_scratch.data import shakespeare
from llm_from_scratch.model import GPT, preset
from llm_from_scratch.training import (TrainConfig, latest_checkpoint,
                                       load_checkpoint, read_log,
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


RUN = """
import sys
from dataclasses import replace
from llm_from_scratch.training import TrainConfig, train
c = TrainConfig(data=sys.argv[1], out=sys.argv[2], block_size=32,
                batch_size=4, warmup_steps=2, eval_every=4, eval_batches=2,
                save_every=4, keep=3, max_steps=8)
stop = int(sys.argv[3])
train(c, resume=sys.argv[4] == 'resume', progress=False,
      stop_after=stop if stop < 8 else None)
"""


def run_process(*args):
    r = subprocess.run([sys.executable, '-c', RUN, *map(str, args)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_resume_is_exact(data, tmp_path):
    "8 steps straight == stop after 4, new process, resume: bit for bit."
    straight, split = tmp_path / 'straight', tmp_path / 'split'
    run_process(data, straight, 8, 'fresh')
    run_process(data, split, 4, 'fresh')
    run_process(data, split, 8, 'resume')
    a, b = read_log(straight), read_log(split)
    assert [r['step'] for r in b] == list(range(1, 9))
    for key in ('loss', 'lr', 'grad_norm', 'val_loss'):
        assert [r[key] for r in a] == [r[key] for r in b], key
    wa = load_file(latest_checkpoint(straight) / 'model.safetensors')
    wb = load_file(latest_checkpoint(split) / 'model.safetensors')
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_crash_while_saving_keeps_the_last_checkpoint(data, tmp_path,
                                                      monkeypatch):
    out = tmp_path / 'run'
    train(config(data, out, max_steps=4), progress=False)
    good = latest_checkpoint(out)
    before = (good / 'model.safetensors').read_bytes()

    def crash(model, path):
        Path(path).write_bytes(b'half a file')
        raise KeyboardInterrupt('power cut')
    monkeypatch.setattr(training, 'save_model', crash)
    model = GPT(preset('tiny', vocab_size=512, block_size=32))
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(out, 8, model, opt, sched,
                        BatchLoader(load_split(data, 'train')[1], 4, 32))
    assert latest_checkpoint(out) == good
    assert (good / 'model.safetensors').read_bytes() == before
    monkeypatch.undo()
    fresh = GPT(preset('tiny', vocab_size=512, block_size=32))
    assert load_checkpoint(good, fresh) == 4


def test_checkpoints_never_unpickle_code(data, tmp_path):
    out = tmp_path / 'run'
    train(config(data, out, max_steps=4), progress=False)
    ckpt = latest_checkpoint(out)
    assert (ckpt / 'model.safetensors').exists()

    class Payload:
        def __reduce__(self):
            return (print, ('this ran from a checkpoint',))
    torch.save({'optimizer': Payload()}, ckpt / 'optim.pt')
    model = GPT(preset('tiny', vocab_size=512, block_size=32))
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match='cannot be loaded safely'):
        load_checkpoint(ckpt, model, opt)


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


@pytest.mark.parametrize('fields, message', [
    (dict(batch_size=0), 'batch_size must be at least 1'),
    (dict(grad_accum=0), 'grad_accum must be at least 1'),
    (dict(warmup_steps=8), 'warmup_steps'),
    (dict(block_size=10_000), 'exceeds the context'),
    (dict(precision='fp8'), 'precision'),
])
def test_impossible_settings(data, tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        train(config(data, tmp_path / 'run', **fields), progress=False)


def test_refuses_to_mix_runs(data, tmp_path):
    out = tmp_path / 'run'
    train(config(data, out, max_steps=4), progress=False)
    with pytest.raises(FileExistsError, match='resume'):
        train(config(data, out, max_steps=4), progress=False)
    with pytest.raises(FileNotFoundError, match='no checkpoint'):
        train(config(data, tmp_path / 'new'), resume=True, progress=False)


def test_cli_train_and_resume(data, tmp_path):
    exe = Path(sys.executable).parent / 'llm-from-scratch'
    cfg = tmp_path / 'cfg.json'
    cfg.write_text(json.dumps(dict(block_size=32, batch_size=4,
                                   warmup_steps=1, eval_every=3,
                                   eval_batches=2, save_every=3)))
    args = [exe, 'train', '--data', data, '--out', tmp_path / 'run',
            '--config', cfg]
    r = subprocess.run([*map(str, args), '--max_steps', '3'],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'step 3' in r.stdout
    r = subprocess.run([*map(str, args), '--max_steps', '6', '--resume'],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [int(x['step']) for x in read_log(tmp_path / 'run')] == \
        list(range(1, 7))
