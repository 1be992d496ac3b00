"""hubprune's OpenAI-compatible server: one endpoint, several models, vLLM or embedded transformers engines.

Example: ``serve(ServeConfig(models=[ModelSpec(path="out/smollm2-24l")]))``, or ``hubprune serve out/smollm2-24l``.
"""

from hubprune.server.config import ModelSpec, ServeConfig
from hubprune.server.launch import serve

__all__ = ["ModelSpec", "ServeConfig", "serve"]
