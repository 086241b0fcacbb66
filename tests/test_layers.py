"""The package's layers: models and envs -> agent -> training -> analysis -> study -> CLIs.
No module imports from a higher layer (imports inside functions included) and no modules
import each other in a circle."""
import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dali_jax")

# dali_jax.<name> -> layer; a package's modules share its layer.
LAYERS = {
    "hostmem": 0, "flops": 0, "methods": 0, "config": 0, "presets": 0, "overrides": 0,
    "models": 1, "envs": 1, "agent": 2, "training": 3, "analysis": 4, "study": 5,
    "launch": 6, "evaluate": 6, "probe": 6, "counterfactual": 6, "curves": 6, "report": 6,
}


def _modules():
    """{module name: set of dali_jax modules it imports}."""
    out = {}
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
            name = rel[:-len(".__init__")] if rel.endswith(".__init__") else rel
            package = name if f == "__init__.py" else name.rsplit(".", 1)[0]
            deps = set()
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.Import):
                    deps |= {a.name for a in node.names if a.name.startswith("dali_jax")}
                elif isinstance(node, ast.ImportFrom):
                    base = node.module or ""
                    if node.level:
                        parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                        base = ".".join(parts + ([node.module] if node.module else []))
                    if not base.startswith("dali_jax"):
                        continue
                    for a in node.names:  # `from pkg import module` names the module
                        sub = f"{base}.{a.name}"
                        is_mod = os.path.exists(os.path.join(
                            os.path.dirname(ROOT), *sub.split(".")) + ".py")
                        deps.add(sub if is_mod else base)
            out[name] = deps - {name}
    return out


def _layer(name):
    parts = name.split(".")
    return -1 if len(parts) == 1 else LAYERS[parts[1]]


def test_every_module_has_a_layer():
    assert {n.split(".")[1] for n in _modules() if "." in n} <= set(LAYERS)


def test_no_module_imports_from_a_higher_layer():
    up = [f"{m} -> {d}" for m, deps in _modules().items() for d in deps
          if _layer(d) > _layer(m)]
    assert not up, up


def test_no_import_circles():
    graph = _modules()
    circles = []

    def visit(node, path):
        for d in graph.get(node, ()):
            if d in path:
                circles.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in done:
                done.add(d)
                visit(d, path + [d])

    for start in graph:
        done = {start}
        visit(start, [start])
    assert not circles, circles[:5]


def test_each_module_alias_names_one_module():
    """`from dali_jax.x import y as Z`: across the package, benchmarks and tests, an alias
    always stands for the same module."""
    repo = os.path.dirname(ROOT)
    seen = {}
    for folder in ("dali_jax", "benchmarks", "tests"):
        for dirpath, _, files in os.walk(os.path.join(repo, folder)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                for node in ast.walk(ast.parse(open(os.path.join(dirpath, f)).read())):
                    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                            "dali_jax"):
                        for a in node.names:
                            if a.asname:
                                seen.setdefault(a.asname, set()).add(f"{node.module}.{a.name}")
    assert {k: v for k, v in seen.items() if len(v) > 1} == {}
