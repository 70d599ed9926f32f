"""The model: parity with Hugging Face transformers, equivalences, errors."""
import json
import re

import pytest
import torch

from llm_from_scratch.attention import CausalSelfAttention, KVCache
from llm_from_scratch.model import (GPT, ModelConfig, config_from_hf,
                                    from_hf, meta_model, n_params, preset,
                                    to_hf)

transformers = pytest.importorskip('transformers')
transformers.logging.set_verbosity_error()
ATOL = 1e-5  # fp32: logits agree to this absolute tolerance


def hf_gpt2(n_layer=2, n_head=4, n_embd=64, vocab=101, positions=64):
    cfg = transformers.GPT2Config(
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab,
        n_positions=positions, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
        bos_token_id=0, eos_token_id=0)
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
        assert not [m for m in missing if not m.endswith('attn.bias')]
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
