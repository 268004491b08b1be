"""Weight regularizers for continual segmentation: EWC, PI (path integral) and RW (Riemannian walk),
as in the MiB / PLOP / SATS repositories (``utils/regularizer.py``, identical in the three).

All three penalise the drift of a parameter from its value after the previous step, θ*, weighted by
an element-wise importance Ω built from the previous steps:

    penalty() = Σ_params Σ_elements Ω ⊙ (θ − θ*)²          (a sum, not a mean)

over parameters that require gradients and have both an Ω and a θ* (new classifier heads have no
θ* from the old model and are never penalised). The trainer multiplies it by ``reg_importance``.

Importance estimates, updated once per training iteration by ``update()``:

* EWC   Fisher  F ← α·g² + (1 − α)·F  (α = ``reg_alpha`` = 0.9 weights the *newest* gradient², so F
        reflects the last few batches; reproduced because it is the method as run).
        Ω = normalize(F_prev).
* PI    δ += g_t ⊙ (θ_prev − θ_t), with θ_prev the parameters at the previous ``update()`` call;
        at the end of the step S = max(δ / ((θ − θ*)² + 1e-20), 0) + S_prev (scores are summed over
        steps). Ω = normalize(S_prev). At step 0, θ* is the model at construction.
* RW    every ``iterations`` calls (``reg_iterations`` = 10): s += g_t ⊙ (θ_snap − θ_t) /
        (½·F ⊙ (θ_t − θ_snap)² + 1e-8), with F the Fisher *before* this call's update and θ_snap
        the parameters ``iterations`` calls ago; F is updated every call as for EWC; at the end of
        the step S = ½·(max(s, 0) + S_prev) where S_prev exists. Ω = normalize(F_prev) + normalize(S_prev).

``normalize(T) = (T − min T) / (max T − min T + 1e-8)`` per parameter tensor (``normalize=False``
skips it; the factory passes ``normalize = not opts.reg_no_normalize``).

Call site (the originals' order, which the numbers above depend on): in each iteration, after
``loss.backward()`` of the task losses and BEFORE the penalty's backward and ``optimizer.step()``:

    loss.backward(); [scaler.unscale_(optimizer)]; reg.update()
    l_reg = reg_importance * reg.penalty(); l_reg.backward(); optimizer.step()

so the importance sees the task gradient only, and PI/RW pair the current gradient with the
displacement produced by the previous optimiser step(s). Gradients must be unscaled (call
``GradScaler.unscale_`` first) and finite (skip ``update()`` on iterations whose step is skipped).

Differences from the originals (bugs not copied): parameters whose ``.grad`` is None or that do
not require gradients are skipped (the original EWC crashed on them); keys are the parameter names
of the unwrapped model (no ``module.`` prefix; prefixed keys of old checkpoints are accepted);
``penalty()`` returns a 0-dim tensor (0 when there is nothing to penalise); snapshots stay on the
device instead of being copied to the CPU every iteration; RW's ``state_dict`` also stores the raw
running score so that resuming a step does not average it with the previous step's score twice.

Distributed: ``update()`` does its work only on rank 0, which owns the running importance (the
gradients it reads are already all-reduced) and writes the checkpoint. The penalty's Ω comes from
the loaded state and is identical on every rank.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["EWC", "PI", "RW", "get_regularizer", "normalize_fn", "REGULARIZERS", "EPS"]

EPS = 1e-8
PI_DAMPING = 1e-20
_DDP_PREFIX = "module."


def normalize_fn(tensor: torch.Tensor) -> torch.Tensor:
    """Min-max normalisation of one tensor: (T − min T) / (max T − min T + 1e-8)."""
    return (tensor - tensor.min()) / (tensor.max() - tensor.min() + EPS)


def _unwrap(model: nn.Module | None) -> nn.Module | None:
    """The module inside a DistributedDataParallel (or DataParallel) wrapper."""
    return getattr(model, "module", model) if model is not None else None


def _strip_prefix(tensors: dict | None) -> dict | None:
    if tensors is None:
        return None
    return {(k[len(_DDP_PREFIX):] if k.startswith(_DDP_PREFIX) else k): v for k, v in tensors.items()}


def _to_cpu(tensors: dict) -> dict:
    return {k: v.detach().cpu().clone() for k, v in tensors.items()}


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _owns_importance() -> bool:
    return not _is_distributed() or dist.get_rank() == 0


class Regularizer:
    """Common machinery: parameter access, the penalty, state handling, rank-0 ownership."""

    name: str = ""

    def __init__(self, model: nn.Module, model_old: nn.Module | None, device):
        self.model = _unwrap(model)
        self.model_old = _unwrap(model_old)
        self.device = torch.device(device)
        self.penalize = False
        self.importance: dict[str, torch.Tensor] = {}  # Ω
        self.reference: dict[str, torch.Tensor] = {}  # θ*

    # -- parameters --------------------------------------------------------------------------
    def _current_parameters(self):
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def _parameters_with_grad(self):
        return [(n, p) for n, p in self.model.named_parameters() if p.grad is not None]

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self._parameters_with_grad()}

    def _old_parameters(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.model_old.named_parameters()}

    def _initial_parameters(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def _on_device(self, tensors: dict) -> dict:
        return {k: v.detach().to(self.device, torch.float32) for k, v in _strip_prefix(tensors).items()}

    # -- interface ---------------------------------------------------------------------------
    def update(self) -> None:
        """Accumulate importance from the current gradients and parameters (rank 0 only)."""
        if _owns_importance():
            with torch.no_grad():
                self._update()

    def _update(self) -> None:
        raise NotImplementedError

    def penalty(self) -> torch.Tensor:
        """Σ Ω ⊙ (θ − θ*)² over trainable parameters having both Ω and θ*; a 0-dim tensor."""
        total = torch.zeros((), device=self.device)
        if not self.penalize:
            return total
        for n, p in self._current_parameters():
            if n in self.importance and n in self.reference:
                total = total + (self.importance[n] * (p - self.reference[n]).pow(2)).sum()
        return total


    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def _check_name(self, state: dict) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"cannot restore a {state.get('name')!r} regularizer state into {self.name!r}")


class EWC(Regularizer):
    """Elastic weight consolidation with an exponential moving Fisher (see the module docstring).

    Args:
        fisher: the previous step's (un-normalised) Fisher by parameter name, or None at step 0.
        alpha: weight of the newest gradient² in the moving average.
        normalize: min-max normalise the previous Fisher into Ω.
    """

    name = "ewc"

    def __init__(self, model, model_old, device, fisher=None, alpha=0.9, normalize=True):
        super().__init__(model, model_old, device)
        self.alpha = float(alpha)
        self.normalize = normalize
        self.fisher: dict[str, torch.Tensor] = {}
        if model_old is not None:
            self.reference = self._old_parameters()
        if fisher is not None:
            previous = self._on_device(fisher)
            self.importance = {k: normalize_fn(v) if normalize else v.clone() for k, v in previous.items()}
            self.fisher = {k: v.clone() for k, v in previous.items()}
            self.penalize = model_old is not None
        for n, p in self._current_parameters():
            if n not in self.fisher:
                self.fisher[n] = torch.ones_like(p, device=self.device, dtype=torch.float32)

    def _update(self):
        for n, p in self._parameters_with_grad():
            if n in self.fisher:
                self.fisher[n] = self.alpha * p.grad.pow(2) + (1 - self.alpha) * self.fisher[n]

    def get(self) -> dict[str, torch.Tensor]:
        """The running (un-normalised) Fisher of this step."""
        return self.fisher


    def state_dict(self):
        return {"name": self.name, "fisher": _to_cpu(self.fisher), "alpha": self.alpha}

    def load_state_dict(self, state):
        self._check_name(state)
        self.fisher = self._on_device(state["fisher"])
        self.alpha = float(state["alpha"])


class PI(Regularizer):
    """Path integral (synaptic intelligence) importance (see the module docstring).

    Args:
        score: the previous steps' summed score by parameter name, or None at step 0.
        normalize: min-max normalise the previous score into Ω (the factory passes True).
    """

    name = "pi"

    def __init__(self, model, model_old, device, score=None, normalize=False):
        super().__init__(model, model_old, device)
        self.normalize = normalize
        self.starting_new: dict[str, torch.Tensor] = {}
        if model_old is not None:
            self.reference = self._old_parameters()
            for n, p in self.model.named_parameters():
                if n not in self.reference:  # new classifier: θ* is its initialisation
                    self.starting_new[n] = p.detach().cpu().clone()
                    self.reference[n] = p.detach().clone()
        else:
            self.reference = self._initial_parameters()
        self.previous_score = self._on_device(score) if score is not None else None
        if self.previous_score is not None:
            self.importance = {k: normalize_fn(v) if normalize else v.clone()
                               for k, v in self.previous_score.items()}
            self.penalize = model_old is not None
        self.delta = {n: torch.zeros_like(p, device=self.device, dtype=torch.float32)
                      for n, p in self.model.named_parameters()}
        self.snapshot: dict[str, torch.Tensor] | None = None

    def _update(self):
        if self.snapshot is not None:
            for n, p in self._parameters_with_grad():
                if n in self.snapshot and n in self.delta:
                    self.delta[n] += p.grad * (self.snapshot[n] - p)
        self.snapshot = self._snapshot()

    def get(self) -> dict[str, torch.Tensor]:
        """S = max(δ / ((θ − θ*)² + 1e-20), 0), plus the previous steps' score where present."""
        score = {}
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if n not in self.delta:
                    continue
                current = (self.delta[n] / ((p - self.reference[n]).pow(2) + PI_DAMPING)).clamp_min(0)
                if self.previous_score is not None and n in self.previous_score:
                    current = current + self.previous_score[n]
                score[n] = current
        return score


    def state_dict(self):
        return {"name": self.name, "score": _to_cpu(self.get()), "delta": _to_cpu(self.delta),
                "starting_model": _to_cpu(self.starting_new)}

    def load_state_dict(self, state):
        self._check_name(state)
        self.delta = self._on_device(state["delta"])
        for n, p in self._on_device(state["starting_model"]).items():
            self.starting_new[n] = p.cpu().clone()
            self.reference[n] = p


