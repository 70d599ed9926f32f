"Chapter 8: conversations, the chat template, packing, and fine-tuning."
import json

import numpy as np
import pytest
import torch

from llm_from_scratch.data import (Doc, load_split, load_tokenizer,
                                   prepare_data, shakespeare, verify_data)
from llm_from_scratch.finetuning import (CHAT_TOKENS, END, ChatLoader,
                                         accuracy, chat_tokenizer,
                                         check_chat, finetune_config,
                                         grow_vocab, pack, prepare_chat,
                                         read_chats, render_chat,
                                         save_chat_tokenizer, task_suite)
from llm_from_scratch.model import GPT, preset
from llm_from_scratch.tokenizer import Tokenizer
from llm_from_scratch.training import (TrainConfig, latest_checkpoint,
                                       model_from_checkpoint, train)

CHATS = [
    [dict(role='system', content='Be brief.'),
     dict(role='user', content='Qui êtes-vous ? 你好 🙂'),
     dict(role='assistant', content='A small model.'),
     dict(role='user', content='And <|end|> this?')],
    [dict(role='user', content='Hi'), dict(role='assistant', content='')],
]


@pytest.fixture(scope='module')
def tok():
    text = '\n'.join(d.text for d in shakespeare()[:20])
    return chat_tokenizer(Tokenizer.train(text, 400))


