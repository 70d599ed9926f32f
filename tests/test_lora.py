"""LoRA: parity with peft, merging, counts, the adapter format, bad input."""
import json

import pytest
import torch
import transformers

from llm_from_scratch.data import (BatchLoader, corpus_files, load_split,
                                   play_documents, prepare_data)
from llm_from_scratch.lora import (LoRALinear, add_lora, layer_shapes,
                                   load_adapter, lora_param_count,
                                   merge_lora, save_adapter, strip_lora,
                                   train_rows, trainable)
from llm_from_scratch.model import GPT, config_to_hf, preset, to_hf
from llm_from_scratch.training import (TrainConfig, evaluate,
                                       latest_checkpoint,
                                       model_from_checkpoint, train)

peft = pytest.importorskip('peft')
transformers.logging.set_verbosity_error()
ATOL = 1e-5
ALL = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'fc', 'proj', 'gate', 'up',
       'down')


def small(name, **changes):
    return preset(name, vocab_size=300, block_size=64, n_layer=2,
                  n_embd=64, **changes)


def hf_twin(model, kind):
    "The Hugging Face model of `kind` holding `model`'s (base) weights."
    config, _ = config_to_hf(model.config, kind)
    hf = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**config))
    hf.load_state_dict(to_hf(strip_lora(model), kind), strict=False)
    return hf.eval()


def randomise_b(model, std=0.1):
    "Give every adapter a nonzero B, as training would."
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B.weight, std=std)


CASES = [('tiny', 'gpt2', ('q_proj', 'k_proj', 'v_proj', 'o_proj')),
         ('tiny', 'gpt2', ('q_proj', 'v_proj', 'fc', 'proj')),
         ('tiny-llama', 'llama', ALL),
         ('tiny-llama', 'llama', ('q_proj', 'v_proj'))]


@pytest.mark.parametrize('name, kind, targets', CASES)
def test_peft_loads_our_adapter(tmp_path, name, kind, targets):
    "Our adapter, loaded by peft onto the exported model: equal logits."
    torch.manual_seed(0)
    config = small(name)
    targets = tuple(t for t in targets if t in layer_shapes(config))
    ours = add_lora(GPT(config), 4, alpha=8.0, targets=targets,
                    dropout=0.1).eval()
    randomise_b(ours)
    hf = hf_twin(ours, kind)
    idx = torch.randint(0, 300, (2, 30))
    with torch.no_grad():
        base = hf(input_ids=idx).logits  # peft below wraps hf in place
    save_adapter(ours, tmp_path, kind)
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    with torch.no_grad():
        a, b = ours(idx)[0], theirs(input_ids=idx).logits
        assert (a - b).abs().max() < ATOL
        assert (a - base).abs().max() > 1e-3  # the adapter matters
    # and back: load_adapter onto a plain copy of the base gives our model
    again = load_adapter(strip_lora(ours), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(idx)[0], a)


@pytest.mark.parametrize('name, kind', [('tiny', 'gpt2'),
                                        ('tiny-llama', 'llama')])
