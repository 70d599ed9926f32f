"""The `llm-from-scratch` program: options made from the code, one-line
errors, precedence of options over files, and each command run as a user
types it."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from llm_from_scratch import cli
from llm_from_scratch.data import load_split, prepare_data, shakespeare
from llm_from_scratch.training import TrainConfig, read_log

EXE = Path(sys.executable).parent / 'llm-from-scratch'


def run(*args, **kw):
    return subprocess.run([str(EXE), *map(str, args)], capture_output=True,
                          text=True, **kw)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp('cli') / 'data'
    prepare_data(shakespeare()[:60], out, vocab_size=400, processes=1)
    return out


SMALL = ['--block_size', 32, '--batch_size', 4, '--eval_every', 3,
         '--eval_batches', 2, '--save_every', 3, '--quiet']


@pytest.fixture(scope='module')
def run_dir(data, tmp_path_factory):
    out = tmp_path_factory.mktemp('cli') / 'run'
    r = run('train', '--data', data, '--out', out, '--max_steps', 3, *SMALL)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


# -- help and errors ---------------------------------------------------------

def test_help_and_usage_errors():
    r = run('--help')
    assert r.returncode == 0 and 'prepare' in r.stdout
    r = run()
    assert r.returncode == 2 and 'usage' in r.stderr
    r = run('nonsense')
    assert r.returncode == 2 and 'unknown command' in r.stderr
    r = run('train', '--no_such_option', 1)
    assert r.returncode == 2 and 'unrecognized' in r.stderr
    r = run('train', '--model', 'gpt5')
    assert r.returncode == 2 and 'invalid choice' in r.stderr


def test_every_train_config_field_is_an_option():
    text = cli.build_parser('train').format_help()
    for f in fields(TrainConfig):
        assert f'--{f.name}' in text, f.name


def test_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    args = ['train', '--data', tmp_path / 'nothing', '--out',
            tmp_path / 'run']
    r = run(*args)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and 'prepare' in lines[0], r.stderr
    assert lines[0].startswith('llm-from-scratch train: error:')
    r = run(*args, '--debug')
    assert r.returncode == 1 and 'Traceback' in r.stderr


def test_missing_checkpoint_is_one_line(tmp_path):
    r = run('generate', '--checkpoint', tmp_path / 'none')
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1


# -- precedence: option > config file > default --------------------------------

def test_config_file_then_options_then_defaults(monkeypatch, tmp_path):
    seen = {}

    def fake_train(c, **kw):
        seen['c'] = c
        return []
    monkeypatch.setattr('llm_from_scratch.training.train', fake_train)
    cfg = tmp_path / 'run.json'
    cfg.write_text(json.dumps(dict(model='tiny-llama', data='d', out='o',
                                   lr=0.01, betas=[0.8, 0.9])))
    assert cli.main(['train', '--config', str(cfg), '--lr', '0.02']) == 0
    c = seen['c']
    assert (c.model, c.data, c.out, c.lr, c.betas) == \
        ('tiny-llama', 'd', 'o', 0.02, (0.8, 0.9))
    assert c.block_size == TrainConfig.block_size


@pytest.mark.parametrize('text, message', [
    ('{"lr": "fast"}', 'lr must be float'),
    ('{"nonsense": 1}', 'unknown fields nonsense'),
    ('not json', 'not valid JSON'),
    ('[1, 2]', 'JSON object')])
def test_bad_config_files_name_the_file(tmp_path, text, message, capsys):
    cfg = tmp_path / 'bad.json'
    cfg.write_text(text)
    assert cli.main(['train', '--config', str(cfg)]) == 1
    err = capsys.readouterr().err
    assert message in err and str(cfg) in err


# -- prepare -----------------------------------------------------------------

def test_prepare_on_own_files(tmp_path):
    src = tmp_path / 'texts'
    src.mkdir()
    for i, d in enumerate(shakespeare()[:30]):
        (src / f'{i:02d}.txt').write_text(d.text)
    out = tmp_path / 'out'
    r = run('prepare', '--input', src, '--out', out, '--vocab_size', 500,
            '--processes', 1, '--quiet')
    assert r.returncode == 0, r.stderr
    meta, shards = load_split(out, 'train')
    assert meta['source'] == str(src) and sum(map(len, shards)) > 0
    r = run('prepare', '--input', src, '--out', out)
    assert r.returncode == 1 and 'overwrite' in r.stderr
    r = run('verify', out)
    assert r.returncode == 0, r.stderr


# -- train -------------------------------------------------------------------

def test_train_and_resume(data, tmp_path):
    cfg = tmp_path / 'cfg.json'
    cfg.write_text(json.dumps(dict(block_size=32, batch_size=4,
                                   eval_every=3, eval_batches=2,
                                   save_every=3)))
    args = ['train', '--data', data, '--out', tmp_path / 'run',
            '--config', cfg]
    r = run(*args, '--max_steps', 3)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'step 3' in r.stdout
    r = run(*args, '--max_steps', 6, '--resume')
    assert r.returncode == 0, r.stderr[-2000:]
    assert [int(x['step']) for x in read_log(tmp_path / 'run')] == \
        list(range(1, 7))


def test_resume_reads_the_saved_config(run_dir):
    "Given again, options must agree: the differing ones are named."
    r = run('train', '--out', run_dir, '--resume', '--lr', 0.5,
            '--max_steps', 4)
    assert r.returncode == 1
    assert 'lr' in r.stderr and '0.5' in r.stderr


def test_short_runs_work_with_the_defaults(data, tmp_path):
    "No warmup_steps given: any max_steps works."
    r = run('train', '--data', data, '--out', tmp_path / 'run',
            '--max_steps', 5, *SMALL)
    assert r.returncode == 0, r.stderr[-2000:]


def test_ctrl_c_saves_a_checkpoint(data, tmp_path):
    out = tmp_path / 'run'
    p = subprocess.Popen([str(EXE), 'train', '--data', str(data), '--out',
                          str(out), '--max_steps', '100000', '--save_every',
                          '100000', '--block_size', '32', '--batch_size',
                          '4', '--eval_every', '100000', '--quiet'],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.time() + 120
    while not (out / 'log.csv').exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    ckpts = list((out / 'checkpoints').glob('step-*'))
    assert len(ckpts) == 1, err
    step = json.loads((ckpts[0] / 'state.json').read_text())['step']
    assert step >= 1


# -- generate ----------------------------------------------------------------

def test_generate_from_a_run(run_dir):
    r = run('generate', '--checkpoint', run_dir, '--prompt', 'ROMEO:',
            '--max_new_tokens', 10, '--seed', 1)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith('ROMEO:') and 'tokens/s' in r.stderr
    again = run('generate', '--checkpoint', run_dir, '--prompt', 'ROMEO:',
                '--max_new_tokens', 10, '--seed', 1)
    assert again.stdout == r.stdout
    r = run('generate', '--checkpoint', run_dir, '--max_new_tokens', 500)
    assert r.returncode == 1 and '--truncate' in r.stderr


def test_generate_samples_and_stop(run_dir):
    r = run('generate', '--checkpoint', run_dir, '--num_samples', 2,
            '--max_new_tokens', 8, '--seed', 0, '--quiet')
    assert r.returncode == 0 and r.stdout.count('--- sample') == 2
    args = ['generate', '--checkpoint', run_dir, '--max_new_tokens', 30,
            '--temperature', 0, '--quiet', '--prompt', 'A']
    full = run(*args).stdout.rstrip('\n')
    assert ' ' in full, full  # so that the stop below means something
    r = run(*args, '--stop', ' ')
    assert r.returncode == 0 and r.stdout == full[:full.index(' ')] + '\n'


def test_generate_truncates_by_tokens(run_dir):
    "The whole context for new tokens, and a cut inside a character."
    prompt = 'é' * 200  # far longer than the context of 32
    r = run('generate', '--checkpoint', run_dir, '--prompt', prompt,
            '--max_new_tokens', 31, '--truncate', '--seed', 0)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'cut' in r.stderr
    r = run('generate', '--checkpoint', run_dir, '--prompt', 'x',
            '--max_new_tokens', 32, '--truncate')
    assert r.returncode == 1 and 'room' in r.stderr


@pytest.mark.parametrize('args, message', [
    (['--max_new_tokens', -1], 'max_new_tokens'),
    (['--temperature', 'nan'], 'temperature'),
    (['--prompt', ''], 'prompt')])
def test_generate_bad_settings(run_dir, args, message):
    r = run('generate', '--checkpoint', run_dir, *args)
    assert r.returncode == 1, r.stderr[-2000:]
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_generate_invalid_utf8_prompt(run_dir):
    r = subprocess.run([str(EXE).encode(), b'generate', b'--checkpoint',
                        str(run_dir).encode(), b'--prompt', b'\xff\xfe'],
                       capture_output=True)
    assert r.returncode == 1 and b'UTF-8' in r.stderr, r.stderr


# -- export ------------------------------------------------------------------

def test_export_both_formats(run_dir, tmp_path):
    r = run('export', run_dir, tmp_path / 'ours')
    assert r.returncode == 0, r.stderr[-2000:]
    r = run('export', run_dir, tmp_path / 'hf', '--format', 'hf')
    assert r.returncode == 0, r.stderr[-2000:]
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(tmp_path / 'hf')
    r = run('export', run_dir, tmp_path / 'hf', '--format', 'hf')
    assert r.returncode == 1 and 'exists' in r.stderr
    for folder in ('ours', 'hf'):
        r = run('generate', '--checkpoint', tmp_path / folder,
                '--max_new_tokens', 5, '--seed', 0)
        assert r.returncode == 0, r.stderr[-2000:]


def test_export_gguf(run_dir, tmp_path):
    import gguf
    r = run('export', run_dir, tmp_path / 'm.gguf', '--format', 'gguf',
            '--type', 'q8_0')
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith(f'wrote {tmp_path / "m.gguf"} (')
    g = gguf.GGUFReader(tmp_path / 'm.gguf')
    assert g.get_field('general.architecture').contents() == 'gpt2'
    assert g.get_field('general.name').contents() == run_dir.name
    assert g.get_field('general.file_type').contents() == \
        gguf.LlamaFileType.MOSTLY_Q8_0
    assert g.tensors[0].tensor_type == gguf.GGMLQuantizationType.Q8_0
    r = run('export', run_dir, tmp_path / 'm.gguf', '--format', 'gguf')
    assert r.returncode == 1 and 'exists' in r.stderr, r.stderr
    r = run('export', run_dir, tmp_path / 'hf', '--type', 'f16')
    assert r.returncode == 1 and '--format gguf' in r.stderr, r.stderr
    assert not (tmp_path / 'hf').exists()
    r = run('export', run_dir, tmp_path / 'x.gguf', '--format', 'gguf',
            '--type', 'q4_0')
    assert r.returncode == 2 and 'invalid choice' in r.stderr


def test_export_int8_then_generate(run_dir, tmp_path):
    "Chapter 12's int8 folder, written and read from the command line."
    from llm_from_scratch.generation import generate, load_for_generation
    from llm_from_scratch.quantization import quantize, read_int8_meta
    q = tmp_path / 'q'
    r = run('export', run_dir, q, '--format', 'int8')
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(f.name for f in q.iterdir()) == [
        'model.int8.safetensors', 'tokenizer.json']
    assert 'lm_head' not in ' '.join(read_int8_meta(
        q / 'model.int8.safetensors')['int8'])  # tied: stays float
    r = run('generate', '--checkpoint', q, '--prompt', 'ROMEO:',
            '--max_new_tokens', 8, '--temperature', 0, '--quiet')
    assert r.returncode == 0, r.stderr[-2000:]
    model, tok = load_for_generation(run_dir, device='cpu', dtype='fp32')
    model = quantize(model).to(torch.bfloat16)
    new, = generate(model, [tok.encode('ROMEO:')], 8, temperature=0)
    assert r.stdout.rstrip('\n') == 'ROMEO:' + tok.decode(new)
    r = run('export', run_dir, q, '--format', 'int8')
    assert r.returncode == 1 and 'exists' in r.stderr, r.stderr
    r = run('export', q, tmp_path / 'q.gguf', '--format', 'gguf')
    assert r.returncode == 1 and 'int8 layers' in r.stderr, r.stderr
    assert not (tmp_path / 'q.gguf').exists()
    lone = subprocess.run(
        [sys.executable, '-c', 'import sys; from llm_from_scratch.'
         'generation import load_for_generation as f; f(sys.argv[1])',
         str(q)], capture_output=True, text=True)
    assert lone.returncode == 1 and lone.stderr.strip().endswith(
        f'{q} (int8 weights) needs load_int8: import '
        f'llm_from_scratch.quantization first'), lone.stderr[-500:]


def test_files_follow_the_umask(run_dir, tmp_path):
    old = os.umask(0o022)
    try:
        r = run('export', run_dir, tmp_path / 'out')
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stderr[-2000:]
    for f in (tmp_path / 'out').iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f


# -- finetune and chat -------------------------------------------------------

CHAT_SMALL = ['--block_size', 32, '--batch_size', 4, '--eval_every', 2,
              '--eval_batches', 1, '--save_every', 2, '--quiet']


@pytest.fixture(scope='module')
def chats(tmp_path_factory):
    f = tmp_path_factory.mktemp('cli') / 'chats.jsonl'
    rows = [{'messages': [dict(role='user', content=f'What is {i} plus 1?'),
                          dict(role='assistant', content=str(i + 1))]}
            for i in range(40)]
    f.write_text('\n'.join(map(json.dumps, rows)))
    return f


@pytest.fixture(scope='module')
def chat_run(run_dir, chats, tmp_path_factory):
    out = tmp_path_factory.mktemp('cli') / 'chat'
    r = run('finetune', '--init_from', run_dir, '--chats', chats, '--out',
            out, '--max_steps', 4, *CHAT_SMALL)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_finetune_from_files_and_resume(chat_run, run_dir):
    meta, _ = load_split(chat_run / 'data', 'train')
    assert meta['kind'] == 'chat' and meta['source'].endswith('.jsonl')
    assert read_log(chat_run)[-1]['step'] == 4
    r = run('finetune', '--out', chat_run, '--resume', '--max_steps', 6,
            '--quiet')
    assert r.returncode == 0, r.stderr[-2000:]
    assert read_log(chat_run)[-1]['step'] == 6
    r = run('finetune', '--init_from', run_dir, '--out', chat_run)
    assert r.returncode == 1 and '--resume' in r.stderr


def test_finetune_needs_a_base_model_and_good_chats(run_dir, tmp_path):
    r = run('finetune', '--out', tmp_path / 'x')
    assert r.returncode == 1 and '--init_from' in r.stderr
    bad = tmp_path / 'bad.jsonl'
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}')
    r = run('finetune', '--init_from', run_dir, '--chats', bad, '--out',
            tmp_path / 'y')
    assert r.returncode == 1 and 'bad.jsonl:1: no assistant' in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / 'y' / 'data').exists()


def test_finetune_with_lora_then_chat(run_dir, chats, tmp_path):
    out = tmp_path / 'lora'
    r = run('finetune', '--init_from', run_dir, '--chats', chats, '--out',
            out, '--max_steps', 2, '--lora_rank', 2, *CHAT_SMALL)
    assert r.returncode == 0, r.stderr[-2000:]
    # the chat tokens' rows trained beside the adapters (chapter 9)
    state = sorted((out / 'checkpoints').glob('step-*'))[-1] / 'state.json'
    tok = json.loads((out / 'data' / 'tokenizer.json').read_text())
    specials = tok['special_tokens']
    assert json.loads(state.read_text())['trained_rows'] == [
        specials[s] for s in ('<|system|>', '<|user|>', '<|assistant|>',
                              '<|end|>')]
    r = run('chat', '--checkpoint', out, '--max_new_tokens', 3,
            input='What is 2 plus 1?\n')
    assert r.returncode == 0 and r.stdout.count('assistant> ') == 1


def test_chat_through_stdin(chat_run):
    r = run('chat', '--checkpoint', chat_run, '--seed', 0,
            '--max_new_tokens', 5, '--system', 'Be brief.',
            input='What is 3 plus 1?\n/reset\nHello\n/quit\nnot read\n')
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count('you> ') == 4  # the last prompt got /quit
    assert r.stdout.count('assistant> ') == 2


def test_chat_refuses_a_model_that_was_not_fine_tuned(run_dir):
    r = run('chat', '--checkpoint', run_dir, input='hi\n')
    assert r.returncode == 1 and 'not a chat model' in r.stderr


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_serve_a_chat_run_until_ctrl_c(chat_run):
    import httpx
    port = free_port()
    url = f'http://127.0.0.1:{port}'
    p = subprocess.Popen([str(EXE), 'serve', str(chat_run), '--port',
                          str(port), '--slots', '2'], text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=dict(os.environ, LLM_FROM_SCRATCH_API_KEY='k'))
    try:
        deadline = time.time() + 60
        while time.time() < deadline and p.poll() is None:
            try:
                if httpx.get(url + '/health').status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = dict(messages=[dict(role='user', content='What is 2 plus 1?')],
                    max_tokens=4, temperature=0)
        r = httpx.post(url + '/v1/chat/completions', json=body)
        assert r.status_code == 401
        r = httpx.post(url + '/v1/chat/completions', json=body,
                       headers={'authorization': 'Bearer k'})
        assert r.status_code == 200, r.text
        assert r.json()['model'] == chat_run.name
        assert r.json()['usage']['completion_tokens'] <= 4
        assert '<title>' in httpx.get(url + '/').text
    finally:
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
    assert p.returncode == 0, err[-2000:]
    assert f'http://127.0.0.1:{port}/' in err and 'API key' in err


def test_serve_errors_are_one_line(run_dir):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        s.listen()
        port = s.getsockname()[1]
        r = run('serve', run_dir, '--port', port)
    assert r.returncode == 1 and 'cannot listen on' in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run('serve', run_dir, '--slots', 0, '--port', free_port())
    assert r.returncode == 1 and 'slots must be at least 1' in r.stderr


def test_exported_chat_model_talks_in_transformers(chat_run, tmp_path):
    transformers = pytest.importorskip('transformers')
    from llm_from_scratch.finetuning import replies
    from llm_from_scratch.generation import load_for_generation
    out = tmp_path / 'hf'
    r = run('export', chat_run, out, '--format', 'hf')
    assert r.returncode == 0, r.stderr[-2000:]
    tok = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    talk = [dict(role='user', content='What is 3 plus 1?')]
    enc = tok.apply_chat_template(talk, add_generation_prompt=True,
                                  return_tensors='pt')
    new = model.generate(**enc, max_new_tokens=6, do_sample=False)
    theirs = tok.decode(new[0, enc['input_ids'].shape[1]:],
                        skip_special_tokens=True)
    ours = replies(*load_for_generation(chat_run), [talk],
                   max_new_tokens=6)[0]
    assert tok.eos_token == '<|end|>' and theirs == ours
    said = [run('chat', '--checkpoint', where, '--seed', 0,
                '--max_new_tokens', 6, input='What is 3 plus 1?\n').stdout
            for where in (chat_run, out)]  # the run, and its export
    assert said[0].count('assistant> ') == 1 and said[0] == said[1]


@pytest.mark.parametrize('kind', ['gpt2', 'llama'])
def test_finetune_a_model_from_hugging_face(chats, tmp_path, kind):
    "A model and tokenizer only in Hugging Face's formats, as from the Hub."
    transformers = pytest.importorskip('transformers')
    from tokenizers import Regex, Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers
    from llm_from_scratch.tokenizer import LLAMA3_PATTERN, load_corpus
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False) \
        if kind == 'gpt2' else pre_tokenizers.Sequence([  # as Llama 3's
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), 'isolated'),
            pre_tokenizers.ByteLevel(add_prefix_space=False,
                                     use_regex=False)])
    hf.train_from_iterator([load_corpus()[:200_000]], trainers.BpeTrainer(
        vocab_size=400, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.add_special_tokens(['<|endoftext|>'])
    size = dict(vocab_size=401, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=64)
    config = transformers.GPT2Config(**size) if kind == 'gpt2' else \
        transformers.LlamaConfig(**size, intermediate_size=64,
                                 num_key_value_heads=1)
    torch.manual_seed(0)
    base = tmp_path / 'base'
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(
        base)
    hf.save(str(base / 'tokenizer.json'))
    out = tmp_path / 'chat'
    r = run('finetune', '--init_from', base, '--chats', chats, '--out', out,
            '--max_steps', 4, *CHAT_SMALL)
    assert r.returncode == 0, r.stderr[-2000:]
    losses = [row['val_loss'] for row in read_log(out) if row['val_loss']]
    assert len(losses) == 2 and losses[-1] < losses[0]
    r = run('chat', '--checkpoint', out, '--max_new_tokens', 3,
            input='What is 2 plus 1?\n')
    assert r.returncode == 0 and r.stdout.count('assistant> ') == 1


# -- eval --------------------------------------------------------------------

def _direct(run_dir, task, limit):
    "What chapter 10's functions say about `task`'s first `limit` items."
    from dataclasses import replace
    from llm_from_scratch.evaluation import evaluate_task
    from llm_from_scratch.generation import load_for_generation
    model, tok = load_for_generation(run_dir)
    return evaluate_task(model, tok, replace(task, items=task.items[:limit]))


def test_eval_writes_a_report(run_dir, tmp_path, capsys):
    from llm_from_scratch.evaluation import lm_scores, load_task, split_plays
    from llm_from_scratch.generation import load_for_generation
    out = tmp_path / 'report'
    r = run('eval', run_dir, '--tasks', 'next_word,bpb', '--limit', 4,
            '--out', out, '--quiet')
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / 'report.json').read_text())
    assert report['tasks'] == ['next_word', 'bpb']
    assert report['checkpoint'].endswith('step-0000003')
    assert {'llm_from_scratch', 'torch', 'python'} <= set(
        report['versions'])
    assert report['seconds']['total'] > 0 and report['limit'] == 4
    word, bpb = report['results']
    direct = _direct(run_dir, load_task('next_word'), 4)
    for k in ('items', 'acc', 'acc_norm', 'acc_stderr', 'centred'):
        assert word[k] == pytest.approx(direct[k]), k
    ours = report['per_item']['next_word']
    assert [x['pred'] for x in ours] == \
        [x['pred'] for x in direct['per_item']]
    assert ours[0]['lls'] == pytest.approx(direct['per_item'][0]['lls'])
    held = [d.text for d in split_plays()[1]][:4]
    scores = lm_scores(*load_for_generation(run_dir), held)
    assert bpb['items'] == 4
    assert bpb['bits_per_byte'] == pytest.approx(scores['bits_per_byte'])
    table = (out / 'report.md').read_text()
    assert table.strip() == r.stdout.split('\nwrote ')[0].strip()
    for name, k, v in [('next_word', 'acc_norm', word['acc_norm']),
                       ('bpb', 'bits_per_byte', bpb['bits_per_byte'])]:
        assert f'| {k} ' in table and f' {v:.4f} |' in table, (k, table)
    assert f" {word['acc_stderr']:.4f} |" in table
    # an existing report is never replaced silently
    before = (out / 'report.json').read_bytes()
    assert cli.main(['eval', str(run_dir), '--tasks', 'bpb', '--out',
                     str(out)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and '--overwrite' in err
    assert (out / 'report.json').read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ['report.json',
                                                     'report.md']


@pytest.mark.parametrize('tasks, message', [
    ('next_word,squad', "unknown task 'squad': choose from bpb"),
    ('arc_easy=no/such.jsonl', 'no task file no/such.jsonl'),
    ('mine.jsonl', 'no task file mine.jsonl'),
    ('squad=x.jsonl', "'squad' is not a benchmark"),
    ('arc_easy', 'pass arc_easy=FILE'),
    ('bpb,bpb', "two tasks are named 'bpb'"),
    (',', 'no tasks given')])
def test_eval_bad_tasks_are_one_line(run_dir, tmp_path, monkeypatch,
                                     capsys, tasks, message):
    "Checked before the model loads; the Hub is out of reach here."
    monkeypatch.setattr(cli, '_hub_in_reach', lambda: False)
    monkeypatch.chdir(tmp_path)
    assert cli.main(['eval', str(run_dir), '--tasks', tasks]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith('llm-from-scratch eval: error:')
    assert message in err, err
    if tasks.endswith(',squad'):  # every kind of task is named
        for name in ('next_word', 'next_line', 'arc_easy', 'mmlu'):
            assert name in err


def test_eval_task_files_and_benchmark_files(run_dir, tmp_path, capsys):
    "Our JSONL format and ARC's own schema, on the model's HF export."
    from llm_from_scratch.distributed import export_checkpoint
    from llm_from_scratch.evaluation import Task, load_task, write_task
    mine = Task('mine', [dict(query='To be, or not to be:',
                              choices=['that is', 'the ques', 'tion'],
                              gold=0)] * 3)
    write_task(mine, tmp_path / 'mine.jsonl')
    rows = [dict(id=f'q{i}', question=f'Who wrote play {i}?',
                 choices=dict(text=['Shakespeare', 'Marlowe', 'Jonson'],
                              label=['A', 'B', 'C']), answerKey='ABC'[i])
            for i in range(3)]
    arc = tmp_path / 'arc.jsonl'
    arc.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    hf = tmp_path / 'hf'
    export_checkpoint(run_dir, hf, format='hf')
    tasks = f'{tmp_path / "mine.jsonl"},arc_easy={arc}'
    assert cli.main(['eval', str(hf), '--tasks', tasks, '--out',
                     str(tmp_path / 'r'), '--quiet']) == 0
    out = capsys.readouterr().out
    assert '| mine ' in out and '| arc_easy ' in out
    report = json.loads((tmp_path / 'r' / 'report.json').read_text())
    assert report['tasks'] == [str(tmp_path / 'mine.jsonl'),
                               f'arc_easy={arc}']
    got = {r['task']: r for r in report['results']}
    assert got['mine']['items'] == 3 and got['arc_easy']['items'] == 3
    for task in (mine, load_task('arc_easy', arc)):
        want = _direct(run_dir, task, None)   # the run, not its export
        assert got[task.name]['acc_norm'] == pytest.approx(want['acc_norm'])
        assert report['per_item'][task.name][0]['lls'] == pytest.approx(
            want['per_item'][0]['lls'], abs=1e-4)


def test_eval_contamination(run_dir, data, tmp_path, capsys):
    "An item copied from the training data is found; a new one is not."
    from llm_from_scratch.evaluation import Task, write_task
    from llm_from_scratch.data import load_tokenizer
    _, shards = load_split(data, 'train')
    seen = load_tokenizer(data).decode(shards[0][1000:1060].tolist())
    task = Task('copied', [dict(query=seen, choices=['and', 'or'], gold=0),
                           dict(query='Zebras compute quickly',
                                choices=['and', 'or'], gold=0)])
    write_task(task, tmp_path / 'copied.jsonl')
    assert cli.main(['eval', str(run_dir), '--tasks',
                     str(tmp_path / 'copied.jsonl'), '--contamination',
                     str(data), '--out', str(tmp_path / 'r'),
                     '--quiet']) == 0
    assert '| contaminated ' in capsys.readouterr().out
    report = json.loads((tmp_path / 'r' / 'report.json').read_text())
    assert report['results'][0]['contaminated'] == 0.5
    assert [x['contaminated'] for x in report['per_item']['copied']] == \
        [True, False]


def test_eval_progress_bar_leaves_the_scores_alone(run_dir, monkeypatch,
                                                   capsys):
    "On a terminal a bar counts the scored sequences; the table is the same."
    args = ['eval', str(run_dir), '--tasks', 'next_word', '--limit', '3']
    assert cli.main(args + ['--quiet']) == 0
    quiet = capsys.readouterr().out
    monkeypatch.setattr(sys.stderr, 'isatty', lambda: True)
    assert cli.main(args) == 0
    out, err = capsys.readouterr()
    assert out == quiet and 'tasks in' in err


def test_train_scores_tasks_at_each_evaluation(data, tmp_path):
    from llm_from_scratch.data import load_tokenizer
    from llm_from_scratch.evaluation import (Task, bits_per_byte,
                                             evaluate_task, load_task,
                                             split_plays, write_task)
    from llm_from_scratch.training import (latest_checkpoint,
                                           model_from_checkpoint)
    out = tmp_path / 'run'
    args = ['train', '--data', data, '--max_steps', 3, *SMALL]
    r = run(*args, '--out', out, '--eval_tasks', 'next_word,bpb',
            '--eval_limit', 5)
    assert r.returncode == 0, r.stderr[-2000:]
    last = read_log(out)[-1]
    model = model_from_checkpoint(latest_checkpoint(out)).eval()
    tok = load_tokenizer(data)
    task = load_task('next_word')
    task.items = task.items[:5]
    texts = [d.text for d in split_plays()[1]][:5]
    assert last['next_word acc_norm (5 items)'] == \
        evaluate_task(model, tok, task)['acc_norm']
    assert abs(last['bpb (5 scenes)'] - bits_per_byte(model, tok, texts)) \
        < 1e-6
    # resuming with other evals is refused before any step
    r = run(*args[:4], 6, *SMALL, '--out', out, '--resume', '--eval_tasks',
            'next_word,bpb', '--eval_limit', 6)
    assert r.returncode == 1 and '(5 items)' in r.stderr, r.stderr
    assert len(read_log(out)) == 3
    r = run(*args, '--out', tmp_path / 'other', '--eval_tasks', 'next_wrd')
    assert r.returncode == 1 and 'unknown task' in r.stderr
    # a written answer that cannot fit the context: refused at the start
    long = Task('long', [dict(query='Enter', answer='x')],
                max_new_tokens=40)
    write_task(long, tmp_path / 'long.jsonl')
    r = run(*args, '--out', tmp_path / 'other', '--eval_tasks',
            tmp_path / 'long.jsonl')
    assert r.returncode == 1 and 'max_new_tokens 40' in r.stderr, r.stderr
    assert not (tmp_path / 'other').exists()
    r = run('eval', out, '--tasks', tmp_path / 'long.jsonl', '--quiet')
    assert r.returncode == 1 and 'max_new_tokens 40' in r.stderr
    r = run('eval', out, '--tasks', tmp_path / 'long.jsonl', '--quiet',
            '--max_new_tokens', 4)
    assert r.returncode == 0 and '| long ' in r.stdout, r.stderr


def test_generate_compiled_frozen_gives_the_same_text(run_dir):
    "--compile frozen: the greedy text of the eager steps; bad values refused."
    args = ['generate', '--checkpoint', run_dir, '--max_new_tokens', 12,
            '--temperature', 0, '--prompt', 'A']
    eager = run(*args, '--quiet')
    frozen = run(*args, '--compile', 'frozen')
    assert frozen.returncode == 0, frozen.stderr[-2000:]
    assert 'compiling' in frozen.stderr
    assert frozen.stdout == eager.stdout
    r = run(*args, '--compile', 'fast')
    assert r.returncode == 1 and '--compile must be compiled or frozen' \
        in r.stderr and len(r.stderr.strip().splitlines()) == 1
