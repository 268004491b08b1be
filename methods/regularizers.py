"""EWC (Kirkpatrick et al., 2017), RW (Chaudhry et al., 2018), PI (Zenke et al., 2017): a penalty
``reg_importance × sum Omega (theta - theta*)^2`` whose importance Omega is accumulated from the
task gradients while training (step 0 included), see ``utils/regularizer.py``. Each accumulates its
importance at step 0, so each has a step-0 model of its own."""
from __future__ import annotations

from methods import register_component, register_method
from methods.base import Component, MethodSpec, StepInfo

REGULARIZERS = ("ewc", "rw", "pi")


class Regularizers(Component):
    name = "regularizers"

    def add_options(self, parser):
        g = parser.add_argument_group("Method: EWC / RW / PI (weight regularizers)")
        g.add_argument("--regularizer", type=str, default=None, choices=REGULARIZERS,
                       help="weight regulariser: EWC, RW (Riemannian walk) or PI (path integral)")
        g.add_argument("--reg_importance", type=float, default=1.0, help="regulariser weight")
        g.add_argument("--reg_alpha", type=float, default=0.9,
                       help="EWC/RW: weight of the newest gradient^2 in the running Fisher (EMA)")
        g.add_argument("--reg_no_normalize", action="store_true", default=False,
                       help="do not min-max normalise the importance")
        g.add_argument("--reg_iterations", type=int, default=10,
                       help="RW: iterations between two updates of the path score")

    def regularizer(self, info: StepInfo):
        return info.opts.regularizer  # at step 0 too: the first importance is accumulated there


register_component(Regularizers())
# the MiB repository uses reg_importance 500 for EWC and PI (ORIGINAL_REPO_VALUES)
register_method(MethodSpec("EWC", preset={"regularizer": "ewc", "reg_importance": 100}, step0_family="ewc",
                           order=4, summary="elastic weight consolidation"))
register_method(MethodSpec("RW", preset={"regularizer": "rw", "reg_importance": 100}, step0_family="rw",
                           order=5, summary="Riemannian walk"))
register_method(MethodSpec("PI", preset={"regularizer": "pi", "reg_importance": 100}, step0_family="pi",
                           order=6, summary="path integral (synaptic intelligence)"))
