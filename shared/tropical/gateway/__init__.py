"""OpenAI's HTTP API in front of a Tropical deployment (`openai_api`: the shapes; `server`: the aiohttp service)."""
