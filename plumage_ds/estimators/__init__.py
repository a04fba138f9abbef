"""Pure estimator math (no ``torch.distributed``): probabilities, samplers, projectors, the estimator
strategies (:mod:`.registry`) and the owner refresh shared by the optimizers and the comm hook (:mod:`.refresh`)."""

from .gum import sample_layers
from .optimal import (
    expected_error,
    optimal_basis,
    optimal_design,
    optimal_probabilities,
    optimal_projection,
    scaled_projector,
    second_moment_from_gram,
    second_moment_update,
)
from .probabilities import estimator_variance, inclusion_probabilities, is_deterministic, mix_uniform
from .projectors import (
    Projection,
    estimate,
    galore_from_basis,
    galore_projection,
    haar_projection,
    plumage_design,
    plumage_from_basis,
    plumage_projection,
    projection_from_design,
    realign_moments,
    realignment,
)
from .refresh import RefreshInput, RefreshResult, owner_refresh
from .registry import ESTIMATORS, Estimator, estimator_names, estimator_problem, get_estimator, oriented_gram
from .sampling import derive_seed, is_refresh, refresh_index, sampler_generator, systematic_sample
from .spectral import deorient, gram_basis, is_left, orient, oriented_shape, short_side_basis

__all__ = [
    "ESTIMATORS",
    "Estimator",
    "RefreshInput",
    "RefreshResult",
    "Projection",
    "deorient",
    "derive_seed",
    "estimate",
    "estimator_names",
    "estimator_problem",
    "estimator_variance",
    "expected_error",
    "galore_from_basis",
    "galore_projection",
    "get_estimator",
    "gram_basis",
    "haar_projection",
    "inclusion_probabilities",
    "is_refresh",
    "is_deterministic",
    "is_left",
    "mix_uniform",
    "optimal_basis",
    "optimal_design",
    "optimal_probabilities",
    "optimal_projection",
    "orient",
    "oriented_gram",
    "owner_refresh",
    "oriented_shape",
    "plumage_design",
    "plumage_from_basis",
    "plumage_projection",
    "projection_from_design",
    "realign_moments",
    "realignment",
    "refresh_index",
    "sample_layers",
    "sampler_generator",
    "scaled_projector",
    "second_moment_from_gram",
    "second_moment_update",
    "short_side_basis",
    "systematic_sample",
]
