"""A Generator given token ids and read for token ids never loads the tokenizer (issue 11's memory
goal: `tokenizers` and smollm2's BPE were ~42 MB of a generating process): its stop ids come from
the folder's files (runtime/eos.py) and a result's text is decoded when it is read. What the
tokenizer used to give is unchanged: the same eos ids, the same text, one tokenizer per Generator
however many threads ask for it first."""

from __future__ import annotations

import concurrent.futures
import copy
import gc
import json
import pickle
import subprocess
import sys
import threading
import weakref

import pytest

from edgellama.runtime import eos
from edgellama.runtime.call import GenerationResult
from edgellama.runtime.generator import Generator
from edgellama.runtime.session import OrtModel
from edgellama.tokenizer import Tokenizer
from tests.conftest import build_toy, shared_export


def library_eos(folder):
    """What the Generator read before: the loaded tokenizer's eos id (None: none, or no tokenizer)."""
    try:
        return Tokenizer.from_folder(folder).eos_token_id
    except Exception:  # noqa: BLE001 - as Generator.tokenizer_or_none: no usable tokenizer
        return None


def files_eos(folder):
    """(id, decided): the files' answer, or the library's where they leave it undecided."""
    try:
        return eos.tokenizer_eos_id(folder), True
    except eos.Undecided:
        return library_eos(folder), False


def word_tokenizer(folder, *, words=11, special=(), eos_token=None, added=()):
    """tokenizer files of a WordLevel vocabulary t0..t{words-1}: `special` of them (indexes) also
    added tokens, `added` new added tokens (ids after the vocabulary), `eos_token` as given."""
    from tokenizers import AddedToken, models
    from tokenizers import Tokenizer as Backend

    backend = Backend(models.WordLevel({f"t{i}": i for i in range(words)}, unk_token="t0"))
    backend.add_special_tokens([AddedToken(f"t{i}", special=True) for i in special] +
                               [AddedToken(a, special=True) for a in added])
    Tokenizer(backend, eos_token=eos_token).save(folder)
    if isinstance(eos_token, dict):     # as transformers writes an AddedToken
        path = folder / "tokenizer_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "eos_token": eos_token}))
    return folder


