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
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope type 'yarn'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 4.0}}, "needs low_freq_factor"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "unsupported architecture"),
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
