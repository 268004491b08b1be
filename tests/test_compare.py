"""scripts/synth/compare.py: the planned run.py calls (step-0 sharing, --step_ckpt, seeds, resuming)
and the markdown / PNG report written from hand-made results CSVs."""
import importlib.util
import math
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from utils.results import append_results_row

ROOT = Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location("synth_compare", ROOT / "scripts" / "synth" / "compare.py")
compare = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = compare  # dataclasses look their module up there
_SPEC.loader.exec_module(compare)

N_VOC = 21  # classes of the VOC results files


def option(argv, name):
    return argv[argv.index(name) + 1] if name in argv else None


def steps_of(argv):
    start = argv.index("--step") + 1
    end = next(i for i in range(start, len(argv)) if argv[i].startswith("--"))
    return [int(s) for s in argv[start:end]]


def plan(tmp_path, methods, task_names=("15-5",), seeds=(42,), settings=compare.QUICK):
    return compare.plan_runs(methods, list(task_names), list(seeds), settings, tmp_path / "work",
                             tmp_path / "data", num_workers=0, python="python")


# ------------------------------------------------------------------------------ dry run / plan
def test_dry_run_shares_step0_per_seed_and_starts_step1_from_it(tmp_path, capsys):
    work = tmp_path / "work"
    code = compare.main(["--dry_run", "--quick", "--methods", "FT", "mib", "--tasks", "15-5",
                         "--seeds", "2", "--workdir", str(work), "--data_root", str(tmp_path / "data")])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# cd ")
    commands = [shlex.split(line) for line in lines[1:]]
    assert len(commands) == 6  # per seed: one shared CE step 0, then FT and MiB
    names = [option(c, "--name") for c in commands]
    assert names == ["step0-ce_s42", "FT_s42", "MiB_s42", "step0-ce_s43", "FT_s43", "MiB_s43"]
    for argv, seed in zip(commands, [42, 42, 42, 43, 43, 43]):
        assert argv[1] == str(ROOT / "run.py")
        assert option(argv, "--random_seed") == str(seed)
        assert option(argv, "--task") == "15-5" and "--overlap" in argv and "--crop_val" in argv
        assert option(argv, "--model") == "segformer_b0" and option(argv, "--crop_size") == "64"
        assert option(argv, "--checkpoint") == str(work / "checkpoints")
        assert option(argv, "--date") == "compare" and "--no_progress" in argv
    step0, ft, mib = commands[:3]
    assert option(step0, "--method") == "FT" and steps_of(step0) == [0]
    assert option(step0, "--lr") == "0.02" and option(step0, "--epochs") == str(compare.QUICK.epochs0)
    assert "--step_ckpt" not in step0
    shared = str(work / "checkpoints" / "15-5-voc_step0-ce_s42_0.pth")
    for argv, method in ((ft, "FT"), (mib, "MiB")):
        assert option(argv, "--method") == method and steps_of(argv) == [1]
        assert option(argv, "--step_ckpt") == shared
        assert option(argv, "--lr") == "0.005" and option(argv, "--epochs") == str(compare.QUICK.epochs)
    assert option(commands[4], "--step_ckpt") == str(work / "checkpoints" / "15-5-voc_step0-ce_s43_0.pth")
    assert not work.exists()  # a dry run writes nothing


def test_own_step0_families_and_ssul_learning_rate(tmp_path):
    runs = plan(tmp_path, ["EWC", "SSUL", "LWF-MC", "PLOP-M"], task_names=["15-1"])
    step0 = [(r.name, option(r.argv, "--method")) for r in runs if r.kind == "step0"]
    assert step0 == [("step0-ewc_s42", "EWC"), ("step0-ssul_s42", "SSUL"),
                     ("step0-lwf-mc_s42", "LWF-MC"), ("step0-ce_s42", "FT")]
    methods = {r.label: r for r in runs if r.kind == "method"}
    assert list(methods) == ["EWC", "SSUL", "LWF-MC", "PLOP-M"]
    for label, family in (("EWC", "ewc"), ("SSUL", "ssul"), ("LWF-MC", "lwf-mc"), ("PLOP-M", "ce")):
        run = methods[label]
        assert run.steps == [1, 2, 3, 4, 5] and steps_of(run.argv) == [1, 2, 3, 4, 5]
        assert option(run.argv, "--step_ckpt").endswith(f"15-5s-voc_step0-{family}_s42_0.pth")  # run.py names files by the canonical task
    assert option(methods["SSUL"].argv, "--lr") == "0.02"  # SSUL: the step-0 rate at every step
    ssul_step0 = next(r for r in runs if r.name == "step0-ssul_s42")
    assert "--no_freeze" in ssul_step0.argv  # SSUL trains the whole network at step 0
    assert "--no_freeze" not in methods["SSUL"].argv
    assert option(methods["EWC"].argv, "--lr") == "0.005"
    assert option(methods["LWF-MC"].argv, "--lr") == "0.002"  # STEP_LR_CAP: its iCaRL term diverges
    assert methods["PLOP-M"].log_path.endswith("logs/15-1_PLOP-M_s42_step1-5.txt")


