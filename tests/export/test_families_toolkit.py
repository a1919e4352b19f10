"""The rest of the toolkit per family (issue 15): quantization quality, and Qwen's tokenizer and
chat template.

Quality: check/quality's code (what bench/quality.py runs) on each family's ort export, fp32 and
every quantization mode, against the family's fp32 torch model. Qwen: a byte-level BPE tokenizer
with Qwen's special tokens, pre-tokenizer and Qwen2.5's ChatML template, built here (no hub), read
by edgellama's Tokenizer and by transformers' own Qwen2Tokenizer; an exported Qwen2 folder stops on
<|im_end|>; a Qwen2 GGUF carrying the same tokenizer as llama.cpp's converter writes it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")   # a dev extra

from edgellama.check import quality  # noqa: E402
from edgellama.export import onnx_export  # noqa: E402
from tests.export.test_families import GREEDY, TOL, family_folder, family_model, family_ort_folder  # noqa: E402

QUALITY_FAMILIES = ("qwen2", "qwen3", "mistral-window5")   # Mistral's ort export is a static-KV-cache folder
MODES = ("fp16", "int8", "int8-dynamic", "int4")


# -- quality ----------------------------------------------------------------------------------------
def windows(vocab: int):
    """Two teacher-forced windows of random ids (24 tokens: past Mistral's window of 5)."""
    ids = np.random.default_rng(11).integers(3, vocab, size=48).tolist()
    return quality.make_windows(ids, window=24, bos_id=1)


@pytest.fixture(scope="module")
def family_scores(tmp_path_factory):
    """name -> {variant: Scores} of the family's ort export, fp32 and each mode, against fp32 torch."""
    from edgellama.quant.api import quantize_folder

    out = {}
    for name in QUALITY_FAMILIES:
        base = tmp_path_factory.mktemp(f"quality-{name}")
        model = family_model(name)
        wins = windows(model.config.vocab_size)
        ref = quality.evaluate(quality.torch_logits_fn(model), wins, keep_logprobs=True)
        fp32 = family_ort_folder(tmp_path_factory, name)      # test_families' folder, read only
        folders = {"fp32": fp32, **{m: quantize_folder(fp32, base / m, mode=m) for m in MODES}}
        c = model.config
        out[name] = {"torch": ref.scores, "kv_cache": json.loads((fp32 / "edgellama.json").read_text())["kv_cache"]}
        for variant, folder in folders.items():
            fn = quality.ort_logits_fn(folder / "model.onnx", num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim)
            out[name][variant] = quality.evaluate(fn, wins, reference=ref.logprobs).scores
        print(name, {k: (v.kl_mean, v.top1) for k, v in out[name].items() if k not in ("torch", "kv_cache")})
    return out


def test_quality_runs_the_static_folder(family_scores):
    """ort_logits_fn took Mistral's static-KV-cache folder (through parity's OrtSide) as it takes
    the dynamic Qwen folders."""
    assert family_scores["mistral-window5"]["kv_cache"] == "static"
    assert family_scores["qwen2"]["kv_cache"] == family_scores["qwen3"]["kv_cache"] == "dynamic"


@pytest.mark.parametrize("name", QUALITY_FAMILIES)
def test_fp32_export_kl_within_rounding(name, family_scores):
    """fp32 ONNX vs fp32 torch. Logits differ by d with |d| <= TOL (test_families' parity bound);
    to second order KL(P||Q) = Var_P(d)/2, and a variable confined to an interval of width 2*TOL
    has variance at most TOL^2 (Popoviciu), so KL <= TOL^2/2. The same bound moves perplexity by at
    most 2*TOL relative (log Q moves by at most 2*TOL per token)."""
    s, ref = family_scores[name]["fp32"], family_scores[name]["torch"]
    assert 0 <= s.kl_mean <= TOL ** 2 / 2
    assert s.ppl == pytest.approx(ref.ppl, rel=2 * TOL)
    assert s.tokens == ref.tokens


@pytest.mark.parametrize("name", QUALITY_FAMILIES)
def test_quant_kl_finite_and_ordered(name, family_scores):
    """Each mode's KL is finite and above fp32's (a quantized model is a different model). Ordered
    where the grids say it must be, on any weights: fp16 rounds each weight and activation to 11
    significant bits (relative error <= 2^-11); int8 and int4 share blocks of 32, the same lm_head
    treatment (int8) and accuracy level (activations to int8 per block), and differ in the decoder
    weights' grid: 255 levels of the block's absmax range vs 16 of its [min, max], a step ~8x
    coarser, an error variance ~60x larger on Gaussian weights. So fp16 < int8 < int4. int8-dynamic
    (per-token int8 activations, 7-bit weight codes per channel) has no such ordering against int8."""
    s = family_scores[name]
    kls = {m: s[m].kl_mean for m in MODES}
    assert all(math.isfinite(v) and v > s["fp32"].kl_mean for v in kls.values()), kls
    assert kls["fp16"] < kls["int8"] < kls["int4"], kls
    assert all(math.isfinite(s[m].ppl) for m in MODES)


# -- Qwen's tokenizer and chat template -------------------------------------------------------------------
# Qwen2's pre-tokenizer split, as its tokenizer.json spells it: single digits, letters with one
# leading non-letter, case-insensitive contractions.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")   # ids 151643.. in Qwen2.5, here after the merges
NOT_SPECIAL = ("<tool_call>", "</tool_call>")               # added, but text (Qwen2.5's tokenizer_config)
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Qwen2.5-Instruct's template as its model card and tokenizer_config document it (tools omitted:
# edgellama's Tokenizer renders no tool schemas): ChatML, a default system turn when the
# conversation has none, assistant tool calls as <tool_call> JSON, tool results as a user turn.
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == 'user') or (message.role == 'system' and not loop.first)"
    " or (message.role == 'assistant' and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == 'assistant' %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == 'tool' %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n")

