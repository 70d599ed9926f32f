"""Distributed training on CPU: 2 processes over gloo (torchrun), FSDP2
shards for real, DDP and FSDP equal one process, sharded checkpoints resume
at world size 2 and 1, export, and the errors."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from llm_from_scratch.data import prepare_data, shakespeare
from llm_from_scratch.distributed import (STRATEGIES, export_checkpoint,
                                          fsdp_plugin, memory_plan, torchrun)
from llm_from_scratch.generation import load_for_generation
from llm_from_scratch.model import GPT, preset
from llm_from_scratch.training import (TrainConfig, build_run,
                                       latest_checkpoint,
                                       model_from_checkpoint,
                                       read_checkpoint_meta, read_log, train)

ROOT = Path(__file__).resolve().parents[1]
EXE = str(Path(sys.executable).parent / 'llm-from-scratch')
ARGS = dict(model='tiny', block_size=32, batch_size=8, max_steps=6,
            warmup_steps=1, lr=1e-2, eval_every=3, eval_batches=2,
            save_every=3, keep=2)


def cli_args(data, out, **kw):
    "`train` arguments: ARGS through --config, `kw` as options."
    cfg = Path(out).parent / f'{Path(out).name}.json'
    cfg.write_text(json.dumps(ARGS))
    args = ['train', '--data', data, '--out', out, '--config', cfg]
    for k, v in kw.items():
        args += [f'--{k}', v]
    return args


def weights(checkpoint):
    "The full weights of any checkpoint, loaded in this process."
    return model_from_checkpoint(checkpoint).state_dict()


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    "The same 6 steps: one process, 2-process DDP, 2-process FSDP."
    root = tmp_path_factory.mktemp('dist')
    data = root / 'data'
    prepare_data(shakespeare()[:60], data, vocab_size=512, processes=1,
                 progress=False)
    train(TrainConfig(data=str(data), out=str(root / 'single'), **ARGS),
          progress=False)
    torchrun(2, *cli_args(data, root / 'ddp', parallel='ddp'))
    torchrun(2, *cli_args(data, root / 'fsdp', parallel='fsdp'))
    return root


def losses(run):
    return [r['loss'] for r in read_log(run)]


@pytest.mark.parametrize('name', ['ddp', 'fsdp'])
def test_two_processes_equal_one(runs, name):
    single, other = losses(runs / 'single'), losses(runs / name)
    assert len(other) == len(single) == 6  # one log, written by rank 0
    assert max(abs(a - b) for a, b in zip(single, other)) < 1e-5
    assert single[-1] < single[0] - 0.3  # and it did train
    w1 = weights(latest_checkpoint(runs / 'single'))
    w2 = weights(latest_checkpoint(runs / name))
    # Adam divides by sqrt(v): where a gradient is a near-cancelling sum,
    # fp32 rounding of the summation order moves an update by up to ~1%
    # of lr (1e-2); a missing all-reduce would move weights by ~lr
    assert max_diff(w1, w2) < 2e-4


def test_fsdp_checkpoint_is_sharded_safetensors(runs):
    ckpt = latest_checkpoint(runs / 'fsdp')
    meta = read_checkpoint_meta(ckpt)
    assert meta['sharded']['world_size'] == 2
    files = sorted((ckpt / 'shards').iterdir())
    assert [f.name for f in files] == meta['sharded']['files']
    assert len(files) == 2 and all(f.suffix == '.safetensors'
                                   for f in files)
    assert not list(ckpt.rglob('*.pt'))  # nothing to unpickle
    rows = {}
    for f in files:
        with safe_open(str(f), 'pt') as st:
            info = json.loads(st.metadata()['DCP_SHARDING_INFO'])
            key = 'model.blocks.0.attn.q_proj.weight'
            rows[info[key]['saved_offsets'][0]] = st.get_slice(key) \
                .get_shape()
    assert rows == {0: [64, 128], 64: [64, 128]}  # 128 rows, half each


def test_each_rank_holds_half(tmp_path):
    torchrun(2, tmp_path, script=ROOT / 'tests' / 'fsdp_probe.py')
    ranks = [json.loads((tmp_path / f'rank-{i}.json').read_text())
             for i in range(2)]
    full = GPT(preset('tiny-llama', vocab_size=512, block_size=32))
    n_bytes = sum(p.nbytes for p in full.parameters())
    for rank in ranks:
        assert rank['world'] == 2
        # weights, gradients and both Adam moments: about half each
        b = rank['bytes']
        assert abs(b['params'] / n_bytes - 0.5) < 0.02, b
        assert abs(b['grads'] / n_bytes - 0.5) < 0.02, b
        assert abs(b['optimizer'] / (2 * n_bytes) - 0.5) < 0.02, b
    for rows in zip(*(r['report'] for r in ranks)):
        shape = rows[0]['shape']
        locals_ = [tuple(r['local']) for r in rows]
        assert sum(s[0] for s in locals_) == shape[0], rows
        assert all(s[0] <= math.ceil(shape[0] / 2) for s in locals_)
        assert all(list(s[1:]) == shape[1:] for s in locals_)
        for r in rows:  # Adam's moments are sharded like the weight
            assert r['state'] == {'exp_avg': r['local'],
                                  'exp_avg_sq': r['local']}, r


def resume_copy(runs, name):
    "A copy of the FSDP run whose newest checkpoint is step 3."
    shutil.copytree(runs / 'fsdp', runs / name)
    shutil.rmtree(runs / name / 'checkpoints' / 'step-0000006')
    return runs / name


def test_sharded_resume_at_world_2_and_1(runs):
    original = losses(runs / 'fsdp')
    two = resume_copy(runs, 'resume-2')
    torchrun(2, *cli_args(runs / 'data', two, parallel='fsdp'), '--resume')
    one = resume_copy(runs, 'resume-1')  # one process, no launcher
    train(TrainConfig(data=str(runs / 'data'), out=str(one), **ARGS),
          resume=True, progress=False)
    final = weights(latest_checkpoint(runs / 'fsdp'))
    for run in (two, one):
        again = losses(run)
        assert len(again) == 6
        assert max(abs(a - b) for a, b in zip(again, original)) < 1e-5
        assert max_diff(weights(latest_checkpoint(run)), final) < 2e-4


def test_missing_shard_is_a_clear_error(runs, tmp_path):
    ckpt = tmp_path / 'step'
    shutil.copytree(latest_checkpoint(runs / 'fsdp'), ckpt)
    gone = sorted((ckpt / 'shards').iterdir())[1]
    gone.unlink()
    with pytest.raises(FileNotFoundError, match=gone.name) as e:
        model_from_checkpoint(ckpt)
    assert '1 of 2 shard files are missing' in str(e.value)


def test_export_consolidates(runs, tmp_path):
    path = export_checkpoint(runs / 'fsdp', tmp_path / 'export')
    assert path.name == 'model.safetensors'
    with safe_open(str(path), 'pt') as st:
        config = json.loads(st.metadata()['model_config'])
    assert config == read_checkpoint_meta(
        latest_checkpoint(runs / 'fsdp'))['model_config']
    ref = weights(latest_checkpoint(runs / 'fsdp'))
    assert max_diff(weights(tmp_path / 'export'), ref) == 0
    model, tok = load_for_generation(tmp_path / 'export',
                                     runs / 'data' / 'tokenizer.json')
    assert max_diff(model.state_dict(), ref) == 0
    with pytest.raises(FileExistsError, match='exists'):
        export_checkpoint(runs / 'fsdp', tmp_path / 'export')
    r = subprocess.run([EXE, 'export', str(runs / 'fsdp'),
                        str(tmp_path / 'cli')], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'model.safetensors' in r.stdout


def test_generation_reads_a_sharded_run(runs):
    model, tok = load_for_generation(runs / 'fsdp')
    ref = weights(latest_checkpoint(runs / 'fsdp'))
    assert max_diff(model.state_dict(), ref) == 0


def test_fsdp_needs_a_process_group(runs, tmp_path):
    c = TrainConfig(data=str(runs / 'data'), out=str(tmp_path / 'r'),
                    **{**ARGS, 'max_steps': 2}, parallel='fsdp')
    with pytest.raises(RuntimeError, match='(?s)process group.*torchrun'):
        train(c, progress=False)


def test_world_size_must_divide_the_batch(runs):
    c = TrainConfig(data=str(runs / 'data'), **{**ARGS, 'batch_size': 3})
    with pytest.raises(ValueError, match='batch_size 3 .* divisible by 2'):
        build_run(c, world_size=2)
    r = torchrun(2, *cli_args(runs / 'data', runs / 'odd', batch_size=3),
                 check=False)
    assert r.returncode != 0 and 'divisible by 2' in r.stderr


def test_accelerate_launch_runs_the_train_command(runs):
    exe = Path(sys.executable).parent / 'accelerate'
    r = subprocess.run([str(exe), 'launch', '--cpu', '--num_processes', '1',
                        '--num_machines', '1', '--mixed_precision', 'no',
                        '--dynamo_backend', 'no', EXE,
                        *map(str, cli_args(runs / 'data', runs / 'acc',
                                           max_steps=2))],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [int(x['step']) for x in read_log(runs / 'acc')] == [1, 2]


def test_unknown_parallel(runs):
    c = TrainConfig(data=str(runs / 'data'), parallel='tp')
    with pytest.raises(ValueError, match='parallel'):
        train(c, progress=False)


def test_memory_plan_arithmetic():
    c = preset('llama2-7b')
    ddp = memory_plan(c, 8, 'ddp', checkpointing=False)
    n = ddp['n_params']
    assert ddp['params'] + ddp['grads'] + ddp['optimizer'] == 16 * n
    z1, z2, f = (memory_plan(c, 8, s) for s in STRATEGIES[1:])
    assert z1['optimizer'] == 12 * n / 8 and z1['grads'] == 2 * n
    assert z2['grads'] == 2 * n / 8 and z2['params'] == 2 * n
    assert f['params'] == 2 * n / 8 + 4 * f['per_block']
    assert f['comm_per_step'] == 1.5 * ddp['comm_per_step']
    assert memory_plan(c, 1, 'ddp')['comm_per_step'] == 0
    assert f['activations'] < ddp['activations']  # checkpointing
    with pytest.raises(ValueError, match='strategy'):
        memory_plan(c, 8, 'zero4')
    with pytest.raises(ValueError, match='n_gpus'):
        memory_plan(c, 0)


def test_accelerate_configs_and_plugin():
    from accelerate.commands.config.config_args import \
        load_config_from_file
    for name in ('fsdp-1node.yaml', 'fsdp-multinode.yaml'):
        cfg = load_config_from_file(str(ROOT / 'configs' / 'accelerate'
                                        / name))
        assert cfg.distributed_type == 'FSDP'
        assert cfg.fsdp_config['fsdp_version'] == 2
        assert cfg.fsdp_config['fsdp_transformer_layer_cls_to_wrap'] == \
            'Block'
    p = fsdp_plugin('bf16')
    assert p.fsdp_version == 2 and p.reshard_after_forward is True
    assert p.transformer_cls_names_to_wrap == ['Block']
    assert p.mixed_precision_policy.param_dtype == torch.bfloat16
    assert p.mixed_precision_policy.reduce_dtype == torch.float32
