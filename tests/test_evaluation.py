"""Chapter 10: parity with lm-evaluation-harness, the task formats, bad input.

The parity tests run the real `lm_eval` package (offline) on a small trained
model exported to a Hugging Face folder, on local task files, and compare
every per-item log-likelihood, every answer and every generated text with
ours.
"""
import dataclasses
import itertools
import json
import math
import os
from pathlib import Path

os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')

import numpy as np
import pytest
import torch

from llm_from_scratch.data import (corpus_files, load_split, load_tokenizer,
                                   play_documents, prepare_data)
from llm_from_scratch.distributed import export_checkpoint
from llm_from_scratch.evaluation import (
    HUB, PLAY_TASKS, Task, centred, complete_word_task, contamination,
    continuation_logprobs, encode_pair, evaluate_task, extract,
    generate_answers, lm_scores, load_task, next_line_task, next_word_task,
    ngram_hashes, pass_at_k, read_task, score_item, split_plays,
    split_results, to_lm_eval, windows, write_task)
from llm_from_scratch.evaluation import _WORD
from llm_from_scratch.training import (TrainConfig, latest_checkpoint,
                                       model_from_checkpoint, train)

BLOCK = 64
# items that exercise the harness's rules: an empty query (the prefix
# token), trailing spaces (moved to the continuation), a query longer than
# the context (cut from the left), non-ASCII text (characters, not bytes,
# for acc_norm), 2 to 5 choices of very different lengths
EDGE_ITEMS = [
    dict(query='', choices=['Enter MACBETH.', 'Exeunt.'], gold=0),
    dict(query='What say you, my lord? ', choices=['Ay.', 'No, sir.',
                                                   'I will not.'], gold=2),
    dict(query='O, ' * 60 + 'what a rogue', choices=[
        'and peasant slave am I!', 'am I', 'the', 'of the king'], gold=0),
    dict(query='Thou art a naïve fool,', choices=[
        ' café.', 'sirrah, and a knave.', 'é', 'and thou wilt die.',
        'so.'], gold=1),
    dict(query='Good morrow,', choices=['sir.', 'good my lord.'], gold=1),
]
# rows in the published schemas, as the hub datasets hold them
HELLASWAG = [
    dict(ind=1, activity_label='Fencing', ctx_a='Two men in doublets face '
         'each other with rapiers.', ctx_b='they', ctx='', source_id='s',
         split='val', split_type='indomain', label='0',
         endings=['bow, then cross blades [title] and circle.',
                  'eat a pie.', 'sing  to the moon [header].', 'sleep.']),
    dict(ind=2, activity_label='Sailing', ctx_a='A storm breaks over a '
         'ship.', ctx_b='THE master', ctx='', source_id='s', split='val',
         split_type='indomain', label='2',
         endings=['reads.', 'paints a wall.', 'calls the boatswain.',
                  'sleeps.'])]
ARC = [
    dict(id='a1', question='Who rules the island in The Tempest?',
         choices=dict(text=['Prospero', 'Hamlet', 'Falstaff'],
                      label=['A', 'B', 'C']), answerKey='A'),
    dict(id='a2', question='What does Macbeth see before him?',
         choices=dict(text=['a dagger', 'a ship', 'a crown', 'a ghost'],
                      label=['1', '2', '3', '4']), answerKey='4')]
MMLU = [
    dict(question=' Which of these is a tragedy? ', subject='english_drama',
         choices=['Hamlet', 'Twelfth Night', 'As You Like It', 'Cymbeline'],
         answer=0),
    dict(question='Who wrote Hamlet?', subject='english_drama',
         choices=['Marlowe', 'Jonson', 'Shakespeare', 'Kyd'], answer=2)]
GSM8K = [
    dict(question='Viola has 3 rings and gets 4 more. How many rings?',
         answer='3 + 4 = <<3+4=7>>7\n#### 7'),
    dict(question='O, ' * 40 + 'how many is 1,000 and 200?',
         answer='1,000 + 200 = 1,200\n#### 1,200'),
    dict(question='Naïve café: 2 * 3?', answer='#### 6')]
