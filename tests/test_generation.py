"""Generation: cache == recompute, parity with transformers, sampling rules."""
import hashlib
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

from llm_from_scratch.attention import KVCache
from llm_from_scratch import generation
from llm_from_scratch.generation import (filter_logits, fit_prompt, generate,
                                         generate_tokens, left_pad,
                                         load_for_generation, next_token,
                                         penalize_repeats, stream_text)
from llm_from_scratch.model import GPT, preset
from llm_from_scratch.tokenizer import Tokenizer


def model_of(name, **kw):
    torch.manual_seed(0)
    return GPT(preset(name, vocab_size=211, block_size=64,
                      tie_weights=False, **kw)).eval()


PROMPTS = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]


@pytest.mark.parametrize('name, kw', [('tiny', {}),
                                      ('tiny-llama', {}),
                                      ('tiny-llama', dict(n_kv_head=1))])
def test_cached_logits_equal_recomputation(name, kw):
    "At every step, for a batch of unequal prompts: cache == full pass."
    model = model_of(name, **kw)
    c = model.config
    idx, mask, pos = left_pad(PROMPTS)
    B, L = idx.shape
    cache = [KVCache(B, c.n_kv_head, L + 12, c.head_dim)
             for _ in range(c.n_layer)]
    seqs = [list(p) for p in PROMPTS]
    with torch.no_grad():
        logits, _ = model(idx, cache=cache, positions=pos, pad_mask=mask)
        for step in range(12):
            for b, seq in enumerate(seqs):  # each sequence alone, no pad
                alone, _ = model(torch.tensor([seq]))
                assert torch.allclose(logits[b, -1], alone[0, -1],
                                      atol=1e-5), (step, b)
            tok = logits[:, -1].argmax(-1)
            for b, seq in enumerate(seqs):
                seq.append(tok[b].item())
            mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
            pos = torch.cat([pos, pos[:, -1:] + 1], 1)
            logits, _ = model(tok[:, None], cache=cache,
                              positions=pos[:, -1:], pad_mask=mask)


def test_no_cache_path_generates_the_same():
    model = model_of('tiny-llama')
    a = generate(model, PROMPTS, 10, temperature=0, use_cache=True)
    b = generate(model, PROMPTS, 10, temperature=0, use_cache=False)
    assert a == b


@pytest.mark.parametrize('kind', ['gpt2', 'llama'])
def test_greedy_matches_transformers_generate(kind):
    import transformers
    transformers.logging.set_verbosity_error()
    sys.path.insert(0, str(Path(__file__).parent))
    from test_model import hf_gpt2, hf_llama, ours_from
    torch.manual_seed(0)
    hf = hf_gpt2(2, 4, 64, 101, 64) if kind == 'gpt2' else hf_llama()
    ours = ours_from(hf, kind)
    prompt = [5, 17, 42, 8]
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=20,
                         do_sample=False, pad_token_id=0)
    mine = generate(ours, [prompt], 20, temperature=0)[0]
    assert theirs[0, len(prompt):].tolist() == mine


def test_same_seed_same_sample():
    model = model_of('tiny')
    kw = dict(temperature=1.0, top_k=50, top_p=0.95)
    a = generate(model, PROMPTS, 15, seed=7, **kw)
    assert a == generate(model, PROMPTS, 15, seed=7, **kw)
    assert a != generate(model, PROMPTS, 15, seed=8, **kw)


@pytest.mark.parametrize('k, p', [(1, None), (3, None), (None, 0.5),
                                  (None, 0.9), (4, 0.6)])
def test_samples_stay_in_the_allowed_set(k, p):
    "Constructed distributions: the top-k set and the top-p nucleus."
    probs = torch.tensor([[0.05, 0.3, 0.02, 0.25, 0.2, 0.1, 0.08]])
    order = probs[0].argsort(descending=True).tolist()
    order = order[:k] if k else order  # top-k first, then the nucleus
    allowed = set(order)               # of the renormalised top-k
    if p is not None:
        total = sum(probs[0, i].item() for i in order)
        cum, nucleus = 0.0, []
        for i in order:
            if cum >= p:
                break
            nucleus.append(i)
            cum += probs[0, i].item() / total
        allowed = set(nucleus)
    g = torch.Generator().manual_seed(0)
    draws = {next_token(probs.log(), 1.0, k, p, g).item()
             for _ in range(2000)}
    assert draws == allowed  # never outside, and every member drawn
    kept = filter_logits(probs.log(), k, p).isfinite()[0].nonzero()
    assert set(kept.flatten().tolist()) == allowed


