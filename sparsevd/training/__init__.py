"""The parts of training that ``sparsevd.train.fit`` puts together, one concept per module:
the run configuration (:mod:`.config`), mixed precision (:mod:`.precision`), divergence
(:mod:`.divergence`), the state carried across epochs and resumes (:mod:`.state`) and the
summary (:mod:`.summary`). The loop itself, by phase, is :mod:`sparsevd.train`."""
from .config import (LR_DECAYS, METHODS, RUNTIME_FIELDS, UNSAVED_FIELDS, TrainConfig, resolve_recipe,
                     resume_conflicts, saved_settings)
from .divergence import TrainingDiverged
from .precision import AMP_DTYPES, fp16_init_scale

__all__ = ["AMP_DTYPES", "LR_DECAYS", "METHODS", "RUNTIME_FIELDS", "UNSAVED_FIELDS", "TrainConfig",
           "TrainingDiverged", "fp16_init_scale", "resolve_recipe", "resume_conflicts", "saved_settings"]