@pytest.mark.parametrize('generation', [True, False])
def test_template_gives_the_ids_of_transformers(tok, tmp_path, generation):
    transformers = pytest.importorskip('transformers')
    save_chat_tokenizer(tok, tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for chat in CHATS[:1] + [CHATS[0][:3], CHATS[1]]:
        if '<|end|>' in json.dumps(chat):  # theirs renders it special
            chat = [dict(m, content=m['content'].replace('<|end|>', 'x'))
                    for m in chat]
        theirs = hf.apply_chat_template(chat, add_generation_prompt=generation)
        ours, mask = render_chat(tok, chat, generation)
        assert list(theirs['input_ids']) == ours
        assert len(mask) == len(ours)


def test_content_cannot_forge_a_special_token(tok):
    ids, _ = render_chat(tok, CHATS[0])
    assert ids.count(tok.special_tokens[END]) == len(CHATS[0])


def test_mask_covers_exactly_the_answers(tok):
    ids, mask = render_chat(tok, CHATS[0][:3])
    answer = tok.encode_ordinary('A small model.') + [
        tok.special_tokens[END]]
    assert [i for i, m in zip(ids, mask) if m] == answer


def test_masked_positions_contribute_zero_gradient(tok, tmp_path):
    rows = [CHATS[0][:3], CHATS[1]] * 4
    base = tmp_path / 'tok.json'
    Tokenizer(tok.ranks, tok.pattern, {}).save(base)
    prepare_chat({'train': rows, 'val': rows}, base, tmp_path / 'chat',
                 block_size=48)
    x, y = ChatLoader(tmp_path / 'chat', 'train', 4, 48).batch(0)
    torch.manual_seed(0)
    model = GPT(preset('tiny', vocab_size=tok.vocab_size, block_size=48))
    emb = model.tok_emb.weight
    logits, loss = model(x, y)
    (grad,) = torch.autograd.grad(loss, logits)
    assert (y == -1).any() and (y >= 0).any()
    assert grad[y == -1].abs().max() == 0
    assert (grad[y >= 0].abs().sum(-1) > 0).all()
    assert emb.shape[0] == tok.vocab_size


@pytest.mark.parametrize('bad, message', [
    ([], 'non-empty list'),
    ([dict(role='user', content='Hi')], 'no assistant message'),
    ([dict(role='assistant', content='Hi')], "expected system or user"),
    ([dict(role='user', content='a'), dict(role='user', content='b')],
     "expected assistant"),
    ([dict(role='user', content='a'), dict(role='assistant', content='b'),
      dict(role='system', content='c')], 'expected user'),
    ([dict(role='bot', content='a')], "roles are system, user, assistant"),
    ([dict(role='user', content=3)], 'string fields'),
])
def test_bad_conversations_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        check_chat(bad, 'here')


def test_files_of_chats_and_their_errors(tmp_path):
    good = [{'instruction': 'Add', 'input': '2 and 3', 'output': '5'},
            {'messages': CHATS[1]}]
    f = tmp_path / 'chats.jsonl'
    f.write_text('\n'.join(map(json.dumps, good)) + '\n\n')
    chats = read_chats(f)
    assert chats[0][0]['content'] == 'Add\n\n2 and 3' and chats[1] == CHATS[1]
    g = tmp_path / 'chats.json'
    g.write_text(json.dumps(good))
    assert read_chats(g) == chats
    f.write_text(json.dumps(good[0]) + '\n{"messages": [')
    with pytest.raises(ValueError, match=r'chats.jsonl:2: not valid JSON'):
        read_chats(f)
    f.write_text(json.dumps({'text': 'no chat'}))
    with pytest.raises(ValueError, match=r'chats.jsonl:1: neither'):
        read_chats(f)
    f.write_text(json.dumps({'messages': [dict(role='user', content='a')]}))
    with pytest.raises(ValueError, match=r'chats.jsonl:1: no assistant'):
        read_chats(f)


def test_hf_chats_from_local_files(tmp_path):
    pytest.importorskip('datasets')
    from llm_from_scratch.finetuning import hf_chats
    f = tmp_path / 'rows.jsonl'
    f.write_text(json.dumps({'messages': CHATS[1]}))
    assert hf_chats('json', data_files=str(f)) == [CHATS[1]]


def test_task_suite_splits_never_share_a_prompt_or_a_scene():
    suite = task_suite(n=(200, 40, 40))
    assert task_suite(n=(200, 40, 40)) == suite  # seeded
    prompts = {s: [r['messages'][0]['content'] for r in rows]
               for s, rows in suite.items()}
    for s, n in zip(suite, (200, 40, 40)):
        tasks = [r['task'] for r in suite[s]]
        assert {t: tasks.count(t) for t in set(tasks)} == dict(
            reverse=n, count=n, add=n, play=n)
    assert not set(prompts['train']) & set(prompts['test'])
    assert not set(prompts['train']) & set(prompts['val'])
    for r in suite['test']:
        q, a = (m['content'] for m in r['messages'])
        if r['task'] == 'add':
            x, y = map(int, q[8:-1].split(' plus '))
            assert int(a) == x + y
        if r['task'] == 'reverse':
            assert a.split() == q.split(': ')[1].split()[::-1]
    with pytest.raises(ValueError, match='distinct'):
        task_suite(n=(1, 1, 2000), tasks=('add',))  # 1,000 or so exist


def test_pack_keeps_conversations_whole_and_counts_the_long_ones():
    examples = [([1] * 5, [0] * 5), ([2] * 4, [1] * 4), ([3] * 20, [1] * 20),
                ([4] * 3, [0, 1, 1])]
    rows, masks, dropped = pack(examples, 9, pad_id=0)
    assert dropped == 1
    assert rows.tolist() == [[1] * 5 + [2] * 4 + [0], [4] * 3 + [0] * 7]
    assert masks.sum() == 6


def test_prepare_chat_writes_a_verified_folder_and_refuses_others(
        tok, tmp_path):
    base = tmp_path / 'tok.json'
    plain = Tokenizer(tok.ranks, tok.pattern, {})
    plain.save(base)
    out = tmp_path / 'chat'
    long = [dict(role='user', content='word ' * 200),
            dict(role='assistant', content='ok')]
    meta = prepare_chat({'train': [CHATS[1], long], 'val': [CHATS[1]]},
                        base, out, block_size=32)
    assert meta['kind'] == 'chat' and meta['splits']['train']['dropped'] == 1
    assert meta['added_tokens'] == list(CHAT_TOKENS)
    assert verify_data(out)['files'] == 5
    assert load_tokenizer(out).special_tokens == \
        chat_tokenizer(plain).special_tokens
    with pytest.raises(FileExistsError, match='overwrite'):
        prepare_chat({'train': [CHATS[1]]}, base, out, block_size=32)
    prepare_chat({'train': [CHATS[1]], 'val': [CHATS[1]]}, base, out,
                 block_size=32, overwrite=True)
    other = tmp_path / 'mine'
    other.mkdir()
    (other / 'notes.txt').write_text('keep me')
    with pytest.raises(FileExistsError, match='not empty'):
        prepare_chat({'train': [CHATS[1]]}, base, other, block_size=32)
    assert (other / 'notes.txt').read_text() == 'keep me'
    with pytest.raises(ValueError, match='holds rows for block_size 32'):
        ChatLoader(out, 'train', 2, 64)


def test_chat_loader_rows_labels_and_state(tok, tmp_path):
    base = tmp_path / 'tok.json'
    Tokenizer(tok.ranks, tok.pattern, {}).save(base)
    chats = [[dict(role='user', content=f'q{i}'),
              dict(role='assistant', content=f'answer {i}')]
             for i in range(40)]
    prepare_chat({'train': chats, 'val': chats}, base, tmp_path / 'c',
                 block_size=24)
    _, (tokens,) = load_split(tmp_path / 'c', 'train')
    n_rows = len(tokens) // 25
    seq = ChatLoader(tmp_path / 'c', 'train', 2, 24, 'sequential')
    seen = [tuple(seq.batch(s)[0][0].tolist()) for s in range(n_rows)]
    seen += [tuple(seq.batch(s)[0][1].tolist()) for s in range(n_rows)]
    assert len(set(seen)) == n_rows  # every row once per epoch
    a = ChatLoader(tmp_path / 'c', 'train', 2, 24, seed=3)
    for _ in range(3):
        next(a)
    b = ChatLoader(tmp_path / 'c', 'train', 2, 24, seed=3)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(u, v) for u, v in zip(next(a), next(b)))
    x, y = a.batch(7)
    learned = y[:, :-1] >= 0  # y is x shifted by one, where learned
    assert learned.any() and (~learned).any()
    assert torch.equal(y[:, :-1][learned], x[:, 1:][learned])


