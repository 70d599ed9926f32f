"""The data pipeline: shards, metadata, loader, dedup, bad input, the CLI."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from llm_from_scratch.data import (HEADER, BatchLoader, Doc, FolderInUse,
                                   MinHasher, clean_documents, expand_paths,
                                   hf_documents, jaccard, load_split,
                                   load_tokenizer, lock_folder,
                                   near_duplicates, prepare_data,
                                   read_documents, read_shard, shakespeare,
                                   shingles, split_documents, token_dtype,
                                   verify_data, write_shard, write_split)
from llm_from_scratch.data import id_dtype
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
    stream = []  # every rank's windows, in the order they are dealt
    for step in range(2 * n // (B * W) + 1):
        per_rank = [ld._windows(step) for ld in loaders]
        assert [len(p) for p in per_rank] == [B] * W
        stream += [w for group in zip(*per_rank) for w in group]
    everything = {loaders[0]._window(i) for i in range(n)}
    for epoch in stream[:n], stream[n:2 * n]:  # each window exactly once
        assert len(set(epoch)) == n and set(epoch) == everything
    assert stream[:n] != stream[n:2 * n]  # a new order every epoch


def test_sequential_batches_are_full_at_the_end_of_an_epoch():
    "9 windows, 2 ranks of batch 2: the third step crosses the epoch."
    T = 4
    tokens = np.arange(9 * T + 1, dtype=np.uint16)
    for n_tokens in 9 * T + 1, 3 * T + 1:  # an epoch smaller than a step
        loaders = [BatchLoader([tokens[:n_tokens]], 2, T, 'sequential',
                               rank=r, world_size=2) for r in range(2)]
        for step in range(12):
            for ld in loaders:
                x, y = ld.batch(step)
                assert x.shape == y.shape == (2, T)
                assert (x[:, 1:] == y[:, :-1]).all()


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


def test_split_does_not_depend_on_where_the_corpus_lies(tmp_path):
    "Documents are named from the input, so a moved corpus splits alike."
    splits = []
    for where in 'here', 'elsewhere/deeper':
        folder = tmp_path / where / 'texts'
        (folder / 'act').mkdir(parents=True)
        for i in range(40):
            sub = folder / 'act' if i % 2 else folder
            (sub / f'{i:02d}.txt').write_text(f'text {i}')
        docs, _ = read_documents(folder)
        splits.append([d.source for d in split_documents(docs)[1]])
    assert splits[0] == splits[1] and splits[0]
    assert all(s.startswith('texts/') for s in splits[0])
    single, _ = read_documents(tmp_path / 'here' / 'texts' / '00.txt')
    assert single[0].source == '00.txt'


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
    assert [d.source for d in found] == [f'{tmp_path.name}/latin1.txt',
                                         f'{tmp_path.name}/ok.txt']
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


def test_empty_input_folder(tmp_path):
    folder = tmp_path / 'scans'
    folder.mkdir()
    (folder / 'page.pdf').write_bytes(b'%PDF-1.4')
    for read in expand_paths, read_documents:
        with pytest.raises(FileNotFoundError,
                           match=r'scans: no \.txt or \.md files'):
            read(folder)
    with pytest.raises(ValueError, match='no documents to prepare'):
        prepare_data([], tmp_path / 'out')
    assert not (tmp_path / 'out').exists()


def test_prepare_requires_a_validation_split(docs, tmp_path):
    out = tmp_path / 'out'
    for fraction in 0, 1, -0.5:
        with pytest.raises(ValueError, match=f'val_fraction must be .*'
                           f'not {fraction}'):
            prepare_data(docs[:40], out, vocab_size=300,
                         val_fraction=fraction)
    kept, _ = clean_documents(docs[:20])
    assert split_documents(kept)[1] == []  # too few documents for 10%
    with pytest.raises(ValueError, match='raise val_fraction or add '
                       'documents'):
        prepare_data(docs[:20], out, vocab_size=300)
    assert not out.exists()
    assert set(os.listdir(tmp_path)) <= {'.out.lock'}


def test_shard_tokens_must_be_positive(tmp_path):
    tok = Tokenizer.train('to be or not to be ' * 20, 260)
    tok.save(tmp_path / 'tok.json')
    for n in 0, -5:
        message = f'shard_tokens must be at least 1, not {n}'
        with pytest.raises(ValueError, match=message):
            prepare_data([], tmp_path / 'out', shard_tokens=n)
        with pytest.raises(ValueError, match=message):
            write_split([], tmp_path / 'tok.json', tmp_path, 'train',
                        shard_tokens=n)
    assert sorted(os.listdir(tmp_path)) == ['tok.json']


def test_token_ids_never_wrap(docs, tmp_path):
    with pytest.raises(ValueError, match='70000 does not fit in uint16'):
        write_shard(tmp_path / 'x.bin', np.array([5, 70_000]), np.uint16)
    with pytest.raises(ValueError, match='-1 does not fit in uint32'):
        write_shard(tmp_path / 'x.bin', np.array([-1, 7]), np.uint32)
    assert os.listdir(tmp_path) == []
    # the dtype holds the largest id, not just `vocab_size` ids
    gap = SimpleNamespace(vocab=dict.fromkeys(range(300)),
                          special_ids={70_000: '<|endoftext|>'})
    assert id_dtype(gap) == np.uint32
    base = Tokenizer.train('\n'.join(d.text for d in docs[:40]), 300)
    try:  # a separator far above the learned ids
        Tokenizer(base.ranks, base.pattern, {'<|endoftext|>': 70_000},
                  'gap').save(tmp_path / 'gap.json')
        meta = prepare_data(docs[:40], tmp_path / 'out',
                            tokenizer=tmp_path / 'gap.json')
    except ValueError as e:  # the tokenizer itself may refuse such ids
        assert '70000' in str(e) or '70,000' in str(e)
        return
    assert meta['dtype'] == 'uint32'
    for name, split in meta['splits'].items():
        ids = np.concatenate(load_split(tmp_path / 'out', name)[1])
        assert (ids == 70_000).sum() == split['documents']
        assert ids.max() == 70_000


# -- files prepare did not write are never touched ---------------------------

@pytest.fixture(scope='module')
def small(docs, tmp_path_factory):
    "A quickly prepared folder, to copy and damage."
    out = tmp_path_factory.mktemp('small') / 'data'
    return out, prepare_data(docs[:40], out, vocab_size=300)


def copy_of(small, tmp_path):
    shutil.copytree(small[0], tmp_path / 'data')
    return tmp_path / 'data'


def test_overwrite_refuses_a_folder_prepare_did_not_write(docs, tmp_path):
    thesis = tmp_path / 'mythesis'
    thesis.mkdir()
    (thesis / 'chapter1.tex').write_text('It was a dark and stormy night.')
    os.symlink(thesis, tmp_path / 'link')
    work = tmp_path / 'work'
    (work / 'sub').mkdir(parents=True)
    (work / 'notes.txt').write_text('keep me')
    for out in thesis, tmp_path / 'link', work / 'sub' / '..':
        for overwrite in False, True:
            with pytest.raises(FileExistsError, match='no prepared data'):
                prepare_data(docs[:40], out, vocab_size=300,
                             overwrite=overwrite)
    assert (thesis / 'chapter1.tex').read_text().startswith('It was')
    assert (work / 'notes.txt').read_text() == 'keep me'
    with pytest.raises(FileExistsError, match=r'mythesis.*chapter1\.tex'):
        prepare_data(docs[:40], thesis, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ['link', 'mythesis', 'work']
    assert sorted(os.listdir(work)) == ['notes.txt', 'sub']


def test_overwrite_replaces_only_what_prepare_wrote(docs, small, tmp_path):
    out = copy_of(small, tmp_path)
    (tmp_path / 'data.tmp').write_text('a user file with an unlucky name')
    (out / 'notes.txt').write_text('mine')
    with pytest.raises(FileExistsError, match=r'data.*notes\.txt'):
        prepare_data(docs[:40], out, vocab_size=300, overwrite=True)
    assert (out / 'notes.txt').exists()
    os.remove(out / 'notes.txt')
    with pytest.raises(FileExistsError, match='overwrite'):
        prepare_data(docs[:40], out, vocab_size=300)
    meta = prepare_data(docs[:40], out, vocab_size=260, overwrite=True)
    assert meta['tokenizer']['vocab_size'] == 260
    assert load_tokenizer(out).vocab_size == 260
    assert (tmp_path / 'data.tmp').read_text().startswith('a user file')
    assert sorted(os.listdir(tmp_path)) == ['.data.lock', 'data',
                                            'data.tmp']
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask


def test_failed_prepare_keeps_the_old_data(docs, small, tmp_path):
    out = copy_of(small, tmp_path)
    before = sorted(os.listdir(out))
    with pytest.raises(FileNotFoundError):
        prepare_data(docs[:40], out, tokenizer=tmp_path / 'missing.json',
                     overwrite=True)
    assert sorted(os.listdir(out)) == before
    assert verify_data(out)['files'] == len(before) - 1
    assert sorted(os.listdir(tmp_path)) == ['.data.lock', 'data']


# -- one process at a time ---------------------------------------------------

HOLD = ('import sys, time\n'
        'from llm_from_scratch.data import lock_folder\n'
        'with lock_folder(sys.argv[1]):\n'
        '    print("locked", flush=True)\n'
        '    time.sleep(120)\n')


def test_a_locked_folder_is_refused_at_once(docs, tmp_path):
    out = tmp_path / 'data'
    holder = subprocess.Popen([sys.executable, '-c', HOLD, str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        t0 = time.perf_counter()
        with pytest.raises(FolderInUse) as e:
            prepare_data(docs[:40], out, vocab_size=300)
        assert time.perf_counter() - t0 < 5
        assert str(e.value) == (
            f'{out} is in use by another process (pid {holder.pid}): '
            f'wait for it to finish or choose another folder')
        assert isinstance(e.value, RuntimeError)
        assert sorted(os.listdir(tmp_path)) == ['.data.lock']
    finally:
        holder.kill()  # SIGKILL: the system releases the lock
        holder.wait()
    with lock_folder(out) as folder:
        assert folder == out.resolve()
        assert (tmp_path / '.data.lock').read_text().strip() == \
            str(os.getpid())


RACE = ('import sys, time, pathlib\n'
        'from llm_from_scratch.data import prepare_data, shakespeare\n'
        'docs = shakespeare()[:40]\n'
        'print("ready", flush=True)\n'
        'go = pathlib.Path(sys.argv[2])\n'
        'while not go.exists():\n'
        '    time.sleep(0.001)\n'
        'try:\n'
        '    prepare_data(docs, sys.argv[1], vocab_size=300)\n'
        'except Exception as e:\n'
        '    print(type(e).__name__, e)\n'
        '    sys.exit(1)\n')


def test_two_prepares_into_one_folder(tmp_path):
    out, go = tmp_path / 'data', tmp_path / 'go'
    runs = [subprocess.Popen([sys.executable, '-c', RACE, str(out),
                              str(go)], stdout=subprocess.PIPE, text=True)
            for _ in range(2)]
    for r in runs:
        assert r.stdout.readline().strip() == 'ready'
    go.touch()
    results = [(r.wait(timeout=300), r.stdout.read()) for r in runs]
    assert sorted(code for code, _ in results) == [0, 1]
    failure = next(text for code, text in results if code)
    assert failure.startswith('FolderInUse') and \
        'is in use by another process' in failure
    meta = json.loads((out / 'metadata.json').read_text())
    for split in meta['splits'].values():
        for s in split['shards']:
            digest = hashlib.sha256((out / s['file']).read_bytes())
            assert digest.hexdigest() == s['sha256']
    assert verify_data(out)['files'] == len(os.listdir(out)) - 1


# -- what reading checks -----------------------------------------------------

def edit_metadata(folder, change):
    meta = json.loads((folder / 'metadata.json').read_text())
    change(meta)
    (folder / 'metadata.json').write_text(json.dumps(meta))


def test_file_names_stay_inside_the_folder(small, tmp_path):
    out = copy_of(small, tmp_path)
    first = out / small[1]['splits']['train']['shards'][0]['file']
    (tmp_path / 'elsewhere').mkdir()
    shutil.copy(first, tmp_path / 'elsewhere' / 'x.bin')
    bad_names = ['../elsewhere/x.bin', str(tmp_path / 'elsewhere/x.bin'),
                 '..', '', 'sub\\x.bin']
    for name in bad_names:
        def rename(meta):
            meta['splits']['train']['shards'][0]['file'] = name
        shutil.copy(small[0] / 'metadata.json', out / 'metadata.json')
        edit_metadata(out, rename)
        with pytest.raises(ValueError, match='not a plain file name'):
            load_split(out, 'train')
        with pytest.raises(ValueError, match='not a plain file name'):
            verify_data(out)
    shutil.copy(small[0] / 'metadata.json', out / 'metadata.json')
    edit_metadata(out, lambda m: m['tokenizer'].update(file='../t.json'))
    with pytest.raises(ValueError, match='not a plain file name'):
        load_tokenizer(out)


def test_a_zeroed_shard_is_caught_by_verification(small, tmp_path):
    out = copy_of(small, tmp_path)
    name = small[1]['splits']['val']['shards'][0]['file']
    raw = bytearray((out / name).read_bytes())
    raw[HEADER.size:] = bytes(len(raw) - HEADER.size)  # header intact
    (out / name).write_bytes(raw)
    load_split(out, 'val')  # header and size are fine
    load_split(out, 'train', verify=True)  # the other split is fine
    for check in (lambda: load_split(out, 'val', verify=True),
                  lambda: verify_data(out)):
        with pytest.raises(ValueError, match=f'{name}.*prepare the data '
                           f'again'):
            check()


def test_a_swapped_tokenizer_is_refused(docs, small, tmp_path):
    out = copy_of(small, tmp_path)
    assert load_tokenizer(out).vocab_size == 300
    other = Tokenizer.train('\n'.join(d.text for d in docs[40:60]), 300)
    other.save(out / 'tokenizer.json')
    for check in (lambda: load_tokenizer(out), lambda: verify_data(out)):
        with pytest.raises(ValueError, match='tokenizer.json.*prepare the '
                           'data again'):
            check()


def test_verify_data_summary(small):
    out, meta = small
    files = [s['file'] for part in meta['splits'].values()
             for s in part['shards']] + ['tokenizer.json']
    summary = verify_data(out)
    assert summary['files'] == len(files)
    assert summary['bytes'] == sum((out / f).stat().st_size for f in files)
    assert summary['tokens'] == sum(p['tokens']
                                    for p in meta['splits'].values())
