"""The model families as Llama blocks with switches (issue 15): Qwen2 (q/k/v biases), Qwen3 (per-head
q_norm/k_norm, head_dim apart from hidden/heads) and Mistral (sliding window).

Config switches read from config.json as transformers 4.x and 5.x write it, refusals in one line;
our torch blocks and every ONNX target against transformers' own classes (Qwen2ForCausalLM,
Qwen3ForCausalLM, MistralForCausalLM) on tiny random configs: fp32 logits within 1e-4 over a
left-padded batch of 2, prefill + 16 decode steps, greedy 32 tokens identical; Mistral's window
is smaller than the sequence."""

from __future__ import annotations

import functools

import pytest
import torch

transformers = pytest.importorskip("transformers")   # a dev extra

from edgellama.errors import ConfigError, ExportError  # noqa: E402
from edgellama.export import config as presets  # noqa: E402
from edgellama.export import onnx_export  # noqa: E402
from edgellama.export.config import LlamaConfig  # noqa: E402
from edgellama.export.model import greedy_generate  # noqa: E402
from tests.conftest import (OrtLoop, diff_vs_transformers, hf_greedy, hf_reference, left_padded_batch,  # noqa: E402
                            ort_greedy, ort_session, seeded_llama, shared_portable, shared_trace,
                            teacher_forced)

TOL = 1e-4
DECODE_STEPS = 16
GREEDY = 32
TARGETS = ["portable", "ort", "onnx23"]
# prompts of 12 and 8 tokens (+16 decoded): a window of 5 cuts every query's keys
FAMILIES = {
    "qwen2": {"model_type": "qwen2", "attention_bias": True},
    "qwen2-tied": {"model_type": "qwen2", "attention_bias": True, "tie_word_embeddings": True},
    "qwen3": {"model_type": "qwen3", "qk_norm": True, "head_dim": 32},
    "mistral-window5": {"model_type": "mistral", "sliding_window": 5},
}


def family_model(name: str):
    return seeded_llama(presets.tiny(**FAMILIES[name]), seed=7)


def family_portable(tmp_path_factory, name: str):
    """A fresh copy of the family's portable ONNX model, traced once per family in the session: the
    trace of its HF folder (family_hf_folder: family_model(name)'s weights, fp32), which
    family_ort_folder's export lowers too (conftest.shared_portable / shared_trace), instead of a
    second trace of the same graph from the in-memory model. Its weights are read from that folder
    when a test writes the model."""
    return shared_portable(str(family_hf_folder(tmp_path_factory, name)))


@functools.cache
def family_greedy(name: str):
    """(ids, mask, transformers' GREEDY greedy tokens) on the left-padded batch (10, 6) of seed 2: the
    reference of the torch, ONNX and Generator greedy checks, computed once per family."""
    ours = family_model(name)
    ids, mask = left_padded_batch(ours.config.vocab_size, (10, 6), seed=2)
    return ids, mask, hf_greedy(hf_reference(ours), ids, mask, GREEDY)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_pair(request):
    ours = family_model(request.param)
    return request.param, ours, hf_reference(ours)


# -- config.json --------------------------------------------------------------------------------------
def hf_dict(model_type: str, **overrides) -> dict:
    """config.json as transformers 5.x writes it for a tiny model of the family."""
    cls = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
           "mistral": transformers.MistralConfig}[model_type]
    base = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return cls(**{**base, **overrides}).to_dict()


def test_switches_from_transformers_5_configs():
    qwen2 = LlamaConfig.from_hf(hf_dict("qwen2"))
    assert (qwen2.model_type, qwen2.attention_bias, qwen2.qk_norm, qwen2.sliding_window) == ("qwen2", True, False, None)
    qwen3 = LlamaConfig.from_hf(hf_dict("qwen3", head_dim=48))
    assert (qwen3.model_type, qwen3.attention_bias, qwen3.qk_norm, qwen3.head_dim) == ("qwen3", False, True, 48)
    mistral = LlamaConfig.from_hf(hf_dict("mistral", sliding_window=64))
    assert (mistral.model_type, mistral.sliding_window, mistral.attention_bias) == ("mistral", 64, False)
    assert LlamaConfig.from_hf(hf_dict("mistral", sliding_window=None)).sliding_window is None
    # Qwen's window is off unless use_sliding_window; on for every layer from max_window_layers 0
    assert LlamaConfig.from_hf(hf_dict("qwen2", sliding_window=32)).sliding_window is None
    assert LlamaConfig.from_hf(hf_dict("qwen2", use_sliding_window=True, sliding_window=32,
                                       max_window_layers=0)).sliding_window == 32


