"""vllm-griffin: GRIFFIN (training-free, per-sequence FF expert selection) as a vLLM plugin.

Switch it on per engine with ``additional_config={"griffin": {"density": 0.5}}``.
"""

__version__ = "0.1.0"


def register() -> None:
    """``vllm.general_plugins`` entry point (named ``griffin``)."""
    from vllm_griffin.engine.integration import register as _register

    _register()