def test_stop_tokens_and_streaming():
    from llm_from_scratch.tokenizer import load_corpus
    tok = Tokenizer.train(load_corpus()[:100_000], 300)
    torch.manual_seed(0)
    model = GPT(preset('tiny', vocab_size=tok.vocab_size,
                       block_size=64)).eval()
    out = generate(model, [tok.encode('To be')], 30, temperature=0)[0]
    stop = out[3]
    cut = generate(model, [tok.encode('To be')], 30, temperature=0,
                   stop_tokens=[stop])[0]
    assert cut == out[:out.index(stop)]
    text = ''.join(stream_text(tok, model, 'To be', max_new_tokens=30,
                               temperature=0, stop_tokens=[]))
    assert text == tok.decode(out)


@pytest.mark.parametrize('kw, message', [
    (dict(top_p=0.0), 'top_p'), (dict(top_p=1.5), 'top_p'),
    (dict(top_k=0), 'top_k'), (dict(repetition_penalty=0), 'penalty'),
    (dict(max_new_tokens=-1), 'max_new_tokens'),
    (dict(max_new_tokens=2.5), 'max_new_tokens'),
    (dict(temperature=math.nan), 'temperature'),
    (dict(temperature=math.inf), 'temperature'),
    (dict(top_p=math.nan), 'top_p'), (dict(top_k=math.nan), 'top_k'),
    (dict(top_k=math.inf), 'top_k'), (dict(top_k=2.5), 'top_k'),
    (dict(repetition_penalty=math.nan), 'penalty'),
    (dict(repetition_penalty=math.inf), 'penalty'),
])
def test_bad_sampling_settings(kw, message):
    kw = {'max_new_tokens': 5, **kw}
    with pytest.raises(ValueError, match=message):
        generate(model_of('tiny'), PROMPTS, **kw)
    with pytest.raises(ValueError, match=message):
        next(generate_tokens(model_of('tiny'), PROMPTS, **kw))


def test_prompt_errors_and_truncation():
    model = model_of('tiny')
    with pytest.raises(ValueError, match='at least one token'):
        generate(model, [[]], 5)
    long = list(range(100))
    with pytest.raises(ValueError, match='exceeds the context of 64'):
        generate(model, [long], 10)
    out = generate(model, [long], 10, truncate=True, temperature=0)[0]
    assert out == generate(model, [long[-54:]], 10, temperature=0)[0]
    assert next_token(torch.tensor([[0.1, 3.0, 2.0]]), 0).item() == 1


# -- padding, model mode, settings -------------------------------------------

def test_repeat_penalty_ignores_padding():
    "A padded row with a repetition penalty generates what it would alone."
    model = model_of('tiny-llama')
    kw = dict(temperature=0, repetition_penalty=1.8)
    alone = [generate(model, [p], 8, **kw)[0] for p in PROMPTS]
    for pad_id in {0, alone[1][0], alone[2][0]}:
        assert generate(model, PROMPTS, 8, pad_id=pad_id, **kw) == alone
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5]])
    seen = torch.tensor([[0, 0, 1]])
    mask = torch.tensor([[False, False, True]])
    assert penalize_repeats(logits, seen, 2.0, mask).tolist() == \
        [[2.0, -2.0, 3.0, 0.5]]


def test_generation_restores_the_models_mode(monkeypatch):
    model = model_of('tiny').train()
    generate(model, PROMPTS, 3)
    assert model.training
    steps = generate_tokens(model, PROMPTS, 5)
    next(steps)
    assert not model.training  # eval while generating
    steps.close()
    assert model.training
    model.eval()
    generate(model, PROMPTS, 2)
    assert not model.training

    def boom(*args):
        raise RuntimeError('boom')
    monkeypatch.setattr(generation, 'next_token', boom)
    model.train()
    with pytest.raises(RuntimeError, match='boom'):
        generate(model, PROMPTS, 3)
    assert model.training


def test_zero_new_tokens_yields_nothing():
    model = model_of('tiny')
    assert list(generate_tokens(model, PROMPTS, 0)) == []
    assert generate(model, PROMPTS, 0) == [[], [], []]


