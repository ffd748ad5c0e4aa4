"""opdlm: on-policy distillation for language models with pluggable samplers, supports,
aligners, maskers, losses and tasks (see README.md)."""

__version__ = "0.1.0"
