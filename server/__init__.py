"""hubprune's OpenAI-compatible server: one endpoint, several models, vLLM or embedded transformers engines."""
