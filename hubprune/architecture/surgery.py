"""Drop decoder layers from a model in memory, keeping model and config consistent.

After surgery the model is a plain transformers model: ``config.num_hidden_layers`` and
every per-layer config entry (``layer_types``, ``max_window_layers``, ...) describe the
kept layers, and each kept attention module's ``layer_idx`` is its new position, so the KV
cache works and ``save_pretrained`` output reloads with ``AutoModelForCausalLM``.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import re
from collections.abc import Sequence
from typing import Any

from torch import nn

from hubprune.architecture.families import decoder_layers, family_of, set_module, skeleton
from hubprune.architecture.perlayer import cut_per_layer_tensors

logger = logging.getLogger(__name__)

# Config entries that hold layer *indices* (remapped) or a layer *count* (recounted),
# rather than one value per layer (sliced).
_INDEX_LIST_KEYS = (
    "mlp_only_layers",
    "moe_layers",
    "attn_layer_indices",
    "cross_attention_layers",
    "local_layer_ids",
    "index_layers",
)
# Renumbered with the kept layer's new position (same base: a 1-based number stays 1-based).
LAYER_INDEX_ATTRIBUTES = ("layer_idx", "layer_id", "layer_number")
_SOURCE_KEYS = ("kv_source_layers",)  # one entry per layer, naming the layer whose KV cache it reads
LAYER_REFERENCE_ATTRIBUTES = ("kv_source_layer",)  # a layer module's copy of it
_COUNT_KEYS = ("max_window_layers", "first_k_dense_replace", "num_dense_layers")
# Settings a layer uses divided by sqrt(num_hidden_layers) (MiniCPM's residual scale): rescaled so the quotient stays.
_DEPTH_SCALED_KEYS = ("scale_depth",)
_NOT_PER_LAYER = ("architectures",)
_COUNT_ALIASES = ("num_blocks", "num_layers", "n_layer", "n_layers")  # the layer count under another name
_PERIODIC = re.compile(r"period|offset|interval|step|every|freq", re.I)  # int fields that may hold a layer pattern
_PATTERN_HINT = re.compile(r"layer|step|freq|pattern|interval|period|every|sparse", re.I)


def check_layers(layers: Sequence[int], num_layers: int) -> list[int]:
    """Validate 0-based layer indices to drop from a ``num_layers``-layer model; sorted copy."""
    layers = list(layers)
    if not layers:
        raise ValueError("no layers to drop: give at least one 0-based layer index")
    for index in layers:
        if not isinstance(index, int) or isinstance(index, bool):
            raise TypeError(f"layer indices must be integers, got {index!r}")
    duplicates = sorted(i for i in set(layers) if layers.count(i) > 1)
    if duplicates:
        raise ValueError(f"layer {duplicates[0]} is listed more than once; list each layer once")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(
            f"layer {bad[0]} is out of range: this model has {num_layers} layers, numbered 0 to {num_layers - 1}"
        )
    if len(layers) >= num_layers:
        raise ValueError(f"cannot drop all {num_layers} layers; drop 1 to {num_layers - 1} of them")
    return sorted(layers)


def drop_layers(model: nn.Module, layers: Sequence[int]) -> nn.Module:
    """A copy of ``model`` without the given 0-based layers; ``model`` itself is untouched.

    The copy shares weight tensors with ``model`` (no extra memory); clone them before
    changing weights in place.

    Example: ``pruned = drop_layers(model, [12, 13, 14, 15])``
    """
    family = family_of(model)
    num_layers = len(decoder_layers(model))
    removed = check_layers(layers, num_layers)
    kept = [i for i in range(num_layers) if i not in set(removed)]
    refuse_index_dependent_layers(model.config, kept)

    check_kept_layers(model.config, slice_copy(model.config, kept, num_layers), kept, type(model))

    pruned = copy_sharing_weights(model)
    old = decoder_layers(pruned)
    new = nn.ModuleList([old[i] for i in kept])
    for position, layer in enumerate(new):
        for module in layer.modules():
            for name in LAYER_INDEX_ATTRIBUTES:  # the KV-cache (or recurrent-state) slot of the layer
                value = getattr(module, name, None)
                if isinstance(value, int) and not isinstance(value, bool):
                    slots = 1 if module is layer else family.slots  # a layer counts layers, its parts slots
                    setattr(module, name, value + slots * (position - kept[position]))
            for name in LAYER_REFERENCE_ATTRIBUTES:  # another layer, by index (checked kept by slice_config)
                value = getattr(module, name, None)
                if isinstance(value, int) and not isinstance(value, bool) and value in kept:
                    setattr(module, name, kept.index(value))
    set_module(pruned, family.layers, new)
    cut_per_layer_tensors(pruned, kept, num_layers, family.layers)
    sliced = slice_config(pruned.config, kept, num_layers)
    refresh_copied_settings(pruned, model.config, sliced)
    logger.info("dropped layers %s; %d layers remain; config entries updated: %s", removed, len(kept), sliced)
    return pruned


def slice_config(config, kept: Sequence[int], num_layers: int) -> list[str]:
    """Make ``config`` describe only the ``kept`` layers (0-based, ascending); the keys changed.

    Per-layer lists are sliced, layer-index lists and per-layer overrides (``per_layer_config``)
    renumbered, layer counts recounted; a periodic MoE step (``decoder_sparse_step``) becomes the
    explicit list of dense layers. A text config
    inside a multimodal config is sliced in place."""
    text = config.get_text_config()
    if text is not config:
        changed = slice_config(text, kept, num_layers)
        if getattr(config, "num_hidden_layers", None) == num_layers:
            config.num_hidden_layers = len(kept)
        return changed
    slots = max(1, config.num_hidden_layers // num_layers)  # cache slots per layer (LongCat-Flash: 2)
    derived = _derived_lists(config, num_layers)  # before slicing: what the kept layers were built from
    changed = []
    step = getattr(config, "decoder_sparse_step", None)
    if isinstance(step, int) and step > 1 and isinstance(getattr(config, "mlp_only_layers", None), list):
        dense = set(config.mlp_only_layers)
        config.mlp_only_layers = [j for j, i in enumerate(kept) if (i + 1) % step != 0 or i in dense]
        config.decoder_sparse_step = 1
        changed += ["decoder_sparse_step", "mlp_only_layers"]
    for key, value in list(vars(config).items()):
        if key in changed:
            continue
        new: object
        if key in _INDEX_LIST_KEYS and isinstance(value, (list, tuple)):
            new = [kept.index(i) for i in value if i in kept]
        elif key in _SOURCE_KEYS and isinstance(value, (list, tuple)) and len(value) == num_layers:
            lost = [i for i in kept if value[i] not in kept]
            if lost:
                raise ValueError(
                    f"layer {lost[0]} reads the KV cache of layer {value[lost[0]]} ({key}), which this cut removes; "
                    f"keep layer {value[lost[0]]} or drop layer {lost[0]} too"
                )
            new = type(value)(kept.index(value[i]) for i in kept)
        elif key in _COUNT_ALIASES and value == num_layers and not isinstance(value, bool):
            new = len(kept)
        elif key in _COUNT_KEYS and isinstance(value, int):
            new = sum(1 for i in kept if i < value)
        elif key in _DEPTH_SCALED_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool):
            new = value * math.sqrt(len(kept) / num_layers)
        elif isinstance(value, (list, tuple)) and len(value) == num_layers and key not in _NOT_PER_LAYER:
            new = type(value)(value[i] for i in kept)
        else:
            continue
        setattr(config, key, new)
        changed.append(key)
    config.num_hidden_layers = len(kept) * slots
    spec = vars(config).get("_heterogeneity_spec")  # transformers' per-layer overrides, keyed by layer index
    if spec is not None:
        overrides = spec.per_layer_overrides
        config.per_layer_config = {new: overrides[old] for new, old in enumerate(kept) if old in overrides}
        changed.append("per_layer_config")
    changed += _refit_patterns(config, derived, kept, num_layers)
    return ["num_hidden_layers", *changed]


def _derived_lists(config, num_layers: int) -> dict[str, list]:
    """The per-layer lists a config computes (properties such as Jamba's ``layers_block_type``)."""
    found = {}
    for name in dir(type(config)):
        if name.startswith("_") or not isinstance(getattr(type(config), name, None), property):
            continue
        try:
            value = getattr(config, name)
        except Exception:  # a property that does not apply to this config
            continue
        if isinstance(value, (list, tuple)) and len(value) == num_layers:
            found[name] = list(value)
    return found


def _refit_patterns(config, derived: dict[str, list], kept: Sequence[int], num_layers: int) -> list[str]:
    """Make the per-layer lists the config computes (``derived``, before the cut) list the kept layers' entries,
    by rewriting the pattern they come from: a repeated list (RecurrentGemma's ``block_types``) becomes the
    explicit per-layer list; a period or offset (Jamba's ``attn_layer_offset``) gets the value that fits, where
    one does. The keys changed; a pattern that no value fits is left for ``check_kept_layers`` to refuse."""
    want = {name: [value[i] for i in kept] for name, value in derived.items()}

    def fits() -> bool:
        try:
            return all(list(getattr(config, name) or []) == value for name, value in want.items())
        except Exception:  # the config cannot compute a list from these values
            return False

    if fits():
        return []
    for key, value in list(vars(config).items()):
        if isinstance(value, (list, tuple)) and 0 < len(value) < num_layers and key not in _INDEX_LIST_KEYS:
            explicit = type(value)(value[i % len(value)] for i in kept)  # the repeated entries the kept layers had
            if _try(config, {key: explicit}, fits):
                return [key]
    ints = [
        k
        for k, v in vars(config).items()
        if _PERIODIC.search(k) and isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= num_layers
    ]
    values = range(num_layers + 1)
    for size in (1, 2):
        for keys in itertools.combinations(ints, size):
            for candidate in itertools.product(values, repeat=size):
                if _try(config, dict(zip(keys, candidate)), fits):
                    return list(keys)
    return []


def _try(config, values: dict, fits) -> bool:
    """Set ``values`` on ``config`` and keep them if ``fits()``; otherwise restore the old ones."""
    old = {k: getattr(config, k) for k in values}
    try:
        for key, value in values.items():
            setattr(config, key, value)
        if fits():
            return True
    except Exception:  # a value the config refuses
        pass
    for key, value in old.items():
        setattr(config, key, value)
    return False


def refresh_copied_settings(model: Any, old_config, keys: Sequence[str]) -> None:
    """Give the sliced config entries ``keys`` to the modules that copied them from ``old_config`` at
    build time (Mllama's text model keeps ``cross_attention_layers``), so that the pruned model runs
    in memory as it will after a reload: an attribute of the same name that still holds the old value."""
    old_text, new_text = old_config.get_text_config(), model.config.get_text_config()
    for key in keys:
        old, new = getattr(old_text, key, None), getattr(new_text, key, None)
        for module in model.modules():
            value = vars(module).get(key)
            if value is not None and not isinstance(value, nn.Module) and type(value) is type(old) and value == old:
                setattr(module, key, copy.copy(new))


def slice_copy(config, kept: Sequence[int], num_layers: int):
    """A copy of ``config`` sliced to the ``kept`` layers (``config`` itself is untouched)."""
    config = copy.deepcopy(config)
    slice_config(config, kept, num_layers)
    return config


def check_kept_layers(config, new_config, kept: Sequence[int], model_class: type | None = None) -> None:
    """Refuse a cut whose sliced config builds different layers than the ones kept (a periodic
    per-layer setting the kept layers no longer follow, say): compared on meta-device skeletons,
    module by module (classes, weight shapes, scalar settings). Refuse a cut that removes every
    layer of one kind (``layer_types``): transformers cannot build its cache."""
    types = list(getattr(config.get_text_config(), "layer_types", None) or [])
    for kind in dict.fromkeys(types):
        if all(types[i] != kind for i in kept):
            where = [i for i, t in enumerate(types) if t == kind]
            raise ValueError(
                f"this cut removes every {kind!r} layer ({', '.join(map(str, where))}); keep at least one of them"
            )
    before, after = skeleton(config, model_class), skeleton(new_config, model_class)
    old, new = decoder_layers(before), decoder_layers(after)
    for j, i in enumerate(kept):
        a, b = _signature(old[i], {o: n for n, o in enumerate(kept)}), _signature(new[j])
        if a != b:
            diff = (
                next(f"{x[0] or 'the layer'}: {x[1:]} != {y[1:]}" for x, y in zip(a, b) if x != y)
                if len(a) == len(b)
                else f"{len(a)} modules != {len(b)}"
            )
            hints = sorted(
                k
                for k, v in vars(config.get_text_config()).items()
                if _PATTERN_HINT.search(k) and isinstance(v, (int, list, str)) and not isinstance(v, bool)
            )
            raise ValueError(
                f"hubprune cannot keep layer {i} as layer {j}: the pruned config would build it "
                f"differently ({diff}). A per-layer setting of this architecture does not follow the cut; "
                f"fields that may hold it: {', '.join(hints) or 'none found'}"
            )


def _signature(layer: nn.Module, renumber: dict[int, int] | None = None) -> list[tuple]:
    """Each module's class, weight shapes and scalar settings; ``renumber`` maps the layer indices that
    LAYER_REFERENCE_ATTRIBUTES hold to their new numbers."""
    rows = []
    for path, module in layer.named_modules():
        shapes = tuple((n, tuple(p.shape)) for n, p in module.named_parameters(recurse=False))
        settings: list[tuple[str, Any]] = []
        for k, v in sorted(vars(module).items()):
            if k.startswith("_") or k in (*LAYER_INDEX_ATTRIBUTES, "training"):
                continue
            if isinstance(v, float):
                v = float(f"{v:.12g}")  # a rescaled setting may differ in its last bit
            elif k in LAYER_REFERENCE_ATTRIBUTES and renumber is not None:
                v = renumber.get(v, f"dropped layer {v}")
            elif not isinstance(v, (int, bool, str)):
                continue
            settings.append((k, v))
        rows.append((path, type(module).__name__, shapes, tuple(settings)))
    return rows


def refuse_index_dependent_layers(config, kept: list[int]) -> None:
    # GPT-2 can scale attention by 1/(layer_idx + 1), computed from the index at load time:
    # renumbering a layer would silently change what it computes.
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) and kept != list(range(len(kept))):
        raise ValueError(
            "this GPT-2 model scales attention by its layer index (scale_attn_by_inverse_layer_idx=True), "
            "so only its last layers can be dropped without changing the kept ones; "
            f"drop a suffix such as layers {len(kept)}..{config.num_hidden_layers - 1}"
        )


def copy_sharing_weights(model: nn.Module) -> nn.Module:
    """A copy of the module tree and config that shares every parameter and buffer with ``model``."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)
