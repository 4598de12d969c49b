"""Check a vLLM release for GRIFFIN's hooks before installing it.

    python benchmarks/check_vllm_hooks.py PATH [--print-fingerprints]

PATH is a downloaded vLLM wheel (``vllm-X-*.whl``, a zip), a source tree (the
repository root holding ``vllm/``), or the ``vllm`` package directory itself
(e.g. site-packages/vllm). Nothing is imported from PATH and nothing is
installed: the script parses vLLM's ``.py`` files with ``ast``.

For every hook in ``vllm_griffin.engine.compat.ALL_HOOKS`` (the table the runtime
check uses) it resolves ``module:Class.attr`` the way Python would: module
files and packages, ``from x import y`` / ``import *`` re-exports (relative
too), class bodies and their vLLM base classes, module-level instances
(``ModelRegistry = _ModelRegistry(...)``), enum members and the methods a
``NamedTuple`` gets. Then it fingerprints what it found (signature: parameter
names, kinds, defaults, decorators; body: the code without docstring, comments
or formatting) and compares with ``compat.HOOK_FINGERPRINTS`` (those of the tested
versions). One line per hook:

    OK       the hook is there with the recorded source
    MISSING  the module or the attribute is not there
    CHANGED  it is there, but its signature or its body is none of the tested ones

Exit status 1 on any MISSING or CHANGED (or an unreadable PATH), else 0.
``--print-fingerprints`` prints ``HOOK_FINGERPRINTS`` with PATH's fingerprints
added (to record a newly tested version in vllm_griffin/compat.py).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vllm_griffin.engine.compat import ALL_HOOKS, HOOK_FINGERPRINTS  # noqa: E402 (data only; does not import vLLM)

# Methods every typing.NamedTuple / collections.namedtuple class has without defining them.
_NAMEDTUPLE_ATTRS = {"_replace", "_asdict", "_make", "_fields", "_field_defaults"}
_NAMEDTUPLE_BASES = {"typing.NamedTuple", "collections.namedtuple", "NamedTuple"}


class SourceError(Exception):
    """PATH is neither a wheel nor a tree holding vLLM's package."""


class Source:
    """Read access to ``vllm/**.py`` in a wheel or a directory, by module name."""

    def __init__(self, path: str | Path):
        path = Path(path)
        self._zip = None
        self._root: Path | None = None
        if path.is_file():
            if not zipfile.is_zipfile(path):
                raise SourceError(f"{path} is not a wheel (zip) file")
            self._zip = zipfile.ZipFile(path)
            self._names = set(self._zip.namelist())
            if "vllm/__init__.py" not in self._names:
                raise SourceError(f"{path} has no vllm/__init__.py")
        elif (path / "vllm" / "__init__.py").is_file():
            self._root = path
        elif path.name == "vllm" and (path / "__init__.py").is_file():
            self._root = path.parent
        else:
            raise SourceError(f"{path}: neither a wheel nor a directory with vllm/__init__.py")

    def _read(self, relpath: str) -> str | None:
        if self._zip is not None:
            return self._zip.read(relpath).decode("utf-8") if relpath in self._names else None
        file = self._root / relpath
        return file.read_text(encoding="utf-8") if file.is_file() else None

    def module_file(self, module: str) -> tuple[str, str, bool] | None:
        """(relative path, text, is_package) of ``module``, or None."""
        base = module.replace(".", "/")
        for relpath, is_package in ((f"{base}/__init__.py", True), (f"{base}.py", False)):
            text = self._read(relpath)
            if text is not None:
                return relpath, text, is_package
        return None


@dataclass
class Module:
    name: str
    tree: ast.Module
    is_package: bool


@dataclass
class Found:
    """What a name resolves to: kind in module/class/function/value/instance/namedtuple_attr/external."""

    kind: str
    module: Module | None = None
    node: ast.AST | None = None
    name: str = ""
    owner: Found | None = None  # the class of an instance


