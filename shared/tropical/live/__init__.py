"""Real-clock drivers of the core: what a live worker and router run around the clock-free core."""
