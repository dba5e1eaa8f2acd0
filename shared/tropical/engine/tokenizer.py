"""Text to token ids and back: the model directory's own tokenizer, or bytes for the tiny preset."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

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
    """A tokenizer saved beside a Hugging Face checkpoint, through `transformers`."""

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer

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


def load_tokenizer(model_dir: str | Path | None) -> Tokenizer:
    """The directory's tokenizer when it has one; bytes otherwise."""
    if model_dir is not None and any((Path(model_dir) / name).exists() for name in TOKENIZER_FILES):
        return HfTokenizer(model_dir)
    return ByteTokenizer()
