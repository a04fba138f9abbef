"""Pure estimator math (no ``torch.distributed``): probabilities, samplers, projectors, the registry."""

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
from .registry import ESTIMATORS, EstimatorSpec, estimator_names, estimator_problem, get_estimator
from .sampling import derive_seed, sampler_generator, systematic_sample
from .spectral import deorient, gram_basis, is_left, orient, oriented_shape, short_side_basis

__all__ = [
    "ESTIMATORS",
    "EstimatorSpec",
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
    "is_deterministic",
    "is_left",
    "mix_uniform",
    "optimal_basis",
    "optimal_design",
    "optimal_probabilities",
    "optimal_projection",
    "orient",
    "oriented_shape",
    "plumage_design",
    "plumage_from_basis",
    "plumage_projection",
    "projection_from_design",
    "realign_moments",
    "realignment",
    "sample_layers",
    "sampler_generator",
    "scaled_projector",
    "second_moment_from_gram",
    "second_moment_update",
    "short_side_basis",
    "systematic_sample",
]
