"""Distributed training on CPU: 2 processes over gloo (torchrun), FSDP2
shards for real, DDP and FSDP equal one process, sharded checkpoints resume
at world size 2 and 1, export, and the errors."""
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from llm_from_scratch.data import prepare_data, shakespeare
from llm_from_scratch.distributed import (STRATEGIES, export_checkpoint,
                                          memory_plan, torchrun)
from llm_from_scratch.generation import load_for_generation
from llm_from_scratch.model import GPT, preset
from llm_from_scratch.tokenizer import Tokenizer
from llm_from_scratch.training import (TrainConfig, build_run,
                                       latest_checkpoint,
                                       model_from_checkpoint,
                                       read_checkpoint_meta, read_log, train)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # several processes: minutes
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
    assert q_rows(ckpt) == {0: [64, 128], 64: [64, 128]}  # half each


def q_rows(ckpt):
    "First row -> shape of each saved piece of one weight, over the files."
    rows = {}
    for f in sorted((ckpt / 'shards').iterdir()):
        with safe_open(str(f), 'pt') as st:
            info = json.loads(st.metadata()['DCP_SHARDING_INFO'])
            key = 'model.blocks.0.attn.q_proj.weight'
            if key in info:
                rows[info[key]['saved_offsets'][0]] = st.get_slice(key) \
                    .get_shape()
    return rows


def test_ddp_checkpoint_holds_whole_weights(runs):
    assert q_rows(latest_checkpoint(runs / 'ddp')) == {0: [128, 128]}


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
    assert str(tmp_path / 'cli') in r.stdout
    assert (tmp_path / 'cli' / 'model.safetensors').exists()


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


CPU_FSDP = ROOT / 'configs' / 'accelerate' / 'fsdp-cpu.yaml'


