"""Gateway: OpenAI-compatible HTTP (completions, chat, models, health, metrics) publishing onto `requests`."""