CASES = {   # name: (word_tokenizer arguments, whether the files decide it)
    "an added special token": (dict(special=[4], eos_token="t4"), True),
    "an AddedToken dict": (dict(special=[4], eos_token={"content": "t4", "special": True}), True),
    "a new added token": (dict(added=["<end>"], eos_token="<end>"), True),
    "no eos token named": (dict(special=[4]), True),
    "a plain vocabulary token": (dict(special=[4], eos_token="t6"), False),
    "a token the vocabulary lacks": (dict(special=[4], eos_token="nowhere"), False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_eos_from_the_files_equals_the_tokenizers(tmp_path, name):
    kwargs, decided = CASES[name]
    folder = word_tokenizer(tmp_path, **kwargs)
    want = library_eos(folder)
    assert files_eos(folder) == (want, decided)
    if decided and want is not None:
        assert want in {4, 11}


def test_eos_read_a_few_characters_at_a_time(tmp_path, monkeypatch):
    folder = word_tokenizer(tmp_path, special=[1, 3, 4], added=["<a>", "<b>"], eos_token="<b>")
    for chunk in (1, 2, 3, 7, 50):
        monkeypatch.setattr(eos, "_CHUNK", chunk)
        assert eos.tokenizer_eos_id(folder) == library_eos(folder) == 12


@pytest.mark.parametrize("damage", ["model first", "no file", "not json", "cut", "config not json",
                                    "eos twice", "added_tokens not a list"])
def test_files_that_do_not_say_plainly_leave_it_to_the_tokenizer(tmp_path, damage):
    folder = word_tokenizer(tmp_path, special=[4], eos_token="t4")
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text())
    decided = damage == "no file"
    if damage == "model first":
        path.write_text(json.dumps({"model": data.pop("model"), **data}))
    elif damage == "no file":
        path.unlink()
    elif damage == "not json":
        path.write_text("[1, 2]")
    elif damage == "cut":
        path.write_text(path.read_text()[:40])
    elif damage == "config not json":
        (folder / "tokenizer_config.json").write_text("{")
    elif damage == "eos twice":
        data["added_tokens"].append({**data["added_tokens"][0], "id": 9})
        path.write_text(json.dumps(data))
    else:
        path.write_text(json.dumps({**data, "added_tokens": {"t4": 4}}))
    assert files_eos(folder) == (library_eos(folder), decided)


@pytest.mark.slow
def test_smollm2_eos_from_the_files(tmp_path):
    from edgellama.export import sources

    tok = sources.load_tokenizer("smollm2")
    tok.save(tmp_path)
    assert files_eos(tmp_path) == (tok.eos_token_id, True) == (2, True)


@pytest.fixture
def loads(monkeypatch):
    """How many times a tokenizer is loaded from a folder (each load slowed, to widen any race)."""
    count = []
    real = Tokenizer.from_folder.__func__

    def counted(cls, folder):
        count.append(folder)
        threading.Event().wait(0.05)
        return real(cls, folder)

    monkeypatch.setattr(Tokenizer, "from_folder", classmethod(counted))
    return count


@pytest.fixture(scope="module")
def toy_eos(tmp_path_factory):
    """The toy model with a tokenizer whose eos is a token neither config names: (folder, eos id)."""
    folder = build_toy(tmp_path_factory.mktemp("lazy") / "toy", seed=4)
    free = Generator(folder, provider="cpu").generate_ids([5, 7, 9], max_new_tokens=12, eos=False)[0].token_ids
    stop = next(t for t in free[2:] if t not in (2, free[0], free[1]))
    word_tokenizer(folder, special=[stop], eos_token=f"t{stop}")
    return folder, stop


def test_token_ids_in_and_out_load_no_tokenizer_and_stop_on_its_eos(toy_eos, loads):
    folder, stop = toy_eos
    model = OrtModel(folder, provider="cpu")
    gen = Generator(model)
    res = gen.generate_ids([5, 7, 9], max_new_tokens=12)[0]
    assert loads == []
    assert gen.stop_ids == Generator(model, tokenizer=Tokenizer.from_folder(folder)).stop_ids == {2, stop}
    assert (res.finish_reason, res.stop_reason, res.token_ids[-1]) == ("stop", stop, stop)
    loads.clear()
    assert res.text == Tokenizer.from_folder(folder).decode(res.token_ids[:-1]) != ""
    assert len(loads) == 2                  # the text's own load, then this test's
    assert res.to_dict()["text"] == res.text


def test_a_result_read_later_keeps_no_session_alive(toy_eos):
    folder, stop = toy_eos
    gen = Generator(folder, provider="cpu")
    res = gen.generate_ids([5, 7, 9], max_new_tokens=12)[0]
    model = weakref.ref(gen.model)
    del gen
    gc.collect()
    assert model() is None
    assert res.stop_reason == stop and res.text == Tokenizer.from_folder(folder).decode(res.token_ids[:-1])


def test_one_tokenizer_whichever_thread_asks_first(toy_eos, loads):
    gen = Generator(toy_eos[0], provider="cpu")
    start = threading.Barrier(8)

    def ask(_):
        start.wait()
        return gen.tokenizer

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        toks = list(pool.map(ask, range(8)))
    assert len(loads) == 1 and all(t is toks[0] for t in toks)


def test_text_results_are_unchanged(tmp_path_factory):
    """A result whose text was decoded when read equals the one a stream decoded as it went, and
    reads, compares, copies, pickles and prints as a plain field."""
    folder = shared_export(tmp_path_factory, "tiny", target="ort")
    gen = Generator(folder, provider="cpu")
    tok = Tokenizer.from_folder(folder)
    for eos_on in (True, False):
        lazy = gen.generate_ids([5, 6, 7], max_new_tokens=12, eos=eos_on, temperature=1.0, seed=3)[0]
        stream = gen.stream_ids([5, 6, 7], max_new_tokens=12, eos=eos_on, temperature=1.0, seed=3)
        pieces = "".join(stream)
        ids = lazy.token_ids[:-1] if lazy.stop_reason is not None else lazy.token_ids
        assert lazy.text == stream.result.text == pieces == tok.decode(ids)
        assert lazy.token_ids == stream.result.token_ids
        eager = dict(stream.result.to_dict(), prefill_ms=0, decode_ms=0, decode_tokens_per_s=0)
        assert dict(lazy.to_dict(), prefill_ms=0, decode_ms=0, decode_tokens_per_s=0) == eager
        assert list(lazy.to_dict()) == list(stream.result.to_dict())
    lazy = gen.generate_ids([5, 6, 7], max_new_tokens=6, eos=False)[0]
    back = pickle.loads(pickle.dumps(lazy))
    assert back == lazy == copy.deepcopy(lazy) and back.text == lazy.text
    assert f"text={lazy.text!r}" in repr(lazy)
    plain = GenerationResult("hi", [1], 1, "length", 0.0, 0.0, 0.0)
    assert plain.text == "hi" and GenerationResult(**plain.to_dict()) == plain


def test_a_folder_without_a_tokenizer_still_reads_empty_text(tmp_path):
    gen = Generator(build_toy(tmp_path / "toy"), provider="cpu")
    res = gen.generate_ids([5, 7], max_new_tokens=3, eos=False)[0]
    assert res.text == "" and len(res.token_ids) == 3


def test_a_generating_process_imports_no_tokenizer_until_text_is_read(tmp_path_factory):
    folder = shared_export(tmp_path_factory, "tiny", target="ort")
    script = ("import json, sys\n"
              "from edgellama.runtime import Generator\n"
              "gen = Generator(sys.argv[1], provider='cpu', threads=1)\n"
              "r = gen.generate_ids([5, 6, 7], max_new_tokens=8)[0]\n"
              "light = ('tokenizers', 'jinja2')\n"
              "before = [m for m in light if m in sys.modules]\n"
              "text = r.text\n"
              "print(json.dumps([before, [m for m in light if m in sys.modules], r.token_ids, r.stop_reason, text]))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True, check=True)
    before, after, ids, reason, text = json.loads(proc.stdout.strip().splitlines()[-1])
    assert before == [] and after == ["tokenizers"]
    assert text == Tokenizer.from_folder(folder).decode(ids[:-1] if reason is not None else ids)
