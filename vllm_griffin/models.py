"""Public import path kept: the embedded models live in :mod:`vllm_griffin.tools.models`."""

from vllm_griffin.tools.models import MODELS, cli_prepare_model, griffin_home, model_dir, prepare_model  # noqa: F401
