"""Chapter 10: parity with lm-evaluation-harness, the task formats, bad input.

The parity tests run the real `lm_eval` package (offline) on a small trained
model exported to a Hugging Face folder, on local task files, and compare
every per-item log-likelihood and every answer with ours.
"""
import json
import math
import os
from pathlib import Path

os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')

import numpy as np
import pytest
import torch

from llm_from_scratch.data import (corpus_files, load_tokenizer,
                                   play_documents, prepare_data)
from llm_from_scratch.distributed import export_checkpoint
from llm_from_scratch.evaluation import (
    HUB, PLAY_TASKS, Task, centred, continuation_logprobs, encode_pair,
    evaluate_task, lm_scores, load_task, next_line_task, next_word_task,
    read_task, score_item, split_plays, to_lm_eval, windows, write_task)
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


def harness_tasks(work):
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
    ours, texts, folder = harness_tasks(work)
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
    ('text', 'an item is a dict')])
def test_bad_items_name_the_task_and_item(item, message):
    with pytest.raises(ValueError, match=message) as e:
        Task('mine', [EDGE_ITEMS[0], item])
    assert str(e.value).startswith("task 'mine', item 1:")
    assert '\n' not in str(e.value)


def test_bad_files_and_names(tmp_path, trained):
    _, model, tok = trained
    (tmp_path / 't.jsonl').write_text('{"query": "q", "choices": ["a"]\n')
    with pytest.raises(ValueError, match="task 't', item 0: .* not JSON"):
        read_task(tmp_path / 't.jsonl')
    with pytest.raises(ValueError, match="unknown task 'hellaswg'"):
        load_task('hellaswg')
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
            assert len(set(it['choices'])) == 4
            right = it['choices'][it['gold']]
            assert it['query'] and right
    # no held-out scene in the training scenes
    kept, held = split_plays()
    assert not {d.source for d in kept} & {d.source for d in held}
    assert {d.source.split('#')[0] for d in held} == {
        'comedies/twelfth-night.md', 'tragedies/macbeth.md'}