CONVERSATIONS = {
    "no system": [{"role": "user", "content": "What is the capital of France?"}],
    "system": [{"role": "system", "content": "You answer in one word."},
               {"role": "user", "content": "Capital of Japan (日本)?"}],
    "multi-turn": [{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": "Add 1234 and 5678."},
                   {"role": "assistant", "content": "6912."},
                   {"role": "user", "content": "And times 2? Don't explain; I'll check."}],
    "multi-turn, no system": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!\n\nHow can I help?"},
                              {"role": "user", "content": "  indented\tline\r\nnext  "}],
    "tool call": [{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": "", "tool_calls": [
                      {"type": "function", "function": {"name": "get_weather",
                                                        "arguments": {"city": "Paris", "unit": "°C"}}}]},
                  {"role": "tool", "content": "{\"temp\": 21}"}, {"role": "tool", "content": "sunny"}],
}
TEXTS = ["Hello world", "2024-01-15: 3.14159 and 1000000", "(hello) [world] {x}", "I'M HERE, you're there",
         "café naïve 日本語 🙂", "  two spaces\n\n\nnewlines\ttab", "<|im_start|>user\nhi<|im_end|>",
         "<tool_call>x</tool_call>", "e\u0301 composed by NFC"]


def qwen_backend():
    """A byte-level BPE laid out as Qwen2's tokenizer.json is (NFC, the split above, byte-level with
    no regex of its own), merges learned on standard-library docstrings, Qwen's added tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=450, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([quality.stdlib_text(("argparse", "json", "csv", "difflib"))], trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in NOT_SPECIAL])
    return tok


def write_qwen_tokenizer(folder):
    """tokenizer.json + tokenizer_config.json as Qwen2.5-Instruct ships them; returns the backend."""
    tok = qwen_backend()
    folder.mkdir(parents=True, exist_ok=True)
    for stale in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (folder / stale).unlink(missing_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": t in SPECIAL} for t in SPECIAL + NOT_SPECIAL}
    config = {"add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
              "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": None,
              "chat_template": QWEN25_TEMPLATE, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
              "errors": "replace", "model_max_length": 131072, "pad_token": "<|endoftext|>",
              "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return tok


def hf_chat_ids(tok, messages) -> list[int]:
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.fixture(scope="module")
def qwen_tok_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen-tokenizer")
    write_qwen_tokenizer(folder)
    return folder


def test_qwen_tokenizer_loads_as_qwen2tokenizer(qwen_tok_folder):
    """transformers builds its own Qwen2 pipeline from the file's vocabulary and merges (the class,
    not our tokenizer.json's pre-tokenizer): the comparisons below are against that."""
    theirs = transformers.AutoTokenizer.from_pretrained(qwen_tok_folder)
    assert type(theirs).__name__ == "Qwen2Tokenizer"
    assert theirs.eos_token == "<|im_end|>" and theirs.bos_token is None


