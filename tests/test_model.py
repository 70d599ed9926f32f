"""The model: parity with Hugging Face transformers, equivalences, errors."""
import json
import re
import time
from dataclasses import replace

import pytest
import torch
import transformers
from safetensors.torch import save_file, save_model

from llm_from_scratch.attention import CausalSelfAttention, KVCache
from llm_from_scratch.model import (GPT, ModelConfig, check_weights,
                                    config_from_hf, config_to_hf, from_hf,
                                    meta_model, n_params, preset, to_hf)
from llm_from_scratch.tokenizer import Tokenizer, load_corpus

transformers.logging.set_verbosity_error()
ATOL = 1e-5  # fp32: logits agree to this absolute tolerance


def hf_gpt2(n_layer=2, n_head=4, n_embd=64, vocab=101, positions=64,
            tie=True):
    cfg = transformers.GPT2Config(
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab,
        n_positions=positions, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
        bos_token_id=0, eos_token_id=0, tie_word_embeddings=tie)
    return transformers.GPT2LMHeadModel(cfg).eval()


def hf_llama(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, vocab=101,
             positions=64, tie=False, theta=10_000.0):
    cfg = transformers.LlamaConfig(
        hidden_size=n_embd, intermediate_size=3 * n_embd,
        num_hidden_layers=n_layer, num_attention_heads=n_head,
        num_key_value_heads=n_kv_head, vocab_size=vocab,
        max_position_embeddings=positions, tie_word_embeddings=tie,
        rope_theta=theta, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def ours_from(hf, kind):
    config, k = config_from_hf(hf.config.to_dict())
    assert k == kind
    return from_hf(GPT(config), hf.state_dict(), kind).eval()


def max_diff(hf, ours, idx):
    with torch.no_grad():
        return (hf(idx).logits - ours(idx)[0]).abs().max().item()


# -- parity ------------------------------------------------------------------

@pytest.mark.parametrize('shape', [(1, 1, 8), (2, 4, 64), (3, 2, 32)])
def test_gpt2_logits_match_transformers(shape):
    torch.manual_seed(0)
    hf = hf_gpt2(*shape)
    ours = ours_from(hf, 'gpt2')
    idx = torch.randint(0, 101, (3, 40))
    assert max_diff(hf, ours, idx) < ATOL


def test_untied_gpt2_logits_match_transformers():
    "A GPT-2 with its own lm_head loads, and exports its lm_head."
    torch.manual_seed(0)
    hf = hf_gpt2(tie=False)
    ours = ours_from(hf, 'gpt2')
    assert not ours.config.tie_weights
    assert max_diff(hf, ours, torch.randint(0, 101, (2, 30))) < ATOL
    assert torch.equal(to_hf(ours, 'gpt2')['lm_head.weight'],
                       hf.state_dict()['lm_head.weight'])


@pytest.mark.parametrize('heads', [(4, 4), (4, 2), (4, 1), (8, 2)])
@pytest.mark.parametrize('tie', [False, True])
def test_llama_logits_match_transformers(heads, tie):
    "MHA, GQA and MQA Llama configs, tied and untied."
    torch.manual_seed(0)
    hf = hf_llama(n_head=heads[0], n_kv_head=heads[1], tie=tie,
                  theta=500_000.0)
    ours = ours_from(hf, 'llama')
    assert ours.config.n_kv_head == heads[1]
    idx = torch.randint(0, 101, (2, 50))
    assert max_diff(hf, ours, idx) < ATOL


def test_real_gpt2_shape_matches_transformers():
    "GPT-2 small's exact shape (random weights): 124,439,808 parameters."
    torch.manual_seed(0)
    hf = hf_gpt2(12, 12, 768, 50257, 1024)
    ours = ours_from(hf, 'gpt2')
    assert n_params(ours) == 124_439_808 == hf.num_parameters()
    assert ours.config == preset('gpt2-124m')
    idx = torch.randint(0, 50257, (1, 64))
    assert max_diff(hf, ours, idx) < 1e-4


def test_export_to_transformers():
    "Our weights in HF layout load into transformers with equal logits."
    torch.manual_seed(1)
    for kind, hf in [('gpt2', hf_gpt2()), ('llama', hf_llama())]:
        config, _ = config_from_hf(hf.config.to_dict())
        ours = GPT(config).eval()
        missing, unexpected = hf.load_state_dict(to_hf(ours, kind),
                                                 strict=False)
        tied = ['lm_head.weight'] if config.tie_weights else []
        assert not [m for m in missing
                    if not m.endswith('attn.bias') and m not in tied]
        assert not unexpected
        idx = torch.randint(0, 101, (2, 30))
        assert max_diff(hf, ours, idx) < ATOL


def test_from_pretrained_folder(tmp_path):
    "A checkpoint folder as `save_pretrained` writes it (safetensors)."
    torch.manual_seed(0)
    hf = hf_llama(tie=True)
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(tmp_path).eval()
    assert max_diff(hf, ours, torch.randint(0, 101, (1, 20))) < ATOL


@pytest.fixture(scope='module')
def tok300():
    return Tokenizer.train(load_corpus()[:30_000], 300, name='tok300')


@pytest.mark.parametrize('name, changes', [
    ('tiny', {}), ('tiny', dict(tie_weights=False, mlp_hidden=96)),
    ('tiny-llama', {}), ('tiny-llama', dict(tie_weights=False, n_kv_head=1,
                                            rope_base=500_000.0))])
def test_hf_folder_loads_in_transformers(tmp_path, tok300, name, changes):
    "config_to_hf + to_hf + tokenizer.json: a folder transformers loads."
    torch.manual_seed(0)
    config = preset(name, vocab_size=300, block_size=64, n_layer=2,
                    n_embd=64, **changes)
    ours = GPT(config).eval()
    hf_config, kind = config_to_hf(config)
    assert kind == ('gpt2' if name == 'tiny' else 'llama')
    (tmp_path / 'config.json').write_text(json.dumps(hf_config))
    save_file(to_hf(ours, kind), str(tmp_path / 'model.safetensors'))
    tok300.save_hf(tmp_path / 'tokenizer.json')
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.model_type == kind
    idx = torch.randint(0, 300, (2, 40))
    assert max_diff(hf, ours, idx) < ATOL
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / 'tokenizer.json'))
    text = 'O Romeo, Romeo! wherefore art thou Romeo?'
    assert hf_tok(text)['input_ids'] == tok300.encode(text)
    back = GPT.from_pretrained(tmp_path).eval()
    assert back.config == config
    assert torch.equal(back(idx)[0], ours(idx)[0])


