"""The layout rules of docs/design.md, read off the source: data flows one way
(cli → train/deploy → nn → functional → ops → kernels), no import cycle, no CLI module imported by
the library or the benchmarks, one loader of the compiled library, and each op family found under
one name in every folder."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLI = {"sparsevd.cli", "sparsevd.deploy_cli", "sparsevd.__main__", "sparsevd._cli_args"}


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


#: Lower layers must not import these (cli → train/deploy → nn → functional → ops → kernels).
_ABOVE = {
    "ops": ("sparsevd.functional", "sparsevd.nn", "sparsevd.loss", "sparsevd.convert",
            "sparsevd.deploy", "sparsevd.io", "sparsevd.export", "sparsevd.train",
            "sparsevd.checkpoint", "sparsevd.models", "sparsevd.data"),
    "functional": ("sparsevd.nn", "sparsevd.loss", "sparsevd.convert", "sparsevd.deploy",
                   "sparsevd.io", "sparsevd.export", "sparsevd.train", "sparsevd.checkpoint",
                   "sparsevd.models"),
    "nn": ("sparsevd.loss", "sparsevd.convert", "sparsevd.deploy", "sparsevd.io", "sparsevd.export",
           "sparsevd.train", "sparsevd.checkpoint", "sparsevd.models", "sparsevd.data"),
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


#: Each op family under one name: (op module, kernels, tests, benchmark).
OP_FAMILIES = {
    "lrt_linear": ["sparsevd/ops/lrt.py", "triton_kernels/lrt_linear.py", "tests/test_lrt_linear.py",
                   "benchmarks/bench_lrt_linear.py"],
    "lrt_conv": ["sparsevd/ops/lrt.py", "triton_kernels/lrt_conv.py", "sparsevd/ops/triton_conv.py",
                 "tests/test_lrt_conv.py", "tests/test_lrt_conv_triton.py", "benchmarks/bench_lrt_conv.py"],
    "kl": ["sparsevd/ops/kl.py", "triton_kernels/kl.py", "tests/test_kl.py", "benchmarks/bench_kl.py"],
    "csr_linear": ["sparsevd/ops/csr.py", "csrc/cpu/csr_linear_cpu.cpp",
                   "csrc/cuda/csr_linear_kernels.cu", "tests/test_csr_linear.py",
                   "benchmarks/bench_csr_linear.py"],
    "noise": ["sparsevd/ops/noise.py", "csrc/cpu/noise_cpu.cpp", "tests/test_noise.py"],
}


@pytest.mark.parametrize("family", list(OP_FAMILIES))
def test_op_family_paths_exist_and_are_documented(family):
    design = (ROOT / "docs" / "design.md").read_text()
    for rel in OP_FAMILIES[family]:
        assert (ROOT / rel).is_file(), rel
        assert rel in design, f"docs/design.md does not list {rel} ({family})"


def test_docstrings_cite_the_design_document_of_this_repo():
    """Every citation of a design document names docs/design.md, which exists."""
    assert (ROOT / "docs" / "design.md").is_file()
    for path in list((ROOT / "sparsevd").rglob("*.py")) + list((ROOT / "triton_kernels").glob("*.py")) \
            + list((ROOT / "tests").glob("*.py")) + list((ROOT / "benchmarks").glob("*.py")):
        text = path.read_text()
        for i, line in enumerate(text.splitlines(), 1):
            if "DESIGN.md" in line and path.name != "test_structure.py":
                pytest.fail(f"{path.relative_to(ROOT)}:{i} cites DESIGN.md; cite docs/design.md")
