"""kd_tune: distributed tuning of knowledge distillation for tiny wake-word models."""

from kd_tune.distill import alpha_at, combine_teachers, distillation_loss, temperature_at

__version__ = "0.1.0"
__all__ = ["alpha_at", "combine_teachers", "distillation_loss", "temperature_at", "__version__"]
