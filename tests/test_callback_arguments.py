"""Every callback setting that needs no model and no data is checked in ``__init__``, with a message that
names the option: the mistake surfaces where it was written, not at ``Trainer.fit``."""

import pytest

from lightning_freeze import AdaptiveFreeze, FreezeOut, FrozenPrefixCache, LayerFreeze, ProgressiveUnfreezing

CASES = [
    (LayerFreeze, {"layers": 123}, "LayerFreeze: layers must be a layer spec"),
    (LayerFreeze, {"layers": []}, "LayerFreeze: layers must be a layer spec"),
    (LayerFreeze, {"layers": ["backbone", 3]}, "each spec must be a non-empty string, got 3"),
    (LayerFreeze, {"layers": "re:(backbone"}, "bad regex"),
    (LayerFreeze, {"layers": "auto[1:x]"}, "slice auto like a list"),
    (LayerFreeze, {"lr": "abc"}, "LayerFreeze: lr must be a positive number or None, got 'abc'"),
    (LayerFreeze, {"lr": 0}, "lr must be a positive number"),
    (LayerFreeze, {"until_epoch": -1}, "until_epoch must be a non-negative integer or None"),
    (LayerFreeze, {"until_step": 2.5}, "until_step must be a non-negative integer or None"),
    (LayerFreeze, {"until_epoch": True}, "until_epoch must be a non-negative integer"),
    (LayerFreeze, {"until_epoch": 1, "until_step": 3}, "set until_epoch or until_step, not both"),
    (LayerFreeze, {"norm": "frozen"}, "norm='frozen' is not supported; use one of \\['eval', 'train'\\]"),
    (LayerFreeze, {"plot": "yes"}, "plot must be true or false"),
    (FreezeOut, {"t0": 0}, r"FreezeOut: t0 must be a number in \(0, 1\]"),
    (FreezeOut, {"t0": "0.5"}, "t0 must be a number"),
    (FreezeOut, {"schedule": "quartic"}, "schedule='quartic' is not supported"),
    (FreezeOut, {"scale_lr": "false"}, "scale_lr must be true or false"),
    (FreezeOut, {"layers": None}, "layers must be a layer spec"),
    (
        ProgressiveUnfreezing,
        {"every_n_epochs": 0},
        "every_n_epochs must be a positive integer or None, got 0",
    ),
    (ProgressiveUnfreezing, {"groups_per_step": -1}, "groups_per_step must be a positive integer, got -1"),
    (ProgressiveUnfreezing, {"every_n_steps": 0}, "every_n_steps must be a positive integer"),
    (
        ProgressiveUnfreezing,
        {"every_n_epochs": 2, "every_n_steps": 5},
        "every_n_epochs or every_n_steps, not both",
    ),
    (ProgressiveUnfreezing, {"phases": "x"}, "phases must be a list of mappings"),
    (
        ProgressiveUnfreezing,
        {"phases": [{"layers": "head", "at_epok": 1}]},
        r"phase 0: unknown key\(s\) \['at_epok'\]",
    ),
    (ProgressiveUnfreezing, {"phases": [{"layers": "head", "at_epoch": 1}], "every_n_steps": 3}, "not both"),
    (ProgressiveUnfreezing, {"lr_decay": 0}, "lr_decay must be a positive number"),
    (ProgressiveUnfreezing, {"lr_decay": "2.6"}, "lr_decay must be a positive number"),
    (ProgressiveUnfreezing, {"warmup_steps": -5}, "warmup_steps must be a non-negative integer"),
    (ProgressiveUnfreezing, {"lr_growth": -1.0}, "lr_growth must be a positive number or None"),
    (ProgressiveUnfreezing, {"head_lr": 0}, "head_lr must be a positive number or None"),
    (ProgressiveUnfreezing, {"monitor": 3}, "monitor must be a non-empty string or None"),
    (ProgressiveUnfreezing, {"restore_best": True}, "restore_best=True needs monitor"),
    (ProgressiveUnfreezing, {"monitor": "val/loss", "mode": "up"}, "mode='up' is not supported"),
    (ProgressiveUnfreezing, {"monitor": "val/loss", "patience": 0}, "patience must be a positive integer"),
    (
        ProgressiveUnfreezing,
        {"monitor": "val/loss", "min_delta": -1},
        "min_delta must be a non-negative number",
    ),
    (AdaptiveFreeze, {"percentile": 120}, r"AdaptiveFreeze: percentile must be a number in \(0, 100\)"),
    (AdaptiveFreeze, {"check_every_n_steps": 0}, "check_every_n_steps must be a positive integer"),
    (AdaptiveFreeze, {"layers": 7}, "AdaptiveFreeze: layers must be a layer spec"),
    (AdaptiveFreeze, {"monitor": ""}, "monitor must be a non-empty string or None"),
    (AdaptiveFreeze, {"criterion": "grad_norm"}, "threshold must be a positive number"),
    (FrozenPrefixCache, {"module": ""}, "module must be 'auto' or a module name"),
    (FrozenPrefixCache, {"max_bytes": "lots"}, "max_bytes: cannot read 'lots'"),
    (FrozenPrefixCache, {"min_hit_rate": 2}, "min_hit_rate must be a number in \\[0, 1\\]"),
    (FrozenPrefixCache, {"on_mismatch": "raise"}, "on_mismatch='raise' is not supported"),
    (FrozenPrefixCache, {"fixed_shards": "no"}, "fixed_shards must be true or false"),
    (FrozenPrefixCache, {"max_disk_bytes": "lots"}, "max_disk_bytes"),
    (FrozenPrefixCache, {"log_stats": "yes"}, "log_stats must be true or false"),
    (FrozenPrefixCache, {"disk_dir": 3}, "disk_dir must be a path or None"),
]


@pytest.mark.parametrize(
    "cls, kwargs, message", CASES, ids=[f"{c.__name__}-{'-'.join(k)}" for c, k, _ in CASES]
)
def test_bad_setting_fails_in_the_constructor_naming_the_option(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


@pytest.mark.parametrize("max_bytes", [1.5, -1, float("inf"), True, [1]])
def test_cache_budget_that_is_neither_a_fraction_nor_bytes_is_an_error(max_bytes):
    with pytest.raises(ValueError, match="FrozenPrefixCache: max_bytes"):
        FrozenPrefixCache(max_bytes=max_bytes)