def test_switches_from_transformers_4_configs():
    """Qwen2.5's and Mistral's released config.json shapes (4.x: rope_theta, use_sliding_window false
    with a sliding_window value, max_window_layers)."""
    qwen25 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256, "rope_theta": 1e6,
              "rope_scaling": None, "sliding_window": 131072, "use_sliding_window": False, "max_window_layers": 21,
              "tie_word_embeddings": True, "hidden_act": "silu", "rms_norm_eps": 1e-6}
    c = LlamaConfig.from_hf(qwen25)
    assert (c.model_type, c.attention_bias, c.sliding_window, c.tie_word_embeddings) == ("qwen2", True, None, True)
    mistral = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 64,
               "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "vocab_size": 512, "max_position_embeddings": 256, "rope_theta": 10000.0, "sliding_window": 4096}
    assert LlamaConfig.from_hf(mistral).sliding_window == 4096


@pytest.mark.parametrize("config, words", [
    ({"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"]}, "unsupported architecture 'gemma2'"),
    ({"model_type": "qwen2", "architectures": ["Qwen2MoeForCausalLM"]}, "unsupported architecture"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 32, "max_window_layers": 1,
      "num_hidden_layers": 2}, "sliding window on layers 1.. only is not supported"),
    ({"model_type": "mistral", "sliding_window": 32, "layer_types": ["sliding_attention", "full_attention"]},
     "layer_types mixing sliding and full attention is not supported"),
    ({"model_type": "qwen2", "rope_scaling": {"type": "yarn", "factor": 4.0}},
     "rope type 'yarn' needs original_max_position_embeddings"),
    ({"model_type": "qwen2", "rope_scaling": {"type": "longrope", "factor": 4.0}}, "unsupported rope type 'longrope'"),
    ({"model_type": "qwen3", "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}},
     "unsupported rope type 'dynamic'"),
    ({"model_type": "llama", "attention_bias": True}, "attention_bias is not supported for llama"),
    ({"model_type": "qwen3", "attention_bias": True}, "attention_bias is not supported for qwen3"),
    ({"model_type": "mistral", "mlp_bias": True}, "mlp_bias is not supported"),
    ({"model_type": "mistral", "sliding_window": 0}, "sliding_window must be a positive integer"),
])
def test_unsupported_refused_in_one_line(config, words):
    base = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ConfigError) as err:
        LlamaConfig.from_hf({**base, **config})
    assert words in str(err.value) and "\n" not in str(err.value)


def test_switch_values_validated_once():
    with pytest.raises(ConfigError, match="qk_norm must be true or false"):
        presets.tiny(qk_norm="yes")
    with pytest.raises(ConfigError, match="unsupported model_type 'gemma'"):
        presets.tiny(model_type="gemma")
    with pytest.raises(ConfigError, match="sliding_window must be a positive integer"):
        presets.tiny(sliding_window=-3)
    # a switch goes with its family, so to_hf can write every config
    with pytest.raises(ConfigError, match="only qwen2 has them"):
        presets.tiny(attention_bias=True)
    with pytest.raises(ConfigError, match="only qwen3 has q_norm/k_norm"):
        presets.tiny(model_type="qwen3")
    with pytest.raises(ConfigError, match="a sliding window needs model_type mistral, qwen2 or qwen3"):
        presets.tiny(sliding_window=8)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_config_round_trips_through_transformers(name):
    config = presets.tiny(**FAMILIES[name])
    hf = transformers.AutoConfig.for_model(**config.to_hf())
    assert LlamaConfig.from_hf(hf.to_dict()) == config


# -- torch blocks against transformers ------------------------------------------------------------------
def test_logits_prefill_and_decode(family_pair):
    name, ours, hf = family_pair
    ids, mask = left_padded_batch(ours.config.vocab_size, (12, 8), seed=1)
    diff = diff_vs_transformers(ours, hf, ids, mask, DECODE_STEPS)
    print(f"{name}: left-padded batch of 2, prefill + {DECODE_STEPS} decode, max abs logits diff {diff:.2e}")
    assert diff <= TOL