@pytest.mark.parametrize('name, changes, kind, field', [
    ('tiny', dict(n_kv_head=1), 'gpt2', 'n_kv_head'),
    ('tiny', dict(bias=False), 'gpt2', 'bias'),
    ('tiny', {}, 'llama', 'pos'),
    ('tiny-llama', {}, 'gpt2', 'pos'),
    ('tiny-llama', dict(bias=True), 'llama', 'bias'),
    ('tiny', {}, 'bert', 'bert'),
])
def test_to_hf_refuses_what_the_kind_cannot_express(name, changes, kind,
                                                    field):
    model = GPT(preset(name, vocab_size=50, block_size=16, n_layer=1,
                       **changes))
    with pytest.raises(ValueError, match=field):
        to_hf(model, kind)
    with pytest.raises(ValueError, match=field):
        config_to_hf(model.config, kind)


def test_config_to_hf_infers_the_kind():
    assert config_to_hf(preset('gpt2-124m'))[1] == 'gpt2'
    assert config_to_hf(preset('llama3-8b'))[1] == 'llama'
    for d, kind in (config_to_hf(preset('gpt2-124m')),
                    config_to_hf(preset('llama3-8b'))):
        assert config_from_hf(d) == (preset(
            'gpt2-124m' if kind == 'gpt2' else 'llama3-8b'), kind)
    with pytest.raises(ValueError, match="pos='rope'"):
        config_to_hf(preset('tiny', pos='rope'))


