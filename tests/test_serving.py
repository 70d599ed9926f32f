"""The server as its clients meet it: OpenAI's Python package, many
concurrent requests, a client that goes away mid-stream, bad input, the API
key, and the chat page driven in a real (headless) browser."""
import json
import os
import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from llm_from_scratch.finetuning import chat_tokenizer
from llm_from_scratch.generation import generate
from llm_from_scratch.model import GPT, preset
from llm_from_scratch.serving import (Engine, Request, background_server,
                                      chat_prompt, make_app, parse_request)
from llm_from_scratch.tokenizer import Tokenizer, load_corpus

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / 'nbs' / 'images' / '11_chat_page.png'


@pytest.fixture(scope='module')
def tok():
    return chat_tokenizer(Tokenizer.train(load_corpus()[:50_000], 300))


@pytest.fixture(scope='module')
def model(tok):
    # float64: a batch sums in another order than a request alone; in
    # float32 the last bits can differ and flip a near tie of this random
    # model, in float64 they cannot
    torch.manual_seed(0)
    return GPT(preset('tiny-llama', vocab_size=tok.vocab_size,
                      block_size=96)).eval().double()


def start(engine, api_key=None):
    server, url = background_server(make_app(engine, 'tiny', api_key))
    return server, url


def stop(server):
    server.should_exit = True
    server.thread.join(10)


@pytest.fixture(scope='module')
def url(model, tok):
    "A server with 16 slots, started once for the module."
    engine = Engine(model, tok, n_slots=16).start()
    server, url = start(engine)
    yield url
    stop(server)
    engine.close()


def slow_engine(model, tok, n_slots):
    "A started engine whose steps take 50 ms: time to act mid-answer."
    engine = Engine(model, tok, n_slots=n_slots)

    def step():
        time.sleep(0.05)
        Engine.step(engine)
    engine.step = step
    return engine.start()


@pytest.fixture(scope='module')
def slow(model, tok):
    "(url, engine) of a server whose steps take 50 ms: time to hang up."
    engine = slow_engine(model, tok, 2)
    server, url = start(engine)
    yield url, engine
    stop(server)
    engine.close()


def client(url, key='none'):
    return openai.OpenAI(base_url=url + '/v1', api_key=key, max_retries=0)


def user(text):
    return [dict(role='user', content=text)]


# -- OpenAI's client ---------------------------------------------------------

def test_openai_client_chat_and_completions(url):
    c = client(url)
    assert [m.id for m in c.models.list().data] == ['tiny']
    r = c.chat.completions.create(model='tiny', messages=user('Hello'),
                                  max_tokens=7, temperature=0)
    answer = r.choices[0].message.content
    assert r.choices[0].finish_reason in ('stop', 'length')
    assert r.usage.total_tokens == r.usage.prompt_tokens + \
        r.usage.completion_tokens
    chunks = list(c.chat.completions.create(
        model='tiny', messages=user('Hello'), max_tokens=7, temperature=0,
        stream=True, stream_options=dict(include_usage=True)))
    streamed = ''.join(ch.choices[0].delta.content or ''
                       for ch in chunks if ch.choices)
    assert streamed == answer
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    t = c.completions.create(model='tiny', prompt='ROMEO:', max_tokens=5,
                             temperature=0)
    assert t.choices[0].finish_reason == 'length'
    assert t.usage.completion_tokens == 5
    pieces = [ch.choices[0].text for ch in c.completions.create(
        model='tiny', prompt='ROMEO:', max_tokens=5, temperature=0,
        stream=True)]
    assert ''.join(pieces) == t.choices[0].text and len(pieces) > 1


def test_stop_strings_and_health(url):
    c = client(url)
    full = c.completions.create(model='tiny', prompt='ROMEO:',
                                max_tokens=12, temperature=0)
    text = full.choices[0].text
    cut = text[3:5]
    if cut:
        r = c.completions.create(model='tiny', prompt='ROMEO:', stop=[cut],
                                 max_tokens=12, temperature=0)
        assert r.choices[0].text == text[:text.index(cut)]
        assert r.choices[0].finish_reason == 'stop'
    h = httpx.get(url + '/health').json()
    assert h['status'] == 'ok' and h['slots'] == 16


