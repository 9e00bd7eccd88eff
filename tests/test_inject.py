"""Loading a causal LM and injecting adapters: target matching (names, regex, all-linear), per-module
rank/alpha patterns, frozen base weights, parameter counts, the identity at initialisation, and the
errors for target lists that match nothing and for folders that are not causal LMs.

Uses the tiny 2-layer Llama from conftest (hidden 64, 4 heads, 2 KV heads, MLP 128).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from tspeft_rt.errors import ConfigError, ModelError
from tspeft_rt.inject import (AdapterSpec, adapted_layers, adapter_parameters, count_parameters, inject_adapters,
                              linear_module_names, load_base_model, match_targets)
from tspeft_rt.layers import GatedLinear

METHODS = ["ts-lora", "ts-dora", "lora", "dora"]
KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    model, tok = load_base_model(str(tiny_model_dir))
    model.eval()
    return model, tok


@pytest.fixture
def model(base):
    """A private copy of the loaded tiny model, for injection."""
    return copy.deepcopy(base[0])


def dims(config) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each projection, from the config alone."""
    h, i = config.hidden_size, config.intermediate_size
    hd = h // config.num_attention_heads
    kv = config.num_key_value_heads * hd
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def inputs(model, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask}


# ---- loading -----------------------------------------------------------------------------------------


def test_load_base_model(base, tiny_model_dir):
    model, tok = base
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 2
    assert next(model.parameters()).dtype == torch.float32
    assert tok.pad_token_id is not None
    assert len(tok) == model.config.vocab_size
    with torch.no_grad():
        out = model(**inputs(model)).logits
    assert out.shape == (2, 12, model.config.vocab_size)
    assert torch.isfinite(out).all()