@pytest.mark.parametrize("text", TEXTS)
def test_qwen_ids_equal_transformers(text, qwen_tok_folder):
    from edgellama.tokenizer import Tokenizer

    ours = Tokenizer.from_folder(qwen_tok_folder)
    theirs = transformers.AutoTokenizer.from_pretrained(qwen_tok_folder)
    ids = ours.encode(text)
    assert ids == theirs(text, add_special_tokens=False)["input_ids"]
    assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids, skip_special_tokens=False)
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_qwen25_chat_template_equals_transformers(conversation, qwen_tok_folder):
    from edgellama.tokenizer import Tokenizer

    messages = CONVERSATIONS[conversation]
    ours = Tokenizer.from_folder(qwen_tok_folder)
    theirs = transformers.AutoTokenizer.from_pretrained(qwen_tok_folder)
    text = ours.apply_chat_template(messages)
    assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert (DEFAULT_SYSTEM in text) == (messages[0]["role"] != "system")
    ids = ours.chat_ids(messages)
    assert ids == hf_chat_ids(theirs, messages)
    im_start, im_end = (ours.backend.token_to_id(t) for t in SPECIAL[1:])
    turns = 1 + sum(1 for i, m in enumerate(messages) if m["role"] != "tool" or messages[i - 1]["role"] != "tool")
    assert ids.count(im_start) == turns + 1 - (messages[0]["role"] == "system")   # + the generation prompt
    assert ids.count(im_end) == ids.count(im_start) - 1


