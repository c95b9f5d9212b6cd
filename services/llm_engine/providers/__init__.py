"""Model providers: `simulated` (built-in) and `openai` (any OpenAI-compatible server)."""