def test_load_base_model_bf16(tiny_model_dir):
    model, _ = load_base_model(str(tiny_model_dir), torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_linear_module_names_exclude_the_output_head(model):
    names = linear_module_names(model)
    assert len(names) == 7 * model.config.num_hidden_layers
    assert all(n.rsplit(".", 1)[-1] in KINDS for n in names)
    assert "lm_head" not in names


# ---- target matching ---------------------------------------------------------------------------------


def test_names_list_adapts_exactly_those_modules(model):
    names = inject_adapters(model, AdapterSpec(target_modules=["q_proj", "v_proj"]))
    layers = model.config.num_hidden_layers
    assert len(names) == 2 * layers
    assert sorted(names) == sorted(f"model.layers.{i}.self_attn.{k}" for i in range(layers)
                                   for k in ("q_proj", "v_proj"))
    assert set(adapted_layers(model)) == set(names)
    for i in range(layers):
        attn = model.model.layers[i].self_attn
        assert isinstance(attn.q_proj, GatedLinear) and isinstance(attn.v_proj, GatedLinear)
        assert type(attn.k_proj) is nn.Linear and type(attn.o_proj) is nn.Linear
        assert type(model.model.layers[i].mlp.up_proj) is nn.Linear


def test_full_path_name_matches_one_module(model):
    names = inject_adapters(model, AdapterSpec(target_modules=["model.layers.1.mlp.down_proj"]))
    assert names == ["model.layers.1.mlp.down_proj"]


def test_regex_string(model):
    names = inject_adapters(model, AdapterSpec(target_modules=r".*\.layers\.0\..*_proj"))
    assert len(names) == 7
    assert all(n.startswith("model.layers.0.") for n in names)


def test_regex_is_a_full_match(model):
    names = match_targets(model, r".*(q|k)_proj")
    assert sorted(n.rsplit(".", 1)[-1] for n in names) == ["k_proj", "k_proj", "q_proj", "q_proj"]
    with pytest.raises(ConfigError):
        match_targets(model, "q_proj")  # a bare name as a regex string must match the full path


def test_all_linear(model):
    names = inject_adapters(model, AdapterSpec(target_modules="all-linear"))
    assert len(names) == 7 * model.config.num_hidden_layers
    assert not any("lm_head" in n for n in names)
    assert type(model.lm_head) is nn.Linear
    leftover = [n for n, m in model.named_modules() if type(m) is nn.Linear and n != "lm_head"
                and not n.endswith((".base_layer", ".lora_A", ".lora_B"))]
    assert leftover == []


@pytest.mark.parametrize("targets, missing", [
    (["q_proj", "qq_proj"], "qq_proj"),
    (["nope"], "nope"),
    (["proj"], "proj"),  # suffix match is by whole path component
    (["lm_head"], "lm_head"),  # the output head is never a target
])
def test_names_list_with_unmatched_name(model, targets, missing):
    with pytest.raises(ConfigError) as ei:
        inject_adapters(model, AdapterSpec(target_modules=targets))
    msg = str(ei.value)
    assert repr(missing) in msg
    assert "candidates" in msg
    for kind in KINDS:
        assert kind in msg
    assert not any(isinstance(m, GatedLinear) for m in model.modules())  # nothing half-injected


@pytest.mark.parametrize("regex", [r"nothing.*", r".*\.qproj", r".*lm_head"])
def test_regex_matching_nothing(model, regex):
    with pytest.raises(ConfigError) as ei:
        inject_adapters(model, AdapterSpec(target_modules=regex))
    msg = str(ei.value)
    assert repr(regex) in msg
    assert "q_proj" in msg and "down_proj" in msg


@pytest.mark.parametrize("targets", [5, None, {"q_proj": 1}])
def test_target_modules_of_wrong_type(model, targets):
    with pytest.raises(ConfigError) as ei:
        match_targets(model, targets)
    assert "target_modules" in str(ei.value)


# ---- rank / alpha patterns -----------------------------------------------------------------------------


def test_rank_and_alpha_patterns(model):
    spec = AdapterSpec(method="lora", target_modules="all-linear", rank=8, alpha=16.0,
                       rank_pattern={"q_proj": 4, r"layers\.1\.self_attn\.v_proj": 2},
                       alpha_pattern={"v_proj": 32, "down_proj": 8})
    inject_adapters(model, spec)
    d = dims(model.config)
    for name, layer in adapted_layers(model).items():
        kind = name.rsplit(".", 1)[-1]
        rank = 4 if kind == "q_proj" else 2 if name == "model.layers.1.self_attn.v_proj" else 8
        alpha = 32.0 if kind == "v_proj" else 8.0 if kind == "down_proj" else 16.0
        assert layer.rank == rank, name
        assert layer.lora_A.weight.shape == (rank, d[kind][0]), name
        assert layer.lora_B.weight.shape == (d[kind][1], rank), name
        assert layer.scaling == pytest.approx(alpha / rank), name


def test_rslora_scaling(model):
    inject_adapters(model, AdapterSpec(target_modules=["q_proj"], rank=4, alpha=8, use_rslora=True))
    for layer in adapted_layers(model).values():
        assert layer.scaling == pytest.approx(8 / math.sqrt(4))


# ---- frozen base, trainable adapter, counts ------------------------------------------------------------


def trainable_suffixes(method: str) -> set[str]:
    out = {"lora_A.weight", "lora_B.weight"}
    if method.endswith("dora"):
        out.add("lora_magnitude_vector")
    if method.startswith("ts-"):
        out.add("token_gate.tau")
    return out


@pytest.mark.parametrize("method", METHODS)
def test_only_adapter_parameters_require_grad(model, method):
    names = inject_adapters(model, AdapterSpec(method=method, target_modules=["q_proj", "v_proj"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{m}.{s}" for m in names for s in trainable_suffixes(method)}
    assert trainable == expected
    for n, p in model.named_parameters():
        if "base_layer" in n or "embed" in n or "norm" in n:
            assert not p.requires_grad, n
    weights, taus = adapter_parameters(model)
    assert {id(p) for p in weights + taus} == {id(p) for p in model.parameters() if p.requires_grad}
    assert len(taus) == (len(names) if method.startswith("ts-") else 0)


@pytest.mark.parametrize("method", METHODS)
def test_count_parameters_matches_hand_count(model, method):
    total_before = sum(p.numel() for p in model.parameters())
    rank = 4
    inject_adapters(model, AdapterSpec(method=method, target_modules="all-linear", rank=rank,
                                       rank_pattern={"down_proj": 2}))
    d = dims(model.config)
    expected = 0
    for kind, (fan_in, fan_out) in d.items():
        r = 2 if kind == "down_proj" else rank
        per = r * (fan_in + fan_out)
        per += fan_out if method.endswith("dora") else 0
        per += 1 if method.startswith("ts-") else 0
        expected += per * model.config.num_hidden_layers
    trainable, total = count_parameters(model)
    assert trainable == expected
    assert total == total_before + expected


# ---- identity at initialisation ------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_zero_lora_b_keeps_the_logits(base, model, method):
    reference = base[0]
    x = inputs(model)
    with torch.no_grad():
        expected = reference(**x).logits
    inject_adapters(model, AdapterSpec(method=method, target_modules="all-linear"))
    layers = adapted_layers(model)
    assert all(torch.count_nonzero(l.lora_B.weight) == 0 for l in layers.values())
    assert all(torch.count_nonzero(l.lora_A.weight) > 0 for l in layers.values())
    model.eval()
    with torch.no_grad():
        got = model(**x).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # and the adapter is really on the forward path: a non-zero B changes the logits
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.weight.normal_(0, 0.5)
        changed = model(**x).logits
    assert not torch.allclose(changed, expected, atol=1e-3)


# ---- folders that are not causal LMs -------------------------------------------------------------------


def _bert_config():
    from transformers import BertConfig

    return BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64)


def make_not_causal(kind: str, root):
    path = root / kind
    if kind == "no-config":
        path.mkdir()
        (path / "README.md").write_text("nothing here\n")
    elif kind == "bert-config-only":
        _bert_config().save_pretrained(path)
    elif kind == "bert-json-only":
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    elif kind == "bert-masked-lm-with-weights":
        from transformers import BertForMaskedLM

        BertForMaskedLM(_bert_config()).save_pretrained(path)
    elif kind == "t5-config":
        from transformers import T5Config

        T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=100).save_pretrained(path)
    elif kind == "unknown-model-type":
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"model_type": "not-a-model"}))
    else:
        raise AssertionError(kind)
    return path