def test_accelerate_launch_with_an_fsdp_config_on_cpu(runs, tmp_path):
    "Accelerate's FSDP config file alone makes 2 processes shard, on CPU."
    exe = Path(sys.executable).parent / 'accelerate'
    r = subprocess.run([str(exe), 'launch', '--config_file', str(CPU_FSDP),
                        EXE, *map(str, cli_args(runs / 'data', runs / 'acc'))
                        ],  # no --parallel fsdp: the config decides
                       capture_output=True, text=True,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr[-3000:]
    assert max(abs(a - b) for a, b in zip(
        losses(runs / 'acc'), losses(runs / 'single'))) < 1e-5
    meta = read_checkpoint_meta(latest_checkpoint(runs / 'acc'))
    assert meta['sharded']['world_size'] == 2
    assert q_rows(latest_checkpoint(runs / 'acc')) == {
        0: [64, 128], 64: [64, 128]}  # sharded, as the config asked


PROBE = """
from accelerate import Accelerator
from llm_from_scratch.model import GPT, preset
from llm_from_scratch.training import fsdp_plugin, parallelize
acc = Accelerator(cpu=True)
m = parallelize(GPT(preset('tiny', vocab_size=64, block_size=8)), 'fsdp',
                acc.num_processes, fsdp_plugin(acc))
state = m.blocks[0]._get_fsdp_state()._fsdp_param_group
print(acc.num_processes, state.post_forward_mesh_info is not None,
      m.blocks[0].attn.q_proj.weight.to_local().shape[0])
acc.end_training()
"""


@pytest.mark.parametrize('reshard', ['true', 'false'])
def test_accelerates_fsdp_settings_reach_fully_shard(tmp_path, reshard):
    "fsdp_reshard_after_forward in the config file decides what FSDP2 does."
    cfg = tmp_path / 'cfg.yaml'
    cfg.write_text(CPU_FSDP.read_text().replace(
        'fsdp_reshard_after_forward: true',
        f'fsdp_reshard_after_forward: {reshard}'))
    (tmp_path / 'probe.py').write_text(PROBE)
    exe = Path(sys.executable).parent / 'accelerate'
    r = subprocess.run([str(exe), 'launch', '--config_file', str(cfg),
                        str(tmp_path / 'probe.py')], capture_output=True,
                       text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split('\n')[:2] == [f'2 {reshard.title()} 64'] * 2


def test_fsdp_plugin_defaults_outside_accelerate_launch():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from llm_from_scratch.training import fsdp_plugin
    AcceleratorState._reset_state()
    p = fsdp_plugin(Accelerator(cpu=True, mixed_precision='bf16'))
    assert p.fsdp_version == 2 and p.reshard_after_forward is True
    assert p.mixed_precision_policy.param_dtype == torch.bfloat16
    assert p.mixed_precision_policy.reduce_dtype == torch.float32
    AcceleratorState._reset_state()


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


def test_accelerate_configs():
    from accelerate.commands.config.config_args import \
        load_config_from_file
    for name in ('fsdp-1node.yaml', 'fsdp-multinode.yaml', 'fsdp-cpu.yaml'):
        cfg = load_config_from_file(str(ROOT / 'configs' / 'accelerate'
                                        / name))
        assert cfg.distributed_type == 'FSDP'
        assert cfg.fsdp_config['fsdp_version'] == 2
        assert cfg.fsdp_config['fsdp_transformer_layer_cls_to_wrap'] == \
            'Block'


# -- runs of a script of our own, and exports ---------------------------------

TRAIN = """
import json, sys
from llm_from_scratch.training import TrainConfig, train
fields = json.loads(sys.argv[3])
train(TrainConfig(data=sys.argv[1], out=sys.argv[2], **fields),
      resume=len(sys.argv) > 4, progress=False)
"""


@pytest.fixture(scope='module')
def script_runs(tmp_path_factory):
    "A one-process run, and a two-process FSDP run with dropout."
    root = tmp_path_factory.mktemp('script')
    data = root / 'data'
    prepare_data(shakespeare()[:60], data, vocab_size=512, processes=1,
                 progress=False)
    script = root / 'train.py'
    script.write_text(TRAIN)
    train(TrainConfig(data=str(data), out=str(root / 'single'), **ARGS),
          progress=False)
    fields = json.dumps(dict(ARGS, parallel='fsdp', dropout=0.1))
    torchrun(2, data, root / 'fsdp', fields, script=script)
    return root


def test_sharded_checkpoint_holds_every_rank_and_the_tokenizer(script_runs):
    ckpt = latest_checkpoint(script_runs / 'fsdp')
    meta = read_checkpoint_meta(ckpt)
    rng = load_file(str(ckpt / 'rng.safetensors'))
    assert {'cpu.0', 'cpu.1'} <= set(rng)  # each rank's own generator
    assert not torch.equal(rng['cpu.0'], rng['cpu.1'])  # own dropout
    tok = (script_runs / 'data' / 'tokenizer.json').read_bytes()
    assert (ckpt / 'tokenizer.json').read_bytes() == tok
    assert meta['tokenizer_sha256'] == hashlib.sha256(tok).hexdigest()
    names = sorted(p.name for p in (script_runs / 'fsdp' / 'checkpoints')
                   .iterdir())
    assert names == ['step-0000003', 'step-0000006']  # no temp folder
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in ckpt.rglob('*')
               if f.is_file())


def test_a_locked_run_stops_every_rank(script_runs, tmp_path):
    out = tmp_path / 'run'
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, '-c', 'import sys, time\n'
         'from llm_from_scratch.data import lock_folder\n'
         'with lock_folder(sys.argv[1]):\n'
         '    print("locked", flush=True)\n'
         '    time.sleep(600)\n', str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        t0 = time.time()
        r = torchrun(2, script_runs / 'data', out, json.dumps(ARGS),
                     script=script_runs / 'train.py', check=False,
                     timeout=300)
        assert r.returncode != 0 and 'in use' in r.stderr
        assert time.time() - t0 < 300
    finally:
        holder.kill()
        holder.wait()
    assert not (out / 'log.csv').exists()


def test_absurd_sharded_config_is_refused(script_runs, tmp_path):
    ckpt = tmp_path / 'step-0000006'
    shutil.copytree(latest_checkpoint(script_runs / 'fsdp'), ckpt)
    state = json.loads((ckpt / 'state.json').read_text())
    state['model_config']['n_layer'] = 10**6
    (ckpt / 'state.json').write_text(json.dumps(state))
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match='n_layer 1000000 .* 4 blocks'):
        model_from_checkpoint(ckpt)
    assert time.perf_counter() - t0 < 5
    state['sharded']['files'] = ['../../../etc/passwd']
    (ckpt / 'state.json').write_text(json.dumps(state))
    with pytest.raises(ValueError, match='plain names'):
        model_from_checkpoint(ckpt)


