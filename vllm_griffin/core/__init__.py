"""The paper's math and the per-request state (no vLLM import): what a selection is, and when it happens."""
