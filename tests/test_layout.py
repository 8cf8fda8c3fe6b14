"""The house rules of ARCHITECTURE.md that a test can check: dependencies point inward (experiments -> front
doors -> core; core -> torch only), and importing the engine pulls in neither Lightning nor Avalanche."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lightning_cskl"


def _imports(path: Path) -> set[str]:
    """Absolute module names that ``path`` imports (relative imports resolved against the package)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                module = ".".join(base + ([node.module] if node.module else []))
                names = [module] + [f"{module}.{alias.name}" for alias in node.names]
                found.update(names)
            else:
                found.add(node.module)
    return found


def _modules(folder: str = "") -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


def test_the_library_never_imports_the_experiments():
    offenders = {}
    for path in _modules():
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith("experiments/") or relative == "cli.py":  # cli.py dispatches to them
            continue
        bad = sorted(m for m in _imports(path) if m.startswith("lightning_cskl.experiments"))
        if bad:
            offenders[relative] = bad
    assert not offenders, offenders


def test_core_imports_torch_only_among_frameworks():
    offenders = {}
    for path in _modules("core"):
        bad = sorted(m for m in _imports(path) if m.split(".")[0] in ("lightning", "avalanche", "pytorch_lightning")
                     or m.startswith(("lightning_cskl.lightning", "lightning_cskl.avalanche", "lightning_cskl.data")))
        if bad:
            offenders[path.name] = bad
    assert not offenders, offenders


def test_importing_the_engine_loads_neither_lightning_nor_avalanche():
    code = ("import sys, lightning_cskl.core; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'avalanche', 'pytorch_lightning'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