# generative queries: a long one (cut from the left to leave room for the
# answer), non-ASCII text, an empty-looking one
GEN_QUERIES = ['I will not', 'O, ' * 60 + 'what a rogue', 'Thou art a naïve',
               'Good morrow,', '\n', 'MACBETH.\nIs this a dagger']


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    "A small model trained a little, its tokenizer and its HF export."
    work = tmp_path_factory.mktemp('eval')
    docs = [d for f in corpus_files()[:2] for d in play_documents(f)]
    prepare_data(docs, work / 'data', vocab_size=300)
    run = TrainConfig(data=str(work / 'data'), out=str(work / 'run'),
                      block_size=BLOCK, batch_size=8, max_steps=30,
                      eval_every=30, eval_batches=2, save_every=30)
    train(run, progress=False)
    export_checkpoint(run.out, work / 'hf', format='hf')
    model = model_from_checkpoint(latest_checkpoint(run.out)).eval()
    return work, model, load_tokenizer(work / 'data')


def harness_tasks(work, trained):
    "Our tasks, their lm-eval YAML files, and the harness's task names."
    _, held = split_plays()
    folder = work / 'tasks'
    folder.mkdir()
    ours = {'edge': Task('edge', EDGE_ITEMS),
            'next_word': next_word_task(held, n=30, seed=3),
            'next_line': next_line_task(held, n=30, seed=3)}
    # the edge task's YAML is written here by hand; the play tasks' by
    # to_lm_eval
    write_task(ours['edge'], folder / 'edge.jsonl')
    (folder / 'edge.yaml').write_text(f"""task: edge
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'edge.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: query
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    for name in ('next_word', 'next_line'):
        to_lm_eval(ours[name], folder)
    # the harness's own definitions of the benchmarks, on our local rows
    import lm_eval
    theirs = Path(lm_eval.__file__).parent / 'tasks'
    for name, rows, yaml in [
            ('hellaswag', HELLASWAG, 'hellaswag/hellaswag.yaml'),
            ('arc_easy', ARC, 'arc/arc_easy.yaml'),
            ('mmlu', MMLU, 'mmlu/default/_default_template_yaml')]:
        data = work / f'{name}.jsonl'
        data.write_text(''.join(json.dumps(r) + '\n' for r in rows))
        spec = dict(include=str(theirs / yaml), task=f'{name}_local',
                    tag=None, dataset_path='json', dataset_name=None,
                    dataset_kwargs=dict(data_files=dict(test=str(data))),
                    test_split='test', training_split=None,
                    validation_split=None, fewshot_split=None,
                    fewshot_config=None)
        if name == 'mmlu':  # set per subject by the harness's own files
            spec['description'] = ('The following are multiple choice '
                                   'questions (with answers) about english '
                                   'drama.\n\n')
        (folder / f'{name}.yaml').write_text(json.dumps(spec))
        ours[f'{name}_local'] = load_task(name, data)
    # generative: GSM8K with the harness's own YAML (no examples first,
    # answers that fit the context of 64), and two tasks of ours
    data = work / 'gsm8k.jsonl'
    data.write_text(''.join(json.dumps(r) + '\n' for r in GSM8K))
    ours['gsm8k_local'] = dataclasses.replace(load_task('gsm8k', data),
                                              max_new_tokens=16)
    (folder / 'gsm8k.yaml').write_text(json.dumps(dict(
        include=str(theirs / 'gsm8k/gsm8k.yaml'), task='gsm8k_local',
        tag=None, dataset_path='json', dataset_name=None,
        dataset_kwargs=dict(data_files=dict(test=str(data))),
        test_split='test', training_split=None, fewshot_split=None,
        num_fewshot=0, generation_kwargs=dict(
            until=list(ours['gsm8k_local'].until), do_sample=False,
            max_gen_toks=16))))
    ours['complete_word'] = complete_word_task(held, n=20, seed=3)
    to_lm_eval(ours['complete_word'], folder)
    # half the answers are what our greedy decoding writes, so that exact
    # match is 1 on them in both programs; the other half cannot match
    _, model, tok = trained
    wrote = generate_answers(model, tok, GEN_QUERIES, until=(',', '\n'),
                             max_new_tokens=10)
    ours['gen_edge'] = Task('gen_edge', [
        dict(query=q, answer=w.replace(' ', '') if k % 2 else 'zzz')
        for k, (q, w) in enumerate(zip(GEN_QUERIES, wrote))
        if w.replace(' ', '') or not k % 2], until=(',', '\n'),
        ignore=(' ',), max_new_tokens=10)
    to_lm_eval(ours['gen_edge'], folder)
    # bits per byte: the harness's rolling log-likelihood on whole scenes
    texts = [d.text for d in held[:3]] + ['Naïve café — 你好 🙂 ' * 30]
    (work / 'docs.jsonl').write_text(''.join(
        json.dumps(dict(text=t)) + '\n' for t in texts))
    (folder / 'rolling.yaml').write_text(json.dumps(dict(
        task='rolling', dataset_path='json',
        dataset_kwargs=dict(data_files=dict(test=str(work / 'docs.jsonl'))),
        test_split='test', output_type='loglikelihood_rolling',
        doc_to_text='', doc_to_target='text',
        metric_list=[dict(metric='bits_per_byte')])))
    return ours, texts, folder


@pytest.fixture(scope='module')
def harness(trained):
    "lm-eval's results with every sample, and the tasks we gave it."
    import lm_eval
    from lm_eval.tasks import TaskManager
    work, _, _ = trained
    ours, texts, folder = harness_tasks(work, trained)
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    results = lm_eval.simple_evaluate(
        model='hf', model_args=f'pretrained={work / "hf"},dtype=float32',
        tasks=list(ours) + ['rolling'], task_manager=manager, device='cpu',
        batch_size=4, log_samples=True, verbosity='ERROR')
    return results, ours, texts


MC_TASKS = ['edge', 'next_word', 'next_line', 'hellaswag_local',
            'arc_easy_local', 'mmlu_local']


@pytest.mark.parametrize('name', MC_TASKS)
def test_same_loglikelihoods_and_answers_as_lm_eval(trained, harness, name):
    _, model, tok = trained
    results, ours, _ = harness
    task = ours[name]
    samples = sorted(results['samples'][name], key=lambda s: s['doc_id'])
    assert len(samples) == len(task.items)
    mine = evaluate_task(model, tok, task, batch_size=3)
    for s, item, r in zip(samples, task.items, mine['per_item']):
        # the same requests: the query and delimiter + choice
        assert [tuple(a) for a in s['arguments']] == [
            (item['query'], task.delimiter + c) for c in item['choices']]
        theirs = [ll for ll, _ in s['filtered_resps']]
        assert np.abs(np.array(r['lls']) - theirs).max() < 1e-4
        for k in ('acc', 'acc_norm'):
            if k in s:
                assert r[k] == s[k], (name, s['doc_id'], k)
    got = results['results'][name]
    for k in ('acc', 'acc_norm'):
        if f'{k},none' in got:
            assert mine[k] == pytest.approx(got[f'{k},none'], abs=1e-12)
            assert mine[f'{k}_stderr'] == pytest.approx(
                got[f'{k}_stderr,none'], rel=1e-9)


GEN_TASKS = ['gen_edge', 'complete_word', 'gsm8k_local']


@pytest.mark.parametrize('name', GEN_TASKS)
def test_same_generated_texts_and_exact_match_as_lm_eval(trained, harness,
                                                        name):
    "Generated text after the cut, extracted answer, exact match: equal."
    _, model, tok = trained
    results, ours, _ = harness
    task = ours[name]
    samples = sorted([s for s in results['samples'][name] if s['filter'] in
                      ('none', 'extract', 'strict-match')],
                     key=lambda s: s['doc_id'])
    assert len(samples) == len(task.items)
    mine = evaluate_task(model, tok, task, batch_size=3)
    for s, item, r in zip(samples, task.items, mine['per_item']):
        assert s['arguments'][0][0] == item['query']
        assert s['resps'][0][0] == r['generated'], (name, s['doc_id'])
        assert s['filtered_resps'][0] == r['extracted']
        assert s['exact_match'] == r['exact_match']
    got = {k.split(',')[0]: v for k, v in results['results'][name].items()
           if k.split(',')[-1] in ('none', 'extract', 'strict-match')}
    assert mine['exact_match'] == pytest.approx(got['exact_match'])
    if name == 'gen_edge':   # the test means something: matches and not
        assert 0 < mine['exact_match'] < 1
        assert mine['truncated'] == 1


def test_generation_is_batched_and_seeded(trained):
    _, model, tok = trained
    one = [generate_answers(model, tok, [q], until=('\n',),
                            max_new_tokens=8)[0] for q in GEN_QUERIES]
    assert generate_answers(model, tok, GEN_QUERIES, until=('\n',),
                            max_new_tokens=8, batch_size=4) == one
    # the model's greedy first token as the answer: some samples find it
    said = generate_answers(model, tok, GEN_QUERIES, until=('\n',),
                            max_new_tokens=1)
    task = Task('w', [dict(query=q, answer=a) for q, a in
                      zip(GEN_QUERIES, said) if a.strip()],
                until=('\n',), max_new_tokens=1)
    a = evaluate_task(model, tok, task, n=6, ks=(1, 3, 6), seed=5)
    b = evaluate_task(model, tok, task, n=6, ks=(1, 3, 6), seed=5)
    c = evaluate_task(model, tok, task, n=6, ks=(1, 3, 6), seed=6)
    counts = [r['correct'] for r in a['per_item']]
    assert counts == [r['correct'] for r in b['per_item']]
    assert counts != [r['correct'] for r in c['per_item']]
    assert 0 < sum(counts) < 6 * len(counts), counts
    assert a['pass@1'] < a['pass@3'] < a['pass@6'] <= 1
    for bad, message in [(dict(n=1, ks=(5,)), 'needs n > 1'),
                         (dict(n=0), 'whole number of samples'),
                         (dict(n=4, ks=(True,)), 'pass@k needs'),
                         (dict(max_new_tokens=0), 'max_new_tokens')]:
        with pytest.raises(ValueError, match=message):
            evaluate_task(model, tok, task, **bad)
    assert all(isinstance(a[k], float) for k in (
        'exact_match', 'exact_match_stderr', 'pass@1', 'pass@3', 'pass@6'))


@pytest.mark.parametrize('n, c, k', [(5, 2, 2), (6, 0, 3), (6, 6, 1),
                                     (7, 3, 4), (8, 1, 8), (4, 2, 3)])
def test_pass_at_k_counts_the_sets_of_k(n, c, k):
    "The estimator is the share of k-subsets that hold a right sample."
    sets = list(itertools.combinations([1] * c + [0] * (n - c), k))
    assert pass_at_k(n, c, k) == pytest.approx(
        sum(any(s) for s in sets) / len(sets), abs=1e-12)


def test_pass_at_k_bad_input():
    for n, c, k in [(5, 6, 1), (5, 2, 0), (5, 2, 6), (3, -1, 1)]:
        with pytest.raises(ValueError, match='pass@k needs'):
            pass_at_k(n, c, k)


def test_extract_as_the_harness_regex_filter():
    pat = r'#### (\-?[0-9\.\,]+)'
    assert extract('a\n#### 1,200. and #### 3', pat) == '1,200.'
    assert extract('no answer', pat) == '[invalid]'
    assert extract('x 12 y', r'(a)|([0-9]+)') == '12'   # first non-empty
    assert extract('  as written ', None) == '  as written '


def test_contamination_finds_training_text(trained, tmp_path):
    work, _, _ = trained
    docs = [d for f in corpus_files()[:2] for d in play_documents(f)]
    seen = next_word_task(docs, n=40, seed=1)
    c = contamination(seen, work / 'data')
    assert c['items'] == 40 and len(c['flags']) == 40
    assert 0.6 < c['contaminated'] <= 1   # a tenth of scenes: validation
    made_up = Task('new', [dict(query='Zebra quantum xylophone wifi '
                                      'blockchain ' * 3, answer='x')])
    assert contamination(made_up, work / 'data')['flags'] == [False]
    # an item shorter than n is compared whole
    words = docs[0].text.split(' ')
    short = Task('short', [dict(query=' '.join(words[:2]), answer=words[2]),
                           dict(query='Zebra', answer='quantum')])
    assert contamination(short, work / 'data', n=50)['flags'] == \
        [True, False]
    with pytest.raises(ValueError, match='n must be a whole number'):
        contamination(short, work / 'data', n=0)
    h = ngram_hashes([5, 6, 7, 5, 6, 7, 8], 3)
    assert len(h) == 5 and h[0] == h[3] and len(set(h.tolist())) == 4
    r = split_results(dict(per_item=[dict(acc_norm=1.0), dict(
        acc_norm=0.0), dict(acc_norm=1.0)]), [True, False, True])
    assert r == {'clean': 0.0, 'clean items': 1, 'contaminated': 1.0,
                 'contaminated items': 2}
    with pytest.raises(FileNotFoundError, match="task 'new': .* no "
                                                "training shards"):
        contamination(made_up, tmp_path)


def test_edge_items_are_what_they_claim(trained, harness):
    "The edge task does cut a query, and its two accuracies differ."
    _, model, tok = trained
    _, ours, _ = harness
    r = evaluate_task(model, tok, ours['edge'])
    assert r['truncated'] >= 1
    assert encode_pair(tok, '', 'Enter')[0] == [tok.special_tokens[
        '<|endoftext|>']]
    q, c = encode_pair(tok, 'my lord? ', 'Ay.')
    assert tok.decode(q) == 'my lord?' and tok.decode(c) == ' Ay.'


def test_bits_per_byte_as_lm_eval(trained, harness):
    "Rolling windows: the same log-likelihood per document, same bpb."
    _, model, tok = trained
    results, _, texts = harness
    samples = sorted(results['samples']['rolling'],
                     key=lambda s: s['doc_id'])
    for s, text in zip(samples, texts):
        ours = lm_scores(model, tok, text)
        nats = ours['loss'] * ours['tokens']
        assert ours['tokens'] > BLOCK  # several windows
        assert -s['filtered_resps'][0] == pytest.approx(nats, rel=1e-5)
    theirs = results['results']['rolling']['bits_per_byte,none']
    ours = lm_scores(model, tok, texts)['bits_per_byte']
    assert ours == pytest.approx(theirs, rel=1e-5)


@pytest.mark.parametrize('n, block, stride', [
    (1, 4, None), (3, 4, None), (4, 4, None), (5, 4, None), (10, 4, None),
    (10, 4, 1), (10, 4, 2), (10, 4, 3), (100, 16, 5)])
def test_windows_score_each_token_once(n, block, stride):
    spans = windows(n, block, stride)
    scored = [t for a, b, first in spans for t in range(first + 1, b + 1)]
    assert scored == list(range(1, n + 1))
    assert all(0 <= a <= first < b and b - a <= block
               for a, b, first in spans)
    assert all(b - a == min(block, n) for a, b, _ in spans)  # all full


def test_stride_gives_the_same_loss_without_long_documents(trained):
    _, model, tok = trained
    short = 'Good morrow, my lord.'
    assert lm_scores(model, tok, short, stride=8)['loss'] == \
        pytest.approx(lm_scores(model, tok, short)['loss'], rel=1e-6)


def test_batches_do_not_change_scores(trained):
    _, model, tok = trained
    pairs = [encode_pair(tok, q, ' ' + c) for q, c in [
        ('O, ' * 50, 'what'), ('I', 'will'), ('', 'Enter'), ('Ay', 'me')]]
    one = [continuation_logprobs(model, [p], 1)[0] for p in pairs]
    assert np.allclose(continuation_logprobs(model, pairs, 3), one,
                       atol=1e-4)


def test_score_item_ties_and_lengths():
    # equal sums: the first wins; per character the longer choice wins
    assert score_item([-4.0, -4.0], ['ab', 'abcd'], 1) == dict(
        pred=0, pred_norm=1, acc=0.0, acc_norm=1.0)
    # characters, not bytes: 'é' is one character of two bytes
    assert score_item([-2.0, -3.0], ['é', 'abc'], 1)['pred_norm'] == 1
    assert centred(0.25, 0.25) == 0 and centred(1.0, 0.25) == 1


def test_task_files_round_trip(tmp_path):
    task = Task('edge', EDGE_ITEMS, delimiter='\n')
    write_task(task, tmp_path / 'edge.jsonl')
    assert read_task(tmp_path / 'edge.jsonl', delimiter='\n') == task
    assert read_task(tmp_path / 'edge.jsonl', name='other').name == 'other'
    # a file that exists is never replaced unless asked
    with pytest.raises(FileExistsError, match='edge.jsonl exists'):
        write_task(task, tmp_path / 'edge.jsonl')
    (tmp_path / 'h').mkdir()
    (tmp_path / 'h' / 'edge.yaml').write_text('mine')
    with pytest.raises(FileExistsError, match='edge.yaml exists'):
        to_lm_eval(task, tmp_path / 'h')
    assert (tmp_path / 'h' / 'edge.yaml').read_text() == 'mine'
    assert not (tmp_path / 'h' / 'edge.jsonl').exists()  # nothing written
    to_lm_eval(task, tmp_path / 'h', overwrite=True)
    assert json.loads((tmp_path / 'h' / 'edge.yaml').read_text())[
        'task'] == 'edge'


@pytest.mark.parametrize('item, message', [
    (dict(choices=['a', 'b'], gold=0), "item 1: no field 'query'"),
    (dict(query='q', gold=0), "item 1: no field 'choices'"),
    (dict(query='q', choices=['a', 'b']), "item 1: no field 'gold'"),
    (dict(query='q', choices=['a', 'b'], gold=2), 'gold 2 is not'),
    (dict(query='q', choices=['a', 'b'], gold=-1), 'gold -1 is not'),
    (dict(query='q', choices=['a', 'b'], gold='0'), "gold '0' is not"),
    (dict(query='q', choices=['a'], gold=0), 'needs at least 2'),
    (dict(query='q', choices='ab', gold=0), 'list of strings'),
    (dict(query='q', choices=['a', ''], gold=0), 'choice 1 is empty'),
    (dict(query=None, choices=['a', 'b'], gold=0), 'query must be'),
    ('text', 'an item is a dict'),
    (dict(query='q', answer='a'), 'an item with an answer in a multiple'),
    (dict(query='q', answer='a', gold=0), 'not both')])
def test_bad_items_name_the_task_and_item(item, message):
    with pytest.raises(ValueError, match=message) as e:
        Task('mine', [EDGE_ITEMS[0], item])
    assert str(e.value).startswith("task 'mine', item 1:")
    assert '\n' not in str(e.value)


@pytest.mark.parametrize('item, message', [
    (dict(query='q', answer=''), 'the answer is empty'),
    (dict(query='q'), "no field 'answer'"),
    (dict(answer='a'), "no field 'query'"),
    (dict(query='q', answer=7), 'the answer must be a string'),
    (dict(query='q', choices=['a', 'b'], gold=0),
     'multiple-choice item in a generative task')])
def test_bad_generative_items_name_the_task_and_item(item, message):
    with pytest.raises(ValueError, match=message) as e:
        Task('sums', [dict(query='1 + 1 =', answer='2'), item])
    assert str(e.value).startswith("task 'sums', item 1:")
    assert '\n' not in str(e.value)


def test_generative_task_files_round_trip(tmp_path):
    task = Task('sums', [dict(query='1 + 1 =', answer='2')], until=['\n'],
                pattern='([0-9]+)', ignore=[','], max_new_tokens=4)
    write_task(task, tmp_path / 'sums.jsonl')
    first, item = (tmp_path / 'sums.jsonl').read_text().splitlines()
    assert json.loads(first) == dict(settings=dict(
        until=['\n'], pattern='([0-9]+)', ignore=[','], max_new_tokens=4))
    assert json.loads(item) == task.items[0]
    assert read_task(tmp_path / 'sums.jsonl') == task
    assert read_task(tmp_path / 'sums.jsonl', max_new_tokens=9) == \
        dataclasses.replace(task, max_new_tokens=9)
    assert Task('s', task.items, until='Question:').until == ('Question:',)
    to_lm_eval(task, tmp_path / 'h')
    assert json.loads((tmp_path / 'h' / 'sums.jsonl').read_text()) == \
        task.items[0]   # the harness reads items only
    spec = json.loads((tmp_path / 'h' / 'sums.yaml').read_text())
    assert spec['output_type'] == 'generate_until'
    assert spec['generation_kwargs'] == dict(until=['\n'], do_sample=False,
                                             max_gen_toks=4)
    for bad, message in [(dict(until=['']), 'until must'),
                         (dict(pattern='('), 'not a regular expression'),
                         (dict(max_new_tokens=0), 'max_new_tokens'),
                         (dict(ignore=['(']), 'not a regular expression'),
                         (dict(items=[dict(query='', answer='2')]),
                          'the query is empty')]:
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(task, **bad)


def test_bad_files_and_names(tmp_path, trained):
    _, model, tok = trained
    (tmp_path / 't.jsonl').write_text('{"query": "q", "choices": ["a"]\n')
    with pytest.raises(ValueError, match="task 't', item 0: .* not JSON"):
        read_task(tmp_path / 't.jsonl')
    with pytest.raises(ValueError, match="unknown task 'hellaswg': .*"
                                         "gsm8k.*complete_word"):
        load_task('hellaswg')
    (tmp_path / 'gsm8k.jsonl').write_text(json.dumps(dict(
        question='q', answer='7')) + '\n')
    with pytest.raises(ValueError, match="task 'gsm8k', item 0: not a row"):
        load_task('gsm8k', tmp_path / 'gsm8k.jsonl')
    gen = Task('gen', [dict(query='O, ' * 80, answer='a')])
    with pytest.raises(ValueError, match="task 'gen', item 0: .* "
                                         "truncate=True"):
        evaluate_task(model, tok, gen, truncate=False)
    with pytest.raises(TypeError, match='multiple choice'):
        evaluate_task(model, tok, Task('mc', EDGE_ITEMS[:1]), n=3)
    (tmp_path / 'arc.jsonl').write_text(json.dumps(HELLASWAG[0]) + '\n')
    with pytest.raises(ValueError, match="task 'arc_easy', item 0: not a"):
        load_task('arc_easy', tmp_path / 'arc.jsonl')
    long = Task('long', [dict(query='O, ' * 80, choices=['a', 'b'],
                              gold=0)])
    with pytest.raises(ValueError, match="task 'long', item 0: .* do not "
                                         "fit .* truncate=True"):
        evaluate_task(model, tok, long, truncate=False)
    huge = Task('huge', [dict(query='q', choices=['a', 'O, ' * 80],
                              gold=0)])
    with pytest.raises(ValueError, match="task 'huge', item 0: choice 1 "
                                         "alone"):
        evaluate_task(model, tok, huge)
    with pytest.raises(ValueError, match='stride'):
        lm_scores(model, tok, 'text', stride=BLOCK + 1)


def test_hub_schemas_from_local_files(tmp_path):
    for name, rows in [('hellaswag', HELLASWAG), ('arc_easy', ARC),
                       ('arc_challenge', ARC), ('mmlu', MMLU)]:
        path = tmp_path / f'{name}.json'
        path.write_text(json.dumps(rows))           # .json as well as .jsonl
        task = load_task(name, path, limit=1)
        assert len(task.items) == 1 and task.name == name
    hs = load_task('hellaswag', tmp_path / 'hellaswag.json').items
    assert hs[0]['query'] == ('Fencing: Two men in doublets face each other '
                              'with rapiers. They')
    assert hs[0]['choices'][0] == 'bow, then cross blades. and circle.'
    assert hs[1]['query'].endswith('The master') and hs[1]['gold'] == 2
    arc = load_task('arc_easy', tmp_path / 'arc_easy.json').items
    assert arc[1]['gold'] == 3 and arc[0]['query'].endswith('\nAnswer:')
    assert set(HUB) >= {'hellaswag', 'arc_easy', 'arc_challenge', 'mmlu'}


def test_play_tasks_are_seeded_and_distinct():
    _, held = split_plays()
    for name, build in PLAY_TASKS.items():
        a, b = build(held, n=50, seed=1), build(held, n=50, seed=1)
        assert a == b and a.name == name
        assert a != build(held, n=50, seed=2)
        for it in a.items:
            if a.generative:   # complete_word: next_word's right answers
                assert it['query'] and _WORD.fullmatch(it['answer'])
                continue
            assert len(set(it['choices'])) == 4
            right = it['choices'][it['gold']]
            assert it['query'] and right
    # no held-out scene in the training scenes
    kept, held = split_plays()
    assert not {d.source for d in kept} & {d.source for d in held}
    assert {d.source.split('#')[0] for d in held} == {
        'comedies/twelfth-night.md', 'tragedies/macbeth.md'}


def test_contamination_sees_across_shards(trained, tmp_path):
    "Shards cut one stream of tokens: an n-gram may straddle a cut."
    work, _, tok = trained
    docs = [d for f in corpus_files()[:2] for d in play_documents(f)]
    data = tmp_path / 'data'
    prepare_data(docs[:40], data, tokenizer=str(work / 'data' /
                                                'tokenizer.json'),
                 shard_tokens=4000, val_fraction=0.2)
    _, shards = load_split(data, 'train')
    assert len(shards) > 1
    text = tok.decode(shards[0][-10:].tolist() + shards[1][:10].tolist())
    task = Task('cut', [dict(query=text[:8], answer=text[8:])],
                delimiter='')
    assert contamination(task, data, n=8)['flags'] == [True]