@pytest.mark.parametrize('tied', [True, False])
def test_grow_vocab_keeps_what_the_model_computed(tok, tied):
    n = tok.vocab_size - len(CHAT_TOKENS)  # the base tokenizer's ids
    torch.manual_seed(0)
    model = GPT(preset('tiny', vocab_size=n, block_size=16,
                       tie_weights=tied))
    grown = grow_vocab(model, tok, CHAT_TOKENS)
    x = torch.tensor([tok.encode_ordinary('Good morrow')])
    assert torch.equal(model(x)[0], grown(x)[0][..., :n])
    rows = grown.tok_emb.weight[n:]
    user = model.tok_emb.weight[tok.encode_ordinary('user')].mean(0)
    assert torch.allclose(rows[1], user)
    assert len({tuple(r.tolist()) for r in rows}) == len(CHAT_TOKENS)
    with pytest.raises(ValueError, match='must take ids'):
        grow_vocab(model, tok, CHAT_TOKENS[::-1])


@pytest.fixture(scope='module')
def base_run(tmp_path_factory):
    "A small base model and a chat folder made from its tokenizer."
    w = tmp_path_factory.mktemp('ft')
    docs = shakespeare()[:40]
    prepare_data(docs, w / 'data', vocab_size=400)
    train(TrainConfig(data=str(w / 'data'), out=str(w / 'base'),
                      block_size=64, batch_size=8, max_steps=10,
                      eval_every=10, eval_batches=1, save_every=10),
          progress=False)
    suite = task_suite(n=(400, 20, 60), tasks=('count',))
    prepare_chat({s: [r['messages'] for r in rows]
                  for s, rows in suite.items()}, w / 'data', w / 'chat',
                 block_size=64)
    return w, suite


def test_finetuned_model_beats_the_base_model(base_run):
    w, suite = base_run
    c = finetune_config(w / 'chat', w / 'base', w / 'sft', max_steps=150,
                        batch_size=16, lr=3e-3, eval_every=150,
                        eval_batches=2)
    log = train(c, progress=False)
    assert log[-1]['val_loss'] < 2.0
    tok = load_tokenizer(w / 'chat')
    base = grow_vocab(model_from_checkpoint(latest_checkpoint(w / 'base')),
                      tok, CHAT_TOKENS)
    sft = model_from_checkpoint(latest_checkpoint(w / 'sft'))
    assert sft.config.vocab_size == tok.vocab_size
    before = accuracy(base, tok, suite['test'])['count']
    after = accuracy(sft, tok, suite['test'])['count']
    assert after > before and after > 1 / 8  # better than a guess of 2..9


def test_finetune_resume_is_exact(base_run):
    w, _ = base_run
    kw = dict(max_steps=6, batch_size=4, eval_every=3, eval_batches=1,
              save_every=3)
    train(finetune_config(w / 'chat', w / 'base', w / 'full', **kw),
          progress=False)
    c = finetune_config(w / 'chat', w / 'base', w / 'cut', **kw)
    train(c, progress=False, stop_after=3)
    train(c, resume=True, progress=False)
    a = model_from_checkpoint(latest_checkpoint(w / 'full')).state_dict()
    b = model_from_checkpoint(latest_checkpoint(w / 'cut')).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# Classification: a head on the last token, trained by chapter 5's loop.