# -- equivalences and properties ---------------------------------------------

def test_gqa_with_all_heads_is_mha():
    torch.manual_seed(0)
    a = CausalSelfAttention(48, 6)
    b = CausalSelfAttention(48, 6, n_kv_head=6)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 9, 48)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize('n_kv', [1, 2, 3])
def test_gqa_equals_mha_with_repeated_heads(n_kv):
    "GQA (MQA at n_kv=1) equals MHA whose K/V heads repeat in groups."
    torch.manual_seed(0)
    C, H = 48, 6
    g = CausalSelfAttention(C, H, n_kv)
    m = CausalSelfAttention(C, H)
    sd = g.state_dict()
    hs = C // H
    for name in ('k_proj', 'v_proj'):
        w = sd[f'{name}.weight'].view(n_kv, hs, C)
        sd[f'{name}.weight'] = w.repeat_interleave(H // n_kv, 0).reshape(C,
                                                                         C)
    m.load_state_dict(sd)
    x = torch.randn(2, 7, C)
    assert torch.allclose(g(x), m(x), atol=1e-6)


@pytest.mark.parametrize('name', ['tiny', 'tiny-llama'])
def test_future_tokens_never_change_past_logits(name):
    torch.manual_seed(0)
    model = GPT(preset(name, vocab_size=97, block_size=40)).eval()
    idx = torch.randint(0, 97, (2, 40))
    base = model(idx)[0]
    for t in (1, 17, 39):
        changed = idx.clone()
        changed[:, t:] = (changed[:, t:] + 1) % 97
        assert torch.allclose(model(changed)[0][:, :t], base[:, :t],
                              atol=1e-6)


def test_cache_matches_full_forward():
    torch.manual_seed(0)
    model = GPT(preset('tiny-llama', vocab_size=97, block_size=32)).eval()
    c = model.config
    idx = torch.randint(0, 97, (2, 20))
    cache = [KVCache(2, c.n_kv_head, 32, c.head_dim)
             for _ in range(c.n_layer)]
    with torch.no_grad():
        first = model(idx[:, :12], cache=cache)[0]
        rest = [model(idx[:, t:t + 1], cache=cache)[0]
                for t in range(12, 20)]
        full = model(idx)[0]
    got = torch.cat([first, *rest], 1)
    assert torch.allclose(got, full, atol=1e-5)


def test_parameter_counts():
    assert n_params(meta_model(preset('gpt2-124m'))) == 124_439_808
    m = GPT(preset('tiny'))
    assert n_params(m) == sum(p.numel() for p in set(m.parameters()))
    assert n_params(m, embeddings=False) == n_params(m) - 256 * 128


# -- bad input ---------------------------------------------------------------

@pytest.mark.parametrize('fields, message', [
    (dict(n_embd=100, n_head=3), 'n_embd (100) must be divisible'),
    (dict(n_head=4, n_kv_head=3), 'n_kv_head (3)'),
    (dict(n_embd=36, n_head=4, pos='rope'), 'even head size'),
    (dict(n_layer=0), 'n_layer must be a positive integer'),
    (dict(mlp='relu'), 'mlp must be one of'),
    (dict(dropout=1.5), 'dropout'),
])
def test_bad_configs(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelConfig(**fields)


def test_bad_inputs():
    model = GPT(preset('tiny', vocab_size=50, block_size=16))
    with pytest.raises(ValueError, match='longer than block_size 16'):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match='token id 50 is outside'):
        model(torch.tensor([[1, 50]]))
    with pytest.raises(ValueError, match='token id -1 is outside'):
        model(torch.tensor([[1, -1]]))
    with pytest.raises(KeyError, match='no preset'):
        preset('gpt5')


def test_forward_reads_no_ids_off_the_cpu():
    "Reading ids on a device would make the host wait: no check there."
    model = meta_model(preset('tiny', vocab_size=50, block_size=16))
    idx = torch.zeros(1, 8, dtype=torch.long, device='meta')
    assert model(idx)[0].shape == (1, 8, 50)


