"""What a model is (read from a Hugging Face config.json) and how an engine runs it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
RopeKind = Literal["default", "linear", "llama3"]


@dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling; Llama 3.x checkpoints need `llama3` to be right past short contexts."""

    kind: RopeKind = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of one Llama-family decoder; the families differ only in a few flags."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position: int = 4096
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3 normalises each head of q and k before the rotation
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # attention is full within it, so it caps the context
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"model family {self.family!r} is not supported (supported: {', '.join(FAMILIES)})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads} attention heads do not divide into {self.num_kv_heads} KV heads")
        if self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, not {self.head_dim}")

    @classmethod
    def tiny(
        cls,
        *,
        vocab_size: int = 512,
        hidden_size: int = 512,
        intermediate_size: int = 1536,
        num_layers: int = 8,
        num_heads: int = 8,
        num_kv_heads: int = 4,
        max_position: int = 4096,
        eos_token_ids: tuple[int, ...] = (),
    ) -> ModelConfig:
        """The built-in preset (about 25M parameters at the defaults) for machines without weights."""
        return cls(
            family="llama",
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=hidden_size // num_heads,
            max_position=max_position,
            tie_word_embeddings=True,
            eos_token_ids=eos_token_ids,
        )

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Read a config.json, old (`rope_theta`, `rope_scaling`) and new (`rope_parameters`) style."""
        family = hf.get("model_type", "")
        if family not in FAMILIES:
            raise ValueError(f"model_type {family!r} is not supported (supported: {', '.join(FAMILIES)})")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (only silu)")
        num_heads = hf["num_attention_heads"]
        rope = dict(hf.get("rope_scaling") or {})
        rope.update(hf.get("rope_parameters") or {})
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        window = hf.get("sliding_window")
        if family.startswith("qwen") and not hf.get("use_sliding_window", False):
            window = None
        attention_bias = bool(hf.get("attention_bias", False))
        eos = hf.get("eos_token_id")
        return cls(
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=_rope_scaling(rope, hf.get("max_position_embeddings", 4096)),
            max_position=hf.get("max_position_embeddings", 4096),
            qkv_bias=True if family == "qwen2" else attention_bias,
            o_bias=attention_bias if family in ("llama", "qwen3") else False,
            mlp_bias=bool(hf.get("mlp_bias", False)) if family == "llama" else False,
            qk_norm=family == "qwen3",
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=window,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
        )

    def to_hf(self) -> dict[str, Any]:
        """The config.json that makes `transformers` build the same network (for reference runs)."""
        rope: dict[str, Any] = {"rope_type": self.rope_scaling.kind, "rope_theta": self.rope_theta}
        if self.rope_scaling.kind != "default":
            rope["factor"] = self.rope_scaling.factor
        if self.rope_scaling.kind == "llama3":
            rope["low_freq_factor"] = self.rope_scaling.low_freq_factor
            rope["high_freq_factor"] = self.rope_scaling.high_freq_factor
            rope["original_max_position_embeddings"] = self.rope_scaling.original_max_position
        eos = list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else next(iter(self.eos_token_ids), None)
        hf: dict[str, Any] = {
            "model_type": self.family,
            "architectures": [_ARCHITECTURES[self.family]],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "sliding_window": self.sliding_window,
        }
        if self.family in ("llama", "qwen3"):
            hf["attention_bias"] = self.qkv_bias
        if self.family == "llama":
            hf["mlp_bias"] = self.mlp_bias
        if self.family.startswith("qwen"):
            hf["use_sliding_window"] = self.sliding_window is not None
        return hf

    @property
    def num_parameters(self) -> int:
        attention = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.hidden_size * self.intermediate_size
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attention + mlp + 2 * self.hidden_size) + embeddings + self.hidden_size

    @property
    def max_context(self) -> int:
        """The longest sequence this model attends over correctly."""
        return min(self.max_position, self.sliding_window or self.max_position)


_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def _rope_scaling(rope: dict[str, Any], max_position: int) -> RopeScaling:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return RopeScaling()
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(rope["factor"]))
    if kind == "llama3":
        return RopeScaling(
            kind="llama3",
            factor=float(rope["factor"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position=int(rope.get("original_max_position_embeddings", max_position)),
        )
    raise ValueError(f"rope scaling {kind!r} is not supported (supported: default, linear, llama3)")


@dataclass(frozen=True)
class EngineConfig:
    """How one engine instance runs: cache geometry, batch limits, device.

    The KV capacity is `num_kv_blocks` when given, else whatever `kv_cache_bytes`
    holds (default: 1 GiB on the CPU, 90 % of the free memory on a GPU).
    """

    block_size: int = 16
    kv_cache_bytes: int | None = None
    num_kv_blocks: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # tokens per step: decodes first, prefill chunks fill the rest
    max_model_len: int | None = None  # None: the model's own limit
    device: str | None = None  # None: CUDA when available, else CPU
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # auto: fp32 on CPU, bf16 on CUDA
    attention: Literal["auto", "sdpa", "flash_attn"] = "auto"
    enforce_eager: bool = False  # on a GPU, decode steps are CUDA graphs unless this is set
    seed: int = 0  # for requests that sample without a seed of their own

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be at least 1, not {self.num_kv_blocks}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes < 1:
            raise ValueError(f"kv_cache_bytes must be positive, not {self.kv_cache_bytes}")
