"""The prompt vocabulary: a slot grammar (slots with weighted values, `str.format` templates, exclusions, a
negative prompt) read from YAML. `synth_data.composer` composes prompts from it, the toy-world teacher builds its
tokenizer from its words, and the eval grades slots against it.

    name: wan
    slots:
      subject: [an elderly woman, a toddler]
      clothing:
        - {value: a yellow raincoat, weight: 2.0}
        - a red knitted scarf
    templates:
      - "{subject} wearing {clothing}"
    exclusions:
      - {subject: a toddler, clothing: a yellow raincoat}
    negative_prompt: "blurry, low quality"
"""

from __future__ import annotations

import math
import os
import string
from dataclasses import dataclass, field
from pathlib import Path

import yaml

_TOP_LEVEL_KEYS = ("name", "slots", "templates", "exclusions", "negative_prompt")


@dataclass(kw_only=True)
class Vocabulary:
    """A slot grammar for prompts. Checked on construction; errors start with `source`."""

    name: str
    """Short name, e.g. `wan` or `toyworld`."""
    slots: dict[str, list[str]]
    """Ordered slot -> distinct values. Slot names must be Python identifiers (template fields)."""
    weights: dict[str, list[float]] = field(default_factory=dict)
    """Slot -> one weight > 0 per value; a slot left out gets uniform weights (filled in here)."""
    templates: list[str]
    """`str.format` templates; every template uses every slot. The first letter is capitalised."""
    exclusions: list[dict[str, str]] = field(default_factory=list)
    """Partial assignments {slot: value, ...} that never occur together in one prompt."""
    negative_prompt: str = ""
    """Negative prompt the teacher uses with classifier-free guidance."""
    source: str = "<vocabulary>"
    """Where it came from (the YAML path); prefixes every error message."""

    def __post_init__(self) -> None:
        where = self.source
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"{where}: name: expected a non-empty string, got {self.name!r}")
        if not isinstance(self.slots, dict) or not self.slots:
            raise ValueError(f"{where}: slots: no slots; give at least one slot with values")
        for slot, values in self.slots.items():
            _check_slot(where, slot, values)
        for slot in self.weights:
            if slot not in self.slots:
                raise ValueError(f"{where}: weights.{slot}: unknown slot; slots are {', '.join(self.slots)}")
        for slot, values in self.slots.items():
            weights = self.weights.setdefault(slot, [1.0] * len(values))
            if len(weights) != len(values):
                raise ValueError(f"{where}: weights.{slot}: {len(weights)} weights for {len(values)} values")
            for value, w in zip(values, weights):
                _check_weight(f"{where}: slots.{slot}: {value!r}", w)
        if not isinstance(self.templates, list) or not self.templates:
            raise ValueError(f'{where}: templates: expected a non-empty list of strings, e.g. ["{{subject}} ..."]')
        for i, template in enumerate(self.templates):
            _check_template(f"{where}: templates[{i}]", template, list(self.slots))
        if not isinstance(self.exclusions, list):
            raise ValueError(f"{where}: exclusions: expected a list of {{slot: value}} mappings")
        for i, excl in enumerate(self.exclusions):
            _check_exclusion(f"{where}: exclusions[{i}]", excl, self.slots)
        if not isinstance(self.negative_prompt, str):
            raise ValueError(f"{where}: negative_prompt: expected a string, got {self.negative_prompt!r}")
        for slot, values in self.slots.items():
            for value in values:
                if not _has_completion(self.slots, self.exclusions, {slot: value}):
                    raise ValueError(
                        f"{where}: exclusions: slot {slot!r} value {value!r} can never be used; "
                        "remove or narrow an exclusion"
                    )


def _check_slot(where: str, slot: object, values: object) -> None:
    if not isinstance(slot, str) or not slot.isidentifier():
        raise ValueError(f"{where}: slots.{slot}: slot names must be identifiers (letters, digits, _)")
    if not isinstance(values, list) or not values:
        raise ValueError(f"{where}: slots.{slot}: no values; give at least one")
    seen = set()
    for value in values:
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where}: slots.{slot}: expected non-empty strings, got {value!r}")
        if value in seen:
            raise ValueError(f"{where}: slots.{slot}: duplicate value {value!r}; list each value once")
        seen.add(value)