def test_error_messages_read_well_from_the_command_line():
    model = model_of('tiny')
    with pytest.raises(ValueError, match='from Python') as e:
        generate(model, [[]], 5)
    assert 'at least one token' in str(e.value)
    with pytest.raises(ValueError) as e:
        generate(model, [list(range(100))], 10)
    assert 'truncate=True' in str(e.value)
    assert '--truncate' in str(e.value)
    assert '\n' not in str(e.value)


# -- stop strings, truncation by ids -----------------------------------------

class PieceTokenizer:
    "Token i is the text `pieces[i]`: a model's output under our control."

    def __init__(self, pieces):
        self.pieces = pieces
        self.special_tokens = {p: i for i, p in enumerate(pieces)
                               if p.startswith('<') and p.endswith('>')}

    def encode(self, text):
        return [0]

    def decode_bytes(self, ids):
        return ''.join(self.pieces[i] for i in ids).encode()


def stream_pieces(monkeypatch, pieces, stop):
    "What `stream_text` yields when the model writes `pieces`."
    def fake(model, prompts, max_new_tokens=50, **kwargs):
        for i in range(len(pieces)):
            yield torch.tensor([i])
    monkeypatch.setattr(generation, 'generate_tokens', fake)
    return list(stream_text(PieceTokenizer(pieces), model_of('tiny'), 'x',
                            stop=stop))


@pytest.mark.parametrize('pieces, stop, expected', [
    (['Hel', 'lo\n', '\nBye'], ('\n\n',), ['Hel', 'lo']),
    (['a\n', 'b\n'], ('\n\n',), ['a', '\nb', '\n']),
    (['the EN', 'D of it'], ('END',), ['the ']),
    (['xa', 'by'], ('b', 'a'), ['x']),
    (['one\n\ntwo'], ('\n\n',), ['one']),
    (['ab', 'c'], (), ['ab', 'c']),
    (['ab', 'cd', 'e'], ('cdx', 'bc'), ['a']),
    (['ab', 'cd', 'e'], 'cdx', ['ab', 'cde']),
])
def test_stop_strings(monkeypatch, pieces, stop, expected):
    assert stream_pieces(monkeypatch, pieces, stop) == expected


@pytest.mark.parametrize('eot', ['<|endoftext|>', '</s>',
                                 '<|end_of_text|>'])
def test_streams_stop_at_the_end_of_text_token(monkeypatch, eot):
    assert stream_pieces(monkeypatch, ['a', 'b', eot, 'c'], ()) == ['a', 'b']


def test_empty_stop_string_is_refused(monkeypatch):
    with pytest.raises(ValueError, match='stop'):
        stream_pieces(monkeypatch, ['a'], ('',))


@pytest.fixture(scope='module')
def tok300():
    from llm_from_scratch.tokenizer import load_corpus
    return Tokenizer.train(load_corpus()[:100_000], 300)


def test_stream_text_truncates_by_token_ids(tok300):
    tok = tok300
    torch.manual_seed(0)
    model = GPT(preset('tiny', vocab_size=tok.vocab_size,
                       block_size=64)).eval()
    prompt = '👋' * 20 + ' to be'
    ids = tok.encode(prompt)
    for n in range(10, 14):  # a cut that splits an emoji's bytes
        room = 64 - n
        try:
            tok.decode_bytes(ids[-room:]).decode('utf-8')
        except UnicodeDecodeError:
            break
    dropped = []
    text = ''.join(stream_text(tok, model, prompt, stop_tokens=[],
                               max_new_tokens=n, temperature=0,
                               truncate=True, on_truncate=dropped.append))
    assert dropped == [len(ids) - room]
    assert text == tok.decode(generate(model, [ids[-room:]], n,
                                       temperature=0)[0])
    assert fit_prompt(ids, 64, n, True) == (ids[-room:], len(ids) - room)
    assert fit_prompt(ids[:5], 64, n, True) == (ids[:5], 0)
    assert fit_prompt(ids, 64, n, False) == (ids, 0)
    with pytest.raises(ValueError, match='exceeds the context'):
        list(stream_text(tok, model, prompt, max_new_tokens=n))
    with pytest.raises(ValueError, match='no room'):
        list(stream_text(tok, model, prompt, max_new_tokens=64,
                         truncate=True))
    with pytest.raises(ValueError, match='at least one token'):
        list(stream_text(tok, model, '', max_new_tokens=5))


