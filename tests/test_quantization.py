"""int8 quantization: the error bound, parity with torch's per-channel
quantizer, the int8 layer against the dequantized reference, whole models,
the safetensors file, generation, and bad input."""
import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from llm_from_scratch.generation import generate, generate_tokens
from llm_from_scratch.model import GPT, preset
from llm_from_scratch.quantization import (INT8_FORMAT, Int8Linear,
                                           bytes_per_token, dequantize,
                                           int8_layers, int8_linear,
                                           load_int8, quantize,
                                           quantize_tensor, read_int8_meta,
                                           save_int8)


def small(name='tiny', **changes):
    return preset(name, vocab_size=300, block_size=64, n_layer=2,
                  n_embd=64, **changes)


def model_of(name='tiny', seed=0, **changes):
    torch.manual_seed(seed)
    return GPT(small(name, **changes)).eval()


IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator()
                    .manual_seed(1))


def logits(m, ids=IDS):
    with torch.no_grad():
        return m(ids)[0]


# -- the rounding -----------------------------------------------------------

def test_error_is_at_most_half_a_step_per_row():
    torch.manual_seed(0)
    w = torch.randn(40, 70) * torch.logspace(-4, 0, 40)[:, None]
    q, scale = quantize_tensor(w)
    assert q.dtype == torch.int8 and scale.shape == (40,)
    assert int(q.abs().max()) == 127       # every row's largest hits 127
    assert bool((q.abs().amax(1) == 127).all())
    err = (w - dequantize(q, scale)).abs()
    assert bool((err <= scale[:, None] / 2 * (1 + 1e-6)).all())
    # per row: even the row 10,000 times smaller keeps < 1 % error
    rel = (w - dequantize(q, scale)).norm(dim=1) / w.norm(dim=1)
    assert float(rel.max()) < 0.01


def test_same_integers_as_torch_per_channel_quantizer():
    torch.manual_seed(0)
    w = torch.randn(32, 48)
    q, scale = quantize_tensor(w)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        theirs = torch.quantize_per_channel(
            w, scale.double(), torch.zeros(32, dtype=torch.long), 0,
            torch.qint8)
    assert torch.equal(theirs.int_repr(), q)
    assert torch.allclose(theirs.dequantize(), dequantize(q, scale))


def test_zero_row_and_bfloat16_input():
    w = torch.randn(3, 8).bfloat16()
    w[1] = 0
    q, scale = quantize_tensor(w)
    assert scale.dtype == torch.float32 and float(scale[1]) == 1.0
    assert int(q[1].abs().sum()) == 0


@pytest.mark.parametrize('bad, message', [
    (torch.ones(4), 'float matrix'),
    (torch.ones(2, 3, 4), 'float matrix'),
    (torch.ones(2, 3, dtype=torch.long), 'float matrix'),
    (torch.tensor([[1.0, float('inf')]]), 'inf or NaN'),
])
def test_refuses_what_cannot_be_quantized(bad, message):
    with pytest.raises(ValueError, match=message):
        quantize_tensor(bad, 'blocks.0.mlp.fc.weight')


# -- the layer ----------------------------------------------------------------

@pytest.mark.parametrize('n_in, n_out', [(64, 96), (128, 300), (100, 30),
                                         (7, 5)])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_int8_layer_matches_dequantized_reference(n_in, n_out, dtype):
    torch.manual_seed(0)
    lin = nn.Linear(n_in, n_out)
    layer = Int8Linear.from_linear(lin).to(dtype)
    x = torch.randn(2, 3, n_in)
    ref = F.linear(x, dequantize(layer.weight, layer.scale),
                   lin.bias.detach())
    with torch.no_grad():
        y = layer(x.to(dtype))
    assert y.shape == (2, 3, n_out) and y.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 0.02 * float(ref.abs().max())
    assert float((y.float() - ref).abs().max()) <= tol
    assert layer.weight.dtype == torch.int8


