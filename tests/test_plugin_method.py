"""A method outside the repository, in one file: registered through ``CSS_METHOD_PATH``, trained
end to end (steps 0 and 1) by ``run.py`` in a subprocess, composed with a technique by name.

The toy method adds a loss term ``toy = toy_weight * mean((z_old - z[:, :C_o])^2)`` (an L2
distillation of the old logits); the toy technique records, after each step, that its hook ran
with the step's checkpoint, and refuses SSUL.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers_e2e import base_args, log_folder, results_csv, tiny_voc  # noqa: F401

REPO = Path(__file__).resolve().parents[1]

TOY_METHOD = textwrap.dedent('''
    """Toy: L2 distillation of the old logits (a new method in one file)."""
    from methods import register_component, register_method
    from methods.base import Component, LossTerm, MethodSpec


    class LogitL2(LossTerm):
        name = "toy"

        def __call__(self, ctx):
            old = ctx.old_logits.float()
            return (ctx.logits.float()[:, : old.shape[1]] - old).pow(2).mean()


    class Toy(Component):
        name = "toy"
        order = 60

        def add_options(self, parser):
            g = parser.add_argument_group("Method: Toy")
            g.add_argument("--toy_weight", type=float, default=0.0, help="weight of the toy L2 term")

        def check(self, opts):
            if opts.toy_weight < 0:
                raise ValueError(f"--toy_weight must be >= 0, got {opts.toy_weight}")

        def terms(self, info):
            return [LogitL2(info.opts.toy_weight)] if info.opts.toy_weight > 0 else []


    class ToyTechnique(Component):
        name = "toy_technique"

        def add_options(self, parser):
            parser.add_argument("--toy_hook", action="store_true", default=False)

        def after_step(self, run, info):
            if run.opts.toy_hook and run.rank == 0:
                with open(run.checkpoint + ".toy", "w") as f:
                    f.write(f"step {info.step} {os.path.isfile(run.checkpoint)}")


    import os

    register_component(Toy())
    register_component(ToyTechnique())
    register_method(MethodSpec("Toy", preset={"toy_weight": 2.0}, step0_family="ce", summary="toy"))
    register_method(MethodSpec("ToyHook", preset={"toy_hook": True}, technique=True,
                               refuses={"SSUL": "SSUL's network is frozen after step 0"}))
''')


def run_py(args, cwd, plugin):
    env = dict(os.environ, CSS_METHOD_PATH=str(plugin), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("LOCAL_RANK", None)
    return subprocess.run([sys.executable, str(REPO / "run.py"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    folder = tmp_path_factory.mktemp("my_methods")
    (folder / "toy.py").write_text(TOY_METHOD)
    return folder


def test_a_method_in_one_file_trains_two_steps_and_composes_with_a_technique(plugin, tiny_voc, tmp_path):
    done = run_py(base_args(tiny_voc, "toy", "toy+toyhook") + ["--step", "0", "1", "--lr", "0.01", "0.001"],
                  tmp_path, plugin)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Toy+ToyHook on voc 15-5" in done.stdout
    log = (log_folder(tmp_path, "toy") / "log.txt").read_text()
    assert "epoch 1/1: ce " in log and ", toy " in log  # the term is logged at step 1 under its name
    assert results_csv(tmp_path, "toy").is_file()
    hook = {p.name: p.read_text() for p in (tmp_path / "checkpoints" / "step").glob("*.toy")}
    assert hook == {"15-5-voc_toy_0.pth.toy": "step 0 True", "15-5-voc_toy_1.pth.toy": "step 1 True"}


def test_a_plugin_option_and_the_technique_refusal_are_user_errors(plugin, tiny_voc, tmp_path):
    bad = run_py(base_args(tiny_voc, "bad", "toy") + ["--toy_weight", "-1"], tmp_path, plugin)
    assert bad.returncode == 2 and "--toy_weight must be >= 0, got -1.0" in bad.stderr
    assert "Traceback" not in bad.stderr
    refused = run_py(base_args(tiny_voc, "bad", "SSUL+ToyHook"), tmp_path, plugin)
    assert refused.returncode == 2
    assert "ToyHook cannot be combined with SSUL: SSUL's network is frozen after step 0" in refused.stderr
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "logs").exists()
