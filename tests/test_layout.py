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


#: data/ reads one way down: options -> builder -> loader -> tensors / download (a module imports only modules of
#: later layers)
DATA_LAYERS = (("build",), ("benchmarks", "shifts"), ("digits", "fashion_mnist", "tensors"), ("download",))


def test_the_data_package_reads_one_way_down():
    layer_of = {name: i for i, names in enumerate(DATA_LAYERS) for name in names}
    files = {p.stem for p in _modules("data")} - {"__init__"}
    assert files == set(layer_of), f"data/ modules without a layer in DATA_LAYERS: {sorted(files ^ set(layer_of))}"
    offenders = {}
    for path in _modules("data"):
        if path.stem == "__init__":
            continue
        imported = {m.split(".")[2] for m in _imports(path) if m.startswith("lightning_cskl.data.")}
        bad = sorted(m for m in imported if m in layer_of and layer_of[m] <= layer_of[path.stem] and m != path.stem)
        if bad:
            offenders[path.stem] = bad
    assert not offenders, offenders


def test_the_learner_leaves_layer_resolution_to_core_layers():
    """learner.py is the per-task lifecycle; which modules train is resolved in core/layers.py."""
    tree = ast.parse((PACKAGE / "core" / "learner.py").read_text())
    defined = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    assert not defined & {"resolve_layers", "resolve_train_also", "NoEligibleLayerError", "refuse_reparametrized"}
    layers = {node.name for node in ast.parse((PACKAGE / "core" / "layers.py").read_text()).body
              if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    assert {"resolve_layers", "resolve_train_also", "NoEligibleLayerError"} <= layers


def test_the_method_options_are_written_once_and_every_door_publishes_them():
    """HeadConfig, PrefixCacheConfig and CenterKernelConfig hold the options; both doors' signatures and cskl run's
    sections derive from them (same names, same defaults, apart from the callback's prototype_replay=False)."""
    import dataclasses
    import inspect

    from lightning_cskl import CenterKernelCallback, CSKLPlugin, CSKLStrategy
    from lightning_cskl.core import CenterKernelConfig, HeadConfig
    from lightning_cskl.options import RunConfig

    from lightning_cskl.core.prefix_cache import PrefixCacheConfig

    def fields(*configs):
        return {f.name: f.default for config in configs for f in dataclasses.fields(config)}

    avalanche = fields(HeadConfig, PrefixCacheConfig, CenterKernelConfig)
    for door, own, published in ((CSKLStrategy, {}, avalanche), (CSKLPlugin, {}, avalanche),
                                 (CenterKernelCallback, {"prototype_replay": False}, avalanche)):
        parameters = inspect.signature(door.__init__).parameters
        for name, default in published.items():
            if door is CSKLStrategy and name == "criterion":
                continue
            assert name in parameters, (door.__name__, name)
            assert parameters[name].default == own.get(name, default), (door.__name__, name)
    from lightning_cskl.options import StrategyOptions

    run = {f.name: f.type for f in dataclasses.fields(RunConfig)}
    assert run["strategy"] == "StrategyOptions" and run["engine"] == "CenterKernelConfig"
    assert fields(StrategyOptions) == fields(HeadConfig, PrefixCacheConfig)
