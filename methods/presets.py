"""Presets: what ``--method BASE+TECHNIQUE-M`` sets, and the original repositories' values.

An option given on the command line wins over every preset; each such override is returned as a
note (``"preset MiB sets loss_kd=40; using 10 from the command line"``) that the run logs.
"""
from __future__ import annotations

import json

import methods

# The MiB / PLOP repositories' own values where they differ from METHOD_PRESETS (the SATS
# repository's): {method: {repository: {option: value}}}. original_repo_flags() writes the flags.
ORIGINAL_REPO_VALUES = {
    "ILT": {"MiB": {"loss_kd": 100, "loss_de": 100}, "PLOP": {"loss_kd": 100, "loss_de": 100}},
    "EWC": {"MiB": {"reg_importance": 500}},
    "PI": {"MiB": {"reg_importance": 500}},
    "MiB": {"MiB": {"loss_kd": 10}, "PLOP": {"loss_kd": 10}},
}




def canonical_method(name):
    """``(method, uses_memory)`` for a user spelling of a base method: ``"mib"`` -> ``("MiB", False)``,
    ``"SATS-m"`` -> ``("SATS", True)``, ``None`` -> ``("FT", False)``. Techniques are dropped
    (:func:`methods.parse` keeps them)."""
    parsed = methods.parse(name)
    return parsed.base, parsed.memory


def _format_value(value):
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _apply_preset(opts, preset_name, values, explicit):
    """Set ``values`` on ``opts`` except where the user gave the option; return the override notes."""
    notes = []
    for option, value in values.items():
        if option not in explicit:
            setattr(opts, option, value)
        elif getattr(opts, option) != value:
            notes.append(f"preset {preset_name} sets {option}={_format_value(value)}; using "
                         f"{_format_value(getattr(opts, option))} from the command line")
    return notes


def apply_method(opts, explicit, memory_size: int):
    """Expand ``--method`` (base preset, technique presets, memory size); return the override notes."""
    parsed = methods.parse(opts.method)
    opts.method, opts.techniques, opts.method_label = parsed.base, list(parsed.techniques), parsed.label
    notes = _apply_preset(opts, parsed.base, methods.get(parsed.base).preset, explicit)
    for technique in parsed.techniques:
        notes += _apply_preset(opts, technique, methods.get(technique).preset, explicit)
    if parsed.memory:
        notes += _apply_preset(opts, f"{parsed.base}-M", {"mem_size": memory_size}, explicit)
    return notes


def original_repo_flags(method, repo):
    """Command-line flags that turn ``method``'s preset into ``repo``'s own values
    (``original_repo_flags("ILT", "MiB")`` -> ``"--loss_kd 100 --loss_de 100"``); "" if equal."""
    method, _ = canonical_method(method)
    values = ORIGINAL_REPO_VALUES.get(method, {}).get(repo, {})
    return " ".join(f"--{option} {_format_value(value)}" for option, value in values.items())