def test_same_gradients_as_peft(name, kind):
    "Same initial weights -> same gradients of every A and B as peft's."
    torch.manual_seed(0)
    config = small(name)
    targets = tuple(t for t in layer_shapes(config)  # GPT-2: c_attn is
                    if kind == 'llama' or t not in ('q_proj', 'k_proj',
                                                    'v_proj'))  # fused
    ours = add_lora(GPT(config), 4, alpha=8.0, targets=targets)
    randomise_b(ours)
    hf = hf_twin(ours, kind)
    target_modules = {'gpt2': ['attn.c_proj', 'mlp.c_fc', 'mlp.c_proj'],
                      'llama': ['q_proj', 'k_proj', 'v_proj', 'o_proj',
                                'gate_proj', 'up_proj', 'down_proj']}[kind]
    theirs = peft.get_peft_model(hf, peft.LoraConfig(
        r=4, lora_alpha=8.0, target_modules=target_modules,
        fan_in_fan_out=kind == 'gpt2'))
    names = {'gpt2': dict(o_proj='attn.c_proj', fc='mlp.c_fc',
                          proj='mlp.c_proj'),
             'llama': dict(q_proj='self_attn.q_proj',
                           k_proj='self_attn.k_proj',
                           v_proj='self_attn.v_proj',
                           o_proj='self_attn.o_proj', gate='mlp.gate_proj',
                           up='mlp.up_proj', down='mlp.down_proj')}[kind]
    prefix = {'gpt2': 'transformer.h', 'llama': 'model.layers'}[kind]
    pairs = []
    for i, block in enumerate(ours.blocks):
        for full, m in block.named_modules():
            short = full.split('.')[-1]
            if isinstance(m, LoRALinear) and short in names:
                t = theirs.base_model.model.get_submodule(
                    f'{prefix}.{i}.{names[short]}')
                with torch.no_grad():  # the same initial A and B
                    t.lora_A['default'].weight.copy_(m.lora_A.weight)
                    t.lora_B['default'].weight.copy_(m.lora_B.weight)
                pairs.append((m, t))
    assert pairs
    idx = torch.randint(0, 300, (2, 30))
    ours(idx, idx)[1].backward()
    logits = theirs(input_ids=idx).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1),
                                      idx.flatten()).backward()
    for m, t in pairs:
        for ab in ('lora_A', 'lora_B'):
            g1 = getattr(m, ab).weight.grad
            g2 = getattr(t, ab)['default'].weight.grad
            torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


def test_merge_equals_unmerged_and_unmerge_restores():
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(16, 12), rank=3, alpha=6.0)
    randomise_b(torch.nn.ModuleList([layer]))
    x = torch.randn(5, 16)
    y, W = layer(x), layer.base_layer.weight.clone()
    layer.merge()
    torch.testing.assert_close(layer(x), y)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, W)
    torch.testing.assert_close(layer(x), y)
    model = add_lora(GPT(small('tiny-llama')), 2, targets=ALL[:4] + ALL[6:])
    randomise_b(model)
    idx = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        y = model(idx)[0]
        merged = merge_lora(model)
        torch.testing.assert_close(merged(idx)[0], y, atol=ATOL, rtol=0)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(GPT(small('tiny-llama'))
                                          .state_dict())


@pytest.mark.parametrize('name', ['tiny', 'tiny-llama', 'small'])
@pytest.mark.parametrize('rank', [1, 8])
def test_count_equals_formula(name, rank):
    config = preset(name, vocab_size=300)
    for targets in [('q_proj', 'v_proj'), tuple(layer_shapes(config))]:
        model = add_lora(GPT(config), rank, targets=targets)
        assert trainable(model) == lora_param_count(config, rank, targets)
        shapes = layer_shapes(config)
        assert lora_param_count(config, rank, targets) == config.n_layer * \
            sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)


def test_only_adapters_train():
    model = add_lora(GPT(small('tiny')), 2)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all('.lora_A.' in n or '.lora_B.' in n for n in names)
    assert not model.tok_emb.weight.requires_grad


def test_bad_settings_are_refused():
    llama = GPT(small('tiny-llama'))
    with pytest.raises(ValueError, match="targets: 'fc' matches no layer"
                       ".*choose from q_proj, k_proj, v_proj, o_proj, "
                       "gate, up, down"):
        add_lora(llama, 2, targets=('q_proj', 'fc'))
    with pytest.raises(ValueError, match='rank 100 is larger than the '
                       r'k_proj layers allow.*from 1 to 32'):
        add_lora(llama, 100)
    with pytest.raises(ValueError, match='rank must be a whole number'):
        add_lora(llama, 0)
    assert not any(isinstance(m, LoRALinear) for m in llama.modules())
    assert all(p.requires_grad for p in llama.parameters())  # untouched
    with pytest.raises(ValueError, match='already has LoRA adapters'):
        add_lora(add_lora(llama, 2), 2)


def test_save_refuses_to_overwrite(tmp_path):
    model = add_lora(GPT(small('tiny')), 2)
    (tmp_path / 'notes.txt').write_text('mine')
    with pytest.raises(FileExistsError, match='overwrite=True'):
        save_adapter(model, tmp_path, 'gpt2')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['notes.txt']
    save_adapter(model, tmp_path, 'gpt2', overwrite=True)
    assert (tmp_path / 'notes.txt').read_text() == 'mine'
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        'adapter_config.json', 'adapter_model.safetensors', 'notes.txt']
    config = json.loads((tmp_path / 'adapter_config.json').read_text())
    assert config['rank_pattern'] == {'attn.c_attn': 6}
    with pytest.raises(ValueError, match='gpt2 layout cannot express'):
        save_adapter(add_lora(GPT(small('tiny-llama')), 2), tmp_path / 'x',
                     'gpt2')
    with pytest.raises(ValueError, match='no LoRA adapters'):
        save_adapter(GPT(small('tiny')), tmp_path / 'y', 'gpt2')


