"""Public import path kept: expert files live in :mod:`vllm_griffin.core.export`."""

from vllm_griffin.core.export import EXPORT_DIR_ENV, external_request_id, read_experts, read_statistic, write_experts  # noqa: F401