def test_bad_state_dicts():
    hf = hf_gpt2()
    config, _ = config_from_hf(hf.config.to_dict())
    sd = hf.state_dict()
    missing = {k: v for k, v in sd.items() if 'h.1.mlp.c_fc.weight' not in k}
    with pytest.raises(KeyError, match="h.1.mlp.c_fc.weight"):
        from_hf(GPT(config), missing, 'gpt2')
    shaped = dict(sd, **{'transformer.ln_f.weight': torch.ones(3)})
    with pytest.raises(ValueError, match=r"ln_f.weight.*\(3,\)"):
        from_hf(GPT(config), shaped, 'gpt2')
    extra = dict(sd, **{'transformer.h.9.attn.c_attn.weight': torch.ones(1)})
    with pytest.raises(ValueError, match='does not use'):
        from_hf(GPT(config), extra, 'gpt2')


def test_unsupported_hf_configs(tmp_path):
    d = hf_llama().config.to_dict()
    with pytest.raises(ValueError, match='RoPE scaling'):
        config_from_hf(dict(d, rope_scaling={'type': 'linear'}))
    with pytest.raises(ValueError, match="model_type 'bert'"):
        config_from_hf(dict(d, model_type='bert'))
    with pytest.raises(FileNotFoundError, match='config.json'):
        GPT.from_pretrained(tmp_path)
    (tmp_path / 'config.json').write_text(json.dumps(d))
    with pytest.raises(FileNotFoundError, match='safetensors'):
        GPT.from_pretrained(tmp_path)


# -- checking weights before building a model --------------------------------

def tiny_file(tmp_path, **changes):
    "A tiny model (4 blocks, tied) saved as our checkpoints save it."
    model = GPT(preset('tiny', vocab_size=97, block_size=32, **changes))
    path = tmp_path / 'model.safetensors'
    save_model(model, str(path))
    return model.config, path


def test_check_weights_reads_only_the_header(tmp_path):
    "An absurd config is refused before a single layer is built."
    config, path = tiny_file(tmp_path)
    assert check_weights(config, path) is None
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=re.escape(
            f'{path}: the config says n_layer 1000000 but the file holds '
            f'4 blocks')):
        check_weights(replace(config, n_layer=10**6), path)
    assert time.perf_counter() - t0 < 2


@pytest.mark.parametrize('changes, message', [
    (dict(vocab_size=98), "'lm_head.weight' has shape (97, 128), the "
                          "config needs (98, 128)"),
    (dict(n_embd=64), "'pos_emb.weight' has shape (32, 128)"),
    (dict(block_size=64), "'pos_emb.weight' has shape (32, 128)"),
    (dict(mlp_hidden=256), "'blocks.0.mlp.fc.weight' has shape (512, "),
    (dict(tie_weights=False), "no tensor 'tok_emb.weight'"),
    (dict(bias=False), "holds 'blocks.0.attn.k_proj.bias', which the "
                       "config has no place for"),
])
def test_check_weights_names_the_first_difference(tmp_path, changes,
                                                   message):
    config, path = tiny_file(tmp_path)
    with pytest.raises(ValueError, match=re.escape(f'{path}') + '.*' +
                       re.escape(message)):
        check_weights(replace(config, **changes), path)


@pytest.mark.parametrize('data', [
    b'', b'\x05\x00', b'\xff' * 8 + b'{}',
    len(b'{nope}').to_bytes(8, 'little') + b'{nope}',
    len(b'[1, 2]').to_bytes(8, 'little') + b'[1, 2]'])
def test_check_weights_corrupt_header(tmp_path, data):
    path = tmp_path / 'model.safetensors'
    path.write_bytes(data)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        check_weights(preset('tiny'), path)


def hf_folder(tmp_path, **kwargs):
    "A small Llama saved by transformers' `save_pretrained`."
    torch.manual_seed(0)
    hf = hf_llama(tie=True)
    hf.save_pretrained(tmp_path, **kwargs)
    return hf


