"""The sweep scripts: syntax, the file set, and the exact commands of a DRY_RUN."""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import argparser
import methods

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
# every registered base method and its -M variant has a script per standard task
METHODS = [m.lower() for m in methods.names()] + [f"{m.lower()}-m" for m in methods.memory_names()]
VOC_TASKS = ["15-5", "15-1", "10-1", "5-3", "19-1"]
ADE_TASKS = ["100-50", "100-10", "50-50", "100-5"]
# what common.sh reads from the environment: the caller's values must not leak into the tests
SWEEP_VARIABLES = ("GPU", "NB_GPU", "DATA_ROOT", "NAME", "PORT", "MODEL", "BATCH_SIZE", "EPOCHS",
                   "INITIAL_EPOCHS", "LR0", "LR", "OPT_LEVEL", "CROP_VAL", "CHECKPOINT_DIR",
                   "STEP0_PREFIX", "RESUME", "EXTRA_ARGS", "DRY_RUN", "PYTHON", "TORCHRUN",
                   "START_DATE", "LOCAL_RANK", "PRETRAINED", "ORDERS")
STEP0_CE = "checkpoints/step/15-5s-voc_step0-ce-segformer_b2_0.pth"


def dry_run(script, **env):
    """stdout lines of ``DRY_RUN=1 bash script`` (cwd outside the repository on purpose)."""
    full_env = {k: v for k, v in os.environ.items() if k not in SWEEP_VARIABLES}
    full_env.update({"DRY_RUN": "1", "PYTHON": sys.executable, "GPU": "0,1", "PORT": "12345",
                     "START_DATE": "2024-01-01"})
    full_env.update(env)
    done = subprocess.run(["bash", str(SCRIPTS / script)], env=full_env, cwd="/", text=True,
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def run_py_args(line):
    """The run.py arguments of one printed torchrun command."""
    words = shlex.split(line)
    return words[words.index("run.py") + 1:]


def option(args, name):
    return args[args.index(name) + 1] if name in args else None


def test_every_method_has_its_scripts_and_every_script_names_a_registered_method():
    voc = {p.name for p in (SCRIPTS / "voc").glob("*.sh")}
    ade = {p.name for p in (SCRIPTS / "ade").glob("*.sh")}
    assert {f"{m}_{t}.sh" for m in METHODS for t in VOC_TASKS} <= voc
    assert {f"{m}_{t}.sh" for m in METHODS for t in ADE_TASKS} <= ade
    for name in voc | ade:  # combinations (MiB+EWF, SATS+NeST, ...) too
        method = name[: name.rindex("_")]
        assert methods.parse(method).label.lower() == method, name


def test_every_script_passes_bash_syntax_check():
    sweeps = sorted(SCRIPTS.glob("voc/*.sh")) + sorted(SCRIPTS.glob("ade/*.sh"))
    files = sweeps + [SCRIPTS / "common.sh"]
    others = sorted(SCRIPTS.glob("*.sh")) + sorted(SCRIPTS.glob("synth/*.sh"))  # demo, comparison
    loop = 'for f in "$@"; do bash -n "$f" || { echo "syntax error: $f"; exit 1; }; done'
    done = subprocess.run(["bash", "-c", loop, "check", *map(str, files + others)], text=True,
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(sweeps) >= len(METHODS) * 9


def test_sats_15_1_prints_the_exact_commands():
    lines = dry_run("voc/sats_15-1.sh")
    prefix = ("CUDA_VISIBLE_DEVICES=0,1 torchrun --master_port 12345 --nproc_per_node 2 run.py "
              "--date 2024-01-01 --data_root data --dataset voc --task 15-5s --overlap "
              "--model segformer_b2 --batch_size 12 --opt_level O1 --checkpoint checkpoints/step "
              "--crop_val")
    assert lines == [
        f"{prefix} --name step0-ce-segformer_b2 --step 0 --lr 0.01 --epochs 30 --method FT",
        f"{prefix} --name SATS --step 0 --method SATS --test --ckpt {STEP0_CE}",
        f"{prefix} --name SATS --step 1 --lr 0.001 --epochs 30 --method SATS --step_ckpt {STEP0_CE}",
        f"{prefix} --name SATS --step 2 --lr 0.001 --epochs 30 --method SATS",
        f"{prefix} --name SATS --step 3 --lr 0.001 --epochs 30 --method SATS",
        f"{prefix} --name SATS --step 4 --lr 0.001 --epochs 30 --method SATS",
        f"{prefix} --name SATS --step 5 --lr 0.001 --epochs 30 --method SATS",
        f"{sys.executable} average_csv.py results/2024-01-01_voc_15-5s_SATS.csv "
        f"--dataset voc --task 15-5s",
    ]


def test_existing_step0_checkpoint_is_reused(tmp_path):
    ckpt_dir = tmp_path / "ckpts"
    ckpt_dir.mkdir()
    (ckpt_dir / "15-5s-voc_step0-ce-segformer_b2_0.pth").write_bytes(b"")
    lines = dry_run("voc/mib_15-1.sh", CHECKPOINT_DIR=str(ckpt_dir))
    steps = [option(run_py_args(line), "--step") for line in lines[:-1]]
    assert steps == ["0", "1", "2", "3", "4", "5"]
    assert "--test" in run_py_args(lines[0])  # only the method's step-0 test row is left


def test_step0_is_shared_only_between_methods_that_train_it_alike():
    def step0(script):
        args = run_py_args(dry_run(script)[0])
        return option(args, "--name"), option(args, "--method"), option(args, "--epochs")

    assert step0("voc/mib_15-1.sh") == step0("voc/plop-m_15-1.sh") == step0("voc/ilt_15-1.sh") == (
        "step0-ce-segformer_b2", "FT", "30")
    assert step0("voc/ewc_15-1.sh") == ("step0-ewc-segformer_b2", "EWC", "30")
    assert step0("voc/lwf-mc_15-1.sh") == ("step0-lwf-mc-segformer_b2", "LWF-MC", "30")
    assert step0("voc/ssul-m_15-1.sh") == ("step0-ssul-segformer_b2", "SSUL", "50")


def test_environment_overrides():
    lines = dry_run("voc/sats-m_10-1.sh", NAME="mine", EPOCHS="3", INITIAL_EPOCHS="2",
                    BATCH_SIZE="5", MODEL="segformer_b0", DATA_ROOT="/d/voc", CROP_VAL="0",
                    GPU="3", EXTRA_ARGS="--num_workers 4")
    first, last_step = run_py_args(lines[0]), run_py_args(lines[-2])
    assert lines[0].startswith("CUDA_VISIBLE_DEVICES=3 torchrun --master_port 12345 --nproc_per_node 1 ")
    assert option(first, "--name") == "step0-ce-segformer_b0" and option(first, "--epochs") == "2"
    assert (option(last_step, "--name"), option(last_step, "--step"), option(last_step, "--epochs"),
            option(last_step, "--method")) == ("mine", "10", "3", "SATS-M")
    for args in (first, last_step):
        assert option(args, "--batch_size") == "5" and option(args, "--model") == "segformer_b0"
        assert option(args, "--data_root") == "/d/voc" and option(args, "--num_workers") == "4"
        assert "--crop_val" not in args
    assert lines[-1].endswith("results/2024-01-01_voc_10-1_mine.csv --dataset voc --task 10-1")


def test_plop_on_ade_uses_the_papers_pod_values():
    lines = dry_run("ade/plop_100-10.sh")
    assert len(lines) == 2 + 5 + 1
    for line in lines[2:-1]:
        args = run_py_args(line)
        assert option(args, "--pod_factor") == "0.001" and option(args, "--epochs") == "60"
        assert json.loads(option(args, "--pod_options"))["switch"]["after"]["factor"] == 0.00001
    opts = argparser.parse_options(run_py_args(lines[2]))
    assert opts.pod_factor == 0.001
    assert opts.preset_overrides[0] == "preset PLOP sets pod_factor=0.01; using 0.001 from the command line"


def test_ssul_on_ade_uses_clovaai_values():
    args = run_py_args(dry_run("ade/ssul_50-50.sh")[2])
    assert (option(args, "--task"), option(args, "--step"), option(args, "--lr"),
            option(args, "--epochs")) == ("50", "1", "0.05", "100")


@pytest.mark.parametrize("script, policy", [("voc/ssul_15-1.sh", None), ("ade/ssul_100-10.sh", "warm_poly")])
def test_a_dry_run_shows_clovaai_step0_rates(script, policy):
    step0 = run_py_args(dry_run(script)[0])
    assert option(step0, "--step") == "0"
    assert (option(step0, "--lr_body0"), option(step0, "--lr_head0")) == ("0.001", "0.01")
    assert option(step0, "--lr_policy") == policy


@pytest.mark.parametrize("script", [f"voc/{m}_15-1.sh" for m in METHODS]
                         + [f"ade/{m}_100-10.sh" for m in METHODS])
def test_every_printed_command_is_accepted_by_the_argparser(script, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    lines = dry_run(script)
    for line in lines[:-1]:
        opts = argparser.parse_options(run_py_args(line))
        assert opts.crop_val and opts.overlap and opts.opt_level == "O1"
        if "plop" not in script or "ade" not in script:
            assert opts.preset_overrides == [], line


def test_resume_passes_the_existing_step_checkpoint(tmp_path):
    (tmp_path / "15-5-voc_MiB_1.pth").write_bytes(b"")
    lines = dry_run("voc/mib_15-5.sh", CHECKPOINT_DIR=str(tmp_path), RESUME="1")
    step1 = run_py_args(lines[2])
    assert option(step1, "--step") == "1"
    assert option(step1, "--ckpt") == str(tmp_path / "15-5-voc_MiB_1.pth")
    assert option(step1, "--step_ckpt") == str(tmp_path / "15-5-voc_step0-ce-segformer_b2_0.pth")
    assert "--ckpt" not in run_py_args(dry_run("voc/mib_15-5.sh", CHECKPOINT_DIR=str(tmp_path))[2])