from llm_from_scratch.distributed import export_checkpoint  # noqa: E402
from llm_from_scratch.finetuning import (  # noqa: E402
    as_classifier, class_rows, classify, naive_bayes, nb_classify,
    play_passages, prepare_classes)
from llm_from_scratch.model import ModelConfig, to_hf  # noqa: E402
from llm_from_scratch.training import (  # noqa: E402
    initial_model, make_optimizer, save_checkpoint)

LAND = 'king queen lord crown throne court castle'.split()
SEA = 'ship wave storm sail shore tide anchor'.split()


def toy_passages(n, seed):
    "Texts of land words or of sea words: a labelling any model can learn."
    import random
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label, words = rng.choice([('land', LAND), ('sea', SEA)])
        out.append((' '.join(rng.choice(words)
                             for _ in range(rng.randint(3, 9))), label))
    return out


@pytest.fixture(scope='module')
def toy_run(base_run):
    "A classes folder of the toy labelling and a classifier trained on it."
    w, _ = base_run
    splits = dict(train=toy_passages(300, 0), val=toy_passages(40, 1))
    meta = prepare_classes(splits, w / 'data', w / 'toy', block_size=32)
    c = finetune_config(w / 'toy', w / 'base', w / 'clf', max_steps=40,
                        batch_size=16, lr=3e-3, eval_every=40,
                        eval_batches=2)
    log = train(c, progress=False)
    return w, meta, log


def test_class_folder_rows_hold_one_target_at_the_last_token(toy_run):
    w, meta, _ = toy_run
    assert meta['kind'] == 'classes' and meta['classes'] == ['land', 'sea']
    tok = load_tokenizer(w / 'toy')
    assert tok.vocab_size == load_tokenizer(w / 'data').vocab_size
    verify_data(w / 'toy')
    x, y = ChatLoader(w / 'toy', 'train', 8, 32, 'sequential').batch(0)
    for xs, ys in zip(x, y):
        (t,) = (ys != -1).nonzero()[0].tolist()
        text = tok.decode(xs[:t + 1].tolist())
        assert all(w in LAND + SEA for w in text.split())
        assert ys[t] == (0 if text.split()[0] in LAND else 1)


def test_classifier_loss_has_gradient_only_at_the_last_token(toy_run):
    w, _, _ = toy_run
    x, y = ChatLoader(w / 'toy', 'train', 8, 32).batch(0)
    torch.manual_seed(0)
    model = GPT(preset('tiny', vocab_size=400, block_size=32,
                       n_layer=2))
    clf = as_classifier(model, 2)
    assert not clf.config.tie_weights and clf.lm_head.weight.shape == (2,
                                                                       128)
    assert torch.equal(clf.tok_emb.weight, model.tok_emb.weight)
    logits, loss = clf(x, y)
    assert logits.shape == (8, 32, 2)
    assert abs(loss.item() - np.log(2)) < 1e-6  # a head of zeros
    logits.retain_grad()
    loss.backward()
    moved = logits.grad.abs().sum(-1) > 0
    assert torch.equal(moved, y != -1)
    assert moved.sum(1).tolist() == [1] * 8


def test_classifier_learns_a_separable_labelling(toy_run):
    w, _, log = toy_run
    assert log[-1]['val_loss'] < 0.3
    clf = model_from_checkpoint(latest_checkpoint(w / 'clf'))
    assert clf.config.n_classes == 2
    test = toy_passages(60, 2)
    tok = load_tokenizer(w / 'toy')
    predicted = classify(clf, tok, [t for t, _ in test])
    right = sum(['land', 'sea'][p] == label
                for p, (_, label) in zip(predicted, test))
    assert right / len(test) >= 0.9
    alone = [classify(clf, tok, [t])[0] for t, _ in test[:10]]
    assert alone == predicted[:10]  # right padding changes nothing
    assert not (w / 'clf' / 'samples.txt').exists()  # no text sampled


def test_classifier_checkpoint_round_trips(toy_run, tmp_path):
    w, _, _ = toy_run
    torch.manual_seed(0)
    clf = as_classifier(model_from_checkpoint(latest_checkpoint(
        w / 'base')), 3)
    torch.nn.init.normal_(clf.lm_head.weight)
    opt, sched = make_optimizer(TrainConfig(max_steps=10), clf)
    loader = ChatLoader(w / 'toy', 'train', 2, 32)
    save_checkpoint(tmp_path / 'run', 1, clf, opt, sched, loader)
    back = model_from_checkpoint(latest_checkpoint(tmp_path / 'run'))
    assert back.config == clf.config and back.config.n_classes == 3
    x = torch.randint(0, 400, (2, 20))
    assert torch.equal(back(x)[0], clf(x)[0])


