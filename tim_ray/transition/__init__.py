"""The transition-model math: paths, (t, r) samplers, the training objective and the any-step sampler.

Pure torch: no Ray, no I/O, no distributed calls of its own (see docs/decisions.md for the choices made here).
"""
from tim_ray.transition.intervals import INTERVAL_SAMPLERS, Intervals, get_interval_sampler, sample_intervals
from tim_ray.transition.objective import (ModelGuidance, TransitionLoss, dde_time_derivative, jvp_time_derivative,
                                          time_weight, transition_loss, transition_target)
from tim_ray.transition.paths import PATHS, OTFMPath, TransitionPath, TrigFlowPath, get_path
from tim_ray.transition.sampler import SampleOutput, sample, sample_from_config, time_grid

__all__ = [
    "INTERVAL_SAMPLERS", "Intervals", "get_interval_sampler", "sample_intervals",
    "ModelGuidance", "TransitionLoss", "dde_time_derivative", "jvp_time_derivative", "time_weight",
    "transition_loss", "transition_target",
    "PATHS", "OTFMPath", "TransitionPath", "TrigFlowPath", "get_path",
    "SampleOutput", "sample", "sample_from_config", "time_grid",
]