class Resolver:
    def __init__(self, source: Source):
        self.source = source
        self._modules: dict[str, Module | None] = {}
        self.errors: list[str] = []

    def module(self, name: str) -> Module | None:
        if name not in self._modules:
            found = self.source.module_file(name) if name.split(".")[0] == "vllm" else None
            if found is None:
                self._modules[name] = None
            else:
                relpath, text, is_package = found
                try:
                    self._modules[name] = Module(name, ast.parse(text, relpath), is_package)
                except SyntaxError as exc:  # e.g. syntax newer than this Python
                    self.errors.append(f"{relpath}: cannot parse ({exc.msg}, line {exc.lineno})")
                    self._modules[name] = None
        return self._modules[name]

    # -- module level -----------------------------------------------------------------
    def _absolute(self, mod: Module, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        parts = mod.name.split(".")
        if not mod.is_package:
            parts = parts[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        return ".".join(parts + ([node.module] if node.module else []))

    def _statements(self, body):
        """Top-level statements that run at import, including those in if/try/with blocks."""
        for stmt in body:
            if isinstance(stmt, ast.If):
                test = stmt.test
                type_checking = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                    isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
                if not type_checking:
                    yield from self._statements(stmt.body)
                yield from self._statements(stmt.orelse)
            elif isinstance(stmt, ast.Try):
                yield from self._statements(stmt.body)
                for handler in stmt.handlers:
                    yield from self._statements(handler.body)
                yield from self._statements(stmt.orelse)
                yield from self._statements(stmt.finalbody)
            elif isinstance(stmt, ast.With):
                yield from self._statements(stmt.body)
            else:
                yield stmt

    def lookup(self, module_name: str, name: str, _seen=None) -> Found | None:
        """``name`` in the namespace of ``module_name`` (None: not there)."""
        seen = _seen if _seen is not None else set()
        if (module_name, name) in seen:
            return None
        seen.add((module_name, name))
        mod = self.module(module_name)
        if mod is None:
            return None
        star_sources = []
        for stmt in self._statements(mod.tree.body):
            if isinstance(stmt, ast.ClassDef) and stmt.name == name:
                return Found("class", mod, stmt, name)
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) and stmt.name == name:
                return Found("function", mod, stmt, name)
            if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in stmt.targets):
                return self._value(mod, stmt.value, name)
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id == name:
                return self._value(mod, stmt.value, name) if stmt.value is not None else Found("value", mod, stmt, name)
            if isinstance(stmt, ast.ImportFrom):
                target = self._absolute(mod, stmt)
                for alias in stmt.names:
                    if alias.name == "*":
                        star_sources.append(target)
                    elif (alias.asname or alias.name) == name:
                        return self._imported(target, alias.name, seen)
            if isinstance(stmt, ast.Import):
                for alias in stmt.names:
                    if alias.asname == name:
                        return self._module_or_external(alias.name)
                    if alias.asname is None and alias.name.split(".")[0] == name:
                        return self._module_or_external(name)
        for target in star_sources:
            found = self.lookup(target, name, seen)
            if found is not None:
                return found
        return self._module_or_none(f"{module_name}.{name}") if mod.is_package else None

    def _imported(self, module_name: str, name: str, seen) -> Found | None:
        if module_name.split(".")[0] != "vllm":
            return Found("external", name=f"{module_name}.{name}")
        found = self.lookup(module_name, name, seen)
        return found if found is not None else self._module_or_none(f"{module_name}.{name}")

    def _module_or_none(self, name: str) -> Found | None:
        mod = self.module(name)
        return Found("module", mod, mod.tree, name) if mod is not None else None

    def _module_or_external(self, name: str) -> Found | None:
        if name.split(".")[0] != "vllm":
            return Found("external", name=name)
        return self._module_or_none(name)

    def _value(self, mod: Module, value: ast.AST, name: str) -> Found:
        if isinstance(value, ast.Call):  # Thing = SomeClass(...): an instance of a vLLM class
            cls = self.expression(mod, value.func)
            if cls is not None and cls.kind == "class":
                return Found("instance", mod, value, name, cls)
        return Found("value", mod, value, name)

    def expression(self, mod: Module, expr: ast.AST) -> Found | None:
        """A Name / dotted Attribute expression in ``mod``'s namespace."""
        if isinstance(expr, ast.Name):
            found = self.lookup(mod.name, expr.id)
            return found if found is not None else Found("external", name=expr.id)  # a builtin
        if isinstance(expr, ast.Attribute):
            base = self.expression(mod, expr.value)
            if base is None:
                return None
            if base.kind == "external":
                return Found("external", name=f"{base.name}.{expr.attr}")
            return self.attribute(base, expr.attr)
        if isinstance(expr, ast.Subscript):  # Generic[T], Base[int]
            return self.expression(mod, expr.value)
        return None

    # -- attributes -------------------------------------------------------------------
    def attribute(self, found: Found, attr: str) -> Found | None:
        if found.kind == "module":
            return self.lookup(found.module.name, attr)
        if found.kind == "class":
            return self.class_attribute(found, attr, set())
        if found.kind == "instance":
            return self.class_attribute(found.owner, attr, set())
        return None

    def class_attribute(self, cls: Found, attr: str, seen: set) -> Found | None:
        key = (cls.module.name, cls.node.name)
        if key in seen:
            return None
        seen.add(key)
        for stmt in self._statements(cls.node.body):
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) and stmt.name == attr:
                return Found("function", cls.module, stmt, attr)
            if isinstance(stmt, ast.ClassDef) and stmt.name == attr:
                return Found("class", cls.module, stmt, attr)
            if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == attr for t in stmt.targets):
                return Found("value", cls.module, stmt.value, attr)
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id == attr:
                return Found("value", cls.module, stmt, attr)
        for base in cls.node.bases:
            resolved = self.expression(cls.module, base)
            if resolved is None:
                continue
            if resolved.kind == "external":
                if resolved.name in _NAMEDTUPLE_BASES and attr in _NAMEDTUPLE_ATTRS:
                    return Found("namedtuple_attr", cls.module, cls.node, attr)
                continue
            if resolved.kind == "class":
                found = self.class_attribute(resolved, attr, seen)
                if found is not None:
                    return found
        return None

    def resolve(self, module_name: str, path: str) -> tuple[Found | None, str]:
        """(what ``module:path`` is, "" when found else what is missing)."""
        mod = self.module(module_name)
        if mod is None:
            return None, "module"
        found = Found("module", mod, mod.tree, module_name)
        for i, name in enumerate(path.split(".")):
            found = self.attribute(found, name)
            if found is None:
                return None, ".".join(path.split(".")[: i + 1])
        return found, ""