# -- many at once ------------------------------------------------------------

def test_16_concurrent_requests_equal_each_alone(url):
    rng = random.Random(0)
    cases = [(''.join(rng.choice('abcdefgh ') for _ in range(rng.randint(
        1, 40))), rng.randint(1, 30), k) for k in range(16)]

    def ask(case, temperature):
        prompt, n, seed = case
        r = client(url).completions.create(
            model='tiny', prompt=prompt, max_tokens=n, seed=seed,
            temperature=temperature)
        return r.choices[0].text, r.usage.completion_tokens

    for temperature in (0, 1.0):  # greedy, and sampling with a seed
        alone = [ask(case, temperature) for case in cases]
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(lambda c: ask(c, temperature), cases))
        assert together == alone


def test_engine_joins_and_leaves_in_any_order(model, tok):
    "Random arrivals and lengths, shifts both ways: same as alone."
    rng = random.Random(1)
    engine, reqs = Engine(model, tok, n_slots=3), []
    for _ in range(24):
        p = [rng.randrange(300) for _ in range(rng.randint(1, 80))]
        reqs.append(engine.add(Request(p, rng.randint(1, 96 - len(p)),
                                       temperature=0)))
        for _ in range(rng.randint(0, 8)):
            engine.step()
    while engine.busy:
        engine.step()
    for r in reqs:
        assert r.tokens == generate(model, [r.ids], r.max_tokens,
                                    temperature=0)[0]
    assert all(s is None for s in engine.slots)


def test_text_held_for_a_stop_string_is_sent_at_a_stop_token(model, tok):
    "A stop token ends the answer: text held back is not lost with it."
    def answer(seed, **stops):
        r = Request([5, 6, 7], 2, temperature=1.0, seed=seed, **stops)
        engine = Engine(model, tok, n_slots=1)
        engine.add(r)
        while engine.busy:
            engine.step()
        return r
    for seed in range(200):
        free = answer(seed).tokens
        held = tok.decode(free[:1])
        if free[1] != free[0] and held.strip() and held.isprintable() \
                and '\ufffd' not in held:
            break
    else:
        pytest.fail('no seed whose answer fits the case')
    # the same sampled answer, where the first token's text looks like
    # the start of a stop string and the second token is a stop token
    r = answer(seed, stop=(held + '\x00',), stop_tokens=(free[1],))
    assert r.finish == 'stop' and r.tokens == free
    assert r.text == held


def test_a_request_that_cannot_start_fails_alone(model, tok):
    "A request the engine cannot take ends with an error; others go on."
    engine = Engine(model, tok, n_slots=2).start()
    try:
        bad = engine.submit(Request([5, 6], 3, seed=2**64))
        good = engine.submit(Request([5, 6], 3, temperature=0))
        deadline = time.time() + 30
        while good.finish is None and time.time() < deadline:
            time.sleep(0.01)
        assert bad.finish == 'error' and 'seed' not in (bad.text or '')
        assert bad.error and good.finish == 'length'
        assert engine.thread.is_alive()
    finally:
        engine.close()


# -- a client that goes away -------------------------------------------------

def test_disconnect_mid_stream_frees_the_slot(slow):
    url, engine = slow
    seen = []
    submit = engine.submit
    engine.submit = lambda r: seen.append(r) or submit(r)
    body = dict(prompt='ROMEO:', max_tokens=80, temperature=0, stream=True)
    with httpx.stream('POST', url + '/v1/completions', json=body) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
    assert any(line.startswith('data: {') for line in got)
    deadline = time.time() + 10
    while httpx.get(url + '/health').json()['running'] and \
            time.time() < deadline:
        time.sleep(0.05)
    assert httpx.get(url + '/health').json()['running'] == 0
    r, = seen
    assert r.finish == 'cancelled' and len(r.tokens) < 80
    engine.submit = submit