class RW(Regularizer):
    """Riemannian walk: Fisher (as EWC) plus a path score sampled every ``iterations`` calls.

    Args:
        score, fisher: the previous step's score and (un-normalised) Fisher, or None at step 0
            (both are needed for a penalty).
        alpha: weight of the newest gradient² in the moving Fisher.
        iterations: one path-score sample every this many ``update()`` calls.
        normalize: min-max normalise the previous Fisher and score into Ω.
    """

    name = "rw"

    def __init__(self, model, model_old, device, score=None, fisher=None, alpha=0.9, iterations=10,
                 normalize=True):
        super().__init__(model, model_old, device)
        if int(iterations) < 1:
            raise ValueError(f"RW iterations (reg_iterations) must be >= 1; got {iterations}")
        self.alpha = float(alpha)
        self.iterations = int(iterations)
        self.normalize = normalize
        self.reference = self._old_parameters() if model_old is not None else self._initial_parameters()
        self.fisher: dict[str, torch.Tensor] = {}
        self.score_old: dict[str, torch.Tensor] | None = None
        if fisher is not None and score is not None:
            previous_fisher, self.score_old = self._on_device(fisher), self._on_device(score)
            scale = normalize_fn if normalize else torch.clone
            self.importance = {k: scale(v) for k, v in previous_fisher.items()}
            for k, v in self.score_old.items():
                self.importance[k] = self.importance[k] + scale(v) if k in self.importance else scale(v)
            self.fisher = {k: v.clone() for k, v in previous_fisher.items()}
            self.penalize = model_old is not None
        self.score = {n: torch.zeros_like(p, device=self.device, dtype=torch.float32)
                      for n, p in self._current_parameters()}
        for n, p in self._current_parameters():
            if n not in self.fisher:
                self.fisher[n] = torch.ones_like(p, device=self.device, dtype=torch.float32)
        self.count = 0
        self.snapshot: dict[str, torch.Tensor] | None = None

    def _update(self):
        if self.count % self.iterations == 0:
            if self.snapshot is not None:
                self._accumulate_path_score()
            self.snapshot = self._snapshot()
        self.count += 1
        for n, p in self._parameters_with_grad():
            if n in self.fisher:
                self.fisher[n] = self.alpha * p.grad.pow(2) + (1 - self.alpha) * self.fisher[n]

    def _accumulate_path_score(self):
        for n, p in self._parameters_with_grad():
            if n in self.snapshot and n in self.score:
                displacement = self.snapshot[n] - p
                loss_change = p.grad * displacement
                self.score[n] += loss_change / (0.5 * self.fisher[n] * displacement.pow(2) + EPS)

    def get_score(self) -> dict[str, torch.Tensor]:
        """S = max(s, 0), averaged with the previous step's score where present."""
        score = {}
        for n, s in self.score.items():
            current = s.clamp_min(0)
            if self.score_old is not None and n in self.score_old:
                current = 0.5 * (current + self.score_old[n])
            score[n] = current
        return score


    def state_dict(self):
        return {"name": self.name, "score": _to_cpu(self.get_score()), "fisher": _to_cpu(self.fisher),
                "iteration": self.iterations, "alpha": self.alpha, "running_score": _to_cpu(self.score)}

    def load_state_dict(self, state):
        self._check_name(state)
        self.iterations = int(state["iteration"])
        self.alpha = float(state["alpha"])
        self.fisher = self._on_device(state["fisher"])
        # States written by the originals lack the raw running score; they restored "score".
        self.score = self._on_device(state.get("running_score", state["score"]))