def test_hugging_face_tokenizer_streams_whole_characters(tok300, tmp_path):
    "Byte-level tokens of a split emoji give its bytes, not U+FFFD each."
    tok300.save_hf(tmp_path / 'tokenizer.json')
    hf = generation.read_tokenizer(tmp_path / 'tokenizer.json')
    assert isinstance(hf, generation._HFTokenizer)
    ids = hf.encode('Hi 👋! <|endoftext|>')
    assert any('\ufffd' in hf.decode([i]) for i in ids)  # a split emoji
    pieces = b''.join(hf.decode_bytes([i]) for i in ids)
    assert pieces.decode() == 'Hi 👋! <|endoftext|>'


# -- loading for generation --------------------------------------------------

@pytest.fixture(scope='module')
def run(tmp_path_factory):
    "A three-step training run on a little Shakespeare."
    from llm_from_scratch.data import prepare_data, shakespeare
    from llm_from_scratch.training import TrainConfig, train
    root = tmp_path_factory.mktemp('run')
    prepare_data(shakespeare()[:40], root / 'data', vocab_size=400,
                 processes=1)
    train(TrainConfig(data=str(root / 'data'), out=str(root / 'run'),
                      block_size=32, batch_size=4, max_steps=3,
                      warmup_steps=1, eval_every=3, eval_batches=1),
          progress=False)
    return root


def checkpoint_copy(run, dest, **state):
    "A copy of the run's checkpoint with `state` changed in state.json."
    from llm_from_scratch.training import latest_checkpoint
    shutil.copytree(latest_checkpoint(run / 'run'), dest)
    (dest / 'tokenizer.json').unlink(missing_ok=True)
    meta = json.loads((dest / 'state.json').read_text())
    for k, v in state.items():
        if k == 'data':
            meta['train_config']['data'] = v
        else:
            meta[k] = v
    (dest / 'state.json').write_text(json.dumps(meta))
    return dest


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_loading_leaves_the_global_rng_alone(run):
    torch.manual_seed(1234)  # not the state the checkpoint saved
    before = torch.get_rng_state()
    load_for_generation(run / 'run')
    assert torch.equal(torch.get_rng_state(), before)


def test_load_device_and_dtype(run):
    model, tok = load_for_generation(run / 'run')
    assert next(model.parameters()).dtype == torch.float32
    assert not model.training
    model, tok = load_for_generation(run / 'run', device='cpu',
                                     dtype='bf16')
    p = next(model.parameters())
    assert (p.dtype, p.device.type) == (torch.bfloat16, 'cpu')
    assert len(''.join(stream_text(tok, model, 'ROMEO:', max_new_tokens=5,
                                   seed=0))) > 0
    with pytest.raises(ValueError, match="dtype.*fp32, bf16, fp16"):
        load_for_generation(run / 'run', dtype='fp8')
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda.*--device cpu"):
            load_for_generation(run / 'run', device='cuda')


def test_tokenizer_lookup(run, tmp_path):
    data_tok = run / 'data' / 'tokenizer.json'
    gone = str(tmp_path / 'moved')
    ckpt = checkpoint_copy(run, tmp_path / 'ckpt', data=gone)
    with pytest.raises(FileNotFoundError,
                       match='has no tokenizer.json.*--tokenizer FILE'):
        load_for_generation(ckpt)
    load_for_generation(ckpt, tokenizer=data_tok)  # explicit
    shutil.copy(data_tok, ckpt / 'tokenizer.json')
    model, tok = load_for_generation(ckpt)  # the checkpoint's own
    assert tok.vocab_size == model.config.vocab_size
    with pytest.raises(FileNotFoundError, match='nothing.json'):
        load_for_generation(ckpt, tokenizer=tmp_path / 'nothing.json')


def test_tokenizer_must_be_the_one_trained_with(run, tmp_path):
    data_tok = run / 'data' / 'tokenizer.json'
    from llm_from_scratch.tokenizer import load_corpus
    text = load_corpus()[-100_000:]  # other text: other merges
    other = Tokenizer.train(text, 400)
    other.save(tmp_path / 'other.json')
    assert other.vocab_size == 400
    ckpt = checkpoint_copy(run, tmp_path / 'ckpt',
                           tokenizer_sha256=sha256(data_tok))
    load_for_generation(ckpt)  # the data folder's: the right one
    with pytest.raises(ValueError,
                       match='was trained with a different tokenizer') as e:
        load_for_generation(ckpt, tokenizer=tmp_path / 'other.json')
    assert 'other.json' in str(e.value) and 'state.json' in str(e.value)
    plain = checkpoint_copy(run, tmp_path / 'plain', tokenizer_sha256=None)
    load_for_generation(plain, tokenizer=tmp_path / 'other.json')
    small = Tokenizer.train(text, 300)
    small.save(tmp_path / 'small.json')
    with pytest.raises(ValueError, match='300 ids'):
        load_for_generation(plain, tokenizer=tmp_path / 'small.json')