def test_peft_trained_fused_adapter_is_refused(tmp_path):
    "A c_attn adapter that mixes q, k and v has no equivalent here."
    torch.manual_seed(0)
    ours = add_lora(GPT(small('tiny')), 2)
    save_adapter(ours, tmp_path, 'gpt2')
    from safetensors.torch import load_file, save_file
    f = tmp_path / 'adapter_model.safetensors'
    t = load_file(str(f))
    key = 'base_model.model.transformer.h.0.attn.c_attn.lora_B.weight'
    t[key] = torch.randn_like(t[key])
    save_file(t, str(f))
    with pytest.raises(ValueError, match='mixes q, k and v'):
        load_adapter(GPT(small('tiny')), tmp_path)


@pytest.fixture(scope='module')
def plays(tmp_path_factory):
    "A base run on one comedy and token shards of The Tempest."
    root = tmp_path_factory.mktemp('lora')
    files = {f.name: f for f in corpus_files()}
    prepare_data(play_documents(files['the-comedy-of-errors.md']),
                 root / 'base-data', vocab_size=300)
    prepare_data(play_documents(files['the-tempest.md']), root / 'tempest',
                 tokenizer=root / 'base-data' / 'tokenizer.json',
                 val_fraction=0.2)
    base = TrainConfig(data=str(root / 'base-data'), out=str(root / 'base'),
                       block_size=32, batch_size=4, max_steps=30,
                       warmup_steps=3, eval_every=30, eval_batches=2,
                       save_every=30, model='tiny')
    train(base, progress=False)
    return root, base


