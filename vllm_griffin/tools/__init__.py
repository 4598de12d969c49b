"""Tools outside the engine: the vllm-griffin command, embedded models, evals, bench, soak, plots."""
