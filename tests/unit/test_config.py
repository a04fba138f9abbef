"""One schema: the YAML ``optimizer:`` section, the DeepSpeed ``"plumage"`` section and the comm
hook load :class:`OptimizerConfig` with the same strict ``from_dict`` and the same messages;
the estimator registry; the factory passes the fields through one mapping."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn as nn

from plumage_ds.config import (
    PLUMAGE_ADAMW_KEYS,
    JobConfig,
    OptimizerConfig,
    from_dict,
    to_dict,
)
from plumage_ds.distributed import lowrank_load
from plumage_ds.distributed.hook_state import PlumageHookState
from plumage_ds.estimators import resolve_sigma_rank
from plumage_ds.estimators.registry import ESTIMATORS, get_estimator, resolve_realign, resolve_svd_method

BAD_OPTIMIZER = [
    ({"rank": 0}, "Invalid {p}rank=0: must be a positive integer"),
    ({"rnak": 3}, "Unknown config key '{p}rnak'"),
    ({"tau": 3}, "Invalid config key '{p}tau': renamed to 'update_interval'"),
    ({"estimator": "topr"}, "Invalid {p}estimator='topr': renamed to 'galore'"),
    ({"estimator": "sgd"}, "Invalid {p}estimator='sgd': must be one of"),
    ({"strict": 1}, "Invalid {p}strict=1: must be true or false"),
    ({"lr": "fast"}, "Invalid {p}lr='fast': must be a number"),
    ({"uniform_mix": 1.5}, "Invalid {p}uniform_mix=1.5: must be in [0, 1]"),
    ({"estimator": "optimal", "sigma_rank": -1}, "Invalid {p}sigma_rank=-1: must be an integer >= 0"),
    ({"estimator": "plumage", "sigma_rank": 8},
     "Invalid {p}sigma_rank=8: applies to estimator 'optimal' only (it keeps Σ), not 'plumage'"),
    ({"estimator": "optimal", "sigma_weight": 1.5}, "Invalid {p}sigma_weight=1.5: must be in (0, 1] (null: the running mean)"),
    ({"estimator": "galore", "sigma_weight": 0.5},
     "Invalid {p}sigma_weight=0.5: applies to estimator 'optimal' only (it keeps Σ), not 'galore'"),
    ({"comm_hook": {"sigma_weight": 0.5}},
     "Invalid config key '{p}comm_hook.sigma_weight': moved out of 'comm_hook' to 'sigma_weight', beside 'sigma_rank' (the optimizer's Σ takes it too)"),
    ({"dense_lr": 0.0}, "Invalid {p}dense_lr=0.0: must be a positive finite number"),
    ({"estimator": "haar", "svd_method": "gram"}, "Invalid {p}svd_method='gram': estimator 'haar' takes no SVD"),
    ({"estimator": "optimal", "svd_method": "svd"}, "Invalid {p}svd_method='svd': estimator 'optimal' takes no SVD"),
    ({"estimator": "galore", "uniform_mix": 0.1},
     "Invalid {p}uniform_mix=0.1: applies to estimators 'plumage' and 'optimal' only, not 'galore'"),
    ({"comm_hook": {"start_iter": -1}}, "Invalid {p}comm_hook.start_iter=-1: must be an integer >= 0"),
]


def _hook_error(data: dict) -> str:
    from plumage_ds.distributed.comm_hook import PlumageHookState

    model = torch.nn.Linear(16, 32)
    with pytest.raises(ValueError) as err:
        PlumageHookState(model, **data)
    return str(err.value)


def _deepspeed_error(data: dict) -> str:
    from plumage_ds.integrations.deepspeed import split_config

    with pytest.raises(ValueError) as err:
        split_config({"zero_optimization": {"stage": 1}, "plumage": data})
    return str(err.value)


def _yaml_error(data: dict) -> str:
    with pytest.raises(ValueError) as err:
        from_dict(JobConfig, {"optimizer": data})
    return str(err.value)


@pytest.mark.parametrize("data, message", BAD_OPTIMIZER, ids=[m[:30] for _, m in BAD_OPTIMIZER])
def test_same_message_from_yaml_deepspeed_and_hook(data, message):
    """The same bad value gives the same message everywhere, up to the section prefix of the key."""
    yaml_msg, ds_msg, hook_msg = _yaml_error(data), _deepspeed_error(data), _hook_error(data)
    assert message.format(p="optimizer.") in yaml_msg
    assert message.format(p="plumage.") in ds_msg
    assert message.format(p="") in hook_msg
    assert yaml_msg.replace("optimizer.", "") == ds_msg.replace("plumage.", "") == hook_msg


def test_deepspeed_knob_given_twice_must_agree():
    from plumage_ds.integrations.deepspeed import split_config

    ds = {"optimizer": {"type": "AdamW", "params": {"lr": 0.01}}, "plumage": {"lr": 0.02}, "gradient_clipping": 0.5}
    with pytest.raises(ValueError, match=r"^Conflicting lr: plumage.lr=0.02 but optimizer.params.lr=0.01"):
        split_config(ds)
    ds["plumage"]["lr"] = 0.01
    _, cfg, _ = split_config(ds)
    assert (cfg.lr, cfg.max_grad_norm) == (0.01, 0.5)
    with pytest.raises(ValueError, match=r"^Invalid optimizer.params.lr=-1.0: must be a finite number >= 0$"):
        split_config({"optimizer": {"params": {"lr": -1.0}}})
    with pytest.raises(ValueError, match=r"^Invalid gradient_clipping=True"):
        split_config({"gradient_clipping": True})


def test_config_knob_names_are_the_constructor_keywords():
    """One name per knob: every PlumageAdamW keyword (but params and the runtime objects) is a config field."""
    from plumage_ds.optim import GUM, PlumageAdamW

    fields = set(OptimizerConfig.__dataclass_fields__)
    # runtime objects (the process groups) are not config knobs; target_modules is one, applied by the
    # factory's group selection (the constructors take it for named_parameters() input)
    runtime = {"self", "params", "process_group", "replicate_group", "target_modules"}
    assert "target_modules" in fields
    ctor = set(inspect.signature(PlumageAdamW.__init__).parameters) - runtime
    assert ctor == set(PLUMAGE_ADAMW_KEYS) and ctor <= fields
    gum_ctor = set(inspect.signature(GUM.__init__).parameters) - runtime
    assert gum_ctor == set(OptimizerConfig(estimator="gum").gum_kwargs())
    cfg = OptimizerConfig(estimator="plumage", rank=3, uniform_mix=0.1, max_grad_norm=2.0)
    resolved = {"svd_method": "gram", "backward_projection": False}  # None: the estimator's / engine's default
    assert cfg.lowrank_kwargs() == {k: getattr(cfg, k) for k in PLUMAGE_ADAMW_KEYS} | resolved


def test_roundtrip_and_types():
    cfg = from_dict(JobConfig, {"optimizer": {"lr": 1, "betas": [0.8, 0.9], "target_modules": "attn"},
                                "model": {"model_type": "gpt2", "n_layer": 2}})  # fmt: skip
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)
    assert cfg.optimizer.betas == (0.8, 0.9) and cfg.optimizer.target_modules == ("attn",)
    assert cfg.model.fields == {"n_layer": 2}
    assert from_dict(JobConfig, to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match=r"^Invalid optimizer=3: must be a mapping of OptimizerConfig keys$"):
        from_dict(JobConfig, {"optimizer": 3})


def test_registry_facts():
    assert list(ESTIMATORS) == ["adamw", "plumage", "galore", "haar", "optimal", "gum"]
    assert [n for n, s in ESTIMATORS.items() if s.needs_gradient] == ["plumage", "galore", "optimal", "gum"]
    assert all(s.in_optimizer for s in ESTIMATORS.values())
    assert [n for n, s in ESTIMATORS.items() if s.keeps_second_moment] == ["optimal"]
    assert resolve_svd_method("optimal", None) is None  # it decomposes Σ, not G
    assert resolve_svd_method("galore", None) == "svd"  # galore-torch's signs
    assert [resolve_realign(n, None) for n in ("plumage", "galore", "haar")] == [True, False, True]
    assert resolve_realign("galore", True) is True
    assert resolve_svd_method("haar", None) is None and resolve_svd_method("plumage", None) == "gram"
    assert not get_estimator("galore").unbiased and get_estimator("plumage").unbiased
    with pytest.raises(ValueError, match=r"^Invalid estimator='adamw': must be one of \['plumage', 'galore', 'haar', 'optimal'\]$"):
        get_estimator("adamw", family="lowrank_adam")
    G = torch.randn(6, 10)
    gen = torch.Generator().manual_seed(0)
    for name in ("plumage", "galore", "haar"):
        proj = get_estimator(name).build(G, 3, gen)
        assert proj.P.shape == (6, 3) and proj.d.shape == (3,)
    with pytest.raises(ValueError, match="no projector"):
        get_estimator("adamw").build(G, 3, gen)


def test_sigma_rank_default_is_the_rank_everywhere() -> None:
    """``sigma_rank=None`` (the default of the schema, the optimizer and the hook) keeps ``Σ`` as ``r``
    eigenpairs plus an isotropic rest, ``(s, r+1)``; 0 keeps it whole. The ownership cost model
    counts the bytes of the form kept."""
    assert OptimizerConfig().sigma_rank is None and OptimizerConfig(estimator="optimal").sigma_rank is None
    assert [resolve_sigma_rank(k, 4) for k in (None, 0, 2)] == [4, 0, 2]
    model = nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 8))
    hooks = {k: PlumageHookState(model, estimator="optimal", rank=4, target_modules=r"^\d$", **kw)
             for k, kw in (("default", {}), ("whole", {"sigma_rank": 0}))}
    assert hooks["default"].sigma_rank == 4 and hooks["whole"].sigma_rank == 0
    sigma_bytes = {k: lowrank_load(16, 24, 4, decomposes=True, keeps_moments=False, keeps_second_moment=True, sigma_rank=k)[1]
                   for k in (0, 4, 14, 15)}
    assert sigma_bytes == {0: 8 * 16 * 16, 4: 8 * 16 * 5, 14: 8 * 16 * 15, 15: 8 * 16 * 16}  # s <= k + 1: whole
