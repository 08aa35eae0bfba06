"""The layout rules of docs/design.md, read off the source: data flows one way
(cli → train/deploy → nn → functional → ops → kernels), no import cycle, no CLI module imported by
the library or the benchmarks, one loader of the compiled library, and each op family found under
one name in every folder."""
import argparse
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The command line: the package sparsevd.cli (one module per command) and ``python -m sparsevd``.
CLI_COMMANDS = ("train", "deploy", "plot", "bench")
CLI_PACKAGE = ("__init__.py", "__main__.py", "args.py") + tuple(f"{c}.py" for c in CLI_COMMANDS)


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "triton_kernels":
        parts = ["sparsevd", "triton_kernels"] + parts[1:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources():
    files = list((ROOT / "sparsevd").rglob("*.py")) + list((ROOT / "triton_kernels").glob("*.py"))
    return {_module_name(p): p for p in files}


MODULES = _sources()
CLI = {n for n in MODULES if n == "sparsevd.cli" or n.startswith("sparsevd.cli.")} | {"sparsevd.__main__"}


def _is_package(name: str) -> bool:
    p = MODULES.get(name)
    return p is not None and p.name == "__init__.py"


def _imports(name: str, path: Path):
    """Every sparsevd module that ``name`` imports (at any depth of its code), resolved to the
    deepest module that exists."""
    tree = ast.parse(path.read_text())
    package = name if _is_package(name) else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES or a.name == "_C" else mod
                       for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" \
                and node.args and isinstance(node.args[0], ast.Constant):
            targets = [node.args[0].value]
        else:
            continue
        for t in targets:
            if t.startswith("sparsevd"):
                while t not in MODULES and "." in t and not t.endswith("._C"):
                    t = t.rpartition(".")[0]
                out.add(t)
    out.discard(name)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_no_import_cycle():
    """No cycle among sparsevd's modules (a package's own __init__ importing its submodules is
    not counted: Python runs it first anyway)."""
    def edges(name):
        return {t for t in GRAPH[name] if t in GRAPH and not name.startswith(t + ".")}

    state, path = {}, []

    def visit(n):
        state[n] = 1
        path.append(n)
        for m in sorted(edges(n)):
            if state.get(m) == 1:
                cycle = path[path.index(m):] + [m]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        path.pop()
        state[n] = 2

    for n in sorted(GRAPH):
        if n not in state:
            visit(n)


def test_cli_modules_are_imported_by_the_cli_only():
    for name, deps in GRAPH.items():
        if name in CLI:
            continue
        assert not deps & CLI, f"{name} imports the command line ({sorted(deps & CLI)})"
    for path in (ROOT / "benchmarks").glob("*.py"):
        fake = {}
        for dep in _imports("benchmarks." + path.stem, path):
            fake[dep] = True
        assert not set(fake) & CLI, f"benchmarks/{path.name} imports the command line"


def test_the_cli_package_is_one_module_per_command():
    """sparsevd/cli/: the parser and main (__init__.py), ``python -m sparsevd.cli`` (__main__.py),
    the argparse types (args.py) and one module per subcommand, which adds its subparser; no other
    module of the library is command line."""
    package = ROOT / "sparsevd" / "cli"
    assert sorted(p.name for p in package.glob("*.py")) == sorted(CLI_PACKAGE)
    assert not any(p.is_dir() and p.name != "__pycache__" for p in package.iterdir())
    assert not (ROOT / "sparsevd" / "cli.py").exists()
    assert sorted(CLI) == sorted({"sparsevd.cli", "sparsevd.__main__"}
                                 | {f"sparsevd.cli.{p[:-3]}" for p in CLI_PACKAGE if p != "__init__.py"})
    import sparsevd.cli

    parser = sparsevd.cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert sorted(sub.choices) == sorted(CLI_COMMANDS)
    assert GRAPH["sparsevd.__main__"] == {"sparsevd.cli"}
    # sparsevd.cli imports each command's module (deploy by name, when the command runs)
    assert {f"sparsevd.cli.{c}" for c in CLI_COMMANDS} <= GRAPH["sparsevd.cli"]


#: Lower layers must not import these (cli → train/deploy → nn → functional → ops → kernels).
_ABOVE = {
    "ops": ("sparsevd.functional", "sparsevd.nn", "sparsevd.loss", "sparsevd.convert",
            "sparsevd.deploy", "sparsevd.planner", "sparsevd.compare", "sparsevd.io", "sparsevd.export",
            "sparsevd.train", "sparsevd.training", "sparsevd.checkpoint", "sparsevd.models", "sparsevd.data"),
    "functional": ("sparsevd.nn", "sparsevd.loss", "sparsevd.convert", "sparsevd.deploy",
                   "sparsevd.planner", "sparsevd.compare", "sparsevd.io", "sparsevd.export",
                   "sparsevd.train", "sparsevd.training", "sparsevd.checkpoint", "sparsevd.models"),
    "nn": ("sparsevd.loss", "sparsevd.convert", "sparsevd.deploy", "sparsevd.planner", "sparsevd.compare",
           "sparsevd.io", "sparsevd.export", "sparsevd.train", "sparsevd.training", "sparsevd.checkpoint",
           "sparsevd.models", "sparsevd.data"),
}


@pytest.mark.parametrize("layer", list(_ABOVE))
def test_data_flows_one_way(layer):
    prefix = f"sparsevd.{layer}"
    members = [n for n in GRAPH if n == prefix or n.startswith(prefix + ".")]
    if layer == "ops":
        members += [n for n in GRAPH if n.startswith("sparsevd.triton_kernels")]
    assert members
    for name in members:
        bad = {d for d in GRAPH[name] if d.startswith(_ABOVE[layer])}
        assert not bad, f"{name} ({layer}) imports a layer above it: {sorted(bad)}"


def test_one_loader_of_the_compiled_library():
    loaders = sorted(n for n, deps in GRAPH.items() if "sparsevd._C" in deps)
    assert loaders == ["sparsevd.ops.library"], loaders


#: The op families, each under one name in every folder (docs/design.md, "Op families"): its package
#: sparsevd/ops/<family>/ (FAMILY_PACKAGE), its Triton kernels, its tests and its benchmark.
OP_FAMILIES = ("lrt_linear", "lrt_conv2d", "kl", "csr_linear")
#: The families whose backends SPARSEVD_BACKEND picks (sparsevd.ops.backend); csr_linear runs its
#: compiled kernels wherever the library runs on the input's device, the torch math elsewhere.
REGISTRY_FAMILIES = ("lrt_linear", "lrt_conv2d", "kl")
#: The files of a family's package: the math (the reference backend), the custom ops, one module per
#: other backend (triton.py where the family has Triton kernels), and what a family adds.
FAMILY_PACKAGE = ("__init__.py", "naive.py", "op.py", "native.py")
FAMILY_EXTRA = {"lrt_linear": ("triton.py",), "lrt_conv2d": ("triton.py",), "kl": ("triton.py",),
                "csr_linear": ("format.py",)}
#: The backend modules of a family, which only its dispatcher imports (on first use): the backend
#: registry sparsevd.ops.backend, or the family's own op.py where it has no registry entry.
BACKEND_MODULES = ("native", "triton")
#: What the families share, beside their packages.
OPS_SHARED = ("__init__.py", "backend.py", "library.py", "weights.py", "conv_geometry.py", "noise.py",
              "lrt_common.py", "triton_common.py", "checks.py")


def has_triton(family):
    return "triton.py" in FAMILY_EXTRA[family]


def family_paths(family):
    """Every file of ``family`` outside its package, under its one name (csr_linear: no Triton
    kernels, its CUDA kernels and argument checks in C++, one test module for every backend)."""
    paths = [f"csrc/cpu/{family}_cpu.cpp", f"tests/test_{family}.py", f"benchmarks/bench_{family}.py"]
    if has_triton(family):
        paths += [f"triton_kernels/{family}.py", f"tests/test_{family}_native.py", f"tests/test_{family}_triton.py"]
    else:
        paths += [f"csrc/cuda/{family}_cuda.cpp", f"csrc/cuda/{family}_kernels.cu", f"csrc/{family}_checks.h"]
    return paths


@pytest.mark.parametrize("family", OP_FAMILIES)
def test_op_family_has_its_files_under_one_name_and_they_are_documented(family):
    design = (ROOT / "docs" / "design.md").read_text()
    package = ROOT / "sparsevd" / "ops" / family
    assert sorted(p.name for p in package.glob("*.py")) == sorted(FAMILY_PACKAGE + FAMILY_EXTRA[family]), family
    # a triton.py exactly where the family has Triton kernels
    assert has_triton(family) == (ROOT / "triton_kernels" / f"{family}.py").exists(), family
    for rel in [f"sparsevd/ops/{family}/"] + family_paths(family):
        assert (ROOT / rel).exists(), rel
        assert rel in design, f"docs/design.md does not list {rel} ({family})"
    # The family's test module runs every backend and device (conftest.py): it names its op.
    text = (ROOT / "tests" / f"test_{family}.py").read_text()
    assert '\nOP = "' in text, f"tests/test_{family}.py names no OP"


def test_the_ops_package_is_the_families_and_what_they_share():
    ops = ROOT / "sparsevd" / "ops"
    assert sorted(p.name for p in ops.glob("*.py")) == sorted(OPS_SHARED)
    assert sorted(p.name for p in ops.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(OP_FAMILIES)
    from sparsevd.ops import backend

    assert set(backend.families()) == set(REGISTRY_FAMILIES)


def dispatcher(family):
    """The one module that imports ``family``'s backend modules (on first use, by name)."""
    return "sparsevd.ops.backend" if family in REGISTRY_FAMILIES else f"sparsevd.ops.{family}.op"


def test_backend_modules_are_imported_by_the_dispatcher_only():
    """Nothing in the library imports a family's backend module but its dispatcher, which loads it
    on first use (by name: importlib, which this graph records), so a missing triton or compiled
    library only makes that backend unavailable."""
    for family in OP_FAMILIES:
        backends = {f"sparsevd.ops.{family}.{b}" for b in BACKEND_MODULES} & set(MODULES)
        assert backends, family
        for name, deps in GRAPH.items():
            if name != dispatcher(family):
                assert not deps & backends, f"{name} imports a backend module ({sorted(deps & backends)})"
    # the dispatchers do import them (the registry by a computed name, checked by its tests)
    assert "sparsevd.ops.csr_linear.native" in GRAPH["sparsevd.ops.csr_linear.op"]


def test_one_name_for_the_math_and_one_for_the_backend_that_runs_it():
    """The math of a family is ``naive_<op>`` (its naive.py); the backends' implementations are
    ``native_<op>`` and ``triton_<op>``; the word "reference" names the backend only (and the
    re-export module sparsevd.reference): no module under sparsevd/ops is called reference*."""
    for family in OP_FAMILIES:
        tree = ast.parse((ROOT / "sparsevd" / "ops" / family / "naive.py").read_text())
        public = [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")]
        assert public and all(n.startswith("naive_") for n in public), (family, public)
        for backend_name in BACKEND_MODULES:
            path = ROOT / "sparsevd" / "ops" / family / f"{backend_name}.py"
            if not path.exists():
                continue
            tree = ast.parse(path.read_text())
            if family in REGISTRY_FAMILIES:
                named = [n.args[2].id for n in ast.walk(tree) if isinstance(n, ast.Call)
                         and getattr(n.func, "id", None) == "register_impl"]
            else:  # called by its op.py: its public functions
                named = [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")]
            assert named and all(r.startswith(backend_name + "_") for r in named), (family, named)
    assert not list((ROOT / "sparsevd" / "ops").rglob("reference*.py"))


def test_every_cpp_schema_is_in_one_block_of_ops_cpp():
    """csrc/ops.cpp holds the one TORCH_LIBRARY(sparsevd, m) block and every m.def; the kernels
    register with TORCH_LIBRARY_IMPL in their own files (no TORCH_LIBRARY_FRAGMENT)."""
    sources = sorted(p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cpp", ".cu", ".h"))
    assert sources
    for path in sources:
        text = path.read_text()
        rel = path.relative_to(ROOT).as_posix()
        assert "TORCH_LIBRARY_FRAGMENT(" not in text, rel
        if rel == "csrc/ops.cpp":
            assert text.count("TORCH_LIBRARY(sparsevd, m)") == 1
            continue
        assert "TORCH_LIBRARY(" not in text and "m.def(" not in text, f"{rel} defines a schema"
    registered = set()
    for path in sources:
        registered |= set(re.findall(r'm\.impl\("(\w+)"', path.read_text()))
    defined = set(re.findall(r'm\.def\("(\w+)\(', (ROOT / "csrc" / "ops.cpp").read_text()))
    assert registered <= defined, sorted(registered - defined)


def test_one_home_for_the_checks_of_op_arguments():
    """The dtype, device and type checks of tensor arguments that compare with another argument
    ("expected dtype ... (the dtype of weight)") are sparsevd/ops/checks.py's, called everywhere else."""
    home = ROOT / "sparsevd" / "ops" / "checks.py"
    patterns = ("(the dtype of {", "(the device of {", "expected a floating-point tensor, got")
    for path in (ROOT / "sparsevd").rglob("*.py"):
        if path == home:
            continue
        text = path.read_text()
        for pattern in patterns:
            assert pattern not in text, f"{path.relative_to(ROOT)} checks an op argument itself ({pattern!r})"
    assert all(p in home.read_text() for p in patterns)


def test_docstrings_cite_the_design_document_of_this_repo():
    """Every citation of a design document names docs/design.md, which exists."""
    assert (ROOT / "docs" / "design.md").is_file()
    for path in list((ROOT / "sparsevd").rglob("*.py")) + list((ROOT / "triton_kernels").glob("*.py")) \
            + list((ROOT / "tests").glob("*.py")) + list((ROOT / "benchmarks").glob("*.py")) \
            + [p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cpp", ".cu", ".h")]:
        text = path.read_text()
        for i, line in enumerate(text.splitlines(), 1):
            if "DESIGN.md" in line and path.name != "test_structure.py":
                pytest.fail(f"{path.relative_to(ROOT)}:{i} cites DESIGN.md; cite docs/design.md")


#: The training code: the loop by phase (sparsevd/train.py) and what it puts together (sparsevd/training/).
TRAINING_SOURCES = ["sparsevd/train.py"] + sorted(
    p.relative_to(ROOT).as_posix() for p in (ROOT / "sparsevd" / "training").glob("*.py"))
#: The command line, one module per command (sparsevd/cli/).
CLI_SOURCES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "sparsevd" / "cli").glob("*.py"))
MAX_FUNCTION_LINES = 100


@pytest.mark.parametrize("rel", TRAINING_SOURCES + CLI_SOURCES)
def test_training_functions_are_short(rel):
    """No function (or method) of the training code or the command line is over MAX_FUNCTION_LINES lines of code: its
    lines from ``def`` to its end, the docstring not counted (a long docstring is documentation,
    not a long function)."""
    tree = ast.parse((ROOT / rel).read_text())
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        lines = node.end_lineno - node.lineno + 1
        first = node.body[0]
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                and isinstance(first.value.value, str):
            lines -= first.end_lineno - first.lineno + 1
        assert lines <= MAX_FUNCTION_LINES, f"{rel}: {node.name} has {lines} lines of code"


def test_training_package_has_one_module_per_concept():
    names = sorted(p.name for p in (ROOT / "sparsevd" / "training").glob("*.py"))
    assert names == sorted(["__init__.py", "config.py", "precision.py", "divergence.py", "state.py",
                            "summary.py"]), names