def _check_weight(where: str, weight: object) -> None:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise ValueError(f"{where}: weight must be a number > 0, got {weight!r}")
    if not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"{where}: weight must be > 0, got {weight!r}")


def _check_template(where: str, template: object, slots: list[str]) -> None:
    if not isinstance(template, str):
        raise ValueError(f"{where}: expected a string, got {template!r}")
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(f"{where}: bad braces ({err}); use {{slot}} fields, {{{{ }}}} for a literal brace") from None
    used = set()
    for _, name, spec, conversion in fields:
        if name is None:
            continue
        if name not in slots:
            raise ValueError(f"{where}: unknown slot {{{name}}}; slots are {', '.join(slots)}")
        if spec or conversion:
            raise ValueError(f"{where}: field {{{name}}} has a conversion or format spec; write plain {{{name}}}")
        used.add(name)
    missing = [s for s in slots if s not in used]
    if missing:
        raise ValueError(f"{where}: missing slot {{{missing[0]}}}; every template must use every slot")


def _check_exclusion(where: str, excl: object, slots: dict[str, list[str]]) -> None:
    if not isinstance(excl, dict) or not excl:
        raise ValueError(f"{where}: expected a non-empty {{slot: value}} mapping, got {excl!r}")
    for slot, value in excl.items():
        if slot not in slots:
            raise ValueError(f"{where}: unknown slot {slot!r}; slots are {', '.join(slots)}")
        if value not in slots[slot]:
            raise ValueError(f"{where}: {slot}: unknown value {value!r}; copy it exactly from slots.{slot}")


def _has_completion(slots: dict[str, list[str]], exclusions: list[dict[str, str]], partial: dict) -> bool:
    """Backtracking search: can `partial` be extended to a full assignment that breaks no exclusion?"""

    def violates(assign: dict) -> bool:
        return any(all(assign.get(s) == v for s, v in e.items()) for e in exclusions)

    if violates(partial):
        return False
    free = [s for s in slots if s not in partial]
    if not free:
        return True
    slot = free[0]
    return any(_has_completion(slots, exclusions, {**partial, slot: v}) for v in slots[slot])


def load_vocabulary(path: str | os.PathLike) -> Vocabulary:
    """Read and check a vocabulary YAML (format in the module docstring)."""
    where = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"{where}: vocabulary file not found; pass the path of a vocabulary YAML, e.g. synth_data/vocab/wan.yaml"
        )
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{where}: not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping with keys {', '.join(_TOP_LEVEL_KEYS)}")
    for key in raw:
        if key not in _TOP_LEVEL_KEYS:
            raise ValueError(f"{where}: {key}: unknown key; allowed keys are {', '.join(_TOP_LEVEL_KEYS)}")
    for key in ("name", "slots", "templates"):
        if key not in raw:
            raise ValueError(f"{where}: {key}: missing required key")
    if not isinstance(raw["slots"], dict) or not raw["slots"]:
        raise ValueError(f"{where}: slots: expected a mapping slot -> list of values")
    slots: dict[str, list[str]] = {}
    weights: dict[str, list[float]] = {}
    for slot, items in raw["slots"].items():
        if not isinstance(items, list) or not items:
            raise ValueError(f"{where}: slots.{slot}: no values; give at least one")
        slots[slot], weights[slot] = [], []
        for item in items:
            value, weight = item, 1.0
            if isinstance(item, dict):
                unknown = set(item) - {"value", "weight"}
                if unknown or "value" not in item:
                    raise ValueError(
                        f"{where}: slots.{slot}: item {item!r} must be a string or {{value: str, weight: float}}"
                    )
                value, weight = item["value"], item.get("weight", 1.0)
            slots[slot].append(value)
            weights[slot].append(weight)
    exclusions = raw.get("exclusions") or []
    return Vocabulary(
        name=raw["name"],
        slots=slots,
        weights=weights,
        templates=raw["templates"],
        exclusions=exclusions,
        negative_prompt=raw.get("negative_prompt", ""),
        source=where,
    )


__all__ = ["Vocabulary", "load_vocabulary"]