REGULARIZERS = {"ewc": EWC, "pi": PI, "rw": RW}


def _stored(state: dict | None, key: str, name: str):
    if state is None:
        return None
    if key not in state:
        raise ValueError(f"the stored regularizer state ({state.get('name')!r}) has no {key!r}, "
                         f"which the {name!r} regularizer needs")
    return state[key]


def get_regularizer(model, model_old, device, opts, state=None):
    """Build the regularizer named by ``opts.regularizer`` ('ewc' | 'rw' | 'pi' | None).

    ``state`` is ``trainer_state["regularizer"]`` of the previous step's checkpoint (None at step 0);
    it supplies the previous Fisher/score. Reads ``opts.reg_alpha``, ``opts.reg_no_normalize`` and
    ``opts.reg_iterations``.
    """
    name = opts.regularizer
    if name is None:
        return None
    if name not in REGULARIZERS:
        raise ValueError(f"unknown regularizer {name!r}; choose one of {sorted(REGULARIZERS)} or None")
    if state is not None and state.get("name") != name:
        warnings.warn(f"regularizer {name!r} is built from a stored {state.get('name')!r} state")
    normalize = not opts.reg_no_normalize
    if name == "ewc":
        return EWC(model, model_old, device, fisher=_stored(state, "fisher", name),
                   alpha=opts.reg_alpha, normalize=normalize)
    if name == "pi":
        return PI(model, model_old, device, score=_stored(state, "score", name), normalize=normalize)
    return RW(model, model_old, device, score=_stored(state, "score", name),
              fisher=_stored(state, "fisher", name), alpha=opts.reg_alpha,
              iterations=opts.reg_iterations, normalize=normalize)


def check_finite_state(state: dict, path: str, step: int | None = None) -> None:
    """Raise ``ValueError`` naming ``path`` if a regularizer state (a checkpoint's
    ``trainer_state["regularizer"]``) holds a NaN/Inf tensor: training on it would apply NaN
    gradients at the first iteration. ``step`` is the step that wrote the file (named in the fix)."""
    bad = []

    def visit(value, key):
        if torch.is_tensor(value):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                bad.append(key)
        elif isinstance(value, dict):
            for k, v in value.items():
                visit(v, f"{key}.{k}" if key else str(k))

    visit(state, "")
    if bad:
        which = f"step {step}" if step is not None else "that step"
        raise ValueError(f"checkpoint {path} holds a non-finite regularizer importance ({len(bad)} tensors, first "
                         f"{bad[0]}): the step that wrote it diverged. Retrain {which} (with --opt_level O0 or "
                         f"a lower --lr)")
