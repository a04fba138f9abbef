"""Pure estimator math (no ``torch.distributed``): probabilities, samplers, projectors."""

from .gum import sample_layers
from .optimal import (
    expected_error,
    optimal_design,
    optimal_probabilities,
    optimal_projection,
    scaled_projector,
    second_moment_update,
)
from .probabilities import estimator_variance, inclusion_probabilities, is_deterministic, mix_uniform
from .projectors import (
    Projection,
    DEFAULT_SVD_METHOD,
    build_projection,
    default_svd_method,
    estimate,
    galore_projection,
    haar_projection,
    plumage_design,
    plumage_projection,
    projection_from_design,
    realign_moments,
    realignment,
)
from .sampling import derive_seed, sampler_generator, systematic_sample
from .spectral import deorient, is_left, orient, oriented_shape, short_side_basis

__all__ = [
    "DEFAULT_SVD_METHOD",
    "Projection",
    "build_projection",
    "default_svd_method",
    "deorient",
    "derive_seed",
    "estimate",
    "estimator_variance",
    "expected_error",
    "galore_projection",
    "haar_projection",
    "inclusion_probabilities",
    "is_deterministic",
    "is_left",
    "mix_uniform",
    "optimal_design",
    "optimal_probabilities",
    "optimal_projection",
    "orient",
    "oriented_shape",
    "plumage_design",
    "plumage_projection",
    "projection_from_design",
    "realign_moments",
    "realignment",
    "sample_layers",
    "sampler_generator",
    "scaled_projector",
    "second_moment_update",
    "short_side_basis",
    "systematic_sample",
]
