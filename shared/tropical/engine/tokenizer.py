"""Text to token ids and back: the model's own tokenizer (directory or GGUF file), or bytes for the tiny preset."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from tropical.engine.gguf import SUFFIX, gguf_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class Tokenizer(Protocol):
    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_token_ids(self) -> tuple[int, ...]: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0-255, then BOS and EOS; ids past those decode to nothing."""

    bos_token_id = 256
    eos_token_id = 257

    @property
    def vocab_size(self) -> int:
        return 258

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return (self.eos_token_id,)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, token_ids: Sequence[int]) -> str:
        return bytes(t for t in token_ids if t < 256).decode("utf-8", errors="replace")


class HfTokenizer:
    """A tokenizer saved beside a Hugging Face checkpoint, or built from a GGUF file, through `transformers`."""

    def __init__(self, path: str | Path) -> None:
        """`path` is a model directory or a .gguf file (which carries its vocabulary, merges and template)."""
        from transformers import AutoTokenizer

        path = Path(path)
        if path.suffix == SUFFIX:
            self._tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        else:
            self._tokenizer = AutoTokenizer.from_pretrained(str(path))

    @property
    def vocab_size(self) -> int:
        return len(self._tokenizer)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self._tokenizer.eos_token_id
        return () if eos is None else (eos,)

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text))

    def decode(self, token_ids: Sequence[int]) -> str:
        text = self._tokenizer.decode(list(token_ids), skip_special_tokens=True)
        return text if isinstance(text, str) else "".join(text)

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """The prompt ids for a conversation (`{"role": ..., "content": ...}` each), ready for the reply."""
        ids = self._tokenizer.apply_chat_template(
            [dict(message) for message in messages], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return [int(token) for token in ids]


def load_tokenizer(source: str | Path | None) -> Tokenizer:
    """The tokenizer of a .gguf file or the `smollm2` preset, a directory's when it has one; bytes otherwise."""
    if source is None:
        return ByteTokenizer()
    path = gguf_file(source)
    if path is not None:
        return HfTokenizer(path)
    if any((Path(source) / name).exists() for name in TOKENIZER_FILES):
        return HfTokenizer(source)
    return ByteTokenizer()
