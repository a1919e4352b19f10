"""The tokenizer: the `tokenizers` library's Tokenizer plus the chat template and special tokens.

Behaves as transformers' fast tokenizer does for the calls edgellama makes: `encode` with
`add_special_tokens=False` and `apply_chat_template(..., tokenize=False)` rendered with the same
jinja2 sandbox settings (`trim_blocks`, `lstrip_blocks`, `loopcontrols`, a `tojson` that does not
escape HTML, `raise_exception`, `strftime_now`). No torch here: the runtime uses this module.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgellama.errors import EdgellamaError, RuntimeInputError, SourceError
from edgellama.folder import inside, read_json

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"  # transformers 5.x writes the template here, not in the config

Messages = Sequence[dict[str, Any]]


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Text <-> token ids, and chat prompts as transformers' `apply_chat_template` renders them."""

    def __init__(self, backend: Any, *, chat_template: str | None = None, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None, unk_token: str | None = None):
        self.backend = backend  # tokenizers.Tokenizer
        self.chat_template = chat_template
        self.special = {"bos_token": bos_token, "eos_token": eos_token,
                        "pad_token": pad_token, "unk_token": unk_token}
        self._template = None

    # -- ids ---------------------------------------------------------------------------------------
    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def _id(self, key: str) -> int | None:
        text = self.special.get(key)
        return None if text is None else self.backend.token_to_id(text)

    @property
    def bos_token_id(self) -> int | None:
        return self._id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._id("pad_token")

    @property
    def vocab_size(self) -> int:
        """Every id the tokenizer can produce, added tokens included (transformers' `len(tokenizer)`)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    # -- chat ----------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: Messages, *, add_generation_prompt: bool = True) -> str:
        """The prompt text transformers' `apply_chat_template(messages, tokenize=False)` renders."""
        if not self.chat_template:
            raise SourceError("this tokenizer has no chat template; pass a plain prompt instead")
        if self._template is None:
            self._template = _compile(self.chat_template)
        for m in messages:
            if not isinstance(m, dict) or "role" not in m:
                raise RuntimeInputError(f"a chat message must be a dict with 'role' and 'content', got {m!r}")
        extra = {k: v for k, v in self.special.items() if v is not None}
        import jinja2

        try:
            return self._template.render(messages=[dict(m) for m in messages],
                                         add_generation_prompt=add_generation_prompt, **extra)
        except jinja2.exceptions.TemplateError as e:  # the template refused the conversation
            raise RuntimeInputError(f"the chat template rejected these messages: {e}") from None

    def chat_ids(self, prompt_or_messages: str | Messages) -> list[int]:
        """Token ids of a chat prompt (a str is one user message), a generation prompt added.

        transformers' `apply_chat_template(..., tokenize=True)` encodes without special tokens:
        the template writes them itself.
        """
        messages = ([{"role": "user", "content": prompt_or_messages}]
                    if isinstance(prompt_or_messages, str) else list(prompt_or_messages))
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)

    # -- files ---------------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (chat template and special tokens inside)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / TOKENIZER_FILE))
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                                  "clean_up_tokenization_spaces": False}
        config.update({k: v for k, v in self.special.items() if v is not None})
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer":
        """Read tokenizer.json (+ tokenizer_config.json, chat_template.jinja) as transformers writes them."""
        from tokenizers import Tokenizer as Backend

        folder = Path(folder)
        path, config_path, template_path = (_file_in(folder, name)
                                            for name in (TOKENIZER_FILE, CONFIG_FILE, TEMPLATE_FILE))
        if not path.is_file():
            raise SourceError(f"{folder}: no {TOKENIZER_FILE}")
        try:
            backend = Backend.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the library raises bare Exceptions for malformed JSON
            raise SourceError(f"{path}: not a readable tokenizer ({e})") from None
        config: dict[str, Any] = {}
        if config_path.is_file():
            config = read_json(config_path, error=SourceError, bad="not valid JSON")
            if not isinstance(config, dict):
                raise SourceError(f"{config_path}: not a JSON object")
        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: transformers picks "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template_path.is_file():
            try:
                template = template_path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise SourceError(f"{template_path}: not readable text ({e})") from None
        return cls(backend, chat_template=template if isinstance(template, str) else None,
                   **{k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")})

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, chat_template={'yes' if self.chat_template else 'no'})"


def _file_in(folder: Path, name: str) -> Path:
    """A tokenizer file of `folder`; one that is a symlink to a file outside is refused."""
    try:
        return inside(folder, name, what="tokenizer file", hub_cache=True)
    except EdgellamaError as e:
        raise SourceError(str(e)) from None


def _compile(template: str) -> Any:
    """transformers' `_compile_jinja_template` environment (chat_template_utils.py), without the
    assistant-mask tracker edgellama never asks for."""
    import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise SourceError(f"the chat template does not parse ({e})") from None
