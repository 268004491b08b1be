import argparse
import datetime

import pytest

import argparser
from argparser import METHOD_PRESETS, modify_command_options, parse_options


@pytest.fixture(autouse=True)
def _no_launcher_env(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def parse(*args):
    return parse_options(list(args))


# ------------------------------------------------------------------------------------ defaults
def test_defaults_match_the_sats_argparser_and_the_decision_table():
    opts = parse()
    expected = {
        # SATS argparser
        "data_root": "data", "dataset": "voc", "task": "19-1", "step": [0], "overlap": False,
        "data_masking": "current", "lr": [0.007], "epochs": 30, "batch_size": 4,
        "crop_size": 512, "weight_decay": 1e-4, "lr_policy": "poly", "lr_power": 0.9,
        "lr_decay_step": 5000, "lr_decay_factor": 0.1, "random_seed": 42, "num_workers": 1,
        "backbone": "resnet101", "output_stride": 16, "norm_act": "iabn_sync", "pooling": 32,
        "fusion_mode": "mean", "loss_kd": 0.0, "loss_de": 0.0, "alpha": 1.0, "reg_importance": 1.0,
        "reg_alpha": 0.9, "reg_iterations": 10, "icarl_importance": 1.0, "threshold": 0.9,
        "pod_factor": 5.0, "pod_prepro": "pow", "pod_apply": "all", "spp_scales": [1, 2, 4],
        "kd_bce_sig_shape": "trim", "temperature": 1.0, "focal_loss_gamma": 2,
        "distill_weight_args": 10, "val_interval": 1, "logdir": "./logs", "name": "Experiment",
        "date": str(datetime.date.today()), "sample_num": 0, "print_interval": 10, "opt_level": "O0",
        "code_directory": ".", "local_rank": 0, "pseudo": None, "regularizer": None,
        "visualize": True, "strict_weights": True,
        # this project's fixes and additions
        "model": "segformer_b2", "segformer_head": "sats", "method": "FT", "momentum": 0.9,
        "lr_head": 1.0, "crop_val": False, "distill_object": "sats-selfattn", "mem_size": 0,
        "pretrained": None, "ssul_pseudo_threshold": 0.7, "checkpoint": "checkpoints/step",
        "idxs_dir": "data", "sats_legacy_reshape": False, "pseudo_median_legacy": False,
        "num_classes": 21, "no_overlap": True, "no_cross_val": True,
    }
    assert {k: getattr(opts, k) for k in expected} == expected
    assert opts.preset_overrides == [] and opts.option_warnings == []


def test_ade_sets_151_classes():
    assert parse("--dataset", "ade", "--task", "100-10").num_classes == 151


# ------------------------------------------------------------------------------------ presets
PRESET_EXPECTATIONS = {
    "LWF": {"loss_kd": 100},
    "LWF-MC": {"icarl": True, "icarl_importance": 10},
    "ILT": {"loss_kd": 10, "loss_de": 10},
    "EWC": {"regularizer": "ewc", "reg_importance": 100},
    "RW": {"regularizer": "rw", "reg_importance": 100},
    "PI": {"regularizer": "pi", "reg_importance": 100},
    "MiB": {"loss_kd": 40, "unce": True, "unkd": True, "init_balanced": True},
    "PLOP": {"pod": "local", "pod_factor": 0.01, "pod_logits": True, "pseudo": "entropy",
             "threshold": 0.001, "classif_adaptive_factor": True, "init_balanced": True,
             "pod_options": {"switch": {"after": {"extra_channels": "sum", "factor": 0.0005,
                                                  "type": "local"}}},
             "loss_kd": 0.0, "unce": False},
    "SSUL": {"ssul": True, "bce": True, "unknown": True, "pseudo": "ssul", "freeze": True,
             "bn_freeze": True, "w_transfer": True, "ssul_pseudo_threshold": 0.7},
    "SATS": {"pseudo": "entropy", "threshold": 0.001, "classif_adaptive_factor": False,
             "init_balanced": True, "loss_kd": 20, "unkd": True, "unce": False, "pod": None,
             "distill_segformer": True, "distill_object": "sats-selfattn",
             "distill_weight_args": 20},
}


@pytest.mark.parametrize("method", sorted(PRESET_EXPECTATIONS))
def test_each_preset_sets_the_sats_repository_values(method):
    opts = parse("--method", method, "--task", "15-5s", "--step", "1")
    assert opts.method == method
    assert {k: getattr(opts, k) for k in PRESET_EXPECTATIONS[method]} == PRESET_EXPECTATIONS[method]
    assert opts.preset_overrides == []


def test_ft_and_no_method_change_nothing():
    base = vars(parse())
    ft = vars(parse("--method", "ft"))
    for opts in (base, ft):
        opts.pop("explicit_options")
    assert ft == base


def test_only_sats_enables_the_attention_transfer():
    for method in METHOD_PRESETS:
        opts = parse("--method", method)
        assert opts.distill_segformer == (method == "SATS"), method


def test_explicit_value_beats_the_preset_and_is_reported():
    opts = parse("--method", "MiB", "--loss_kd", "10")
    assert opts.loss_kd == 10
    assert (opts.unce, opts.unkd, opts.init_balanced) == (True, True, True)
    assert opts.preset_overrides == ["preset MiB sets loss_kd=40; using 10 from the command line"]


def test_explicit_value_equal_to_the_default_still_beats_the_preset():
    # --loss_kd 0 is the parser default: only the SUPPRESS re-parse can tell it was typed
    opts = parse("--method", "SATS", "--loss_kd", "0", "--no_unkd", "--classif_adaptive_factor")
    assert (opts.loss_kd, opts.unkd, opts.classif_adaptive_factor) == (0.0, False, True)
    assert opts.preset_overrides == [
        "preset SATS sets classif_adaptive_factor=False; using True from the command line",
        "preset SATS sets loss_kd=20; using 0 from the command line",
        "preset SATS sets unkd=True; using False from the command line",
    ]


def test_explicit_value_equal_to_the_preset_is_not_reported():
    opts = parse("--method", "SATS", "--distill_weight_args", "20")
    assert opts.distill_weight_args == 20 and opts.preset_overrides == []


def test_explicit_json_option_override_message():
    opts = parse("--method", "PLOP", "--pod_options",
                 '{"switch": {"after": {"extra_channels": "sum", "factor": 0.00001, "type": "local"}}}')
    assert opts.pod_options["switch"]["after"]["factor"] == 0.00001
    assert opts.preset_overrides == [
        'preset PLOP sets pod_options={"switch":{"after":{"extra_channels":"sum","factor":0.0005,'
        '"type":"local"}}}; using {"switch":{"after":{"extra_channels":"sum","factor":1e-05,'
        '"type":"local"}}} from the command line'
    ]


def test_modify_on_a_namespace_built_in_code_compares_with_defaults():
    opts = argparser.get_argparser().parse_args([])
    opts.method, opts.loss_kd = "mib", 10.0
    modify_command_options(opts)
    assert opts.method == "MiB" and opts.loss_kd == 10.0
    assert opts.preset_overrides == ["preset MiB sets loss_kd=40; using 10 from the command line"]


def test_explicit_options_lists_what_was_typed():
    assert argparser.explicit_options(["--local-rank", "2", "--loss_kd", "0", "--no_unkd"]) == {
        "local_rank", "loss_kd", "unkd"}


@pytest.mark.parametrize("spelling", ["MiB", "MIB", "mib", " Mib "])
def test_method_is_case_insensitive(spelling):
    assert parse("--method", spelling).method == "MiB"


@pytest.mark.parametrize("spelling, method", [("lwf-mc", "LWF-MC"), ("sats", "SATS"),
                                              ("Plop", "PLOP"), ("ssul", "SSUL")])
def test_other_spellings(spelling, method):
    assert parse("--method", spelling).method == method


def test_memory_aliases_set_the_memory_size_per_dataset():
    voc = parse("--method", "SATS-M", "--task", "15-5s")
    ade = parse("--method", "ssul-m", "--dataset", "ade", "--task", "100-10")
    assert (voc.method, voc.mem_size, voc.distill_segformer) == ("SATS", 100, True)
    assert (ade.method, ade.mem_size, ade.ssul) == ("SSUL", 300, True)
    assert parse("--method", "MiB").mem_size == 0


def test_memory_alias_with_explicit_size():
    opts = parse("--method", "PLOP-M", "--mem_size", "50")
    assert opts.mem_size == 50
    assert opts.preset_overrides == ["preset PLOP-M sets mem_size=100; using 50 from the command line"]


def test_model_alias_and_choices():
    assert parse("--model", "segformer").model == "segformer_b2"
    assert parse("--model", "segformer_b5").model == "segformer_b5"
    with pytest.raises(SystemExit):
        parse("--model", "segformer_b6")


def test_task_alias_is_canonicalised():
    assert parse("--task", "15-1", "--step", "5").task == "15-5s"


# ------------------------------------------------------------------------------------ local rank
@pytest.mark.parametrize("flag", ["--local-rank", "--local_rank"])
def test_both_local_rank_spellings(flag):
    assert parse(flag, "3").local_rank == 3


def test_local_rank_from_the_environment(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert parse().local_rank == 2
    assert parse("--local_rank", "1").local_rank == 1  # an explicit flag wins


def test_bad_local_rank_environment(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "two")
    opts = argparser.get_argparser().parse_args([])
    with pytest.raises(ValueError, match="LOCAL_RANK='two' is not an integer"):
        modify_command_options(opts, explicit=set())


# ------------------------------------------------------------------------------------ errors
def error_of(*args):
    opts = argparser.get_argparser().parse_args(list(args))
    with pytest.raises(ValueError) as info:
        modify_command_options(opts, explicit=argparser.explicit_options(list(args)))
    return str(info.value)


def test_unknown_method_lists_the_valid_ones():
    message = error_of("--method", "foo")
    assert message.startswith("unknown method 'foo'; valid methods (any case): FT, LWF, LWF-MC")
    assert "SATS-M" in message


def test_unknown_method_exits_through_the_parser(capsys):
    with pytest.raises(SystemExit) as info:
        parse("--method", "foo")
    assert info.value.code == 2
    assert "unknown method 'foo'" in capsys.readouterr().err


def test_unknown_task_for_the_dataset():
    assert "'100-10' is a task of ade" in error_of("--task", "100-10")


def test_step_beyond_the_task():
    assert error_of("--task", "15-5s", "--step", "6") == (
        "step 6 is out of range for task '15-5s' on 'voc': valid steps are 0..5")


def test_steps_must_increase():
    assert "strictly increasing" in error_of("--task", "15-5s", "--step", "2", "1")


def test_lr_list_must_match_the_steps():
    assert error_of("--task", "15-5s", "--step", "1", "2", "--lr", "0.1", "0.2", "0.3") == (
        "--lr takes one value or one per step: got 3 values [0.1, 0.2, 0.3] for 2 steps [1, 2]")
    opts = parse("--task", "15-5s", "--step", "1", "2", "--lr", "0.1", "0.2")
    assert opts.lr == [0.1, 0.2]


def test_batch_size_must_be_positive():
    assert error_of("--batch_size", "0") == "--batch_size must be >= 1, got 0"


def test_unsupported_pseudo_modes_and_step_threshold():
    assert "unknown --pseudo 'median_5'" in error_of("--pseudo", "median_5")
    assert "unknown --pseudo 'threshold_2'" in error_of("--pseudo", "threshold_2")
    assert parse("--pseudo", "threshold_0.5").pseudo == "threshold_0.5"
    assert "--step_threshold is not supported" in error_of("--step_threshold", "0.1")


def test_attention_transfer_needs_a_segformer():
    assert "self-attention maps" in error_of("--method", "SATS", "--model", "deeplab")
    opts = parse("--method", "SATS", "--model", "deeplab", "--distill_object", "sats-feature-CNN")
    assert opts.distill_segformer


def test_ssul_parts_are_consistent():
    assert "--ssul needs --unknown" in error_of("--method", "SSUL", "--no_unknown")
    assert "--w_transfer" in error_of("--w_transfer")


def test_num_classes_must_match_the_dataset():
    assert "--num_classes 19 does not match dataset 'voc'" in error_of("--num_classes", "19")


def test_invalid_pod_options_json(capsys):
    with pytest.raises(SystemExit):
        parse("--pod_options", "{not json")
    assert "not valid JSON" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ switches
def test_changed_flags_mean_what_they_say():
    assert parse("--crop_val").crop_val is True
    assert parse("--no_visualize").visualize is False
    assert parse("--no_visualize", "--sample_num", "4").sample_num == 0
    assert parse("--no_strict_weights").strict_weights is False


def test_no_effect_options_are_reported():
    opts = parse("--dont_predict_bg", "--fusion-mode", "max")
    assert opts.option_warnings == [
        "--dont_predict_bg has no effect in this implementation (accepted for compatibility); "
        "ignoring True",
        "--fusion-mode has no effect in this implementation (accepted for compatibility); "
        "ignoring max",
    ]


def test_original_repo_flags():
    assert argparser.original_repo_flags("ILT", "MiB") == "--loss_kd 100 --loss_de 100"
    assert argparser.original_repo_flags("mib", "PLOP") == "--loss_kd 10"
    assert argparser.original_repo_flags("EWC", "MiB") == "--reg_importance 500"
    assert argparser.original_repo_flags("SATS", "MiB") == ""
    opts = parse("--method", "ILT", *argparser.original_repo_flags("ILT", "PLOP").split())
    assert (opts.loss_kd, opts.loss_de) == (100, 100)


def test_help_has_the_groups_and_fits_250_lines(capsys):
    with pytest.raises(SystemExit):
        parse("--help")
    out = capsys.readouterr().out
    for title in ["Data:", "Model:", "Training:", "Method:", "Method: MiB:", "Method: SATS:",
                  "Validation & checkpoints:", "Logging:", "Performance/distributed:"]:
        assert f"\n{title}\n" in out, title
    assert "--local_rank LOCAL_RANK, --local-rank LOCAL_RANK" in out
    assert "--focal_loss" not in out and "--dont_predict_bg" not in out  # legacy options are hidden
    assert len(out.splitlines()) <= 250


def test_help_legacy_lists_the_hidden_options(capsys):
    with pytest.raises(SystemExit):
        parse("--help_legacy")
    out = capsys.readouterr().out
    assert "--dont_predict_bg" in out and "--focal_loss" in out and "--print_interval" in out


def test_every_preset_option_is_a_parser_option():
    dests = {a.dest for a in argparser.get_argparser()._actions}
    for method, values in METHOD_PRESETS.items():
        assert set(values) <= dests, method
    assert isinstance(argparser.get_argparser(), argparse.ArgumentParser)


def test_saliency_follows_the_unknown_class():
    assert parse("--method", "SSUL").saliency is True
    assert parse("--method", "MiB").saliency is False


def test_stop_after_epochs_must_be_positive():
    assert parse("--stop_after_epochs", "2").stop_after_epochs == 2
    assert error_of("--stop_after_epochs", "0") == "--stop_after_epochs must be >= 1, got 0"


def test_options_to_dict_is_plain_and_complete():
    opts = parse("--method", "PLOP", "--task", "15-5s", "--step", "1")
    values = argparser.options_to_dict(opts)
    assert values["method"] == "PLOP" and values["pod_options"]["switch"]["after"]["factor"] == 0.0005
    assert values["explicit_options"] == ["method", "step", "task"]
    assert set(values) == set(vars(opts))


def test_unimplemented_plop_experiment_is_refused_with_a_short_usage(capsys):
    import argparser as ap

    with pytest.raises(SystemExit) as exit_info:
        ap.parse_options(["--focal_loss"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "--focal_loss: PLOP experimental option(s) not implemented" in err
    assert len(err.splitlines()) == 2  # the short usage line and the message
    assert {"nca", "print_interval"} <= {a.dest for a in ap.get_argparser()._actions}  # still parsed


def test_data_masking_all_is_refused_for_training(capsys):
    with pytest.raises(SystemExit):
        parse_options(["--data_masking", "all"])
    assert "future classes" in capsys.readouterr().err
    assert parse_options(["--data_masking", "all", "--test"]).data_masking == "all"
