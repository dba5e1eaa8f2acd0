"""Asking an OpenAI-compatible server over HTTP, as any client would: what `tropical up --prompt --port` prints."""

from __future__ import annotations

import aiohttp


async def chat_once(base_url: str, model: str, prompt: str, *, max_tokens: int, api_key: str | None = None,
                    timeout_s: float = 300.0) -> str:
    """The answer to one user message (greedy), or RuntimeError with the server's error message."""
    headers = {} if api_key is None else {"Authorization": f"Bearer {api_key}"}
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        async with session.post(f"{base_url}/v1/chat/completions", json=body, headers=headers) as response:
            reply = await response.json()
    if "error" in reply:
        raise RuntimeError(f"{response.status}: {reply['error']['message']}")
    return str(reply["choices"][0]["message"]["content"])