def test_greedy_identical(family_pair):
    name, ours, _ = family_pair
    ids, mask, theirs = family_greedy(name)
    mine = greedy_generate(ours, ids, GREEDY, attention_mask=mask)
    assert mine.shape == (2, GREEDY)
    assert torch.equal(mine, theirs)


@pytest.mark.parametrize("name, switch", [("qwen2", {"attention_bias": False}), ("qwen3", {"qk_norm": False}),
                                          ("mistral-window5", {"sliding_window": None})])
def test_each_switch_matters(name, switch):
    """The comparison sees each switch: the family without it (same shared weights) differs past TOL."""
    ours = family_model(name)
    plain = seeded_llama(presets.tiny(**{**FAMILIES[name], **switch, "model_type": "llama"}), seed=7)
    state = {k: v for k, v in ours.state_dict().items() if k in plain.state_dict()}
    plain.load_state_dict(state)
    ids, mask = left_padded_batch(ours.config.vocab_size, (12, 8), seed=1)
    assert diff_vs_transformers(plain, hf_reference(ours), ids, mask, 2) > 100 * TOL


# -- the ONNX export on every target ----------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", list(FAMILIES))
def test_export_parity(name, target, tmp_path_factory, tmp_path):
    ours = family_model(name)
    loop = OrtLoop(ort_session(onnx_export.lower(family_portable(tmp_path_factory, name), target=target),
                               tmp_path / target), ours.config)
    ids, mask = left_padded_batch(ours.config.vocab_size, (12, 8), seed=1)
    diff = teacher_forced(ours, loop, ids, mask, steps=DECODE_STEPS)
    print(f"{name} {target}: prefill + {DECODE_STEPS} decode, max abs logits diff vs torch {diff:.2e}")
    assert diff <= TOL
    ids, mask, theirs = family_greedy(name)
    assert (ort_greedy(loop, ids, mask, GREEDY) == theirs.numpy()).all()


def test_window_lowered_per_target(tmp_path_factory):
    """ort: GroupQueryAttention's local_window_size; onnx23: Attention-23 has no window attribute, so
    the window goes into its explicit mask; the portable node carries `sliding_window`."""
    portable = family_portable(tmp_path_factory, "mistral-window5")
    gqa = [n for n in portable.graph if n.op_type == "GroupQueryAttention"]
    assert gqa and all(n.attributes["sliding_window"].as_int() == 5 for n in gqa)
    ort = onnx_export.lower(family_portable(tmp_path_factory, "mistral-window5"), target="ort")
    assert all(n.attributes["local_window_size"].as_int() == 5
               for n in ort.graph if n.op_type == "GroupQueryAttention")
    onnx23 = onnx_export.lower(family_portable(tmp_path_factory, "mistral-window5"), target="onnx23")
    assert any(n.name.startswith("onnx23/attention_bias_window5/") for n in onnx23.graph)
    llama = shared_portable("tiny")        # the session's trace of the built-in tiny (presets.tiny())
    assert all("sliding_window" not in n.attributes for n in llama.graph)   # a Llama graph is unchanged


# -- model folders: static KV cache, onnxruntime-genai, quantization -----------------------------------------
def family_folder(name: str, out) -> "Path":
    """An HF checkpoint folder of the family (config.json as `to_hf` writes it, tiny's tokenizer)."""
    import json

    from safetensors.torch import save_file

    from edgellama.export import sources

    model = family_model(name)
    folder = sources.save_hf_folder("tiny", out)
    (folder / "config.json").write_text(json.dumps(model.config.to_hf()))
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    save_file(state, str(folder / "model.safetensors"))
    return folder


_HF_FOLDERS: dict[str, "Path"] = {}
_ORT_FOLDERS: dict[str, "Path"] = {}


def family_hf_folder(tmp_path_factory, name: str) -> "Path":
    """The family's HF checkpoint folder (family_folder), written once per session; read only."""
    if name not in _HF_FOLDERS:
        _HF_FOLDERS[name] = family_folder(name, tmp_path_factory.mktemp(name) / "hf")
    return _HF_FOLDERS[name]


