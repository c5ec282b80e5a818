"""kd_tune: distributed tuning of knowledge distillation for tiny wake-word models."""

__version__ = "0.1.0"
__all__ = ["alpha_at", "combine_teachers", "distillation_loss", "temperature_at", "__version__"]


def __getattr__(name: str):
    # Lazy: importing any kd_tune module imports this package, and kd_tune.config and kd_tune.detect load no torch.
    if name in __all__:
        from kd_tune import distill

        return getattr(distill, name)
    raise AttributeError(f"module 'kd_tune' has no attribute {name!r}")