def test_a_full_server_answers_503_at_once(model, tok):
    "Beyond the slots and max_waiting, a request is refused, not queued."
    engine = slow_engine(model, tok, 1)
    server, url = background_server(make_app(engine, 'tiny', max_waiting=0))
    try:
        body = dict(prompt='ROMEO:', max_tokens=80, temperature=0,
                    stream=True)
        with httpx.stream('POST', url + '/v1/completions', json=body) as r:
            next(r.iter_lines())  # the one slot is taken
            t0 = time.time()
            busy = httpx.post(url + '/v1/completions',
                              json=dict(prompt='Hi', max_tokens=1))
            waited = time.time() - t0
        assert busy.status_code == 503, busy.text
        assert busy.headers['retry-after'] == '1'
        assert busy.json()['error']['type'] == 'server_busy'
        assert waited < 2  # refused at once, not after the running answer
        deadline = time.time() + 10
        while httpx.get(url + '/health').json()['running'] and \
                time.time() < deadline:
            time.sleep(0.05)
        ok = httpx.post(url + '/v1/completions',
                        json=dict(prompt='Hi', max_tokens=1))
        assert ok.status_code == 200, ok.text  # room again
    finally:
        stop(server)
        engine.close()


# -- bad input -----------------------------------------------------------------

BAD = {
    'malformed JSON': b'{"messages": [',
    'not an object': b'[1, 2]',
    'not UTF-8': b'\xff\xfe{}',
    'unknown model': dict(model='gpt-5', messages=user('Hi')),
    'max_tokens beyond the context': dict(messages=user('Hi'),
                                          max_tokens=10_000),
    'max_tokens zero': dict(messages=user('Hi'), max_tokens=0),
    'max_tokens a string': dict(messages=user('Hi'), max_tokens='10'),
    'negative temperature': dict(messages=user('Hi'), temperature=-0.5),
    'temperature true': dict(messages=user('Hi'), temperature=True),
    'top_p zero': dict(messages=user('Hi'), top_p=0),
    'prompt that does not fit': dict(messages=user('to be or not ' * 50)),
    '1 MB of text': dict(messages=user('x' * 2**20)),
    'unknown role': dict(messages=[dict(role='wizard', content='Hi')]),
    'no messages': dict(messages=[]),
    'content not text': dict(messages=[dict(role='user', content=5)]),
    'message not an object': dict(messages=['Hi']),
    'five stop strings': dict(messages=user('Hi'), stop=list('abcde')),
    'empty stop string': dict(messages=user('Hi'), stop=''),
    'two answers': dict(messages=user('Hi'), n=2),
    'seed a float': dict(messages=user('Hi'), seed=1.5),
    'seed beyond 64 bits': dict(messages=user('Hi'), seed=2**64),
    'temperature that overflows': dict(messages=user('Hi'),
                                       temperature=1e-45),
    'JSON nested too deep': b'[' * 100_000 + b']' * 100_000,
    'a 5,000-digit number': b'{"max_tokens": ' + b'9' * 5000 + b'}',
}


@pytest.mark.parametrize('case', BAD)
def test_bad_input_is_a_400_and_the_server_goes_on(url, case):
    body = BAD[case]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url + '/v1/chat/completions', content=content,
                   headers={'content-type': 'application/json'}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()['error']
    assert error['type'] == 'invalid_request_error' and error['message']
    ok = client(url).chat.completions.create(model='tiny', max_tokens=2,
                                             messages=user('Hi'))
    assert ok.choices[0].message.role == 'assistant'


def test_bad_completions_prompt(url):
    for body in [dict(prompt=5), dict(prompt=['a', 'b']),
                 dict(prompt='x' * 2**20), dict(prompt='')]:
        r = httpx.post(url + '/v1/completions', json=body, timeout=30)
        assert r.status_code == 400, (body, r.text)
    with pytest.raises(openai.BadRequestError, match='temperature'):
        client(url).completions.create(model='tiny', prompt='Hi',
                                       temperature=-1)


def test_too_large_body_and_unknown_route(url):
    r = httpx.post(url + '/v1/completions', content=b' ' * (9 * 2**20),
                   timeout=30)
    assert r.status_code == 400 and 'over' in r.json()['error']['message']
    r = httpx.get(url + '/v1/nothing')
    assert r.status_code == 404 and r.json()['error']['message']


