"""Model-card templates shipped inside the hubprune package (rendered by hubprune.card)."""

from pathlib import Path

TEMPLATES = Path(__file__).parent


def template_path(name: str = "model_card.md.j2") -> Path:
    return TEMPLATES / name
