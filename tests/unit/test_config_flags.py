"""megatron_md.megatron.config (dataclasses → flags → MDConfig, validation) and megatron_md.megatron_lm.

CPU-only, no processes. Megatron-LM is not installed here: its integration is tested through
its import-failure path and with small stand-in modules for ``megatron.training``.
"""
import argparse
import dataclasses
import inspect
import logging
import re
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from megatron_md import megatron_lm
from megatron_md.megatron import config as C
from megatron_md.optim import MATRIX_OPTIMIZERS, OPTIMIZER_NAMES, SFAdamW


def _parser(*extra_setup):
    p = argparse.ArgumentParser(allow_abbrev=False)
    for f in extra_setup:
        f(p)
    return C.add_md_args(p)


def _parse(argv, parser=None):
    return C.md_config_from_args((parser or _parser()).parse_args(argv))


# ------------------------------------------------------------------------------ the dataclasses
def test_names_agree_with_the_optimizer_package():
    assert set(C.METHOD_CONFIGS) == set(C.OPTIMIZER_CHOICES) - {"adam"}
    assert set(C.OPTIMIZER_CHOICES) <= set(OPTIMIZER_NAMES)
    for name, cls in MATRIX_OPTIMIZERS.items():
        assert C.METHOD_CONFIGS[name].optimizer_class is cls
    assert C.METHOD_CONFIGS["sf-adamw"].optimizer_class is SFAdamW
    # one nested config per method, named after it
    nested = {f.name: f for f in dataclasses.fields(C.MDConfig) if f.name.replace("_", "-") in C.METHOD_CONFIGS}
    assert {n.replace("_", "-") for n in nested} == set(C.METHOD_CONFIGS)


