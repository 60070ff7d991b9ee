"""Tokenizers: a Hugging Face `tokenizer.json` (+ `tokenizer_config.json`) through the `tokenizers` library.

Holds what generation and chat need: encode/decode, BOS/EOS ids and the chat template.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table): bytes that are
    printable stand for themselves, the other 68 take the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF_CHAR = _byte_level_alphabet()

# DeepSeek-V2-Chat's format: "User: {prompt}\n\nAssistant: {answer}<eos>", BOS once at the start.
DEEPSEEK_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


class TokenizerError(ValueError):
    pass


def _token_str(v) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise TokenizerError(f"no tokenizer.json at {file}: train one with `dsv2 tokenizer train` "
                                 "or copy the model's tokenizer files next to its weights.")
        self.tk = _HFTokenizer.from_file(str(file))
        cfg_file = file.parent / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        self.chat_template = cfg.get("chat_template")
        self.add_bos = cfg.get("add_bos_token", self.bos_token is not None)
        self.bos_id = self.tk.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = self.tk.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def check_fits(self, model_vocab: int) -> None:
        if self.vocab_size > model_vocab:
            raise TokenizerError(f"the tokenizer has {self.vocab_size} tokens but the model's vocab_size is "
                                 f"{model_vocab}: this tokenizer belongs to another model.")

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def encode_chat(self, rendered: str) -> list[int]:
        """The ids of a rendered chat (apply_chat_template's text). The template writes BOS
        itself when it has one; BOS is prepended only if it did not and add_bos_token says so."""
        ids = self.encode(rendered, add_bos=False)
        if self.add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for. A byte-level BPE token may hold part of a UTF-8
        character, so these need not decode on their own (logprobs report them as such).
        Tokenizers of other kinds (Metaspace, byte fallback) get their piece's UTF-8."""
        piece = self.tk.id_to_token(token_id)
        if piece is None:
            return b""
        if type(self.tk.decoder).__name__ == "ByteLevel" and token_id not in self._added:
            try:
                return bytes(_BYTE_OF_CHAR[c] for c in piece)
            except KeyError:
                pass
        return piece.encode("utf-8")

    def is_special(self, token_id: int) -> bool:
        """A special token (BOS, EOS, ...): decoding skips it."""
        return token_id in self._special

    @functools.cached_property
    def _added(self) -> set[int]:
        return set(self.tk.get_added_tokens_decoder())

    @functools.cached_property
    def _special(self) -> set[int]:
        return {i for i, t in self.tk.get_added_tokens_decoder().items() if t.special}

    @functools.cached_property
    def _template(self):
        """The chat template, compiled once (SFT renders every turn of every conversation)."""
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(self.chat_template or DEEPSEEK_CHAT_TEMPLATE)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render a conversation with the tokenizer's own template, else DeepSeek-V2's format."""
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=self.bos_token or "", eos_token=self.eos_token or "")


def load_tokenizer(path: str | Path, model_vocab: int | None = None) -> Tokenizer:
    tok = Tokenizer(path)
    if model_vocab is not None:
        tok.check_fits(model_vocab)
    return tok
