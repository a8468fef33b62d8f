"""Reproducible measurement scripts: latency against MACs per expert and backend."""
