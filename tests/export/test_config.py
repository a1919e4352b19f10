"""LlamaConfig: transformers' config.json in both generations, invariants refused once, presets."""

import pytest

from edgellama.errors import ConfigError, EdgellamaError
from edgellama.export.config import LlamaConfig, llama3_2_1b_shape, tiny

HF4 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 100, "hidden_size": 64,
       "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
       "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
       "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "max_position_embeddings": 256}


def test_transformers_4_config():
    c = LlamaConfig.from_hf(HF4)
    assert (c.head_dim, c.n_rep, c.rope_type, c.rope_theta) == (16, 2, "llama3", 500000.0)
    assert c.tie_word_embeddings


def test_transformers_5_rope_parameters():
    d = {k: v for k, v in HF4.items() if k not in ("rope_theta", "rope_scaling")}
    d["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1234.0}
    c = LlamaConfig.from_hf(d)
    assert (c.rope_type, c.rope_theta, c.rope_scaling["factor"]) == ("linear", 1234.0, 2.0)
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 99.0}
    c = LlamaConfig.from_hf(d)
    assert (c.rope_type, c.rope_scaling, c.rope_theta) == ("default", None, 99.0)


def test_legacy_type_key_and_round_trip():
    d = dict(HF4, rope_scaling={"type": "linear", "factor": 4.0})
    c = LlamaConfig.from_hf(d)
    assert c.rope_type == "linear"
    again = LlamaConfig.from_hf(c.to_hf())
    assert again == c
    assert LlamaConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("change, words", [
    ({"num_key_value_heads": 3}, "does not divide"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}}, "unsupported rope type 'dynamic'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 4.0}}, "needs low_freq_factor"),
    ({"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}, "unsupported architecture"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"hidden_size": 0}, "hidden_size must be a positive integer"),
    ({"attention_bias": True}, "attention_bias"),
])
def test_invariants_refused_with_clear_words(change, words):
    with pytest.raises(ConfigError, match=words) as err:
        LlamaConfig.from_hf(dict(HF4, **change))
    assert isinstance(err.value, EdgellamaError) and "\n" not in str(err.value)


def test_presets():
    assert tiny().num_key_value_heads == 2
    big = llama3_2_1b_shape()
    # Llama-3.2-1B has 1.24B parameters with its tied embedding.
    assert 1.2e9 < big.num_parameters() < 1.3e9
    assert big.rope_type == "llama3" and big.n_rep == 4


LLAMA3 = HF4["rope_scaling"]


@pytest.mark.parametrize("change, words", [
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false, got 'false'"),
    ({"tie_word_embeddings": 0}, "tie_word_embeddings must be true or false"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "2.0"}}, "rope factor must be a positive number"),
    ({"rope_scaling": {**LLAMA3, "low_freq_factor": 0}}, "rope low_freq_factor must be a positive number"),
    ({"rope_scaling": {**LLAMA3, "low_freq_factor": 4.0}}, "high_freq_factor .* must be greater than"),
    ({"rope_scaling": {**LLAMA3, "original_max_position_embeddings": 0.5}}, "original_max_position_embeddings"),
    ({"rope_scaling": ["llama3"]}, "rope_scaling must be an object"),
    ({"rope_parameters": "default"}, "rope_parameters must be an object"),
    ({"num_hidden_layers": 10 ** 12}, "num_hidden_layers must be a positive integer up to 1024"),
    ({"max_position_embeddings": 10 ** 12}, "max_position_embeddings must be a positive integer up to 1048576"),
    ({"hidden_size": -64}, "hidden_size must be a positive integer"),
    ({"vocab_size": "100"}, "vocab_size must be a positive integer"),
    ({"num_attention_heads": 4.0}, "num_attention_heads must be a positive integer"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps must be a positive number"),
    ({"rope_theta": float("nan")}, "rope_theta must be a number greater than 1"),
    ({"rope_theta": 1e-177}, "rope_theta must be a number greater than 1"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 1e-300}}, "rope factor must be at least 1"),
    ({"eos_token_id": [2, "3"]}, "eos_token_id must be a token id"),
    ({"pad_token_id": 100}, r"pad_token_id must be a token id in 0\.\.99"),
    ({"attention_bias": "false"}, "attention_bias must be true or false"),
    ({"architectures": "LlamaForCausalLM"}, "architectures a list of strings"),
])
def test_untyped_and_absurd_fields_refused_in_one_line(change, words):
    """Issue 10's untyped-reading examples, at the config boundary: each a ConfigError, never a
    TypeError/ZeroDivisionError, never a string read as truthy, nothing sized by an absurd value."""
    with pytest.raises(ConfigError, match=words) as err:
        LlamaConfig.from_hf(dict(HF4, **change))
    assert "\n" not in str(err.value) and len(str(err.value)) < 300


def test_manifest_config_is_validated_the_same_way():
    good = LlamaConfig.from_hf(HF4).to_dict()
    for change in ({"tie_word_embeddings": "true"}, {"num_hidden_layers": 10 ** 12}, {"head_dim": [16]}):
        with pytest.raises(ConfigError):
            LlamaConfig.from_dict({**good, **change})
    with pytest.raises(ConfigError, match="not an object"):
        LlamaConfig.from_dict([])


def test_check_shapes_compares_layers_and_embedding_first():
    from edgellama.errors import SourceError
    from edgellama.export.config import check_shapes, expected_shapes

    config = tiny()
    shapes = expected_shapes(config)
    assert check_shapes(config, shapes, where="w") == list(shapes)
    tied = tiny(tie_word_embeddings=True)
    assert "lm_head.weight" not in check_shapes(tied, shapes, where="w")     # a tied checkpoint's copy dropped
    layers = {k: v for k, v in shapes.items() if not k.startswith("model.layers.1.")}
    with pytest.raises(SourceError, match="the config says 2 layers; the weights hold 1"):
        check_shapes(config, layers, where="w")
