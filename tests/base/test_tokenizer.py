"""The Tokenizer: byte-exact round trips, transformers' encodings and chat prompts for smollm2's GGUF
vocabulary, and tokenizer files that both we and transformers read back."""

from __future__ import annotations

import json

import pytest

from edgellama.errors import RuntimeInputError, SourceError
from edgellama.export import sources
from edgellama.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    "Hello 12345 world\n\n  x  café 日本 🤗",
    "What's up?\tI'm   fine...\r\n\n\n 3.14159 + 2,000,000 = ?",
    "  leading spaces and trailing   ",
    "ñ Ü 中文 العربية emoji 👍🏽 \u00a0nbsp",
    "def f(x):\n    return x**2  # comment\n",
    "<|im_start|>user\nhi<|im_end|>\n",
    "",
]
FRANCE = "What is the capital of France?"
CONVERSATION = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Capital of Italy?"},
    {"role": "assistant", "content": "Rome."},
    {"role": "user", "content": "And of Spain? 🇪🇸"},
]


@pytest.fixture(scope="module")
def tiny_tok():
    return sources.load_tokenizer("tiny")


@pytest.mark.parametrize("text", TEXTS)
def test_tiny_round_trip(tiny_tok, text):
    ids = tiny_tok.encode(text)
    assert all(0 <= i < tiny_tok.vocab_size for i in ids)
    assert tiny_tok.decode(ids, skip_special_tokens=False) == text


def test_tiny_specials(tiny_tok):
    config = sources.presets.tiny()
    assert tiny_tok.vocab_size == config.vocab_size
    assert (tiny_tok.bos_token_id, tiny_tok.eos_token_id) == (config.bos_token_id, config.eos_token_id)
    ids = tiny_tok.chat_ids("hi")
    assert ids[0] == tiny_tok.bos_token_id and tiny_tok.eos_token_id in ids
    # specials are one id each, and skipped on decode by default
    assert tiny_tok.decode(ids) == "user\nhi\nassistant\n"


def test_chat_ids_accepts_a_string_or_messages(tiny_tok):
    one = [{"role": "user", "content": "hi"}]
    assert tiny_tok.chat_ids("hi") == tiny_tok.chat_ids(one) == tiny_tok.encode(tiny_tok.apply_chat_template(one))
    assert tiny_tok.apply_chat_template(one, add_generation_prompt=False).endswith("<|im_end|>\n")


def test_save_and_from_folder_round_trip(tiny_tok, tmp_path):
    tiny_tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == tiny_tok.chat_template and config["eos_token"] == "<|im_end|>"
    back = Tokenizer.from_folder(tmp_path)
    for text in TEXTS:
        assert back.encode(text) == tiny_tok.encode(text)
    assert back.chat_ids(CONVERSATION) == tiny_tok.chat_ids(CONVERSATION)
    assert (back.bos_token_id, back.eos_token_id, back.pad_token_id, back.vocab_size) == \
        (tiny_tok.bos_token_id, tiny_tok.eos_token_id, tiny_tok.pad_token_id, tiny_tok.vocab_size)


