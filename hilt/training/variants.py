"""Model variants for ``hilt ablate --models``: ``"gpt,hilt,hilt[ilt_scale_start=1,ilt_scale_end=1],block[block_size=16]"``.

Grammar: entries are separated by top-level commas (commas inside ``[...]`` belong to the entry);
an entry is a model name, optionally followed by ``[field=value, ...]``. Values are read as
``true`` / ``false`` (bool), ``none`` / ``null`` (None), an int, a float, JSON when they start with
``[``, ``{`` or ``"``, and otherwise as a plain string. Whitespace around names and values is
ignored. Each entry keeps a label (its text, whitespace removed) and gets a file-system-safe folder
name (:func:`run_dir_name`).

This module only parses; which fields exist (model config or training config) is checked by
:func:`split_overrides` against the sets the caller passes in.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Iterable

__all__ = ["Variant", "parse_variants", "parse_variant", "split_top_level", "parse_value", "run_dir_name",
           "split_overrides"]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One ``--models`` entry: ``model`` (e.g. ``"hilt"``), ``overrides`` (``((field, value), ...)``
    in the order written) and ``label`` (``"hilt[ilt_scale_start=1,ilt_scale_end=1]"``)."""

    model: str
    overrides: tuple = ()
    label: str = ""

    @property
    def override_dict(self) -> dict:
        return dict(self.overrides)

    @property
    def dir_name(self) -> str:
        return run_dir_name(self.label)


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split ``text`` on ``sep`` outside brackets (``[]``, ``{}``, ``()``) and double quotes.
    Raises ValueError on unbalanced brackets or an unterminated quote."""
    parts, depth, cur, quoted = [], [], [], False
    pairs = {"]": "[", "}": "{", ")": "("}
    for i, ch in enumerate(text):
        if quoted:
            cur.append(ch)
            if ch == '"' and text[i - 1] != "\\":
                quoted = False
            continue
        if ch == '"':
            quoted = True
        elif ch in "[{(":
            depth.append(ch)
        elif ch in pairs:
            if not depth or depth[-1] != pairs[ch]:
                raise ValueError(f"unbalanced {ch!r} at position {i} in {text!r}")
            depth.pop()
        elif ch == sep and not depth:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    if quoted:
        raise ValueError(f"unterminated quote in {text!r}")
    if depth:
        raise ValueError(f"unclosed {depth[-1]!r} in {text!r}")
    parts.append("".join(cur))
    return parts


def parse_value(text: str) -> Any:
    """``"1"`` -> 1, ``"0.5"``/``"1e-3"`` -> float, ``"true"``/``"false"`` -> bool, ``"none"``/``"null"``
    -> None, JSON for ``[..]``, ``{..}``, ``".."``, anything else -> the string itself."""
    s = text.strip()
    if not s:
        raise ValueError("empty value")
    low = s.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if s[0] in '[{"':
        try:
            return json.loads(s)
        except json.JSONDecodeError as e:
            raise ValueError(f"value {s!r} is not valid JSON: {e.msg}") from None
    try:
        return int(s)
    except ValueError:
        pass
    try:
        return float(s)
    except ValueError:
        return s


def parse_variant(text: str, models: Iterable[str]) -> Variant:
    """One entry, e.g. ``"block[block_size=16]"``; ``models``: the allowed model names."""
    models = tuple(models)
    s = text.strip()
    if not s:
        raise ValueError("empty --models entry (two commas in a row, or a trailing comma?)")
    if "[" in s:
        name, _, rest = s.partition("[")
        if not rest.endswith("]"):
            raise ValueError(f"--models entry {s!r}: text after the closing ']' (or no ']')")
        body = rest[:-1]
        try:
            split_top_level(body)  # the entry's own brackets must hold everything
        except ValueError as e:
            raise ValueError(f"--models entry {s!r}: {e}") from None
    elif "]" in s or "=" in s:
        raise ValueError(f"--models entry {s!r}: overrides go in brackets, e.g. block[block_size=16]")
    else:
        name, body = s, None
    name = name.strip()
    if name not in models:
        raise ValueError(f"--models entry {s!r}: unknown model {name!r}; choose from {', '.join(models)}")
    if body is None:
        return Variant(name, (), name)
    if not body.strip():
        raise ValueError(f"--models entry {s!r}: empty brackets (write just {name!r} for no overrides)")
    overrides, texts = [], []
    for item in split_top_level(body):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq:
            raise ValueError(f"--models entry {s!r}: {item.strip()!r} is not field=value")
        if not _NAME.match(key):
            raise ValueError(f"--models entry {s!r}: {key!r} is not a field name")
        if key in dict(overrides):
            raise ValueError(f"--models entry {s!r}: field {key!r} given twice")
        try:
            value = parse_value(raw)
        except ValueError as e:
            raise ValueError(f"--models entry {s!r}: field {key!r}: {e}") from None
        overrides.append((key, value))
        texts.append(f"{key}={raw.strip()}")
    return Variant(name, tuple(overrides), f"{name}[{','.join(texts)}]")


def parse_variants(text: str, models: Iterable[str]) -> list[Variant]:
    """All entries of a ``--models`` string; no label and no folder name may repeat."""
    if not isinstance(text, str):
        raise TypeError(f"--models must be a string, got {type(text).__name__}")
    models = tuple(models)
    try:
        items = split_top_level(text)
    except ValueError as e:
        raise ValueError(f"--models: {e}") from None
    variants = [parse_variant(t, models) for t in items]
    seen: dict[str, str] = {}
    for v in variants:
        if v.label in seen.values():
            raise ValueError(f"--models lists {v.label!r} twice")
        if v.dir_name in seen:
            raise ValueError(f"--models entries {seen[v.dir_name]!r} and {v.label!r} would share the run folder "
                             f"{v.dir_name!r}; write them differently")
        seen[v.dir_name] = v.label
    return variants


def run_dir_name(label: str) -> str:
    """A folder name for a label: ``hilt[ilt_scale_start=1,ilt_scale_end=1]`` ->
    ``hilt-ilt_scale_start=1-ilt_scale_end=1`` (letters, digits and ``._=+-`` kept, others ``_``)."""
    s = label.replace("[", "-").replace("]", "").replace(",", "-")
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", s)


def split_overrides(variant: Variant, model_fields: Iterable[str], train_fields: Iterable[str],
                    reserved: Iterable[str] = ()) -> tuple[dict, dict]:
    """(model-config overrides, training-config overrides) of ``variant``. A field that is in
    neither set, or in ``reserved`` (set by the caller for every run), is a ValueError naming it.
    A name in both sets goes to the model config."""
    model_fields, train_fields, reserved = set(model_fields), set(train_fields), set(reserved)
    model_over, train_over = {}, {}
    for key, value in variant.overrides:
        if key in reserved:
            raise ValueError(f"--models entry {variant.label!r}: {key!r} cannot be set per entry "
                             f"(the ablation sets it for every run)")
        if key in model_fields:
            model_over[key] = value
        elif key in train_fields:
            train_over[key] = value
        else:
            raise ValueError(f"--models entry {variant.label!r}: unknown field {key!r} (not a {variant.model} "
                             f"config field nor a training option)")
    return model_over, train_over