def test_from_pretrained_ignores_stray_safetensors(tmp_path):
    "model.safetensors is the model; another file does not override it."
    hf = hf_folder(tmp_path)
    save_file({'model.norm.weight': torch.zeros(64)},
              str(tmp_path / 'zz-adapter.safetensors'))
    ours = GPT.from_pretrained(tmp_path).eval()
    assert max_diff(hf, ours, torch.randint(0, 101, (1, 20))) < ATOL


def test_from_pretrained_follows_the_index(tmp_path):
    hf = hf_folder(tmp_path, max_shard_size='40KB')
    index = tmp_path / 'model.safetensors.index.json'
    assert index.exists() and len(list(tmp_path.glob('*.safetensors'))) > 2
    save_file({'model.norm.weight': torch.zeros(64)},
              str(tmp_path / 'zz-adapter.safetensors'))
    ours = GPT.from_pretrained(tmp_path).eval()
    assert max_diff(hf, ours, torch.randint(0, 101, (1, 20))) < ATOL
    d = json.loads(index.read_text())
    d['weight_map']['model.norm.weight'] = '../elsewhere.safetensors'
    index.write_text(json.dumps(d))
    with pytest.raises(ValueError, match='index.json.*model.norm.weight'):
        GPT.from_pretrained(tmp_path)


def test_from_pretrained_refuses_a_tensor_in_two_files(tmp_path):
    torch.manual_seed(0)
    hf = hf_llama()
    (tmp_path / 'config.json').write_text(hf.config.to_json_string())
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    names = sorted(sd)
    half = len(names) // 2
    for part, chosen in (('a', names[:half]), ('b', names[half:])):
        save_file({k: sd[k] for k in chosen},
                  str(tmp_path / f'{part}.safetensors'))
    ours = GPT.from_pretrained(tmp_path).eval()
    assert max_diff(hf, ours, torch.randint(0, 101, (1, 20))) < ATOL
    save_file({names[0]: sd[names[0]]}, str(tmp_path / 'c.safetensors'))
    with pytest.raises(ValueError, match=re.escape(names[0]) +
                       '.*a.safetensors.*c.safetensors'):
        GPT.from_pretrained(tmp_path)


def test_from_pretrained_checks_before_building(tmp_path):
    hf_folder(tmp_path)
    config = tmp_path / 'config.json'
    d = json.loads(config.read_text())
    config.write_text(json.dumps(dict(d, num_hidden_layers=10**6)))
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match='model.safetensors: the config '
                       'says n_layer 1000000 but the file holds 2 blocks'):
        GPT.from_pretrained(tmp_path)
    assert time.perf_counter() - t0 < 5
    config.write_text(json.dumps(dict(d, hidden_size=32, head_dim=8)))
    with pytest.raises(ValueError, match="embed_tokens.weight' has shape"):
        GPT.from_pretrained(tmp_path)
    config.write_text(json.dumps(d))
    (tmp_path / 'model.safetensors').write_bytes(b'\x00' * 7)
    with pytest.raises(ValueError, match='model.safetensors'):
        GPT.from_pretrained(tmp_path)


def test_gpt2_files_without_the_transformer_prefix(tmp_path):
    "GPT-2 as stored on the Hub names tensors `h.0...`, not `transformer.`"
    torch.manual_seed(0)
    config = preset('tiny', vocab_size=300, block_size=64, n_layer=2,
                    n_embd=64)
    ours = GPT(config).eval()
    hf_config, kind = config_to_hf(config)
    (tmp_path / 'config.json').write_text(json.dumps(hf_config))
    bare = {k.removeprefix('transformer.'): v.contiguous()
            for k, v in to_hf(ours, kind).items()}
    assert not any(k.startswith('transformer.') for k in bare)
    save_file(bare, str(tmp_path / 'model.safetensors'))
    idx = torch.randint(0, 300, (2, 40))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert max_diff(hf, ours, idx) < ATOL  # transformers reads it too
    back = GPT.from_pretrained(tmp_path).eval()
    assert torch.equal(back(idx)[0], ours(idx)[0])