def test_fused_and_general_paths_agree():
    "The bf16 CPU kernel and the scale-the-output path, same numbers."
    torch.manual_seed(0)
    q, scale = quantize_tensor(torch.randn(256, 192))
    x = torch.randn(5, 192)
    general = F.linear(x, q.float()) * scale
    fused = int8_linear(x.bfloat16(), q, scale)
    assert fused.dtype == torch.bfloat16
    assert torch.allclose(fused.float(), general, rtol=0.02,
                          atol=0.02 * float(general.abs().max()))


# -- the model ----------------------------------------------------------------

def test_quantize_keeps_embeddings_and_tied_head():
    m = model_of('tiny')
    q = quantize(copy.deepcopy(m))
    assert q.lm_head.weight is q.tok_emb.weight     # still tied, float
    assert type(q.lm_head) is nn.Linear
    assert len(int8_layers(q)) == 2 * 6             # q k v o fc proj
    assert q.config.mlp_hidden == 512               # the preset's 4 * 128
    assert not any(type(x) is nn.Linear and x is not q.lm_head
                   for x in q.modules())
    rel = (logits(q) - logits(m)).norm() / logits(m).norm()
    assert float(rel) < 0.01


def test_untied_head_is_quantized():
    m = model_of('tiny-llama', tie_weights=False)
    q = quantize(copy.deepcopy(m))
    assert isinstance(q.lm_head, Int8Linear)
    assert len(int8_layers(q)) == 2 * 7 + 1         # q k v o gate up down
    assert float((logits(q) - logits(m)).norm() / logits(m).norm()) < 0.02


def test_refuses_quantized_and_lora_models():
    from llm_from_scratch.lora import add_lora
    q = quantize(model_of())
    with pytest.raises(ValueError, match='already quantized'):
        quantize(q)
    with pytest.raises(ValueError, match='merge_lora'):
        quantize(add_lora(model_of(), 4))
    with pytest.raises(ValueError, match='no nn.Linear'):
        quantize(nn.Sequential(nn.ReLU()))


def test_bytes_per_token_counts_int8_weights():
    m = model_of('tiny-llama', tie_weights=False)
    q = quantize(copy.deepcopy(m))
    lin = [x for x in m.modules() if type(x) is nn.Linear]
    n_w = sum(x.weight.numel() for x in lin)
    n_out = sum(x.out_features for x in lin)
    assert bytes_per_token(m) - bytes_per_token(q) == 4 * n_w - \
        (n_w + 4 * n_out)


# -- the file -----------------------------------------------------------------

@pytest.mark.parametrize('name, changes', [('tiny', {}),
                                           ('tiny-llama',
                                            dict(tie_weights=False))])
def test_save_and_load_give_the_same_model(tmp_path, name, changes):
    q = quantize(model_of(name, **changes))
    path = save_int8(q, tmp_path / 'm.safetensors')
    with safe_open(str(path), 'pt') as f:
        meta, keys = f.metadata(), set(f.keys())
        assert f.get_slice('blocks.0.mlp.' + ('fc' if name == 'tiny'
                                              else 'up') +
                           '.weight').get_dtype() == 'I8'
    assert meta['format'] == INT8_FORMAT
    for layer in json.loads(meta['int8']):
        assert {layer + '.weight', layer + '.scale'} <= keys
    loaded = load_int8(path)
    assert torch.equal(logits(loaded), logits(q))
    assert int8_layers(loaded) == int8_layers(q)
    if name == 'tiny':
        assert 'lm_head.weight' not in keys
        assert loaded.lm_head.weight is loaded.tok_emb.weight


def test_bfloat16_model_round_trip(tmp_path):
    q = quantize(model_of()).bfloat16()
    loaded = load_int8(save_int8(q, tmp_path / 'm.safetensors'))
    assert loaded.norm_f.weight.dtype == torch.bfloat16
    assert loaded.blocks[0].attn.q_proj.scale.dtype == torch.bfloat16
    assert torch.equal(logits(loaded), logits(q))