@pytest.fixture(scope="module")
def qwen_chat_folder(tmp_path_factory):
    """An exported Qwen2 (qwen2 family, untied) with Qwen's tokenizer and Qwen2.5's generation config
    (eos_token_id [<|im_end|>, <|endoftext|>]; config.json's eos is <|endoftext|> alone, as the base
    model's). lm_head's <|im_end|> row is twice the row of the token the model greedily writes 4th,
    so greedy decoding meets <|im_end|> within a few tokens (its logit doubles a positive maximum)."""
    from safetensors.torch import save_file

    from edgellama.export.model import greedy_generate
    from edgellama.tokenizer import Tokenizer

    base = tmp_path_factory.mktemp("qwen-chat")
    model = family_model("qwen2")
    hf = family_folder("qwen2", base / "hf")
    write_qwen_tokenizer(hf)
    tok = Tokenizer.from_folder(hf)
    endoftext, _, im_end = (tok.backend.token_to_id(t) for t in SPECIAL)
    prompt = tok.chat_ids(CONVERSATIONS["system"])
    seq = greedy_generate(model, torch.tensor([prompt]), 8)[0].tolist()
    pick = seq[3]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["lm_head.weight"][im_end] = 2 * state["lm_head.weight"][pick]
    save_file(state, str(hf / "model.safetensors"))
    config = json.loads((hf / "config.json").read_text())
    config.update(bos_token_id=endoftext, eos_token_id=endoftext)
    (hf / "config.json").write_text(json.dumps(config))
    (hf / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": endoftext, "eos_token_id": [im_end, endoftext], "pad_token_id": endoftext, "do_sample": False}))
    return onnx_export.export_model(str(hf), base / "ort", target="ort"), hf


def test_exported_qwen2_folder_keeps_the_chat_template(qwen_chat_folder):
    """The export rewrites tokenizer_config.json (edgellama's Tokenizer.save); transformers reads the
    exported folder to the same chat ids as the Qwen source folder."""
    folder, hf = qwen_chat_folder
    exported = transformers.AutoTokenizer.from_pretrained(folder)
    source = transformers.AutoTokenizer.from_pretrained(hf)
    for messages in CONVERSATIONS.values():
        assert hf_chat_ids(exported, messages) == hf_chat_ids(source, messages)


def test_generator_stops_on_im_end(qwen_chat_folder):
    from edgellama.runtime.generator import Generator

    folder, _ = qwen_chat_folder
    gen = Generator(folder)
    im_end = gen.tokenizer.backend.token_to_id("<|im_end|>")
    assert im_end not in gen.config.eos_token_ids      # config.json names <|endoftext|> only
    messages = CONVERSATIONS["system"]
    free = gen.generate(messages, chat=True, max_new_tokens=GREEDY, eos=False)
    assert im_end in free.token_ids and free.finish_reason == "length"
    stopped = gen.generate(messages, chat=True, max_new_tokens=GREEDY)
    cut = free.token_ids.index(im_end) + 1
    assert stopped.token_ids == free.token_ids[:cut]
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", im_end)
    assert "<|im_end|>" not in stopped.text and stopped.text == gen.tokenizer.decode(free.token_ids[:cut - 1])


# -- Qwen2 GGUF: the tokenizer llama.cpp's converter writes ---------------------------------------------------
def qwen_gguf(path, *, pre: str = "qwen2"):
    """A qwen2 GGUF of the family model whose tokenizer.ggml.* metadata is the Qwen tokenizer above,
    as convert_hf_to_gguf writes it: byte-spelled tokens padded to the vocab size with [PAD{i}]
    (UNUSED), special added tokens CONTROL, other added tokens USER_DEFINED, eos <|im_end|>,
    padding and bos <|endoftext|>, no BOS added, the chat template."""
    from tests.export.test_sources import write_gguf

    tok = qwen_backend()
    model = family_model("qwen2")
    vocab = tok.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    n = model.config.vocab_size
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
    types = [3 if t in SPECIAL else 4 if t in NOT_SPECIAL else 5 if i not in by_id else 1
             for i, t in enumerate(tokens)]
    merges = [" ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    meta = {"tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.eos_token_id": vocab["<|im_end|>"],
            "tokenizer.ggml.padding_token_id": vocab["<|endoftext|>"],
            "tokenizer.ggml.bos_token_id": vocab["<|endoftext|>"], "tokenizer.ggml.add_bos_token": False,
            "tokenizer.chat_template": QWEN25_TEMPLATE}
    return write_gguf(path, model, meta=meta)


@pytest.fixture(scope="module")
def qwen_gguf_pair(tmp_path_factory):
    from edgellama.export.gguf_source import read_gguf_tokenizer

    folder = tmp_path_factory.mktemp("qwen-gguf")
    path = qwen_gguf(folder / "qwen2.gguf")
    return read_gguf_tokenizer(path), transformers.AutoTokenizer.from_pretrained(folder, gguf_file=path.name)


def test_qwen2_gguf_carries_template_and_stop_token(qwen_gguf_pair):
    from edgellama.export import sources

    ours, theirs = qwen_gguf_pair
    assert ours.chat_template == QWEN25_TEMPLATE
    assert ours.eos_token_id == theirs.eos_token_id == ours.backend.token_to_id("<|im_end|>")
    assert ours.encode("x", add_special_tokens=True) == ours.encode("x")             # add_bos_token false
    for messages in CONVERSATIONS.values():
        assert ours.apply_chat_template(messages) == theirs.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)
    ids = ours.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == ours.backend.token_to_id("<|im_start|>") and ids[-1] == ours.eos_token_id
    assert ours.decode(ids) == "user\nhi"                                           # CONTROL: skipped


@pytest.mark.parametrize("text", ["Hello world", "café naïve", "<tool_call>x</tool_call>"])
def test_qwen2_gguf_ids_equal_transformers_where_the_splits_agree(text, qwen_gguf_pair):
    ours, theirs = qwen_gguf_pair
    assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("text", ["hello\n\nworld", "first.\n\nSecond", "Hello!\n\nHow can I help?", "in 2024, 12345"])
def test_qwen2_gguf_ids_where_qwens_split_differs_from_gpt2(text, qwen_gguf_pair):
    # Qwen2's split keeps newlines whole ('\n\n' one piece), on the punctuation before them, and digits single.
    ours, theirs = qwen_gguf_pair
    assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]