def test_lora_run_through_train(plays):
    "A LoRA run of the training loop lowers the loss; its checkpoint loads."
    root, base = plays
    c = TrainConfig(data=str(root / 'tempest'), out=str(root / 'lora'),
                    init_from=base.out, block_size=32, batch_size=4,
                    max_steps=30, warmup_steps=3, eval_every=15,
                    eval_batches=4, save_every=30, lr=1e-2, lora_rank=4,
                    lora_alpha=8.0)
    _, val = load_split(c.data, 'val')
    before = evaluate(model_from_checkpoint(latest_checkpoint(base.out)),
                      BatchLoader(val, 4, 32, 'sequential'), 4)['loss']
    log = train(c, progress=False)
    assert log[-1]['val_loss'] < before - 0.02
    merged = model_from_checkpoint(latest_checkpoint(c.out))
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    # the same weights as the unmerged adapted model, merged
    from llm_from_scratch.training import load_checkpoint
    lora = add_lora(model_from_checkpoint(latest_checkpoint(base.out)), 4,
                    alpha=8.0)
    load_checkpoint(latest_checkpoint(c.out), lora)
    idx = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(idx)[0],
                                   lora.eval()(idx)[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize('name, kind, tied', [('tiny', 'gpt2', True),
                                              ('tiny', 'gpt2', False),
                                              ('tiny-llama', 'llama', True),
                                              ('tiny-llama', 'llama', False)])
def test_peft_loads_trained_token_rows(tmp_path, name, kind, tied):
    "Rows from train_rows travel as peft's trainable_token_indices."
    torch.manual_seed(0)
    model = GPT(small(name, tie_weights=tied))
    ours = train_rows(add_lora(model, 4, alpha=8.0), [7, 299])
    randomise_b(ours)
    with torch.no_grad():  # as if trained
        for m in (ours.tok_emb, ours.lm_head):
            if not m._tied:
                m.rows.normal_()
    untied = not ours.lm_head._tied
    assert untied == (not tied)
    hf = hf_twin(ours, kind)
    save_adapter(ours, tmp_path, kind)
    config = json.loads((tmp_path / 'adapter_config.json').read_text())
    emb = 'embed_tokens' if kind == 'llama' else 'wte'
    assert config['trainable_token_indices'] == (
        {emb: [7, 299], 'lm_head': [7, 299]} if untied else [7, 299])
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    idx = torch.tensor([[7, 1, 299, 7, 3, 4]])
    with torch.no_grad():
        a, b = ours.eval()(idx)[0], theirs(input_ids=idx).logits
        assert (a - b).abs().max() < 1e-4  # logits up to ~5: fp32 rounding
    again = load_adapter(strip_lora(ours), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(idx)[0], a)
        merged = merge_lora(again)(idx)[0]
        assert (merged - a).abs().max() < 1e-4  # rounding of W + s B A
    # only the rows train, and an adapter for the other tying is refused
    assert not ours.tok_emb.base_layer.weight.requires_grad
    other = GPT(small(name, tie_weights=not tied))
    with pytest.raises(ValueError, match='tied to|untied from'):
        load_adapter(other, tmp_path)
    assert type(other.tok_emb) is torch.nn.Embedding  # left as it was


def test_trained_rows_survive_a_checkpoint(tmp_path):
    "A LoRA run on data that adds tokens trains their rows, and only them."
    from llm_from_scratch.finetuning import (CHAT_TOKENS, grow_vocab,
                                             prepare_chat, task_suite)
    from llm_from_scratch.data import load_tokenizer, shakespeare
    from llm_from_scratch.training import initial_model
    prepare_data(shakespeare()[::25], tmp_path / 'data', vocab_size=300,
                 val_fraction=0.2)
    suite = task_suite(n=(40, 8, 0), tasks=('add',))
    prepare_chat({s: [r['messages'] for r in rows]
                  for s, rows in suite.items() if rows},
                 tmp_path / 'data', tmp_path / 'chat', block_size=64)
    base = TrainConfig(data=str(tmp_path / 'data'), out=str(tmp_path / 'b'),
                       block_size=64, batch_size=4, max_steps=2,
                       eval_every=2, eval_batches=1, save_every=2)
    train(base, progress=False)
    c = TrainConfig(data=str(tmp_path / 'chat'), out=str(tmp_path / 'l'),
                    init_from=base.out, block_size=64, batch_size=4,
                    max_steps=3, eval_every=3, eval_batches=1,
                    save_every=3, lr=1e-2, lora_rank=2)
    tok = load_tokenizer(c.data)
    start = initial_model(c, tok.vocab_size)
    new = [tok.special_tokens[s] for s in CHAT_TOKENS]
    assert start.tok_emb.ids.tolist() == new
    train(c, progress=False)
    meta = json.loads((latest_checkpoint(c.out) / 'state.json').read_text())
    assert meta['trained_rows'] == new
    tuned = model_from_checkpoint(latest_checkpoint(c.out)).tok_emb.weight
    grown = grow_vocab(model_from_checkpoint(latest_checkpoint(base.out)),
                       tok, CHAT_TOKENS).tok_emb.weight
    old = len(grown) - len(new)
    assert torch.equal(tuned[:old], grown[:old])  # the base rows stay
    assert (tuned[old:] != grown[old:]).any(1).all()  # each new one moved
    # exported in our format, the merged model loads as a plain one
    from llm_from_scratch.distributed import export_checkpoint
    export_checkpoint(c.out, tmp_path / 'export')
    again = model_from_checkpoint(tmp_path / 'export')
    assert torch.equal(again.tok_emb.weight, tuned)
    # a bad trained_rows in state.json is named
    ckpt = latest_checkpoint(c.out)
    state = json.loads((ckpt / 'state.json').read_text())
    (ckpt / 'state.json').write_text(json.dumps(state | {'trained_rows': 5}))
    with pytest.raises(ValueError, match='trained_rows must be a list'):
        model_from_checkpoint(ckpt)
    (ckpt / 'state.json').write_text(json.dumps(state))
    # a model that does not train those rows (an older run, other data)
    from llm_from_scratch.training import load_checkpoint
    plain = add_lora(grow_vocab(model_from_checkpoint(latest_checkpoint(
        base.out)), tok, CHAT_TOKENS), 2)
    with pytest.raises(ValueError, match='trained the embedding rows'):
        load_checkpoint(latest_checkpoint(c.out), plain)
