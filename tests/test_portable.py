"""GGUF export (chapter 13): metadata and tensors read back with llama.cpp's
`gguf` reader, the Q8_0 bytes, bad input, and llama.cpp itself computing
what we compute (slow; skipped without llama-cpp-python)."""
import os

import gguf
import numpy as np
import pytest
import torch

from llm_from_scratch.attention import apply_rope, rope_cache
from llm_from_scratch.model import GPT, preset
from llm_from_scratch.portable import (
    PRE_TOKENIZERS, TYPES, gguf_tensors, q8_0_blocks, q8_0_bytes,
    rope_to_gguf, rounded_model, write_gguf)
from llm_from_scratch.tokenizer import (GPT2_PATTERN, GPT4_PATTERN,
                                        LLAMA3_PATTERN, Tokenizer,
                                        load_corpus)

TEXT = load_corpus()[:60_000]


@pytest.fixture(scope='module')
def tok():
    return Tokenizer.train(TEXT, 300)


def model_of(name, vocab_size=300, **kw):
    torch.manual_seed(0)
    return GPT(preset(name, vocab_size=vocab_size, block_size=64,
                      n_layer=2, **kw)).eval()


def file_tensors(path):
    "GGUF name -> float32 tensor in numpy's (out, in) order."
    r = gguf.GGUFReader(path)
    return r, {t.name: torch.from_numpy(np.array(
        gguf.quants.dequantize(t.data, t.tensor_type)).reshape(
            [int(n) for n in reversed(t.shape)])) for t in r.tensors}


def known_names(arch):
    "Every tensor name llama.cpp's `arch` can have (2 blocks)."
    a = {'llama': gguf.MODEL_ARCH.LLAMA, 'gpt2': gguf.MODEL_ARCH.GPT2}[arch]
    names = set()
    for t in gguf.MODEL_TENSORS[a]:
        for bid in range(2):
            base = gguf.TENSOR_NAMES[t].format(bid=bid)
            names |= {base + '.weight', base + '.bias'}
    return names


@pytest.mark.parametrize('name, arch', [('tiny-llama', 'llama'),
                                        ('tiny', 'gpt2')])
@pytest.mark.parametrize('tied', [True, False])
def test_metadata_and_tensors_read_back(tok, tmp_path, name, arch, tied):
    model = model_of(name, tie_weights=tied)
    c = model.config
    path = write_gguf(model, tok, tmp_path / 'm.gguf')
    r, tensors = file_tensors(path)
    field = lambda k: r.get_field(k).contents()  # noqa: E731
    assert field('general.architecture') == arch
    assert field(f'{arch}.block_count') == c.n_layer
    assert field(f'{arch}.embedding_length') == c.n_embd
    assert field(f'{arch}.feed_forward_length') == c.mlp_hidden
    assert field(f'{arch}.attention.head_count') == c.n_head
    assert field(f'{arch}.context_length') == c.block_size
    if arch == 'llama':
        assert field('llama.attention.head_count_kv') == c.n_kv_head
        assert field('llama.rope.dimension_count') == c.head_dim
        assert field('llama.rope.freq_base') == c.rope_base
    assert field('general.file_type') == gguf.LlamaFileType.ALL_F32
    assert field('tokenizer.ggml.model') == 'gpt2'
    assert field('tokenizer.ggml.pre') == 'llama-bpe'
    tokens = field('tokenizer.ggml.tokens')
    assert len(tokens) == c.vocab_size == tok.vocab_size
    assert tokens[ord('a')] == 'a' and tokens[ord(' ')] == 'Ġ'
    assert tokens[-3:] == list(tok.special_tokens)
    assert len(field('tokenizer.ggml.merges')) == len(tok.merges)
    assert field('tokenizer.ggml.eos_token_id') == \
        tok.special_tokens['<|endoftext|>']
    assert field('tokenizer.ggml.add_bos_token') is False
    # names llama.cpp knows for this architecture, shapes, exact values
    assert set(tensors) <= known_names(arch)
    assert ('output.weight' in tensors) == (not tied)
    ours = dict(gguf_tensors(model))
    assert list(tensors) == list(ours)
    for k, t in ours.items():
        assert torch.equal(tensors[k], t.float()), k


@pytest.mark.parametrize('type', ['f16', 'bf16', 'q8_0'])
def test_stored_numbers_are_what_rounded_model_predicts(tok, tmp_path,
                                                        type):
    model = model_of('tiny-llama')
    path = write_gguf(model, tok, tmp_path / 'm.gguf', type)
    r, tensors = file_tensors(path)
    assert r.get_field('general.file_type').contents() == \
        gguf.LlamaFileType['MOSTLY_' + type.upper()]
    for t in r.tensors:
        expect = 'F32' if len(t.shape) == 1 else TYPES[type].name
        assert t.tensor_type.name == expect, t.name
    predicted = dict(gguf_tensors(rounded_model(model, type)))
    for k, t in predicted.items():
        assert torch.equal(tensors[k], t), k
    if type == 'q8_0':  # rounding did change something
        assert not torch.equal(tensors['blk.0.attn_q.weight'],
                               dict(gguf_tensors(model))[
                                   'blk.0.attn_q.weight'])