def _write_rows(path, steps, value=0.5):
    for step in steps:
        n_seen = 16 + step
        append_results_row(str(path), step, [value] * n_seen, N_VOC, n_seen, value)


def test_plan_skips_finished_runs_and_resumes_after_the_last_checkpoint(tmp_path):
    work = tmp_path / "work"
    (work / "checkpoints").mkdir(parents=True)
    _write_rows(compare.results_csv(work, "15-1", "step0-ce_s42"), [0])
    (work / "checkpoints" / "15-5s-voc_step0-ce_s42_0.pth").write_bytes(b"")
    _write_rows(compare.results_csv(work, "15-1", "FT_s42"), [1, 2, 3, 4, 5])
    _write_rows(compare.results_csv(work, "15-1", "MiB_s42"), [1, 2])
    (work / "checkpoints" / "15-5s-voc_MiB_s42_2.pth").write_bytes(b"")
    _write_rows(compare.results_csv(work, "15-1", "LWF_s42"), [1, 2])  # step-2 checkpoint lost

    runs = plan(tmp_path, ["FT", "MiB", "LWF"], task_names=["15-1"])
    assert [(r.name, r.steps) for r in runs] == [("MiB_s42", [3, 4, 5]), ("LWF_s42", [1, 2, 3, 4, 5])]
    mib, lwf = runs
    assert "--step_ckpt" not in mib.argv  # step 3 chains on MiB's own step-2 file
    assert option(lwf.argv, "--step_ckpt").endswith("15-5s-voc_step0-ce_s42_0.pth")


def test_bad_input_is_refused_with_its_name(tmp_path, capsys):
    with pytest.raises(SystemExit):
        compare.main(["--dry_run", "--methods", "FT", "Bogus", "--workdir", str(tmp_path)])
    assert "Bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main(["--dry_run", "--tasks", "15-7", "--workdir", str(tmp_path)])
    assert "15-7" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main(["--dry_run", "--seeds", "0", "--workdir", str(tmp_path)])
    assert "--seeds" in capsys.readouterr().err


def test_workdir_is_ignored_and_refuses_other_settings(tmp_path):
    work = tmp_path / "work"
    compare.claim_workdir(work, compare.QUICK)
    assert (work / ".gitignore").read_text().splitlines()[-1] == "*"
    compare.claim_workdir(work, compare.QUICK)  # same settings: fine
    with pytest.raises(ValueError, match=r"epochs: 3 -> 9"):
        compare.claim_workdir(work, replace(compare.QUICK, epochs=9))