def test_loading_leaves_the_random_state_alone(tmp_path):
    path = save_int8(quantize(model_of()), tmp_path / 'm.safetensors')
    torch.manual_seed(5)
    load_int8(path)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))


def test_generates_with_chapter_7(tmp_path):
    q = quantize(model_of('tiny-llama', tie_weights=False))
    loaded = load_int8(save_int8(q, tmp_path / 'm.safetensors'))
    prompts = [[5, 6, 7], [8]]
    a = generate(loaded, prompts, 8, temperature=0)
    assert a == generate(q, prompts, 8, temperature=0)
    assert [len(x) for x in a] == [8, 8]
    steps = list(generate_tokens(loaded.bfloat16(), prompts, 4,
                                 temperature=0))
    assert len(steps) == 4 and steps[0].shape == (2,)


def test_refuses_to_replace_files(tmp_path):
    q = quantize(model_of())
    path = save_int8(q, tmp_path / 'm.safetensors')
    with pytest.raises(FileExistsError, match='overwrite=True'):
        save_int8(q, path)
    save_int8(q, path, overwrite=True)
    other = tmp_path / 'notes.txt'
    other.write_text('keep me')
    with pytest.raises(FileExistsError, match='not an int8 checkpoint'):
        save_int8(q, other, overwrite=True)
    assert other.read_text() == 'keep me'
    with pytest.raises(ValueError, match='quantize'):
        save_int8(model_of(), tmp_path / 'float.safetensors')
    assert sorted(p.name for p in tmp_path.iterdir()) == \
        ['m.safetensors', 'notes.txt']


def test_refuses_files_that_are_not_int8_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match='not a file'):
        load_int8(tmp_path / 'missing.safetensors')
    junk = tmp_path / 'junk.safetensors'
    junk.write_bytes(b'\x00' * 100)
    with pytest.raises(ValueError, match='not a safetensors file'):
        load_int8(junk)
    plain = tmp_path / 'plain.safetensors'
    m = model_of()
    save_file({k: v for k, v in m.state_dict().items()
               if k != 'lm_head.weight'}, str(plain))
    with pytest.raises(ValueError, match='not an int8 checkpoint'):
        load_int8(plain)
    damaged = tmp_path / 'damaged.safetensors'
    save_file({'x': torch.ones(1)}, str(damaged),
              metadata={'format': INT8_FORMAT, 'config': '{'})
    with pytest.raises(ValueError, match='metadata is damaged'):
        read_int8_meta(damaged)


def _tampered(tmp_path, change):
    path = save_int8(quantize(model_of()), tmp_path / 'm.safetensors')
    with safe_open(str(path), 'pt') as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    change(tensors, meta)
    out = tmp_path / 'tampered.safetensors'
    save_file(tensors, str(out), metadata=meta)
    return out


@pytest.mark.parametrize('change, message', [
    (lambda t, m: t.update({'blocks.0.mlp.fc.weight':
                            t['blocks.0.mlp.fc.weight'][:, :10]
                            .contiguous()}),
     r"'blocks.0.mlp.fc.weight' is torch.int8 \(512, 10\), the model "
     r"needs torch.int8 \(512, 64\)"),
    (lambda t, m: t.update({'blocks.0.mlp.fc.weight':
                            t['blocks.0.mlp.fc.weight'].float()}),
     r'expected the float tensors in one type|is torch.float32'),
    (lambda t, m: t.pop('blocks.1.attn.o_proj.scale'),
     "has no tensor 'blocks.1.attn.o_proj.scale'"),
    (lambda t, m: t.update({'extra': torch.ones(2)}),
     "tensor 'extra' has no place"),
    (lambda t, m: m.update({'int8': json.dumps(['blocks.9.mlp.fc'])}),
     'no linear layer for'),
])
def test_refuses_tensors_that_do_not_fit(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        load_int8(_tampered(tmp_path, change))
