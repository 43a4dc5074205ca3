"""The two worker roles, each in a room of its own: `workers.generate` (vLLM / transformers sampling) and
`workers.judge` (Celery + math-verify). They never import each other; what they share is in broker/."""
