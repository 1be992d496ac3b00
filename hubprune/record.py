"""The machine-readable record a pruned checkpoint carries (``hubprune.json``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

RECORD_FILE = "hubprune.json"
RECIPE_FILE = "hubprune_recipe.yaml"
SCAN_FILE = "hubprune_scan.json"
PLOT_FILE = "hubprune_scan.png"


@dataclass
class PruneRecord:
    """What was removed from which model, chosen how. Layer indices are the base model's, 0-based.

    ``width``: the MLP narrowing (``hubprune.methods.width.WidthReport``), empty if none; ``sparsity``:
    the zeroed weights (``hubprune.methods.sparsity.sparsify``'s report: pattern, method, counts per
    projection, the mask's sha256), empty if none.

    Example: ``PruneRecord.load("out/smollm2-24l").removed_layers``
    """

    base_model: str
    base_revision: str | None
    base_num_layers: int
    removed_layers: list[int]
    kept_layers: list[int]
    metric: str
    scores: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    parameters_before: int = 0
    parameters_after: int = 0
    config_updates: list[str] = field(default_factory=list)
    width: dict = field(default_factory=dict)
    sparsity: dict = field(default_factory=dict)
    healing: dict = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)
    card_sha256: str = ""
    origin: dict = field(default_factory=dict)
    hubprune_version: str = ""
    created: str = ""

    @property
    def num_layers(self) -> int:
        return len(self.kept_layers)

    @property
    def original_revision(self) -> str | None:
        """The revision to load ``base_model`` at: the pruned commit for a Hub model, None for a local one."""
        return self.base_revision if self.origin.get("kind") == "hub" else None

    def summary(self) -> str:
        """One line: layers, width, sparsity and parameters before -> after."""
        parts = []
        if self.removed_layers:
            parts.append(
                f"removed layers {self.removed_layers} ({self.metric}), {self.base_num_layers} -> {self.num_layers}"
            )
        if self.width:
            w = self.width
            parts.append(f"MLP width {w['intermediate_size_before']} -> {w['intermediate_size_after']}")
        if self.sparsity:
            s = self.sparsity
            parts.append(f"{s['target']} sparsity ({s['method']}, {s['sparsity']:.1%} of decoder weights zero)")
        parts.append(f"{self.parameters_before / 1e6:.1f}M -> {self.parameters_after / 1e6:.1f}M parameters")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / RECORD_FILE
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, folder: str | Path) -> PruneRecord:
        path = Path(folder)
        path = path / RECORD_FILE if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: is {folder} a folder written by hubprune?")
        data = json.loads(path.read_text())
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