# -- fingerprints -----------------------------------------------------------------------
def _canon(node) -> str:
    """A serialisation of an AST that leaves out positions and empty fields, so that it
    reads the same on every Python version that parses the code."""
    if isinstance(node, ast.AST):
        fields = []
        for field in node._fields:
            if field in ("ctx", "type_comment", "kind"):
                continue
            value = getattr(node, field, None)
            if value is None or value == []:
                continue
            fields.append(f"{field}={_canon(value)}")
        return f"{type(node).__name__}({','.join(fields)})"
    if isinstance(node, list):
        return "[" + ",".join(_canon(item) for item in node) + "]"
    return repr(node)


def _strip_annotations(args: ast.arguments) -> list[str]:
    parts = []
    for kind, params in (("posonly", args.posonlyargs), ("arg", args.args), ("kwonly", args.kwonlyargs)):
        parts += [f"{kind}:{p.arg}" for p in params]
    if args.vararg:
        parts.append(f"*{args.vararg.arg}")
    if args.kwarg:
        parts.append(f"**{args.kwarg.arg}")
    parts.append("defaults=" + _canon(args.defaults))
    parts.append("kw_defaults=" + _canon([d if d is not None else ast.Constant(None) for d in args.kw_defaults]))
    return parts


def _body(stmts: list) -> list:
    if stmts and isinstance(stmts[0], ast.Expr) and isinstance(getattr(stmts[0], "value", None), ast.Constant) \
            and isinstance(stmts[0].value.value, str):
        return stmts[1:]
    return stmts


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def fingerprint(found: Found) -> str:
    """"<signature>.<body>" of what a hook resolved to."""
    node = found.node
    if found.kind == "function":
        signature = "|".join(_strip_annotations(node.args) + ["@" + _canon(d) for d in node.decorator_list]
                             + [type(node).__name__])
        body = _canon(_body(node.body))
    elif found.kind == "namedtuple_attr":  # what `_replace` & co. accept: the field names, in order
        fields = [s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
        signature, body = f"namedtuple.{found.name}", ",".join(fields)
    elif found.kind == "class":
        signature = _canon(node.bases)
        body = ",".join(sorted(getattr(s, "name", "") for s in node.body if hasattr(s, "name")))
    elif found.kind == "instance":
        signature, body = f"instance of {found.owner.node.name}", _canon(node)
    else:  # value: an enum member, a class attribute, a module constant
        signature, body = found.kind, _canon(node)
    return f"{_short(signature)}.{_short(body)}"


# -- the check --------------------------------------------------------------------------
def check(path: str | Path, hooks=ALL_HOOKS,
          fingerprints=HOOK_FINGERPRINTS) -> tuple[list[tuple[str, str, str]], list[str]]:
    """[(status, "module:path", detail)] per hook, and errors reading the source."""
    resolver = Resolver(Source(path))
    rows = []
    for module_name, attr_path in hooks:
        key = f"{module_name}:{attr_path}"
        found, missing = resolver.resolve(module_name, attr_path)
        if found is None:
            detail = f"no module {module_name}" if missing == "module" else f"no {missing} in {module_name}"
            rows.append(("MISSING", key, detail))
            continue
        got = fingerprint(found)
        tested = tuple(fingerprints.get(key, ()))
        where = found.module.name if found.module is not None else "outside vLLM"
        if not tested:
            rows.append(("OK", key, f"{found.kind} in {where}; no fingerprint recorded"))
        elif got in tested:
            rows.append(("OK", key, f"{found.kind} in {where}"))
        else:
            signature, body = got.split(".")
            what = [part for part, same in (("signature", any(t.split(".")[0] == signature for t in tested)),
                                            ("body", any(t.split(".")[1] == body for t in tested))) if not same]
            rows.append(("CHANGED", key, f"{' and '.join(what) or 'source'} differs from the tested versions "
                                         f"({found.kind} in {where}: {got}; tested: {', '.join(tested)})"))
    return rows, resolver.errors


def fingerprints_of(path: str | Path, hooks=ALL_HOOKS) -> dict[str, str]:
    """"module:path" -> fingerprint of every hook found in PATH."""
    resolver = Resolver(Source(path))
    table = {}
    for module_name, attr_path in hooks:
        found, _ = resolver.resolve(module_name, attr_path)
        if found is not None:
            table[f"{module_name}:{attr_path}"] = fingerprint(found)
    return table


def merged_fingerprints(path: str | Path, recorded=HOOK_FINGERPRINTS, hooks=ALL_HOOKS) -> dict[str, tuple[str, ...]]:
    """The recorded table with PATH's fingerprints added (for a newly tested version)."""
    found = fingerprints_of(path, hooks)
    table = {}
    for module_name, attr_path in hooks:
        key = f"{module_name}:{attr_path}"
        values = tuple(recorded.get(key, ()))
        if key in found and found[key] not in values:
            values += (found[key],)
        table[key] = values
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="a vLLM wheel (.whl), a source tree holding vllm/, or the vllm package directory")
    parser.add_argument("--print-fingerprints", action="store_true",
                        help="print PATH's fingerprints as a HOOK_FINGERPRINTS table and exit")
    args = parser.parse_args(argv)
    try:
        if args.print_fingerprints:
            print("HOOK_FINGERPRINTS: dict[str, tuple[str, ...]] = {")
            for key, values in merged_fingerprints(args.path).items():
                print(f'    "{key}": ({", ".join(repr(v) for v in values)},),'.replace("'", '"'))
            print("}")
            return 0
        rows, errors = check(args.path)
    except (SourceError, OSError, zipfile.BadZipFile) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    width = max(len(key) for _, key, _ in rows)
    for status, key, detail in rows:
        print(f"{status:8} {key:{width}}  {detail}")
    for error in errors:
        print(f"warning: {error}", file=sys.stderr)
    problems = sum(status != "OK" for status, _, _ in rows)
    print(f"{len(rows)} hooks: {len(rows) - problems} OK, {problems} MISSING or CHANGED")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