def test_saved_files_read_by_transformers(tiny_tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tiny_tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert hf(text, add_special_tokens=False)["input_ids"] == tiny_tok.encode(text)
    assert hf.eos_token_id == tiny_tok.eos_token_id
    assert hf.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == \
        tiny_tok.apply_chat_template(CONVERSATION)


def test_from_folder_reads_transformers5_template_file_and_named_templates(tiny_tok, tmp_path):
    tiny_tok.save(tmp_path)
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ bos_token }}"}]
    cfg["bos_token"] = {"content": "<|im_start|>", "special": True}   # AddedToken form
    cfg_path.write_text(json.dumps(cfg))
    tok = Tokenizer.from_folder(tmp_path)
    assert tok.apply_chat_template([]) == "D<|im_start|>" and tok.bos_token_id == 1
    (tmp_path / "chat_template.jinja").write_text("J{{ messages[0]['content'] }}")
    assert Tokenizer.from_folder(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "Jx"


def test_tokenizer_errors(tiny_tok, tmp_path):
    with pytest.raises(SourceError, match="no tokenizer.json"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(SourceError, match="not a readable tokenizer"):
        Tokenizer.from_folder(tmp_path)
    bare = Tokenizer(tiny_tok.backend)
    with pytest.raises(SourceError, match="no chat template"):
        bare.chat_ids("hi")
    strict = Tokenizer(tiny_tok.backend, chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(RuntimeInputError, match="roles must alternate"):
        strict.chat_ids("hi")
    with pytest.raises(RuntimeInputError, match="role"):
        tiny_tok.chat_ids([{"content": "no role"}])


# -- smollm2's GGUF vocabulary against transformers' GGUF tokenizer ---------------------------------
@pytest.fixture(scope="module")
def smollm2_pair():
    transformers = pytest.importorskip("transformers")
    path = sources.smollm2_path()
    hf = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return sources.load_tokenizer("smollm2"), hf


@pytest.mark.slow
def test_smollm2_encodings_equal_transformers(smollm2_pair):
    ours, hf = smollm2_pair
    assert ours.vocab_size == len(hf)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (hf.bos_token_id, hf.eos_token_id,
                                                                         hf.pad_token_id)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids) == text


@pytest.mark.slow
def test_smollm2_chat_ids_equal_transformers(smollm2_pair):
    ours, hf = smollm2_pair
    ids = ours.chat_ids(FRANCE)
    want = hf.apply_chat_template([{"role": "user", "content": FRANCE}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    assert ids == list(want)
    assert ids[:3] == [1, 9690, 198]     # <|im_start|>system\n: the template's default system prompt
    assert ours.apply_chat_template(CONVERSATION) == hf.apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert ours.chat_ids(CONVERSATION) == list(hf.apply_chat_template(
        CONVERSATION, add_generation_prompt=True, tokenize=True, return_dict=False))


@pytest.mark.slow
def test_smollm2_saved_tokenizer_round_trips(smollm2_pair, tmp_path):
    ours, _ = smollm2_pair
    ours.save(tmp_path)
    back = Tokenizer.from_folder(tmp_path)
    assert back.chat_ids(CONVERSATION) == ours.chat_ids(CONVERSATION)
    for text in TEXTS:
        assert back.encode(text) == ours.encode(text)


# -- a sentencepiece ("llama") GGUF vocabulary against transformers' LlamaTokenizer ---------------------------
def write_sentencepiece_gguf(path):
    """A small llama.cpp-style sentencepiece vocabulary: <unk>/<s>/</s>, 256 byte pieces, characters
    and frequent substrings of some words scored best-first, no merges (they follow from the scores)."""
    from collections import Counter

    import gguf
    import numpy as np

    words = ["\u2581" + w for w in "the cat sat on the mat hello world the end tea that then".split()]
    counts = Counter(w[i:j] for w in words for i in range(len(w)) for j in range(i + 2, min(len(w), i + 5) + 1))
    chars = sorted({c for w in words for c in w})
    multi = [p for p, _ in counts.most_common(60)]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *chars, *multi]
    scores = [0.0] * 259 + [-100.0 - i for i in range(len(chars))] + [-float(i) for i in range(len(multi))]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (len(chars) + len(multi)))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    for add, value in ((w.add_block_count, 1), (w.add_embedding_length, 8), (w.add_head_count, 2),
                       (w.add_feed_forward_length, 8), (w.add_context_length, 16)):
        add(value)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_sentencepiece_gguf_equals_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from edgellama.export.gguf_source import read_gguf_tokenizer

    path = write_sentencepiece_gguf(tmp_path / "spm.gguf")
    ours = read_gguf_tokenizer(path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    texts = ["the cat sat on the mat", " the  cat\n\nhello", "world zebra ü 日本!", "that then tea",
             "<s>the</s> end", " leading", ""]
    for text in texts:
        ids = ours.encode(text)
        assert ids == hf(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids)
        assert ours.encode(text, add_special_tokens=True) == hf(text)["input_ids"]
    assert len(ours.encode("the cat")) < len("the cat") - 2      # merged pieces, not characters
    assert (ours.bos_token_id, ours.eos_token_id) == (1, 2)
