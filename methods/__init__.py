"""The method registry: every ``methods/*.py`` module, plus the files named in ``CSS_METHOD_PATH``.

A module registers its :class:`~methods.base.Component` with :func:`register_component` and its
command-line names with :func:`register_method`. Nothing else lists methods: the option parser,
``run.py``, the trainer, the sweep scripts and the comparison read this registry.

    methods.names()                      -> ["FT", "LWF", ..., "SATS"]
    methods.parse("sats+nest-m")         -> Parsed(base="SATS", techniques=("NeST",), memory=True)
    methods.build_recipe(opts, step)     -> the step's Recipe

``CSS_METHOD_PATH``: ``os.pathsep``-separated ``.py`` files or folders of them, imported after the
built-in modules (a method outside the repository, in one file).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import sys
from dataclasses import dataclass
from typing import Optional

from methods.base import (IGNORE, Component, Context, Criterion, CrossEntropy, LossTerm, MethodSpec,
                          Recipe, StepInfo, TargetBuilder, Targets, argmax_prediction)

__all__ = [
    "Component", "Context", "Criterion", "CrossEntropy", "LossTerm", "MethodSpec", "Recipe", "StepInfo",
    "TargetBuilder", "Targets", "IGNORE", "register_component", "register_method", "components", "specs",
    "names", "memory_names", "techniques", "get", "parse", "Parsed", "build_recipe", "step_info",
    "step0_family", "step0_method", "sweep_settings", "label_space", "param_groups", "memory_pseudo_labels",
]

_COMPONENTS: list = []
_SPECS: dict = {}
_LOADED = False


def register_component(component: Component) -> Component:
    """Add ``component`` (an instance) to the registry; a second one of the same name replaces it."""
    global _COMPONENTS
    _COMPONENTS = [c for c in _COMPONENTS if c.name != component.name] + [component]
    return component


def register_method(spec: MethodSpec) -> MethodSpec:
    """Make ``spec.name`` a valid ``--method`` (case-insensitive)."""
    _SPECS[spec.name] = spec
    return spec


def _load() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    package = os.path.dirname(__file__)
    for info in sorted(pkgutil.iter_modules([package]), key=lambda m: m.name):
        if info.name != "base":
            importlib.import_module(f"methods.{info.name}")
    for entry in filter(None, os.environ.get("CSS_METHOD_PATH", "").split(os.pathsep)):
        files = ([os.path.join(entry, f) for f in sorted(os.listdir(entry)) if f.endswith(".py")]
                 if os.path.isdir(entry) else [entry])
        for path in files:
            _import_file(path)


def _import_file(path: str) -> None:
    if not os.path.isfile(path):
        raise ValueError(f"CSS_METHOD_PATH names {path}, which is not a file or folder; fix the variable")
    name = "css_method_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


def components() -> list:
    """Registered components, in the order their loss terms are summed."""
    _load()
    return sorted(_COMPONENTS, key=lambda c: getattr(c, "order", 100))


def specs() -> list:
    _load()
    return sorted(_SPECS.values(), key=lambda s: (s.technique, getattr(s, "order", 100)))


def names() -> list:
    """Base method names, in the order of the README's tables."""
    return [s.name for s in specs() if not s.technique]


def memory_names() -> list:
    """Base methods with an ``-M`` (exemplar memory) variant."""
    return [s.name for s in specs() if not s.technique and s.memory]


def techniques() -> list:
    return [s.name for s in specs() if s.technique]


def get(name: str) -> MethodSpec:
    _load()
    by_lower = {n.lower(): s for n, s in _SPECS.items()}
    try:
        return by_lower[name.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; valid methods (any case): {', '.join(_valid_spellings())}"
                         ) from None


def _valid_spellings() -> list:
    valid = names() + [f"{m}-M" for m in memory_names()]
    return valid + [f"BASE+{t}" for t in techniques()]


@dataclass(frozen=True)
class Parsed:
    base: str
    techniques: tuple = ()
    memory: bool = False

    @property
    def label(self) -> str:
        return "+".join((self.base,) + self.techniques) + ("-M" if self.memory else "")


def parse(text: Optional[str]) -> Parsed:
    """``"sats+nest-m"`` -> ``Parsed("SATS", ("NeST",), True)``; None -> FT. Raises ValueError."""
    if text is None:
        return Parsed("FT")
    _load()
    parts = [p.strip() for p in str(text).split("+")]
    memory = False
    for i, part in enumerate(parts):  # "-M" may close the base or the whole name
        if part.lower().endswith("-m") and part.lower() not in {n.lower() for n in _SPECS}:
            parts[i], memory = part[:-2], True
    base = get(parts[0])
    if base.technique:
        raise ValueError(f"--method {text}: {base.name} is a technique; combine it with a base method, "
                         f"e.g. MiB+{base.name}")
    if memory and not base.memory:
        raise ValueError(f"--method {text}: {base.name} has no -M (exemplar memory) variant; methods "
                         f"with one: {', '.join(memory_names())} (or pass --mem_size N)")
    found = []
    for part in parts[1:]:
        spec = get(part)
        if not spec.technique:
            raise ValueError(f"--method {text}: only one base method can be given ({base.name}); "
                             f"{spec.name} is another. Techniques that combine: {', '.join(techniques())}")
        if base.name in spec.refuses:
            raise ValueError(f"--method {text}: {spec.name} cannot be combined with {base.name}: "
                             f"{spec.refuses[base.name]}")
        found.append(spec.name)
    return Parsed(base.name, tuple(found), memory)