def test_hugging_face_folder_without_tokenizer(run, tmp_path):
    import transformers
    transformers.logging.set_verbosity_error()
    sys.path.insert(0, str(Path(__file__).parent))
    from test_model import hf_gpt2
    torch.manual_seed(0)
    hf_gpt2(vocab=400).to(torch.bfloat16).save_pretrained(tmp_path / 'hf')
    with pytest.raises(FileNotFoundError) as e:
        load_for_generation(tmp_path / 'hf')
    assert str(e.value) == (f'{tmp_path / "hf"} has no tokenizer.json: '
                            f'pass --tokenizer FILE')
    model, tok = load_for_generation(tmp_path / 'hf',
                                     run / 'data' / 'tokenizer.json')
    assert next(model.parameters()).dtype == torch.bfloat16  # as stored
    model, tok = load_for_generation(tmp_path / 'hf',
                                     run / 'data' / 'tokenizer.json',
                                     dtype='fp32')
    assert next(model.parameters()).dtype == torch.float32


def test_a_classifier_does_not_generate():
    "A model whose head scores classes (chapter 8) refuses to generate."
    model = GPT(preset('tiny', vocab_size=64, block_size=16, n_classes=3,
                       tie_weights=False))
    with pytest.raises(ValueError, match='classifier .3 classes.'):
        generate(model, [[1, 2, 3]], max_new_tokens=2)


# -- fast decoding: static cache, no wasted work, compile, bandwidth ---------

def test_static_cache_matches_the_full_pass_at_every_step():
    "forward_last with StaticKVCache, step by step == the whole sequence."
    model = model_of('tiny-llama', n_kv_head=1)
    c = model.config
    idx, mask, pos = left_pad(PROMPTS)
    B, L = idx.shape
    cache = [generation.StaticKVCache(B, c.n_kv_head, L + 6, c.head_dim)
             for _ in range(c.n_layer)]
    full = torch.cat([mask, mask.new_ones(B, 6)], 1)
    seqs = [list(p) for p in PROMPTS]
    with torch.no_grad():
        logits = generation.forward_last(model, idx, cache, pos, full)
        for step in range(6):
            assert isinstance(cache[0].pos, torch.Tensor)
            assert cache[0].pos.item() == L + step
            for b, seq in enumerate(seqs):
                alone, _ = model(torch.tensor([seq]))
                assert torch.allclose(logits[b], alone[0, -1], atol=1e-5)
            tok = logits.argmax(-1)
            for b, seq in enumerate(seqs):
                seq.append(tok[b].item())
            pos = pos[:, -1:] + 1 if step == 0 else pos + 1
            logits = generation.forward_last(model, tok[:, None], cache,
                                             pos, full)


def test_no_wasted_work(monkeypatch):
    "One prefill + n - 1 steps; logits of one position; no host copies."
    model = model_of('tiny')
    calls, head_rows = [], []
    real = generation.forward_last
    monkeypatch.setattr(generation, 'forward_last',
                        lambda *a: calls.append(a[1].shape) or real(*a))
    model.lm_head.register_forward_hook(
        lambda m, i, o: head_rows.append(i[0].shape))
    for n in (1, 5):
        calls.clear()
        head_rows.clear()
        out = generate(model, PROMPTS, n, temperature=0)
        assert [len(r) for r in out] == [n] * 3
        assert calls == [(3, 7)] + [(3, 1)] * (n - 1)  # prefill, steps
        C = model.config.n_embd
        assert head_rows == [(3, C)] * n  # (B, C): last position only
    steps = generate_tokens(model, PROMPTS, 4, temperature=0.8, seed=1)
    assert all(t.device == torch.device('cpu') and t.shape == (3,)
               for t in steps)


def test_stop_tokens_cut_each_row():
    model = model_of('tiny-llama')
    free = generate(model, PROMPTS, 12, temperature=0)
    stop = free[0][4]
    cut = generate(model, PROMPTS, 12, temperature=0, stop_tokens=[stop])
    for f, c in zip(free, cut):
        assert c == (f[:f.index(stop)] if stop in f else f)


