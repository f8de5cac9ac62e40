"""OpenAI-compatible serving: the FastAPI app (openai.py), per-client limits (limits.py), Prometheus metrics."""
