"""Where weights come from: a local Hugging Face directory, a GGUF file, or seeded random numbers.

Checkpoints keep q, k, v and gate, up as separate matrices; our model packs
each group into one (see models/llama.py). `PACKED` is the whole translation,
used both ways: loading a checkpoint, and writing one `transformers` can read.
A GGUF file (engine/gguf.py) arrives under the same checkpoint names.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tropical.engine.config import ModelConfig
from tropical.engine.gguf import gguf_file, read_gguf, read_gguf_config
from tropical.engine.models import CausalLM

UNPACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
PACKED = {part: (packed, shard) for packed, parts in UNPACKED.items() for shard, part in enumerate(parts)}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # derived, not learned; some old checkpoints carry it


def read_config(source: str | Path) -> ModelConfig:
    """The architecture of a model directory, a .gguf file or the `smollm2` preset."""
    path = gguf_file(source)
    return read_gguf_config(path) if path is not None else read_hf_config(source)


def read_hf_config(model_dir: str | Path) -> ModelConfig:
    """config.json, plus the extra end tokens chat checkpoints list in generation_config.json."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    config = ModelConfig.from_hf(json.loads(path.read_text()))
    generation = Path(model_dir) / "generation_config.json"
    eos = json.loads(generation.read_text()).get("eos_token_id") if generation.is_file() else None
    extra = eos if isinstance(eos, list) else [] if eos is None else [eos]
    return dataclasses.replace(config, eos_token_ids=tuple(dict.fromkeys([*config.eos_token_ids, *extra])))


def load_model(source: str | Path, max_positions: int, dtype: torch.dtype, device: torch.device) -> CausalLM:
    """Build the model a directory (config.json, *.safetensors), a .gguf file or `smollm2` describes, and fill it."""
    path = gguf_file(source)
    config, tensors = read_gguf(path) if path is not None else (read_hf_config(source), _safetensors(source))
    with torch.device(device):
        model = CausalLM(config, max_positions).to(dtype)
    _fill(model, tensors, source)
    return model.eval()


def _safetensors(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a directory's *.safetensors (one file or shards), under its checkpoint name."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} has no *.safetensors weights")
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as shards:
            for name in shards.keys():
                yield name, shards.get_tensor(name)


def _fill(model: CausalLM, tensors: Iterator[tuple[str, torch.Tensor]], source: str | Path) -> None:
    """Copy checkpoint tensors into our (packed) parameters; a tensor of the wrong shape must not broadcast."""
    config = model.config
    params = dict(model.named_parameters())
    filled: set[tuple[str, int]] = set()
    for name, tensor in tensors:
        if name.endswith(IGNORED_SUFFIXES) or (config.tie_word_embeddings and name == "lm_head.weight"):
            continue
        target, shard = _our_name(name)
        if target not in params:
            raise ValueError(f"{source}: tensor {name!r} has no place in a {config.family} model")
        view = _shard_view(params[target], target, shard, config)
        if view.shape != tensor.shape:
            raise ValueError(f"{source}: tensor {name!r} has shape {list(tensor.shape)}, not {list(view.shape)}")
        view.copy_(tensor)
        filled.add((target, shard))
    missing = [name for name, shard in _expected(model) if (name, shard) not in filled]
    if missing:
        raise ValueError(f"{source} lacks weights for: {', '.join(sorted(set(missing))[:8])}")


def random_model(
    config: ModelConfig, max_positions: int, dtype: torch.dtype, device: torch.device, seed: int, std: float = 0.02
) -> CausalLM:
    """Seeded random weights drawn on the CPU, so every device gets the same numbers."""
    model = CausalLM(config, max_positions)
    fill_random(model, torch.Generator().manual_seed(seed), std)
    return model.to(device=device, dtype=dtype).eval()


def fill_random(model: CausalLM, generator: torch.Generator, std: float = 0.02) -> None:
    """Norm scales 1, biases 0, every other weight normal(0, std) from `generator` (on the weights' device)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, std, generator=generator)


def hf_state_dict(model: CausalLM) -> dict[str, torch.Tensor]:
    """Our weights under the checkpoint names, packed matrices split again (copies, safe to save)."""
    config = model.config
    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():  # a tied lm_head is not listed: it is embed_tokens
        prefix, _, leaf = name.rpartition(".")
        parent, _, module = prefix.rpartition(".")
        hf_prefix = "" if name.startswith("lm_head") else "model."
        if module in UNPACKED:
            for shard, part in enumerate(UNPACKED[module]):
                view = _shard_view(param, name, shard, config)
                state[f"{hf_prefix}{parent}.{part}.{leaf}"] = view.detach().clone().contiguous()
        else:
            state[f"{hf_prefix}{name}"] = param.detach().clone().contiguous()
    return state


def save_hf(model: CausalLM, model_dir: str | Path) -> None:
    """Write config.json and model.safetensors that `transformers` (and `load_model`) read back."""
    path = Path(model_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2))
    save_file({k: v.cpu() for k, v in hf_state_dict(model).items()}, str(path / "model.safetensors"), {"format": "pt"})


def _our_name(hf_name: str) -> tuple[str, int]:
    """`model.layers.3.self_attn.k_proj.weight` -> (`layers.3.self_attn.qkv_proj.weight`, 1)."""
    parts = hf_name.removeprefix("model.").split(".")
    for i, part in enumerate(parts):
        if part in PACKED:
            parts[i], shard = PACKED[part]
            return ".".join(parts), shard
    return ".".join(parts), -1


def _shard_view(param: torch.Tensor, name: str, shard: int, config: ModelConfig) -> torch.Tensor:
    """The rows of a packed parameter that one checkpoint tensor fills (the whole tensor when unpacked)."""
    if shard < 0:
        return param.data
    if ".qkv_proj." in name:
        q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        sizes = [q, kv, kv]
    else:
        sizes = [config.intermediate_size] * 2
    return param.data.narrow(0, sum(sizes[:shard]), sizes[shard])


def _expected(model: CausalLM) -> list[tuple[str, int]]:
    """Every (parameter, shard) a checkpoint must fill; shard -1 is a whole unpacked parameter."""
    expected: list[tuple[str, int]] = []
    for name, _ in model.named_parameters():
        module = name.rpartition(".")[0].rpartition(".")[2]
        shards = range(len(UNPACKED[module])) if module in UNPACKED else [-1]
        expected.extend((name, shard) for shard in shards)
    return expected
