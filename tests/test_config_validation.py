"""ASTConfig refuses bad values at construction, naming the argument (not later, as a confusing training error)."""

from __future__ import annotations

import math

import pytest

from hf_sparse import ASTConfig


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"masked_decay_peak": math.nan}, "masked_decay_peak"),
        ({"masked_decay_peak": math.inf}, "masked_decay_peak"),
        ({"masked_decay_peak": -1e-4}, "masked_decay_peak"),
        ({"mask_init": "bogus"}, "mask_init"),
        ({"masked_decay_ramp_steps": -5}, "masked_decay_ramp_steps"),
        ({"masked_decay_ramp_steps": 2.5}, "masked_decay_ramp_steps"),
        ({"mask_update_stop": -1}, "mask_update_stop"),
    ],
)
def test_bad_values_are_refused_naming_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=f"ASTConfig: argument `{argument}`"):
        ASTConfig(**kwargs)


def test_good_values_and_registered_pruners_are_accepted():
    from hf_sparse.oneshot import register_pruner
    from hf_sparse.oneshot.magnitude import MagnitudePruner

    for init in ("magnitude", "wanda", "sparsegpt"):
        assert ASTConfig(mask_init=init).mask_init == init
    assert ASTConfig(masked_decay_ramp_steps=0, masked_decay_peak=0.0, mask_update_stop=10).mask_update_stop == 10

    @register_pruner("my_test_pruner")
    class MyPruner(MagnitudePruner):
        pass

    try:
        assert ASTConfig(mask_init="my_test_pruner").mask_init == "my_test_pruner"
    finally:
        from hf_sparse.oneshot.registry import PRUNERS

        PRUNERS.pop("my_test_pruner")