def family_ort_folder(tmp_path_factory, name: str) -> "Path":
    """The family's ort export (default KV cache contract) of its HF folder, once per session: the
    tests here and test_families_toolkit's quality scores only read it (and its HF folder, parity's
    torch reference). Exported from the session's trace of that folder (the one family_portable
    clones): export_model as the user runs it, the trace not repeated."""
    if name not in _ORT_FOLDERS:
        hf = family_hf_folder(tmp_path_factory, name)
        with shared_trace(str(hf)):
            _ORT_FOLDERS[name] = onnx_export.export_model(str(hf), hf.parent / "ort", target="ort")
    return _ORT_FOLDERS[name]


@pytest.fixture(scope="module")
def ort_folders(tmp_path_factory):
    """name -> the family's ort export (default KV cache contract)."""
    return {name: family_ort_folder(tmp_path_factory, name) for name in ("qwen2", "qwen3", "mistral-window5")}


def manifest(folder) -> dict:
    import json

    return json.loads((folder / "edgellama.json").read_text())


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_static_kv_cache_refused_for_family_or_defaulted_to_dynamic(name, ort_folders, tmp_path):
    """The static graph packs plain q/k/v MatMuls and fuses rotary into attention: no place for
    Qwen2's biases or Qwen3's q_norm/k_norm. Asked for, it is refused in one line; by default the
    ort export falls back to the dynamic contract."""
    folder = family_folder(name, tmp_path / "hf")
    with pytest.raises(ExportError, match=f"--kv-cache static refused: {name}") as err:
        onnx_export.export_model(str(folder), tmp_path / "static", target="ort", kv_cache="static")
    assert "\n" not in str(err.value)
    assert manifest(ort_folders[name])["kv_cache"] == "dynamic"


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "mistral-window5"])
def test_generator_greedy_equals_transformers(name, ort_folders):
    """Our Generator on the family's ort folder (Mistral: the static KV cache, local_window_size in
    the shared-buffer GroupQueryAttention) gives transformers' greedy tokens, batch of 2."""
    from edgellama.runtime.generator import Generator

    folder = ort_folders[name]
    assert manifest(folder)["kv_cache"] == ("static" if name.startswith("mistral") else "dynamic")
    ids, mask, want = family_greedy(name)
    want = want.tolist()
    rows = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    got = [r.token_ids for r in Generator(folder).generate_ids(rows, max_new_tokens=GREEDY, eos=False)]
    assert got == want


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "mistral-window5"])
def test_genai_config_names_the_family(name, ort_folders):
    import json

    genai = json.loads((ort_folders[name] / "genai_config.json").read_text())
    assert genai["model"]["type"] == name.split("-")[0]


@pytest.mark.genai
@pytest.mark.parametrize("name", ["qwen2", "qwen3", "mistral-window5"])
def test_genai_greedy_equals_generator(name, ort_folders):
    pytest.importorskip("onnxruntime_genai")
    from edgellama.runtime.generator import Generator
    from tests.check.test_genai import genai_greedy

    prompt = [5, 9, 33, 70, 12, 8, 100, 41, 7, 3]
    theirs = genai_greedy(ort_folders[name], prompt, GREEDY)
    ours = Generator(ort_folders[name]).generate_ids(prompt, max_new_tokens=GREEDY)[0].token_ids
    assert theirs == ours[:len(theirs)] and len(theirs) > 0


@pytest.mark.parametrize("mode", ["int4", "int8", "int8-dynamic", "fp16"])
@pytest.mark.parametrize("name", ["qwen2", "qwen3", "mistral-window5"])
def test_quantize_and_generate(name, mode, ort_folders, tmp_path):
    from edgellama.quant.api import quantize_folder
    from edgellama.runtime.generator import Generator

    q = quantize_folder(ort_folders[name], tmp_path / mode, mode=mode)
    res = Generator(q).generate_ids([[5, 9, 33, 70], [12, 8]], max_new_tokens=8, eos=False)
    assert [len(r.token_ids) for r in res] == [8, 8]


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "mistral-window5"])
def test_parity_command_passes_against_torch(name, ort_folders, tmp_path):
    """`edgellama parity --reference torch` rebuilds the family's torch model from the manifest's
    source and passes (the localization probes recompute attention through the same switches)."""
    import json

    from edgellama.cli.main import main

    report = tmp_path / "report.json"
    rc = main(["parity", str(ort_folders[name]), "--reference", "torch", "--decode-steps", "4", "--quiet",
               "--json", str(report)])
    result = json.loads(report.read_text())
    assert rc == 0, result
    assert result["comparisons"][0]["status"] == "pass"