def test_chat_prompt_of_a_base_model(tok):
    base = Tokenizer.train(load_corpus()[:20_000], 280)
    ids, stop_ids, stop = chat_prompt(base, user('Hi'))
    assert base.decode(ids) == 'user: Hi\nassistant:' and stop == ('\nuser:',)
    ids, stop_ids, stop = chat_prompt(tok, user('Hi'))
    assert stop_ids[0] == tok.special_tokens['<|end|>'] and stop == ()
    req, stream, usage = parse_request(dict(messages=user('Hi')), 'chat',
                                       tok, 96, 'tiny')
    assert req.max_tokens == 96 - len(ids) and not stream and not usage


# -- the API key ---------------------------------------------------------------

def test_api_key(model, tok):
    engine = Engine(model, tok, n_slots=2).start()
    server, url = start(engine, api_key='s3cret')
    try:
        for key in ('wrong', None):
            headers = {'authorization': f'Bearer {key}'} if key else {}
            r = httpx.post(url + '/v1/completions', headers=headers,
                           json=dict(prompt='Hi', max_tokens=2))
            assert r.status_code == 401
            assert r.json()['error']['code'] == 'invalid_api_key'
        with pytest.raises(openai.AuthenticationError):
            client(url, 'wrong').models.list()
        r = client(url, 's3cret').completions.create(
            model='tiny', prompt='Hi', max_tokens=2)
        assert r.usage.completion_tokens >= 1
        assert httpx.get(url + '/health').status_code == 200
        assert httpx.get(url + '/').status_code == 200  # the page asks
    finally:
        stop(server)
        engine.close()


# -- the chat page in a real browser -----------------------------------------

def chromium():
    "Debian's chromium; the tests fail (not skip) without it."
    path = shutil.which('chromium') or shutil.which('chromium-browser')
    if path is None:
        pytest.fail("no chromium on PATH: the chat page is tested in a "
                    "real browser; install Debian's (apt-get install -y "
                    "chromium), as .ci/run does")
    return path


def test_chat_page_in_headless_chromium(slow, tmp_path):
    from playwright.sync_api import expect, sync_playwright
    url, engine = slow
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(),
                                    args=['--no-sandbox'])
        page = browser.new_page(viewport=dict(width=900, height=520))
        page.goto(url + '/')
        expect(page.locator('#model')).to_have_text('tiny')
        page.fill('#max_tokens', '12')
        page.fill('#seed', '5')  # a long second answer: time to stop it
        page.fill('#input', 'Hello! Who are you?')
        page.press('#input', 'Enter')  # a whole answer first: history
        expect(page.locator('#send')).to_be_disabled()
        expect(page.locator('#send')).to_be_enabled(timeout=10_000)
        first = page.locator('.msg.assistant').first
        expect(first).not_to_be_empty()
        expect(first.locator('.note')).to_have_count(0)  # no error note
        page.fill('#max_tokens', '')   # as much as fits: time to stop it
        page.fill('#input', 'Tell me a story about a horse.')
        page.click('#send')
        expect(page.locator('.msg.assistant')).to_have_count(2)
        answer = page.locator('.msg.assistant').last
        expect(answer).not_to_be_empty(timeout=10_000)
        page.wait_for_function(
            "[...document.querySelectorAll('.msg.assistant')].pop()"
            ".textContent.length > 20", timeout=10_000)
        streamed = answer.text_content()
        page.click('#stop')
        expect(answer.locator('.note')).to_have_text(' [stopped]')
        expect(page.locator('#send')).to_be_enabled()
        shot = tmp_path / 'chat_page.png'
        page.screenshot(path=str(shot))
        text = answer.text_content()
        browser.close()
    assert len(text) >= len(streamed) > 20
    assert shot.stat().st_size > 10_000
    deadline = time.time() + 10
    while httpx.get(url + '/health').json()['running'] and \
            time.time() < deadline:
        time.sleep(0.05)
    assert httpx.get(url + '/health').json()['running'] == 0
    if os.environ.get('UPDATE_SCREENSHOT'):  # the book's figure
        shutil.copy(shot, SCREENSHOT)