def test_bad_classification_input_is_refused(toy_run, tmp_path):
    w, _, _ = toy_run
    good = toy_passages(10, 3)
    with pytest.raises(ValueError, match=r"val passage 2: label 'air' is "
                                         r"not one of the 2 classes"):
        prepare_classes(dict(train=good, val=[good[0], ('x', 'air')]),
                        w / 'data', tmp_path / 'a')
    with pytest.raises(ValueError, match='classes must be two or more'):
        prepare_classes(dict(train=[(t, 'land') for t, _ in good]),
                        w / 'data', tmp_path / 'b')
    assert not (tmp_path / 'a').exists() and not (tmp_path / 'b').exists()
    with pytest.raises(ValueError, match='n_classes must be 0'):
        ModelConfig(n_classes=1, tie_weights=False)
    with pytest.raises(ValueError, match='needs tie_weights=False'):
        ModelConfig(n_classes=3)
    with pytest.raises(ValueError, match='n_classes must be 0'):
        as_classifier(GPT(preset('tiny', n_layer=1)), 1)
    with pytest.raises(ValueError, match='holds rows for block_size 32'):
        ChatLoader(w / 'toy', 'train', 2, 64)
    lm = model_from_checkpoint(latest_checkpoint(w / 'base'))
    with pytest.raises(ValueError, match='classify needs a classifier'):
        classify(lm, load_tokenizer(w / 'data'), ['king'])
    # a classifier given a folder of another kind: text, not passages
    with pytest.raises(ValueError, match='is a classifier .n_classes=2.: '
                                         'train it on labelled passages'):
        train(TrainConfig(data=str(w / 'data'), init_from=str(w / 'clf'),
                          out=str(tmp_path / 'r'), block_size=32,
                          max_steps=1), progress=False)


def test_a_classifier_is_not_exported_to_hugging_face(toy_run, tmp_path):
    w, _, _ = toy_run
    with pytest.raises(ValueError, match="no place for a classifier's head"):
        export_checkpoint(w / 'clf', tmp_path / 'hf', format='hf')
    assert not (tmp_path / 'hf').exists()
    clf = model_from_checkpoint(latest_checkpoint(w / 'clf'))
    with pytest.raises(ValueError, match='n_classes=2'):
        to_hf(clf, 'gpt2')
    export_checkpoint(w / 'clf', tmp_path / 'ours')  # our format keeps it
    assert (tmp_path / 'ours' / 'model.safetensors').exists()


def test_lora_on_a_classifier_trains_the_new_head(toy_run):
    w, _, _ = toy_run
    c = finetune_config(w / 'toy', w / 'base', w / 'unused', lora_rank=4)
    model = initial_model(c, load_tokenizer(w / 'toy').vocab_size)
    assert model.config.n_classes == 2
    assert model.lm_head.weight.requires_grad
    assert not model.tok_emb.weight.requires_grad


def test_naive_bayes_counts_and_the_play_passages():
    ids = [[0, 0, 1], [2, 2], [0, 1, 1]]
    log_prior, log_p = naive_bayes(ids, [0, 1, 0], 2, 3)
    assert torch.allclose(log_prior.exp(), torch.tensor([2 / 3, 1 / 3]))
    # class 0 saw tokens 0,0,1,0,1,1 -> counts 3, 3, 0 (+1 each) of 9
    assert torch.allclose(log_p[0].exp(), torch.tensor([4, 4, 1]) / 9)
    assert nb_classify((log_prior, log_p), [[2], [0, 1]]) == [1, 0]
    passages = play_passages()
    texts = {s: {t for t, _ in p} for s, p in passages.items()}
    assert not texts['train'] & texts['test']
    suite = task_suite(n=(0, 0, 20), tasks=('play',))
    asked = [r['messages'][0]['content'].split('\n\n', 1)[1]
             for r in suite['test']]
    assert all(q in texts['test'] for q in asked)  # the same scenes


def test_class_rows_leave_out_long_passages_and_count_them(tok):
    rows, masks, dropped = class_rows(
        tok, [('a b', 'x'), ('word ' * 50, 'y'), ('', 'x')], ['x', 'y'], 8)
    assert dropped == 2 and rows.shape == masks.shape == (1, 9)
    n = len(tok.encode_ordinary('a b'))
    assert rows[0, n] == 0 and masks[0].tolist().index(1) == n
