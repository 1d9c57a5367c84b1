"""Backends: the LLM clients, the endpoints a server owner configured, the offline templates."""