# -- GGUF as llama.cpp's converter writes each family --------------------------------------------------------
GGUF_FAMILIES = {
    "qwen2": FAMILIES["qwen2"],
    # transformers' GGUF loader reads no head_dim for qwen3 (its config default, 128, is used)
    "qwen3": {"model_type": "qwen3", "qk_norm": True, "head_dim": 128},
    # llama.cpp tags Mistral llama and writes no window; the name says mistral
    "mistral": {"model_type": "mistral"},
}


@pytest.mark.parametrize("name", list(GGUF_FAMILIES))
def test_gguf_weights_equal_transformers_gguf_loader(name, tmp_path):
    from edgellama.export import sources
    from tests.export.test_sources import write_gguf

    model = seeded_llama(presets.tiny(**GGUF_FAMILIES[name]), seed=6)
    path = write_gguf(tmp_path / f"{name}.gguf", model)
    loaded = sources.load_model(path)[0]
    assert loaded.config == model.config
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                                               dtype=torch.float32)
    # transformers reads a llama-tagged Mistral as Llama (its Mistral path wants general.name == "mistral"
    # exactly, then fails on the installed gguf-py): the same weights either way
    assert type(theirs).__name__ == presets.FAMILIES["llama" if name == "mistral" else name]
    theirs = theirs.state_dict()
    mine = loaded.state_dict()
    assert set(k for k in theirs if "rotary" not in k) == set(mine)
    for k, v in mine.items():
        assert torch.equal(v, theirs[k]), k


def test_gguf_mistral_window_metadata_is_read(tmp_path):
    from edgellama.export import sources
    from tests.export.test_sources import write_gguf

    model = family_model("mistral-window5")
    path = write_gguf(tmp_path / "m.gguf", model, meta={"llama.attention.sliding_window": 5})
    assert sources.load_model(path)[0].config.sliding_window == 5


# -- yarn, as the Qwen2.5/Qwen3 model cards add it for long context ------------------------------------------
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}   # small: every band used


def test_yarn_from_the_model_card_config():
    qwen3 = hf_dict("qwen3", rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                              "original_max_position_embeddings": 32768})
    assert LlamaConfig.from_hf(qwen3).rope_scaling == {"rope_type": "yarn", "factor": 4.0,
                                                       "original_max_position_embeddings": 32768}


@pytest.mark.parametrize("target", ["torch", "ort"])
def test_yarn_parity(target, tmp_path):
    ours = seeded_llama(presets.tiny(**FAMILIES["qwen2"], rope_scaling=YARN), seed=7)
    hf = hf_reference(ours)
    ids, mask = left_padded_batch(ours.config.vocab_size, (40, 30), seed=1)
    if target == "torch":
        assert diff_vs_transformers(ours, hf, ids, mask, DECODE_STEPS) <= TOL
        plain = seeded_llama(presets.tiny(**FAMILIES["qwen2"]), seed=7)
        assert diff_vs_transformers(plain, hf, ids, mask, 2) > 100 * TOL     # yarn changes the logits
        return
    loop = OrtLoop(ort_session(onnx_export.lower(onnx_export.export_onnx(ours), target=target), tmp_path), ours.config)
    assert teacher_forced(ours, loop, ids, mask, steps=DECODE_STEPS) <= TOL


def test_gguf_yarn_metadata_becomes_the_config(tmp_path):
    from edgellama.export import sources
    from tests.export.test_sources import write_gguf

    model = seeded_llama(presets.tiny(**FAMILIES["qwen2"], rope_scaling=YARN), seed=7)
    path = write_gguf(tmp_path / "y.gguf", model, meta={"qwen2.rope.scaling.type": "yarn",
                                                        "qwen2.rope.scaling.factor": 4.0,
                                                        "qwen2.rope.scaling.original_context_length": 32})
    assert sources.load_model(path)[0].config == model.config