def test_failed_call_reports_command_and_log_tail(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("import sys\nprint('line one')\nprint('the real error')\nsys.exit(3)\n")
    run = compare.Run("method", "FT", "FT_s42", "15-5", 42, [1], ["python", str(script)],
                      str(tmp_path / "logs" / "x.txt"))
    run.argv[0] = compare.sys.executable
    with pytest.raises(RuntimeError, match=r"(?s)exit code 3.*the real error"):
        compare.execute(run, tmp_path)


# ------------------------------------------------------------------------------ report
def _fake_comparison(work):
    """FT and MiB on 15-5 with seeds 42 and 43; every class of a step has the same IoU except
    where noted, so the means are easy to compute by hand."""
    step0 = compare.results_csv(work, "15-5", "step0-ce_s42")
    append_results_row(step0, 0, [0.8] * 16, N_VOC, 16, 0.8)
    append_results_row(compare.results_csv(work, "15-5", "step0-ce_s43"), 0, [0.6] * 16, N_VOC, 16, 0.6)
    for seed, base in ((42, 0.1), (43, 0.3)):  # FT forgets
        append_results_row(compare.results_csv(work, "15-5", f"FT_s{seed}"), 1,
                           [base] * 16 + [0.5] * 5, N_VOC, 21, 0.0)
    for seed in (42, 43):  # MiB: base 0.7 but class 3 absent from the ground truth ("X")
        ious = [0.7] * 16 + [0.4] * 5
        ious[3] = math.nan
        append_results_row(compare.results_csv(work, "15-5", f"MiB_s{seed}"), 1, ious, N_VOC, 21, 0.0)


def test_report_markdown_numbers(tmp_path):
    work = tmp_path / "work"
    _fake_comparison(work)
    md_path, png_path = compare.write_report(work, "15-5", ["FT", "MiB"], [42, 43], compare.QUICK,
                                             command="python scripts/synth/compare.py --quick")
    assert md_path == str(work / "results" / "compare_15-5.md")
    text = Path(md_path).read_text()
    last = text.split("## All methods after the last step (step 1)")[1].split("## Per method")[0]
    # FT base: 0.1 / 0.3 -> 20.0 ± 14.1; all: (16 b + 5 * 0.5) / 21 = 0.1952 / 0.3476 -> 27.1 ± 10.8
    # MiB: 15 base classes of 0.7 (class 3 absent); all = (15 * 0.7 + 5 * 0.4) / 20 = 0.625
    assert "| method | 0-15 | 16-20 | all |" in last
    assert "| FT | 20.0 ± 14.1 | 50.0 ± 0.0 | 27.1 ± 10.8 |" in last
    assert "| MiB | 70.0 ± 0.0 | 40.0 ± 0.0 | 62.5 ± 0.0 |" in last
    ft = text.split("### FT")[1].split("###")[0]
    assert "| 0 | 16 | 70.0 ± 14.1 | - | 70.0 ± 14.1 |" in ft  # the shared step 0 (0.8 / 0.6)
    assert "| 1 | 21 | 20.0 ± 14.1 | 50.0 ± 0.0 | 27.1 ± 10.8 |" in ft
    assert "mean ± sample std over 2 seeds (42, 43)" in text
    assert "Command: `python scripts/synth/compare.py --quick`" in text
    assert "3 epochs at lr 0.005 (every method)" in text
    assert Path(png_path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_figure_plots_base_miou_per_step(tmp_path):
    work = tmp_path / "work"
    _fake_comparison(work)
    table = compare.collect(work, "15-5", ["FT", "MiB"], [42, 43])
    axes = compare.report_figure("15-5", table, [42, 43]).axes[0]
    lines = {line.get_label(): line for line in axes.get_lines()}
    assert sorted(lines) == ["FT", "MiB"]
    assert list(lines["FT"].get_xdata()) == [0, 1]
    assert lines["FT"].get_ydata() == pytest.approx([70.0, 20.0])
    assert lines["MiB"].get_ydata() == pytest.approx([70.0, 70.0])
    assert len(axes.collections) == 2  # one ± std band per method with two seeds
    colours = {compare._line_style(i)["color"] for i in range(len(compare.DEFAULT_METHODS))}
    assert len(colours) == len(compare.DEFAULT_METHODS)  # one colour per method


def test_one_seed_has_no_spread_and_missing_results_are_named(tmp_path):
    work = tmp_path / "work"
    _fake_comparison(work)
    text = compare.report_markdown("15-5", compare.collect(work, "15-5", ["FT"], [42]), [42], compare.QUICK)
    assert "| FT | 10.0 | 50.0 | 19.5 |" in text and "one seed (42)" in text
    table = {"FT": {}, "SSUL": {}, "LWF-MC": {}}
    assert compare._lr_exceptions(table, compare.QUICK) == "SSUL: 0.02, LWF-MC: 0.002"
    with pytest.raises(FileNotFoundError, match="compare_voc_15-5_SATS_s42.csv"):
        compare.collect(work, "15-5", ["SATS"], [42])