@pytest.mark.parametrize("kind", ["no-config", "bert-config-only", "bert-json-only", "bert-masked-lm-with-weights",
                                  "t5-config", "unknown-model-type"])
def test_not_a_causal_lm_folder(tmp_path, kind):
    path = make_not_causal(kind, tmp_path)
    with pytest.raises(ModelError) as ei:
        load_base_model(str(path))
    assert str(path) in str(ei.value)


@pytest.mark.parametrize("kind", ["t5-config", "bert-masked-lm-with-weights"])
def test_not_a_causal_lm_message_says_so(tmp_path, kind):
    # An encoder checkpoint (BertForMaskedLM) must not be loaded as a "causal" BertLMHeadModel with
    # bidirectional attention, which would train on the very tokens it predicts.
    path = make_not_causal(kind, tmp_path)
    with pytest.raises(ModelError) as ei:
        load_base_model(str(path))
    assert "causal" in str(ei.value)


def test_missing_path(tmp_path):
    path = tmp_path / "does-not-exist"
    with pytest.raises(ModelError) as ei:
        load_base_model(str(path))
    assert str(path) in str(ei.value)


def test_file_instead_of_folder(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(ModelError) as ei:
        load_base_model(str(path))
    assert str(path) in str(ei.value)


@pytest.mark.parametrize("damage", ["no-weights", "bad-config-json", "no-tokenizer", "truncated-weights"])
def test_damaged_model_folder(tiny_copy, damage):
    if damage == "no-weights":
        (tiny_copy / "model.safetensors").unlink()
    elif damage == "bad-config-json":
        (tiny_copy / "config.json").write_text("{not json")
    elif damage == "no-tokenizer":
        for f in tiny_copy.iterdir():
            if f.name.startswith("tokenizer") or f.name in ("vocab.json", "merges.txt", "chat_template.jinja"):
                f.unlink()
    elif damage == "truncated-weights":
        w = tiny_copy / "model.safetensors"
        w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(ModelError) as ei:
        load_base_model(str(tiny_copy))
    assert str(tiny_copy) in str(ei.value)
