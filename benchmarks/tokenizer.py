#!/usr/bin/env python3
"""Tokenizer speed: ours beside Hugging Face `tokenizers`, in one run.

Training: our fast trainer (pure Python) vs `tokenizers`' BpeTrainer (Rust),
on one thread each (RAYON_NUM_THREADS=1, TOKENIZERS_PARALLELISM=false,
OMP_NUM_THREADS=1), same corpus (the embedded Shakespeare, `--copies` times
over), same pre-tokenization (GPT-4 split pattern, byte level), same
vocabulary size (8192 by default, special tokens included). The two are
timed in turns, `--repeat` times each, and we print the minimum, median
and maximum of the wall-clock time and of the CPU time (the CPU time is
what a busy machine disturbs least). Both are timed again at vocabulary
260, one merge, which leaves the fixed cost of splitting the text and
counting the chunks. Then our naive trainer against the fast one on a
slice.

Encoding: MB/s of our tiktoken-backed path vs `tokenizers`, at 1 and 2
threads, on the corpus cut two ways: 38 plays (long documents) and its
paragraphs (short ones), since the two libraries favour different document
lengths. Each thread count runs in a fresh process, because `tokenizers`
fixes its thread pool at first use. Our pure-Python encoder is timed too,
for scale. `--train-only` skips this part.

    python benchmarks/tokenizer.py [--vocab-size 8192] [--repeat 5]
                                   [--copies 1] [--train-only]
"""
import os

# one thread for everything timed in this process; set before the imports
os.environ.update(RAYON_NUM_THREADS='1', TOKENIZERS_PARALLELISM='false',
                  OMP_NUM_THREADS='1')

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import regex  # noqa: E402

from llm_from_scratch.tokenizer import (GPT4_PATTERN,  # noqa: E402
                                        SPECIAL_TOKENS, Tokenizer,
                                        corpus_files, load_corpus,
                                        train_fast, train_naive)


def cpu_model():
    "The CPU's model name from /proc/cpuinfo, or what `platform` knows."
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn):
    "(wall seconds, CPU seconds of this process, result) of one `fn()`."
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def best_of(fn, repeat):
    "Fastest of `repeat` runs of `fn()`: (seconds, last result)."
    best, out = float('inf'), None
    for _ in range(repeat):
        t, _, out = timed(fn)
        best = min(best, t)
    return best, out


def spread(xs):
    "'min / median / max' of `xs`, in seconds."
    return (f'{min(xs):6.2f} {statistics.median(xs):6.2f} '
            f'{max(xs):6.2f}')


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
    "Times of our trainer and `tokenizers`', taken in turns."
    def hf_train():
        hf, trainer = hf_trainer(vocab_size)
        hf.train_from_iterator([corpus], trainer=trainer)
        return hf
    runs = dict(ours=([], []), hf=([], []))
    for _ in range(repeat):
        for name, fn in (('ours', lambda: Tokenizer.train(corpus,
                                                          vocab_size)),
                         ('hf', hf_train)):
            wall, cpu, out = timed(fn)
            runs[name][0].append(wall)
            runs[name][1].append(cpu)
            if name == 'ours':
                tok = out
            else:
                hf_vocab = out.get_vocab_size()
    split, _, _ = timed(lambda: regex.findall(GPT4_PATTERN, corpus))
    return tok, runs, hf_vocab, split


def bench_slice(corpus, repeat):
    "Naive against fast trainer on the first 100,000 characters."
    part, n = corpus[:100_000], 200
    naive, plain = best_of(lambda: train_naive(part, n), 1)
    fast, quick = best_of(lambda: train_fast(part, n), repeat)
    assert plain == quick, 'the two trainers disagree'
    return naive, fast, len(part), n


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


def print_training(args, mb, tok, runs, hf_vocab, split):
    (ow, oc), (hw, hc) = runs['ours'], runs['hf']
    print(f'training, vocab {args.vocab_size}, {mb:.1f} MB, one thread, '
          f'{args.repeat} runs each (seconds: min median max)')
    print(f'  ours (fast trainer, Python)  wall {spread(ow)}   '
          f'CPU {spread(oc)}')
    print(f'  HF tokenizers BpeTrainer     wall {spread(hw)}   '
          f'CPU {spread(hc)}   (vocab {hf_vocab})')
    print(f'  ratio ours / HF, medians     wall '
          f'{statistics.median(ow) / statistics.median(hw):6.2f}x  '
          f'      CPU {statistics.median(oc) / statistics.median(hc):6.2f}x')
    print(f'  of ours: splitting the text with the pattern {split:.2f} s '
          f'wall (one run); our vocab {tok.vocab_size}')


def print_encoding(args, corpus, mb, tok):
    with tempfile.TemporaryDirectory() as d:
        tok_path, hf_path = f'{d}/tok.json', f'{d}/tokenizer.json'
        tok.save(tok_path)
        tok.save_hf(hf_path)
        t_py, _ = best_of(lambda: tok.encode_ordinary(corpus), 1)
        print('encoding the corpus (MB/s, higher is better)')
        print(f'  ours, pure Python             {mb / t_py:7.2f}')
        for n in (1, 2):
            env = dict(os.environ, RAYON_NUM_THREADS=str(n),
                       TOKENIZERS_PARALLELISM='true')
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--vocab-size', type=int, default=8192)
    ap.add_argument('--repeat', type=int, default=5)
    ap.add_argument('--copies', type=int, default=1,
                    help='train on the corpus this many times over')
    ap.add_argument('--train-only', action='store_true',
                    help='skip the encoding measurements')
    ap.add_argument('--encode-only', nargs=3, metavar=('TOK', 'HF', 'N'),
                    help=argparse.SUPPRESS)  # internal: one thread count
    args = ap.parse_args()
    if args.encode_only:
        tok_path, hf_path, n = args.encode_only
        print(json.dumps(bench_encoding(tok_path, hf_path, int(n),
                                        args.repeat)))
        return
    if args.repeat < 1 or args.copies < 1:
        ap.error('--repeat and --copies must be at least 1')

    import tokenizers
    corpus = '\n\n'.join([load_corpus()] * args.copies)
    mb = len(corpus.encode()) / 1e6
    print(f'machine: {cpu_model()}, {os.cpu_count()} CPUs, load average '
          f'{os.getloadavg()[0]:.2f} at the start')
    print(f'Python {platform.python_version()}, tokenizers '
          f'{tokenizers.__version__}')
    print(f'corpus: embedded Shakespeare x {args.copies}, {mb:.2f} MB\n')

    tok, runs, hf_vocab, split = bench_training(corpus, args.vocab_size,
                                                args.repeat)
    print_training(args, mb, tok, runs, hf_vocab, split)
    _, fixed, _, _ = bench_training(corpus, 260, args.repeat)
    fo, fh = (statistics.median(fixed[k][1]) for k in ('ours', 'hf'))
    mo, mh = (statistics.median(runs[k][1]) for k in ('ours', 'hf'))
    print(f'  vocab 260 (one merge: splitting and counting, nearly all), '
          f'median CPU: ours {fo:.2f} s, HF {fh:.2f} s')
    print(f'  so the merges alone (difference of the medians), CPU: '
          f'ours {mo - fo:.2f} s, HF {mh - fh:.2f} s\n')
    naive, fast, chars, n = bench_slice(corpus, args.repeat)
    print(f'on {chars:,} chars, {n} merges: naive {naive:.2f} s, fast '
          f'{fast:.3f} s ({naive / fast:.0f}x), same merges\n')
    if not args.train_only:
        print_encoding(args, corpus, mb, tok)


if __name__ == '__main__':
    main()
