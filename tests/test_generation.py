"""Generation: cache == recompute, parity with transformers, sampling rules."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm_from_scratch.attention import KVCache
from llm_from_scratch.generation import (filter_logits, generate,
                                         left_pad, next_token, stream_text)
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
    transformers = pytest.importorskip('transformers')
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
])
def test_bad_sampling_settings(kw, message):
    with pytest.raises(ValueError, match=message):
        generate(model_of('tiny'), PROMPTS, 5, **kw)


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


def test_cli_generate_from_a_run(tmp_path):
    from llm_from_scratch.data import prepare_data, shakespeare
    from llm_from_scratch.training import TrainConfig, train
    prepare_data(shakespeare()[:40], tmp_path / 'data', vocab_size=400,
                 processes=1)
    train(TrainConfig(data=str(tmp_path / 'data'), out=str(tmp_path / 'run'),
                      block_size=32, batch_size=4, max_steps=3,
                      warmup_steps=1, eval_every=3, eval_batches=1),
          progress=False)
    exe = Path(sys.executable).parent / 'llm-from-scratch'
    r = subprocess.run([str(exe), 'generate', '--checkpoint',
                        str(tmp_path / 'run'), '--prompt', 'ROMEO:',
                        '--max_new_tokens', '10', '--seed', '1'],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith('ROMEO:')
    r = subprocess.run([str(exe), 'generate', '--checkpoint',
                        str(tmp_path / 'run'), '--max_new_tokens', '500'],
                       capture_output=True, text=True)
    assert r.returncode != 0 and 'exceeds the context' in r.stderr