def test_q8_0_from_scratch_is_ggml_byte_for_byte():
    torch.manual_seed(0)
    w = torch.randn(6, 64)
    w[1, :32] = 0                       # an all-zero block
    w[2, :32] = torch.arange(32) / 2    # halves: rounding ties
    w[3] *= 1e-3
    d, q = q8_0_blocks(w)
    ref = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(q8_0_bytes(d, q).numpy().reshape(ref.shape), ref)
    assert (q.abs() <= 127).all() and (q.abs().amax(-1) == 127).sum() == 11


def test_rope_permutation_makes_adjacent_pairs_equal_ours():
    "Permuted q rows + llama.cpp's adjacent-pair RoPE == ours, reordered."
    torch.manual_seed(0)
    T, n_head, hs, C = 6, 3, 8, 10
    x, wq = torch.randn(T, C), torch.randn(n_head * hs, C)
    cos, sin = rope_cache(T, hs)
    ours = apply_rope((x @ wq.T).view(T, n_head, hs).transpose(0, 1),
                      cos, sin)                          # (nh, T, hs)
    q = (x @ rope_to_gguf(wq, n_head).T).view(T, n_head, hs).transpose(0, 1)
    a, b = q[..., 0::2], q[..., 1::2]
    c, s = cos[:, :hs // 2], sin[:, :hs // 2]
    theirs = torch.stack([a * c - b * s, a * s + b * c], -1).flatten(-2)
    perm = torch.stack([torch.arange(hs // 2),
                        torch.arange(hs // 2) + hs // 2], -1).flatten()
    torch.testing.assert_close(theirs, ours[..., perm])
    assert not torch.allclose(theirs, ours)  # the order did change


# -- bad input ---------------------------------------------------------------

def test_bad_input_is_refused_with_a_clear_message(tok, tmp_path):
    f = tmp_path / 'x.gguf'
    with pytest.raises(ValueError, match='no Hugging Face kind'):
        write_gguf(model_of('tiny-llama', mlp='gelu'), tok, f)
    with pytest.raises(ValueError, match='classifier'):
        write_gguf(model_of('tiny', tie_weights=False, n_classes=2), tok, f)
    with pytest.raises(ValueError, match='rows of 80 weights.*multiple of '
                       '32.*f16 or bf16'):
        write_gguf(model_of('tiny-llama', n_embd=80), tok, f, 'q8_0')
    write_gguf(model_of('tiny-llama', n_embd=80), tok, f, 'f16')  # fine
    with pytest.raises(ValueError, match="type must be one of .*'q4_0'"):
        write_gguf(model_of('tiny-llama'), tok, tmp_path / 'y.gguf', 'q4_0')
    with pytest.raises(ValueError, match='fewer than'):
        write_gguf(model_of('tiny-llama', vocab_size=200), tok,
                   tmp_path / 'y.gguf')
    odd = Tokenizer(tok.ranks, r'\w+|\s+', tok.special_tokens)
    with pytest.raises(ValueError, match='split pattern'):
        write_gguf(model_of('tiny-llama'), odd, tmp_path / 'y.gguf')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['x.gguf']


def test_an_existing_file_is_never_replaced(tok, tmp_path):
    f = tmp_path / 'm.gguf'
    f.write_text('mine')
    with pytest.raises(FileExistsError, match='exists'):
        write_gguf(model_of('tiny-llama'), tok, f)
    assert f.read_text() == 'mine'
    assert [p.name for p in tmp_path.iterdir()] == ['m.gguf']


def test_extra_model_rows_become_unused_tokens(tok, tmp_path):
    path = write_gguf(model_of('tiny-llama', vocab_size=320), tok,
                      tmp_path / 'm.gguf')
    r = gguf.GGUFReader(path)
    tokens = r.get_field('tokenizer.ggml.tokens').contents()
    types = r.get_field('tokenizer.ggml.token_type').contents()
    assert len(tokens) == 320 and tokens[-1] == '[PAD319]'
    assert types[-20:] == [gguf.TokenType.UNUSED] * 20
    assert types[tok.special_tokens['<|endoftext|>']] == \
        gguf.TokenType.CONTROL


def test_a_chat_tokenizer_carries_its_template_and_end(tmp_path):
    from llm_from_scratch.finetuning import CHAT_TEMPLATE, CHAT_TOKENS
    chat = Tokenizer.train(TEXT, 300, special_tokens=('<|endoftext|>',
                                                      *CHAT_TOKENS))
    path = write_gguf(model_of('tiny-llama'), chat, tmp_path / 'm.gguf')
    r = gguf.GGUFReader(path)
    assert r.get_field('tokenizer.chat_template').contents() == \
        CHAT_TEMPLATE
    assert r.get_field('tokenizer.ggml.eos_token_id').contents() == \
        chat.special_tokens['<|end|>']


# -- llama.cpp itself (slow: needs llama-cpp-python, a compiled llama.cpp) --

def llama_cpp():
    return pytest.importorskip(
        'llama_cpp', reason='llama-cpp-python is not installed (it '
        'compiles llama.cpp; see the chapter)')


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    "Two small models trained for a few steps, and their tokenizer."
    llama_cpp()  # skip before training when llama.cpp is missing
    from llm_from_scratch.data import load_tokenizer, prepare_data
    from llm_from_scratch.data import shakespeare
    from llm_from_scratch.training import (TrainConfig, latest_checkpoint,
                                           model_from_checkpoint, train)
    work = tmp_path_factory.mktemp('portable')
    docs = shakespeare()
    prepare_data(docs[:120], work / 'data', vocab_size=400)
    models = {}
    for name in ('tiny-llama', 'tiny'):
        run = TrainConfig(data=str(work / 'data'), out=str(work / name),
                          model=name, block_size=64, batch_size=8,
                          max_steps=60, eval_every=60, eval_batches=1,
                          save_every=60, precision='fp32')
        train(run, progress=False)
        models[name] = model_from_checkpoint(
            latest_checkpoint(run.out)).eval()
    tok = load_tokenizer(work / 'data')
    prompts = [tok.encode(d.text)[:10] for d in docs[200:206]]
    return models, tok, prompts


def ours_greedy(model, ids, n):
    from llm_from_scratch.generation import generate_tokens
    return [int(t) for t in generate_tokens(model, [ids], n, temperature=0)]


@pytest.mark.slow
@pytest.mark.parametrize('name', ['tiny-llama', 'tiny'])
def test_llama_cpp_computes_what_we_compute(trained, tmp_path, name):
    llama_cpp()
    from llm_from_scratch.portable import (llama_cpp_greedy,
                                           llama_cpp_logits, load_llama_cpp)
    models, tok, prompts = trained
    model, n = models[name], 30
    ours = [ours_greedy(model, p, n) for p in prompts]
    for type in ('f32', 'q8_0'):
        path = write_gguf(model, tok, tmp_path / f'{type}.gguf', type)
        llm = load_llama_cpp(path, model.config.block_size)
        theirs = [llama_cpp_greedy(llm, p, n) for p in prompts]
        predicted = rounded_model(model, type, inputs=True)
        diffs = []  # the largest logit difference at each position
        for p, o in zip(prompts, ours):
            seq = p + o
            with torch.no_grad():
                want = predicted(torch.tensor([seq]))[0][0]
            diffs.append((llama_cpp_logits(llm, seq) - want).abs().amax(-1))
        d = torch.cat(diffs)
        # llama: float32 sums in another order; for Q8_0, an activation a
        # float32 hair from a rounding boundary may land on the other side,
        # and later positions read its key and value. gpt2: llama.cpp's
        # GELU reads a float16 table (~1e-3). A wrong layout is off by
        # whole units.
        median, worst = {('tiny-llama', 'f32'): (1e-5, 1e-4),
                         ('tiny-llama', 'q8_0'): (1e-4, 0.3),
                         ('tiny', 'f32'): (1e-3, 1e-3),
                         ('tiny', 'q8_0'): (1e-2, 0.3)}[name, type]
        assert d.median() <= median, (d.median(), type)
        assert d.max() <= worst, (d.max(), type)
        llm.close()
        if type == 'f32':
            assert theirs == ours
        else:  # Q8_0 may flip a near tie; most continuations survive
            same = sum(t == o for t, o in zip(theirs, ours))
            assert same >= len(prompts) // 2, (same, len(prompts))


@pytest.mark.slow
@pytest.mark.parametrize('pattern', [GPT2_PATTERN, GPT4_PATTERN,
                                     LLAMA3_PATTERN])
def test_llama_cpp_tokenizes_like_us(tmp_path, pattern):
    llama_cpp()
    from llama_cpp import Llama
    text = load_corpus()[:150_000]
    tok = Tokenizer.train(text, 600, pattern=pattern)
    path = write_gguf(model_of('tiny-llama', vocab_size=600), tok,
                      tmp_path / 'm.gguf')
    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    samples = [load_corpus()[200_000 + i * 3000:200_000 + (i + 1) * 3000]
               for i in range(20)]
    samples += ["I'm   here\n\n\n  now!! 12345 678", "don't\r\n\tYOU'LL",
                'naïve café — 東京 👋🏽 x', '  leading   spaces  ', '\n',
                'a' * 300, "'S 'll 'VE 3.14159 ___init___ ..."]
    for s in samples:
        assert llm.tokenize(s.encode(), add_bos=False) == tok.encode(s), s
        assert llm.detokenize(tok.encode(s)).decode() == s
    assert PRE_TOKENIZERS[pattern] in ('gpt-2', 'llama-bpe')