@pytest.mark.parametrize("name", sorted(C.METHOD_CONFIGS))
def test_defaults_equal_the_optimizer_class_defaults(name):
    """Every constructor keyword is covered by exactly one field (or supplied by the builder from a
    Megatron flag: lr, weight_decay — SF-NorMuon's class default 0.05 is --weight-decay's job —
    and sharding), and the dataclass default equals the class default."""
    cfg_cls = C.METHOD_CONFIGS[name]
    params = inspect.signature(cfg_cls.optimizer_class.__init__).parameters
    keywords = {k: p.default for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    kw = cfg_cls().to_kwargs()
    assert set(kw) == set(keywords) - set(C.BUILDER_SUPPLIED)
    for k, v in kw.items():
        assert v == keywords[k], \
            f"{cfg_cls.flag(k)}: dataclass default {v!r} != {cfg_cls.optimizer_class.__name__}({k}={keywords[k]!r})"


def test_every_field_has_help():
    for cls in (C.MDConfig, *C.METHOD_CONFIGS.values()):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help", "").strip(), f"{cls.__name__}.{f.name} has no help text"


@pytest.mark.parametrize("name", sorted(C.METHOD_CONFIGS))
def test_matrix_kwargs_construct_the_optimizer(name):
    md = C.MDConfig(optimizer=name)
    kw = md.matrix_kwargs()
    assert not set(kw) & set(C.BUILDER_SUPPLIED)
    assert md.method_class() is C.METHOD_CONFIGS[name].optimizer_class
    p = torch.nn.Parameter(torch.randn(6, 4))
    md.method_class()([p], lr=1e-3, **kw)  # accepted as is


def test_matrix_kwargs_translate_ns_dtype_and_betas():
    md = C.MDConfig(optimizer="normuon", normuon=C.NorMuonConfig(ns_dtype="bf16", beta2=0.9))
    kw = md.matrix_kwargs()
    assert kw["ns_dtype"] is torch.bfloat16 and kw["betas"] == (0.9,) and "beta2" not in kw
    assert C.MDConfig(optimizer="muon", muon=C.MuonConfig(ns_dtype="fp32")).matrix_kwargs()["ns_dtype"] is torch.float32
    assert C.MDConfig(optimizer="muon").matrix_kwargs()["ns_dtype"] is None
    assert C.MDConfig(optimizer="adam").matrix_kwargs() == {} and C.MDConfig(optimizer="adam").method_config() is None


def test_partner_kwargs_only_for_schedule_free():
    assert C.MDConfig(optimizer="muon-md").partner_kwargs() == {}
    sf = C.MDConfig(optimizer="sf-normuon", sf_adamw=C.SFAdamWConfig(warmup_steps=7)).partner_kwargs()
    assert sf["warmup_steps"] == 7 and sf["betas"] == (0.9, 0.999)


@pytest.mark.parametrize("make,flag", [
    (lambda: C.MuonConfig(momentum=1.5), "--muon-momentum=1.5"),
    (lambda: C.NorMuonConfig(step_form="paper"), "--normuon-step-form='paper'"),
    (lambda: C.AdamMDConfig(betas=(0.9, 1.0)), "--adam-md-betas=(0.9, 1.0)"),
    (lambda: C.MuonMDConfig(gains_lr=-1.0), "--muon-md-gains-lr=-1.0"),
    (lambda: C.SFNorMuonConfig(warmup_steps=-1), "--sf-normuon-warmup-steps=-1"),
    (lambda: C.MuonHConfig(ns_steps=0), "--muonh-ns-steps=0"),
    (lambda: C.MDConfig(optimizer="lion"), "--optimizer='lion'"),
    (lambda: C.MDConfig(dp_mode="zero3"), "--dp-mode='zero3'"),
    (lambda: C.MDConfig(partner_lr=0.0), "--partner-lr=0.0"),
])
def test_bad_values_fail_at_construction_naming_the_flag(make, flag):
    with pytest.raises(ValueError) as e:
        make()
    assert flag in str(e.value)


# ------------------------------------------------------------------------------ generated flags
def _actions(parser):
    return {a.dest: a for a in parser._actions if a.dest != "help"}


def test_every_field_has_exactly_one_flag_with_the_dataclass_default():
    parser = _parser()
    actions = _actions(parser)
    specs = list(C.flag_specs())
    n_fields = len([f for f in dataclasses.fields(C.MDConfig) if f.name.replace("_", "-") not in C.METHOD_CONFIGS]) + \
        sum(len(dataclasses.fields(c)) for c in C.METHOD_CONFIGS.values())
    assert len(specs) == n_fields == len({s.dest for s in specs}) == len(actions)
    for s in specs:
        a = actions[s.dest]
        assert s.option in a.option_strings
        assert a.default == s.default, f"{s.option}: flag default {a.default!r} != dataclass default {s.default!r}"
        assert "%(default)s" in a.help
    # and the parsed defaults are exactly the dataclass defaults
    assert _parse([]) == C.MDConfig()


def test_flag_kinds_follow_the_annotations():
    actions = {o: a for a in _parser()._actions for o in a.option_strings}
    assert actions["--optimizer"].choices == C.OPTIMIZER_CHOICES
    assert actions["--normuon-step-form"].choices == ("rescale", "rms_match")
    assert isinstance(actions["--no-split-qkv"], argparse.BooleanOptionalAction)
    assert isinstance(actions["--no-muon-nesterov"], argparse.BooleanOptionalAction)
    assert actions["--adam-md-betas"].nargs == 2 and actions["--adam-md-betas"].type is float
    assert actions["--muon-md-gains-lr"].type is float and actions["--muon-md-gains-lr"].default is None
    assert actions["--sf-normuon-warmup-steps"].type is int
    help_ = _parser().format_help()
    assert "--muon-md-gains-lr" in help_ and "(default: 0.95)" in help_ and "(default: shape_up)" in help_


def test_round_trip():
    argv = ("--optimizer sf-normuon --ns-mode gather --dp-mode layer-wise --no-split-qkv --router-on-matrix "
            "--md-residual-scaling --partner-lr 0.003 --muon-momentum 0.9 --no-muon-nesterov --muon-ns-dtype bf16 "
            "--normuon-step-form rms_match --normuon-beta2 0.99 --muon-md-gains-lr 0.005 --muon-md-betas 0.8 0.9 "
            "--muon-md-ns-coefficients quintic --muon-md-ns-steps 4 --sf-normuon-warmup-steps 100 "
            "--sf-normuon-betas 0.95 0.98 --sf-normuon-nesterov --sf-adamw-weight-decay-at z").split()
    md = _parse(argv)
    assert md == C.MDConfig(
        optimizer="sf-normuon", ns_mode="gather", dp_mode="layer-wise", split_qkv=False, router_on_matrix=True,
        md_residual_scaling=True, partner_lr=0.003,
        muon=C.MuonConfig(momentum=0.9, nesterov=False, ns_dtype="bf16"),
        normuon=C.NorMuonConfig(step_form="rms_match", beta2=0.99),
        muon_md=C.MuonMDConfig(gains_lr=0.005, betas=(0.8, 0.9), ns_coefficients="quintic", ns_steps=4),
        sf_normuon=C.SFNorMuonConfig(warmup_steps=100, betas=(0.95, 0.98), nesterov=True),
        sf_adamw=C.SFAdamWConfig(weight_decay_at="z"))
    assert isinstance(md.muon_md.betas, tuple)
    kw = md.matrix_kwargs()
    assert kw["warmup_steps"] == 100 and kw["betas"] == (0.95, 0.98) and kw["nesterov"] is True


@pytest.mark.parametrize("argv", [["--ns-mode", "bogus"], ["--optimizer", "lion"], ["--muon-md-betas", "0.9"]])
def test_parser_rejects_bad_choices(argv, capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(argv)


def test_md_config_from_args_rejects_bad_values_with_the_flag():
    with pytest.raises(ValueError, match="--muon-md-momentum=1.0"):
        _parse(["--muon-md-momentum", "1.0"])


def _megatron_lm_like(p):
    """The parts of Megatron-LM's parser that collide with ours (megatron/training/arguments.py)."""
    p.add_argument("--optimizer", type=str, default="adam",
                   choices=["adam", "sgd", "muon", "dist_muon", "lion", "soap", "adaptive_muon"], help="Optimizer.")
    p.add_argument("--muon-momentum", type=float, default=0.9)
    p.add_argument("--muon-nesterov", action="store_true")


def test_coexists_with_megatron_lm_parser():
    parser = megatron_lm.extra_args_provider(_parser_with(_megatron_lm_like))
    opt = [a for a in parser._actions if "--optimizer" in a.option_strings]
    assert len(opt) == 1 and opt[0].default == "adam"
    assert list(opt[0].choices) == ["adam", "sgd", "muon", "dist_muon", "lion", "soap", "adaptive_muon",
                                    "normuon", "rmnp", "adamh", "muonh", "adam-md", "muon-md", "sf-adamw", "sf-normuon"]
    args = parser.parse_args("--optimizer muon-md --muon-momentum 0.8 --md-muon-momentum 0.85 --no-md-muon-nesterov "
                             "--muon-md-momentum 0.9".split())
    assert args.muon_momentum == 0.8 and args.muon_nesterov is False  # Megatron-LM's own, untouched
    md = C.md_config_from_args(args)
    assert md.optimizer == "muon-md" and md.muon.momentum == 0.85 and md.muon.nesterov is False
    assert md.muon_md.momentum == 0.9 and md.normuon == C.NorMuonConfig()
    assert C.md_config_from_args(parser.parse_args([])).optimizer == "adam"


def _parser_with(setup):
    p = argparse.ArgumentParser(allow_abbrev=False)
    setup(p)
    return p


# ------------------------------------------------------------------------------ validation
def _args(**kw):
    base = dict(fp16=False, bf16=True, weight_decay=0.0, lr_decay_style="constant", lr_warmup_iters=0,
                lr_warmup_samples=0, lr_warmup_fraction=None, use_distributed_optimizer=False)
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.mark.parametrize("name", [n for n in C.OPTIMIZER_CHOICES if n != "adam"])
def test_fp16_is_rejected_naming_both_flags(name):
    with pytest.raises(ValueError) as e:
        C.validate(C.MDConfig(optimizer=name), _args(fp16=True, bf16=False))
    assert "--fp16" in str(e.value) and f"--optimizer {name}" in str(e.value)


def test_adam_with_fp16_is_megatrons_business():
    C.validate(C.MDConfig(optimizer="adam"), _args(fp16=True, bf16=False))


def test_unknown_optimizer():
    md = C.MDConfig()
    md.optimizer = "lion"  # mutated after construction: validate re-checks
    with pytest.raises(ValueError, match="--optimizer 'lion'"):
        C.validate(md, _args())


@pytest.mark.parametrize("name", C.SCHEDULE_FREE)
@pytest.mark.parametrize("style", ["linear", "cosine", "WSD", "inverse-square-root"])
def test_schedule_free_rejects_decay_schedules(name, style):
    with pytest.raises(ValueError) as e:
        C.validate(C.MDConfig(optimizer=name), _args(lr_decay_style=style))
    assert "--lr-decay-style" in str(e.value) and f"--optimizer {name}" in str(e.value)
    assert "constant" in str(e.value)


@pytest.mark.parametrize("attr,flag,value", [("lr_warmup_iters", "--lr-warmup-iters", 100),
                                             ("lr_warmup_samples", "--lr-warmup-samples", 1000),
                                             ("lr_warmup_fraction", "--lr-warmup-fraction", 0.01)])
def test_schedule_free_rejects_megatron_warmup(attr, flag, value):
    with pytest.raises(ValueError) as e:
        C.validate(C.MDConfig(optimizer="sf-normuon"), _args(**{attr: value}))
    assert flag in str(e.value) and "--sf-normuon-warmup-steps" in str(e.value)
    with pytest.raises(ValueError, match="--sf-adamw-warmup-steps"):
        C.validate(C.MDConfig(optimizer="sf-adamw"), _args(**{attr: value}))


def test_schedule_free_with_constant_schedule_passes():
    for name in C.SCHEDULE_FREE:
        C.validate(C.MDConfig(optimizer=name), _args(weight_decay=0.05))


@pytest.mark.parametrize("name", C.NO_WEIGHT_DECAY)
def test_md_and_hyperball_reject_weight_decay(name):
    with pytest.raises(ValueError) as e:
        C.validate(C.MDConfig(optimizer=name), _args(weight_decay=0.01))
    assert "--weight-decay" in str(e.value) and f"--optimizer {name}" in str(e.value)
    C.validate(C.MDConfig(optimizer=name), _args(weight_decay=0.0))


def test_weight_decay_is_fine_for_decaying_methods():
    for name in ("muon", "normuon", "rmnp", "sf-normuon", "adam"):
        C.validate(C.MDConfig(optimizer=name), _args(weight_decay=0.1))


def test_layer_wise_with_distributed_optimizer():
    with pytest.raises(ValueError) as e:
        C.validate(C.MDConfig(dp_mode="layer-wise"), _args(use_distributed_optimizer=True))
    assert "--dp-mode layer-wise" in str(e.value) and "--use-distributed-optimizer" in str(e.value)
    C.validate(C.MDConfig(dp_mode="auto"), _args(use_distributed_optimizer=True))
    C.validate(C.MDConfig(dp_mode="layer-wise"), _args())


def test_ns_mode_is_ignored_by_methods_without_newton_schulz():
    for name in ("rmnp", "adamh", "adam-md", "sf-adamw", "adam"):
        C.validate(C.MDConfig(optimizer=name, ns_mode="gather"), _args())


def test_validate_accepts_a_megatron_optimizer_config():
    from megatron.core.optimizer import OptimizerConfig
    C.validate(C.MDConfig(), OptimizerConfig(lr=0.01, weight_decay=0.0, bf16=True))
    with pytest.raises(ValueError, match="--fp16"):
        C.validate(C.MDConfig(), OptimizerConfig(lr=0.01, weight_decay=0.0, fp16=True))
    with pytest.raises(ValueError, match="--weight-decay"):
        C.validate(C.MDConfig(), OptimizerConfig(lr=0.01))  # Megatron's default 0.01
    # no schedule fields on OptimizerConfig: SF passes there (the Namespace check covers it)
    C.validate(C.MDConfig(optimizer="sf-normuon"), OptimizerConfig(lr=0.01))


# ------------------------------------------------------------------------------ megatron_lm
def test_install_without_megatron_lm_raises_a_clear_import_error():
    try:
        import megatron.training  # noqa: F401
        pytest.skip("Megatron-LM is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError) as e:
        megatron_lm.install()
    assert "megatron.training" in str(e.value) and "Megatron-LM" in str(e.value)
    assert megatron_lm.uninstall() is False


def test_register_emerging_optimizers_is_a_no_op_on_megatron_core_0_16(caplog):
    from megatron.core import package_info
    if tuple(int(x) for x in package_info.__version__.split(".")[:2]) >= (0, 18):
        pytest.skip("megatron-core >= 0.18 has the registry")
    with caplog.at_level(logging.INFO, logger="megatron_md.megatron_lm"):
        assert megatron_lm.register_emerging_optimizers() is False
    assert "registry" in caplog.text


@pytest.fixture
def fake_megatron_lm(monkeypatch):
    """Stand-ins for megatron.training(.training, .global_vars) and our builder."""
    calls = {}

    def original(config, model_chunks, config_overrides=None, use_gloo_process_groups=True, pg_collection=None,
                 dump_param_to_param_group_map=None):
        calls["original"] = config.optimizer
        return "megatron"

    def build(config, model_chunks, md=None, *, use_gloo_process_groups=True):
        calls["md"], calls["gloo"] = md, use_gloo_process_groups
        return "megatron_md"

    parser = megatron_lm.extra_args_provider(_parser_with(_megatron_lm_like))
    state = SimpleNamespace(args=None)
    training = types.ModuleType("megatron.training.training")
    training.get_megatron_optimizer = original
    for seam in ("evaluate", "save_checkpoint", "load_checkpoint"):
        setattr(training, seam, lambda *a, **k: None)
    arguments = types.ModuleType("megatron.training.arguments")
    arguments.add_megatron_arguments = lambda p: p
    arguments.validate_args = lambda args, defaults={}: args
    gv = types.ModuleType("megatron.training.global_vars")
    gv.get_args = lambda: state.args
    import megatron_md.megatron.builder as real_builder
    builder = types.ModuleType("megatron_md.megatron.builder")
    builder.__dict__.update({k: v for k, v in vars(real_builder).items() if not k.startswith("__")})
    builder.get_megatron_optimizer = build  # the rest stays the real module's (the checkpoint code imports it)
    for name, mod in (("megatron.training", types.ModuleType("megatron.training")),
                      ("megatron.training.training", training), ("megatron.training.global_vars", gv),
                      ("megatron.training.arguments", arguments),
                      ("megatron.training.initialize", types.ModuleType("megatron.training.initialize")),
                      ("megatron_md.megatron.builder", builder)):
        monkeypatch.setitem(sys.modules, name, mod)

    def run(argv, **extra_args):
        state.args = parser.parse_args(argv.split())
        for k, v in extra_args.items():
            setattr(state.args, k, v)
        config = SimpleNamespace(optimizer=state.args.optimizer)
        calls.clear()
        out = training.get_megatron_optimizer(config, ["chunk"], config_overrides={}, use_gloo_process_groups=False,
                                              pg_collection=None)
        return out, dict(calls)

    yield training, original, run
    megatron_lm.uninstall()


def _refused(capsys, match, fn, *a, **k):
    """A refusal in Megatron-LM's loop: exit code 2 and one ``megatron_md: error:`` line (rank 0) matching."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        fn(*a, **k)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert exc.value.code == 2 and len(lines) == 1 and lines[0].startswith("megatron_md: error: "), err
    assert re.search(match, lines[0]), (match, lines[0])


def test_install_routes_our_names_to_our_builder(fake_megatron_lm, capsys):
    training, original, run = fake_megatron_lm
    megatron_lm.install()
    megatron_lm.install()  # idempotent
    assert getattr(training.get_megatron_optimizer, "__megatron_md_original__") is original
    assert run("--optimizer adam") == ("megatron", {"original": "adam"})
    assert run("--optimizer muon") == ("megatron", {"original": "muon"})
    out, calls = run("--optimizer muon-md --muon-md-momentum 0.9 --dp-mode layer-wise", weight_decay=0.0,
                     use_distributed_optimizer=False)
    assert out == "megatron_md" and calls["gloo"] is False
    assert calls["md"] == C.MDConfig(optimizer="muon-md", dp_mode="layer-wise", muon_md=C.MuonMDConfig(momentum=0.9))
    # Megatron-LM turned --use-distributed-optimizer into layer-wise: --dp-mode auto follows
    _, calls = run("--optimizer rmnp", use_layer_wise_distributed_optimizer=True, use_distributed_optimizer=False)
    assert calls["md"].dp_mode == "layer-wise"
    # validation runs before the builder
    _refused(capsys, "--weight-decay", run, "--optimizer muon-md", weight_decay=0.01)
    _refused(capsys, "--lr-decay-style", run, "--optimizer sf-normuon", lr_decay_style="cosine")
    megatron_lm.install(builtin="md")
    assert run("--optimizer muon --md-muon-momentum 0.8")[1]["md"].muon.momentum == 0.8
    assert megatron_lm.uninstall() is True and training.get_megatron_optimizer is original


def test_install_validates_megatron_lm_args_before_training(fake_megatron_lm, capsys):
    """The validate_args seam: our checks (and the checkpoint formats megatron_md's state does
    not fit) fail at argument validation; other optimizers are left to Megatron-LM."""
    megatron_lm.install()
    arguments = sys.modules["megatron.training.arguments"]
    parser = arguments.add_megatron_arguments(_parser_with(_megatron_lm_like))
    assert arguments.add_megatron_arguments(parser) is parser  # our flags once, however often called

    def args(argv, **extra):
        a = parser.parse_args(argv.split())
        for k, v in dict(dict(weight_decay=0.0, save=None, load=None, ckpt_format="torch_dist",
                              use_distributed_optimizer=False), **extra).items():
            setattr(a, k, v)
        return a

    ok = args("--optimizer muon-md")
    assert arguments.validate_args(ok) is ok and ok.optimizer == "muon-md"
    _refused(capsys, "--weight-decay", arguments.validate_args, args("--optimizer muon-md", weight_decay=0.01))
    _refused(capsys, "--ckpt-format fsdp_dtensor.*pass --ckpt-format torch_dist", arguments.validate_args,
             args("--optimizer rmnp", save="/ckpt", ckpt_format="fsdp_dtensor"))
    _refused(capsys, "--ckpt-format torch and --use-distributed-optimizer", arguments.validate_args,
             args("--optimizer rmnp", save="/ckpt", ckpt_format="torch", use_distributed_optimizer=True))
    arguments.validate_args(args("--optimizer rmnp", save="/ckpt", ckpt_format="torch"))
    arguments.validate_args(args("--optimizer rmnp", save="/ckpt"))  # torch_dist: any DP mode
    arguments.validate_args(args("--optimizer rmnp", save="/ckpt", use_distributed_optimizer=True))
    arguments.validate_args(args("--optimizer adam", save="/ckpt", weight_decay=0.01))  # Megatron-LM's own


def test_register_emerging_optimizers_with_a_registry(monkeypatch):
    """A stand-in with megatron-core 0.18's registry API (megatron/core/optimizer/emerging_optimizers.py)."""

    @dataclasses.dataclass
    class EmergingOptimizerEntry:
        optimizer_cls: type
        init_state_fn: object = None
        config_to_kwargs: object = None
        default_param_overrides: dict = dataclasses.field(default_factory=dict)

    class TensorParallelMuon:
        pass

    mod = types.ModuleType("megatron.core.optimizer.emerging_optimizers")
    mod.EmergingOptimizerEntry = EmergingOptimizerEntry
    mod._EMERGING_OPTIMIZERS = {"muon": EmergingOptimizerEntry(TensorParallelMuon)}
    monkeypatch.setitem(sys.modules, "megatron.core.optimizer.emerging_optimizers", mod)
    md = C.MDConfig(muon_md=C.MuonMDConfig(gains_lr=0.002, ns_dtype="fp32"))
    assert megatron_lm.register_emerging_optimizers(md) is True
    reg = mod._EMERGING_OPTIMIZERS
    assert reg["muon"].optimizer_cls is TensorParallelMuon  # Megatron's own kept
    assert set(reg) == set(megatron_lm.REGISTRY_METHODS)
    assert not set(reg) & set(C.SCHEDULE_FREE)
    cfg = SimpleNamespace(lr=0.01, weight_decay=0.0, bf16=False, fp16=False)
    kw = reg["muon-md"].config_to_kwargs(cfg, [], None)
    assert kw["lr"] == 0.01 and kw["gains_lr"] == 0.002 and kw["ns_dtype"] is torch.float32
    assert "weight_decay" not in kw
    p = torch.nn.Parameter(torch.randn(6, 4))
    reg["muon-md"].optimizer_cls([p], **kw)
    assert reg["normuon"].config_to_kwargs(SimpleNamespace(lr=0.02, weight_decay=0.1), [], None)["weight_decay"] == 0.1
    with pytest.raises(ValueError, match="fp32 parameters only"):
        reg["muon-md"].config_to_kwargs(SimpleNamespace(lr=0.01, weight_decay=0.0, bf16=True), [], None)
    with pytest.raises(ValueError, match="--weight-decay"):
        reg["adamh"].config_to_kwargs(SimpleNamespace(lr=0.01, weight_decay=0.01), [], None)
    assert megatron_lm.register_emerging_optimizers(md) is True  # re-registering our own is fine
