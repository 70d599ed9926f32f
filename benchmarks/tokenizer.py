#!/usr/bin/env python3
"""Tokenizer speed: ours beside Hugging Face `tokenizers`, one run, one machine.

Training: our fast trainer (pure Python) vs `tokenizers`' BpeTrainer (Rust),
same corpus (the embedded Shakespeare), same pre-tokenization (GPT-4 split
pattern, byte level), vocabulary 8192; and our naive trainer against the
fast one on a slice. Encoding: MB/s of our tiktoken-backed path vs
`tokenizers`, at 1 and 2 threads, on the corpus cut two ways: 38 plays
(long documents) and its paragraphs (short ones), since the two libraries
favour different document lengths. Each thread count runs in a fresh
process, because `tokenizers` fixes its thread pool at first use. Our
pure-Python encoder is timed too, for scale.

    python benchmarks/tokenizer.py [--vocab-size 8192] [--repeat 3]
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from llm_from_scratch.tokenizer import (GPT4_PATTERN, SPECIAL_TOKENS,
                                        Tokenizer, corpus_files, load_corpus,
                                        train_fast, train_naive)


def best_of(fn, repeat):
    "Fastest of `repeat` runs of `fn()`: (seconds, last result)."
    best, out = float('inf'), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def hf_trainer(vocab_size):
    "A `tokenizers` BPE model and trainer with our pre-tokenization."
    from tokenizers import Regex, Tokenizer as HF, decoders, models
    from tokenizers import pre_tokenizers, trainers
    hf = HF(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT4_PATTERN), behavior='isolated'),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False)
    return hf, trainer


def bench_training(corpus, vocab_size, repeat):
    ours, tok = best_of(lambda: Tokenizer.train(corpus, vocab_size),
                        repeat)

    def hf_train():
        hf, trainer = hf_trainer(vocab_size)
        hf.train_from_iterator([corpus], trainer=trainer)
        return hf
    theirs, hf = best_of(hf_train, repeat)
    part, n = corpus[:100_000], 200
    naive, _ = best_of(lambda: train_naive(part, n), 1)
    fast, _ = best_of(lambda: train_fast(part, n), repeat)
    return tok, dict(ours=ours, hf=theirs, hf_vocab=hf.get_vocab_size(),
                     naive=naive, fast_slice=fast, slice_chars=len(part),
                     slice_merges=n)


def bench_encoding(tok_path, hf_path, threads, repeat):
    "MB/s of tiktoken (ours) and `tokenizers` at `threads`, in this process."
    from tokenizers import Tokenizer as HF
    tok = Tokenizer.load(tok_path)
    hf = HF.from_file(hf_path)
    plays = [f.read_text(encoding='utf-8') for f in corpus_files()]
    sets = dict(plays=plays, paragraphs='\n\n'.join(plays).split('\n\n'))
    out = dict(threads=threads)
    for name, docs in sets.items():
        mb = sum(len(d.encode()) for d in docs) / 1e6
        t_ours, a = best_of(lambda: tok.tiktoken.encode_ordinary_batch(
            docs, num_threads=threads), repeat)
        t_hf, b = best_of(lambda: [e.ids for e in hf.encode_batch(
            docs, add_special_tokens=False)], repeat)
        assert a == b, 'tiktoken and tokenizers disagree'
        out[name] = dict(ours=mb / t_ours, hf=mb / t_hf, n=len(docs))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--vocab-size', type=int, default=8192)
    ap.add_argument('--repeat', type=int, default=3)
    ap.add_argument('--encode-only', nargs=3, metavar=('TOK', 'HF', 'N'),
                    help=argparse.SUPPRESS)  # internal: one thread count
    args = ap.parse_args()
    if args.encode_only:
        tok_path, hf_path, n = args.encode_only
        print(json.dumps(bench_encoding(tok_path, hf_path, int(n),
                                        args.repeat)))
        return

    corpus = load_corpus()
    mb = len(corpus.encode()) / 1e6
    print(f'machine: {platform.machine()}, {os.cpu_count()} CPUs, '
          f'Python {platform.python_version()}')
    print(f'corpus: embedded Shakespeare, {mb:.2f} MB\n')

    tok, t = bench_training(corpus, args.vocab_size, args.repeat)
    print(f'training, vocab {args.vocab_size} (best of {args.repeat})')
    print(f'  ours (fast trainer, Python)   {t["ours"]:7.2f} s')
    print(f'  HF tokenizers BpeTrainer      {t["hf"]:7.2f} s   '
          f'(vocab {t["hf_vocab"]})')
    print(f'  ratio ours / HF               {t["ours"] / t["hf"]:7.2f} x')
    print(f'  on {t["slice_chars"]:,} chars, {t["slice_merges"]} merges: '
          f'naive {t["naive"]:.2f} s, fast {t["fast_slice"]:.3f} s '
          f'({t["naive"] / t["fast_slice"]:.0f}x)\n')

    with tempfile.TemporaryDirectory() as d:
        tok_path, hf_path = f'{d}/tok.json', f'{d}/tokenizer.json'
        tok.save(tok_path)
        tok.save_hf(hf_path)
        t_py, _ = best_of(lambda: tok.encode_ordinary(corpus), 1)
        print('encoding the corpus (MB/s, higher is better)')
        print(f'  ours, pure Python             {mb / t_py:7.2f}')
        for n in (1, 2):
            env = dict(os.environ, RAYON_NUM_THREADS=str(n))
            out = subprocess.run(
                [sys.executable, __file__, '--repeat', str(args.repeat),
                 '--encode-only', tok_path, hf_path, str(n)],
                env=env, capture_output=True, text=True, check=True)
            r = json.loads(out.stdout)
            for name in ('plays', 'paragraphs'):
                x = r[name]
                print(f'  {n} thread{"s" if n > 1 else " "}, {x["n"]:6,} '
                      f'{name:10s}: ours (tiktoken) {x["ours"]:6.2f}   '
                      f'HF tokenizers {x["hf"]:6.2f}   '
                      f'ratio {x["ours"] / x["hf"]:5.2f}x')


if __name__ == '__main__':
    main()
