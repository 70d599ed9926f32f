"""The data pipeline: shards, metadata, loader, dedup, bad input, the CLI."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llm_from_scratch.data import (HEADER, BatchLoader, Doc, MinHasher,
                                   clean_documents, hf_documents, jaccard,
                                   load_split, near_duplicates,
                                   prepare_data, read_documents, read_shard,
                                   shakespeare, shingles, split_documents,
                                   token_dtype, write_shard)
from llm_from_scratch.tokenizer import Tokenizer


@pytest.fixture(scope='module')
def docs():
    return shakespeare()


@pytest.fixture(scope='module')
def prepared(docs, tmp_path_factory):
    "The embedded corpus prepared with a small tokenizer and small shards."
    out = tmp_path_factory.mktemp('data') / 'shakespeare'
    meta = prepare_data(docs, out, vocab_size=1024, processes=2,
                        shard_tokens=200_000)
    return out, meta


# -- text -> shards -> tokens -> text ----------------------------------------

def test_round_trip(docs, prepared):
    out, meta = prepared
    tok = Tokenizer.load(out / 'tokenizer.json')
    kept, _ = clean_documents(docs)
    train, val = split_documents(kept)
    eot = '<|endoftext|>'
    for name, part in [('train', train), ('val', val)]:
        _, shards = load_split(out, name)
        assert len(shards) == len(meta['splits'][name]['shards'])
        ids = np.concatenate(shards).tolist()
        assert tok.decode(ids) == ''.join(eot + d.text for d in part)
    assert len(meta['splits']['train']['shards']) > 1  # really sharded


def test_one_and_two_processes_write_the_same_tokens(docs, tmp_path):
    part = docs[:40]
    a = prepare_data(part, tmp_path / 'a', vocab_size=600, processes=1)
    b = prepare_data(part, tmp_path / 'b', vocab_size=600, processes=2)
    assert [s['sha256'] for s in a['splits']['train']['shards']] == \
        [s['sha256'] for s in b['splits']['train']['shards']]


def test_metadata_records_the_run(prepared):
    out, meta = prepared
    on_disk = json.loads((out / 'metadata.json').read_text())
    assert on_disk == meta
    assert meta['tokenizer']['vocab_size'] == 1024
    assert meta['dtype'] == 'uint16'
    assert meta['cleaning'][-1][0] == 'documents kept'


# -- shard headers and metadata ----------------------------------------------

def test_header_validation(tmp_path):
    good = tmp_path / 'good.bin'
    write_shard(good, np.arange(100, dtype=np.uint32))
    assert read_shard(good).dtype == np.dtype('<u4')
    raw = good.read_bytes()
    cases = {'magic': b'NOTTOKS!' + raw[8:],
             'version': raw[:8] + (9).to_bytes(4, 'little') + raw[12:],
             'truncated': raw[:-10], 'empty': b''}
    messages = {'magic': 'wrong magic', 'version': 'version 9',
                'truncated': 'truncated', 'empty': 'wrong magic'}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=messages[name]):
            read_shard(tmp_path / name)
    assert HEADER.size == 32


def test_metadata_that_does_not_match_its_shards(prepared, tmp_path):
    out, _ = prepared
    copy = tmp_path / 'copy'
    shutil.copytree(out, copy)
    meta = json.loads((copy / 'metadata.json').read_text())
    meta['splits']['train']['shards'][0]['tokens'] += 1
    (copy / 'metadata.json').write_text(json.dumps(meta))
    with pytest.raises(ValueError, match='does not match'):
        load_split(copy, 'train')
    os.remove(copy / meta['splits']['val']['shards'][0]['file'])
    with pytest.raises(FileNotFoundError, match='missing'):
        load_split(copy, 'val')
    with pytest.raises(FileNotFoundError, match='no metadata.json'):
        load_split(tmp_path / 'nowhere')
    with pytest.raises(KeyError, match="no split 'test'"):
        load_split(out, 'test')


def test_vocab_too_large_for_dtype():
    assert token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.uint32
    with pytest.raises(ValueError, match='does not fit in uint16'):
        token_dtype(100_000, 'uint16')


# -- the loader --------------------------------------------------------------

def test_targets_are_inputs_shifted(prepared):
    _, shards = load_split(prepared[0], 'train')
    x, y = BatchLoader(shards, 8, 128).batch(0)
    assert x.shape == y.shape == (8, 128)
    assert (x[:, 1:] == y[:, :-1]).all()


def test_ranks_are_disjoint_and_cover_the_epoch(prepared):
    _, shards = load_split(prepared[0], 'train')
    B, T, W = 4, 256, 2
    loaders = [BatchLoader(shards, B, T, 'sequential', seed=3, rank=r,
                           world_size=W) for r in range(W)]
    n = loaders[0].n_windows
    steps = -(-n // (B * W))
    seen = [[w for s in range(steps) for w in ld._windows(s)]
            for ld in loaders]
    assert not set(seen[0]) & set(seen[1])
    everything = {loaders[0]._window(i) for i in range(n)}
    assert set(seen[0]) | set(seen[1]) == everything
    assert len(seen[0]) + len(seen[1]) == n  # each window exactly once


def test_random_mode_ranks_are_disjoint(prepared):
    _, shards = load_split(prepared[0], 'train')
    a, b = [BatchLoader(shards, 16, 64, rank=r, world_size=2)
            for r in range(2)]
    for step in range(5):
        assert not set(a._windows(step)) & set(b._windows(step))


@pytest.mark.parametrize('mode', ['random', 'sequential'])
def test_loader_resumes_exactly(prepared, mode):
    _, shards = load_split(prepared[0], 'train')
    first = BatchLoader(shards, 4, 64, mode, seed=7)
    for _ in range(13):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint
    expected = [next(first) for _ in range(3)]
    second = BatchLoader(shards, 4, 64, mode, seed=7)
    second.load_state_dict(state)
    for x, y in expected:
        x2, y2 = next(second)
        assert (x == x2).all() and (y == y2).all()
    with pytest.raises(ValueError, match='seed'):
        BatchLoader(shards, 4, 64, mode, seed=8).load_state_dict(state)


def test_loader_bad_settings(prepared):
    _, shards = load_split(prepared[0], 'train')
    with pytest.raises(ValueError, match='rank 2'):
        BatchLoader(shards, 4, 64, rank=2, world_size=2)
    with pytest.raises(ValueError, match='block_size'):
        BatchLoader(shards, 4, 10**9)
    with pytest.raises(ValueError, match='mode'):
        BatchLoader(shards, 4, 64, mode='shuffled')


# -- MinHash and deduplication -----------------------------------------------

@pytest.mark.parametrize('overlap', [0.1, 0.3, 0.5, 0.7, 0.9])
def test_minhash_estimates_jaccard(overlap):
    "Constructed sets with known Jaccard; 256 hashes: error < 0.08."
    n = 2000
    shared = int(round(2 * n * overlap / (1 + overlap)))
    ids = np.arange(3 * n, dtype=np.uint64) * 2654435761 % (2**32)
    a, b = ids[:n], np.concatenate([ids[:shared], ids[n:2 * n - shared]])
    true = jaccard(a.tolist(), b.tolist())
    assert abs(true - overlap) < 0.01
    mh = MinHasher(256, seed=1)
    assert abs(np.mean(mh(a) == mh(b)) - true) < 0.08


def test_planted_near_duplicates_are_found(docs):
    rng = np.random.default_rng(0)
    long_docs = [d for d in docs if len(d.text.split()) > 800]
    planted = []
    for i in rng.choice(len(long_docs), 8, replace=False):
        words = long_docs[i].text.split()
        for j in rng.choice(len(words), len(words) // 100, replace=False):
            words[j] = 'anon'  # 1% of the words changed
        copy = ' '.join(words)
        # well above the 0.8 threshold, so sampling error cannot hide it
        assert jaccard(shingles(copy).tolist(),
                       shingles(long_docs[i].text).tolist()) > 0.85
        planted.append(Doc(copy, 'planted'))
    corpus = list(docs) + planted
    mh = MinHasher(128)
    dups = near_duplicates([mh(shingles(d.text)) for d in corpus])
    assert set(dups) == set(range(len(docs), len(corpus)))


def test_clean_documents_reports_each_step(docs):
    extra = [docs[3], Doc('Exeunt.', 'short')]
    kept, report = clean_documents(list(docs) + extra)
    steps = dict((name, n) for name, n, _ in report)
    assert steps['exact duplicates'] == -1
    assert steps['documents read'] == len(docs) + 2
    assert steps['documents kept'] == len(kept)
    assert sum(n for name, n, _ in report[1:-1]) == len(kept) - \
        steps['documents read']


def test_split_is_deterministic_and_disjoint(docs):
    train, val = split_documents(docs, 0.2, seed=1)
    assert {d.source for d in train}.isdisjoint(d.source for d in val)
    assert len(train) + len(val) == len(docs)
    assert split_documents(docs[::-1], 0.2, seed=1)[1] == val[::-1]
    assert split_documents(docs, 0.2, seed=2)[1] != val
    with pytest.raises(ValueError, match='val_fraction'):
        split_documents(docs, 1.0)


# -- reading files: the error policy -----------------------------------------

def test_read_documents_errors(tmp_path):
    (tmp_path / 'ok.txt').write_text('Double, double toil and trouble.')
    (tmp_path / 'empty.txt').write_text('  \n')
    (tmp_path / 'latin1.txt').write_bytes('café'.encode('latin-1'))
    with pytest.raises(FileNotFoundError, match='missing.txt'):
        read_documents(tmp_path / 'missing.txt')
    with pytest.raises(FileNotFoundError, match='no file matches'):
        read_documents(str(tmp_path / '*.nope'))
    with pytest.raises(ValueError, match='empty.txt: the file is empty'):
        read_documents(tmp_path / 'empty.txt')
    with pytest.raises(ValueError, match="latin1.txt: not UTF-8.*replace"):
        read_documents(tmp_path / 'latin1.txt')
    found, skipped = read_documents(tmp_path, errors='replace',
                                    skip_empty=True)
    assert [Path(d.source).name for d in found] == ['latin1.txt', 'ok.txt']
    assert found[0].text == 'caf\ufffd'
    assert [Path(s).name for s in skipped] == ['empty.txt']


def test_hf_documents_from_local_files(tmp_path):
    rows = [{'body': f'row {i}'} for i in range(5)]
    path = tmp_path / 'rows.jsonl'
    path.write_text('\n'.join(map(json.dumps, rows)))
    got = list(hf_documents('json', text_field='body', limit=3,
                            data_files=str(path)))
    assert [d.text for d in got] == ['row 0', 'row 1', 'row 2']
    with pytest.raises(KeyError, match="no field 'text'"):
        list(hf_documents('json', data_files=str(path)))


def test_prepare_refuses_to_overwrite(docs, prepared):
    out, _ = prepared
    with pytest.raises(FileExistsError, match='overwrite'):
        prepare_data(docs[:5], out)


# -- the command line --------------------------------------------------------

def cli(*args, **kw):
    exe = Path(sys.executable).parent / 'llm-from-scratch'
    return subprocess.run([str(exe), *map(str, args)], capture_output=True,
                          text=True, **kw)


def test_cli_help_and_errors():
    r = cli('--help')
    assert r.returncode == 0 and 'prepare' in r.stdout
    r = cli('prepare', '--help')
    assert r.returncode == 0 and '--vocab_size' in r.stdout
    r = cli('nonsense')
    assert r.returncode == 2 and 'unknown command' in r.stderr


def test_cli_prepare_on_own_files(tmp_path, docs):
    src = tmp_path / 'texts'
    src.mkdir()
    for i, d in enumerate(docs[:30]):
        (src / f'{i:02d}.txt').write_text(d.text)
    out = tmp_path / 'out'
    r = cli('prepare', '--input', src, '--out', out, '--vocab_size', 500,
            '--processes', 1)
    assert r.returncode == 0, r.stderr
    meta, shards = load_split(out, 'train')
    assert meta['source'] == str(src) and sum(map(len, shards)) > 0
    r = cli('prepare', '--input', src, '--out', out)
    assert r.returncode != 0 and 'overwrite' in r.stderr