def test_compiled_decode_equals_eager_without_recompiling():
    "torch.compile of the decode step: same tokens, one graph per shape."
    model = model_of('tiny-llama')
    eager = generate(model, PROMPTS, 10, temperature=0)
    torch._dynamo.reset()
    generation.compiled_forward_last.cache_clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = generate(model, PROMPTS, 10, temperature=0, compile=True)
    assert compiled == eager
    assert generate(model, PROMPTS, 10, temperature=0) == eager


def test_bf16_decode_with_fp32_prefill():
    "The first token comes from the prefill model; the cache is bf16."
    model = model_of('tiny')
    decode = model_of('tiny').to(torch.bfloat16)
    first = next(generate_tokens(decode, PROMPTS, 3, temperature=0,
                                 prefill_model=model))
    idx, mask, pos = left_pad(PROMPTS)
    with torch.no_grad():
        logits, _ = model(idx, positions=pos, pad_mask=mask)
    assert first.tolist() == logits[:, -1].argmax(-1).tolist()
    out = generate(decode, PROMPTS, 6, temperature=0, prefill_model=model)
    assert [len(r) for r in out] == [6] * 3
    d, p = generation.phase_models(model)
    assert next(d.parameters()).dtype == torch.bfloat16
    assert p is d or p is model
    assert next(model.parameters()).dtype == torch.float32  # left alone


def test_bandwidth_and_decode_speed_arithmetic():
    bw = generation.memory_bandwidth(n_bytes=2**22, repeats=2)
    assert set(bw) == {'copy', 'triad', 'read', 'best'}
    assert 0 < bw['copy'] <= bw['best'] and bw['triad'] <= bw['best']
    assert generation.memory_bandwidth(n_bytes=2**22, repeats=2) is bw
    model = model_of('tiny')
    c = model.config
    w = sum(p.numel() * 4 for p in model.parameters())
    assert generation.weight_bytes(model) == w
    kv = 2 * c.n_layer * c.n_kv_head * c.head_dim * 10 * 2 * 4
    assert generation.step_bytes(model, 2, 10) == w + kv
    d = generation.decode_speed(model, 0.01, 2, 10, bandwidth=1e9)
    assert d['tokens_per_s'] == pytest.approx(200)
    assert d['gb_per_s'] == pytest.approx((w + kv) / 0.01 / 1e9)
    assert d['of_bandwidth'] == pytest.approx((w + kv) / 0.01 / 1e9)
    assert d['ceiling'] == pytest.approx(2 * 1e9 / (w + kv))


def test_frozen_decode_matches_eager_and_follows_changed_weights():
    "Weights as constants: eager's logits; changed weights are never stale."
    model = model_of('tiny-llama')
    c = model.config
    idx, mask, pos = left_pad(PROMPTS)
    B, L = idx.shape
    full = torch.cat([mask, mask.new_ones(B, 2)], 1)

    def step_logits(step):
        "Logits of one decode step by `step`, after an eager prefill."
        cache = [generation.StaticKVCache(B, c.n_kv_head, L + 2, c.head_dim)
                 for _ in range(c.n_layer)]
        with torch.inference_mode():
            first = generation.forward_last(model, idx, cache, pos, full)
            return step(model, first.argmax(-1)[:, None], cache,
                        pos[:, -1:] + 1, full)

    eager = step_logits(generation.forward_last)
    frozen = generation.frozen_forward_last(model)
    assert torch.allclose(step_logits(frozen), eager, atol=1e-4)
    with torch.no_grad():  # as a fused optimizer does: no version bump
        for p in model.parameters():
            p.data.mul_(1.5)
    changed = step_logits(generation.forward_last)
    assert not torch.allclose(changed, eager, atol=1e-2)
    # a plain compile right after a frozen one never runs its constants
    plain = generation.compiled_forward_last()
    assert torch.allclose(step_logits(plain), changed, atol=1e-4)
    again = generation.frozen_forward_last(model)
    assert again.args != frozen.args  # compiled anew
    assert torch.allclose(step_logits(again), changed, atol=1e-4)
    assert generation.frozen_forward_last(model).args == again.args
    assert generate(model, PROMPTS, 4, temperature=0, compile='frozen') \
        == generate(model, PROMPTS, 4, temperature=0)
    with pytest.raises(ValueError, match="False, True or 'frozen'"):
        generate(model, PROMPTS, 2, compile='fast')