def step0_family(text: Optional[str]) -> str:
    """The step-0 model a method shares (``"ce"`` for FT/LWF/ILT/MiB/PLOP/SATS, else its own).
    A technique keeps its base method's family."""
    return get(parse(text).base).step0_family


def step0_method(family: str) -> str:
    """The method that trains a family's step 0: the first listed base method of that family."""
    for name in names():
        if get(name).step0_family == family:
            return name
    raise ValueError(f"no method has the step-0 family {family!r}")


SWEEP_DEFAULTS = {"voc": {"epochs": 30, "lr0": 0.01, "lr": 0.001}, "ade": {"epochs": 60, "lr0": 0.01, "lr": 0.001}}


def sweep_settings(text: str, dataset: str, task: str) -> dict:
    """The sweep scripts' values for a method on ``dataset``/``task``: the defaults, then the base
    method's and each technique's own (the authors' scripts), the more specific key last (keys:
    ``dataset``, ``dataset:task``, and for a technique ``dataset+BASE``, ``dataset:task+BASE``).
    Returns ``{"epochs", "lr0", "lr", "args", "step0_args", "step0_family", "step0_method"}``."""
    import tasks

    parsed = parse(text)
    task = tasks.canonical_task(dataset, task)
    settings = dict(SWEEP_DEFAULTS[dataset], args=[], step0_args=[])
    for name in (parsed.base,) + parsed.techniques:
        sweep = get(name).sweep
        keys = [dataset, f"{dataset}:{task}"]
        if name != parsed.base:  # a technique's values may depend on the base: "voc+MiB", "ade:100-10+MiB"
            keys += [f"{dataset}+{parsed.base}", f"{dataset}:{task}+{parsed.base}"]
        for key in keys:
            for field_name, value in sweep.get(key, {}).items():
                if field_name in ("args", "step0_args"):
                    settings[field_name] = settings[field_name] + list(value)
                else:
                    settings[field_name] = value
    family = step0_family(text)
    settings.update(step0_family=family, step0_method=step0_method(family))
    return settings


# --------------------------------------------------------------------------------------------
# A step's recipe
# --------------------------------------------------------------------------------------------
def label_space(opts, nb_old: int, nb_current: int) -> tuple[int, int]:
    for component in components():
        nb_old, nb_current = component.label_space(opts, nb_old, nb_current)
    return nb_old, nb_current


def step_info(opts, step: int, classes=None) -> StepInfo:
    classes = list(classes) if classes is not None else None
    nb_current = sum(classes) if classes else opts.num_classes
    nb_old = sum(classes[:-1]) if classes and step > 0 else 0
    nb_old, nb_current = label_space(opts, nb_old, nb_current)
    return StepInfo(opts=opts, step=step, classes=classes, nb_old=nb_old, nb_current=nb_current)


def _first(by_priority, fn):
    for component in by_priority:
        value = fn(component)
        if value is not None:
            return value
    return None


def build_recipe(opts, step: int, classes=None) -> Recipe:
    """The recipe of step ``step`` for these (preset-expanded) options."""
    info = step_info(opts, step, classes)
    ordered = components()
    by_priority = sorted(ordered, key=lambda c: -c.priority)
    recipe = Recipe(criterion=_first(by_priority, lambda c: c.criterion(info)) or CrossEntropy(),
                    regularizer=_first(by_priority, lambda c: c.regularizer(info)),
                    predict=_first(by_priority, lambda c: c.predict(opts)) or argmax_prediction,
                    eval_loss=all(c.eval_loss(opts) for c in ordered),
                    find_unused_parameters=any(c.find_unused_parameters(opts) for c in ordered),
                    components=ordered)
    # targets at every step: a label space of its own (SSUL's unknown channel) applies at step 0 too
    recipe.targets = _first(by_priority, lambda c: c.targets(info))
    if step == 0:
        return recipe
    for component in ordered:
        recipe.terms.extend(t for t in component.terms(info) if t.weight != 0)
    init = _first(by_priority, lambda c: c.init_classifier(info))
    if init is not None:
        recipe.init_name, recipe.init_classifier = init
    return recipe


def param_groups(model, opts, step: int) -> list:
    """The optimiser groups of the step: a component's own (SSUL at step > 0), else the default."""
    from methods.common import default_param_groups

    groups = _first(sorted(components(), key=lambda c: -c.priority),
                    lambda c: c.param_groups(model, opts, step))
    return groups if groups is not None else default_param_groups(model, opts, step)


def memory_pseudo_labels(opts):
    """How the exemplar memory labels its candidates with the old model."""
    from dataset.memory import softmax_memory_pseudo_labels

    found = _first(sorted(components(), key=lambda c: -c.priority), lambda c: c.memory_pseudo_labels(opts))
    return found or softmax_memory_pseudo_labels