@pytest.mark.parametrize('run', ['single', 'fsdp'])
def test_export_stands_alone(script_runs, tmp_path, run):
    moved = tmp_path / 'elsewhere'  # the data folder is gone
    out = tmp_path / 'export'
    path = export_checkpoint(script_runs / run, out)
    assert path == out / 'model.safetensors'
    assert sorted(p.name for p in out.iterdir()) == [
        'model.safetensors', 'state.json', 'tokenizer.json']
    assert [p.name for p in tmp_path.iterdir()] == ['export']  # no temp
    shutil.copytree(out, moved)
    ref = weights(latest_checkpoint(script_runs / run))
    model, tok = load_for_generation(moved)
    assert max_diff(model.state_dict(), ref) == 0
    assert tok.encode('ROMEO:') == Tokenizer.load(
        script_runs / 'data' / 'tokenizer.json').encode('ROMEO:')
    with pytest.raises(FileExistsError, match='exists'):
        export_checkpoint(script_runs / run, out)
    with pytest.raises(ValueError, match='format'):
        export_checkpoint(script_runs / run, tmp_path / 'x', format='onnx')


def test_export_to_hugging_face(script_runs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    old = os.umask(0o022)
    try:
        export_checkpoint(script_runs / 'fsdp', tmp_path / 'hf', format='hf')
    finally:
        os.umask(old)
    hf = tmp_path / 'hf'
    assert {'config.json', 'model.safetensors', 'tokenizer.json',
            'tokenizer_config.json'} <= {p.name for p in hf.iterdir()}
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in hf.iterdir())
    theirs = AutoModelForCausalLM.from_pretrained(hf).eval()
    their_tok = AutoTokenizer.from_pretrained(hf)
    ours = model_from_checkpoint(latest_checkpoint(script_runs / 'fsdp'))
    tok = Tokenizer.load(script_runs / 'data' / 'tokenizer.json')
    text = 'ROMEO: But soft, what light through yonder window breaks?'
    ids = tok.encode(text)
    assert their_tok(text)['input_ids'] == ids
    assert their_tok.decode(ids) == text
    x = torch.tensor([ids])
    with torch.no_grad():
        diff = (ours.eval()(x)[0] - theirs(x).logits).abs().max().item()
    assert diff < 1e-4


def test_init_from_a_hugging_face_folder(script_runs, tmp_path):
    export_checkpoint(script_runs / 'single', tmp_path / 'hf', format='hf')
    log = train(TrainConfig(data=str(script_runs / 'data'),
                            out=str(tmp_path / 'run'), init_from=str(
                                tmp_path / 'hf'), **{**ARGS, 'lr': 1e-4,
                                                     'max_steps': 2}),
                progress=False)
    assert log[0]['loss'] < read_log(script_runs / 'single')[-1]['loss'] + 0.3


def test_resume_is_exact_at_world_2_with_dropout(script_runs, tmp_path):
    "FSDP with dropout: stop at step 3, resume in two new processes."
    run = tmp_path / 'again'
    shutil.copytree(script_runs / 'fsdp', run)
    shutil.rmtree(run / 'checkpoints' / 'step-0000006')
    fields = json.dumps(dict(ARGS, parallel='fsdp', dropout=0.1))
    torchrun(2, script_runs / 'data', run, fields, 'resume',
             script=script_runs / 'train.py')
    assert losses(run) == losses(script_runs / 'fsdp')  # bit for bit
    assert max_diff(weights(latest_checkpoint(run)),
                    weights(latest_checkpoint(script_runs / 'fsdp'))) == 0


@pytest.mark.parametrize('parallel', ['ddp', 'fsdp'])
def test_a_one_process_run_resumes_in_two(runs, tmp_path, parallel):
    "The checkpoint of one process continues in two, replicated or sharded."
    run = tmp_path / parallel
    shutil.copytree(runs / 'single', run)
    shutil.rmtree(run / 'checkpoints' / 'step-0000006')
    torchrun(2, *cli_args(runs / 'data', run, parallel=parallel),
             '--resume')
    single = losses(runs / 'single')
    assert len(losses(run)) == 6
    assert max(abs(a - b) for a, b in zip(losses(run), single)) < 1e-5
    meta = read_checkpoint_meta(latest_checkpoint(run))
    assert meta['sharded']['world_size'] == 2
