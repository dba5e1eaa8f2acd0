"""Router: consumes `requests`, keeps the global waiting queue, places each prefill and decode."""
