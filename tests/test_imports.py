"""ediffi stays pure PyTorch: importing it (all modules) loads neither ray nor mlflow."""

import subprocess
import sys


def test_ediffi_imports_neither_ray_nor_mlflow():
    code = (
        "import sys, pkgutil, importlib, ediffi\n"
        "for m in pkgutil.iter_modules(ediffi.__path__): importlib.import_module('ediffi.' + m.name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow'))\n"
        "print(len(list(pkgutil.iter_modules(ediffi.__path__))), bad)\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[0]) >= 8


def test_platform_package_is_importable_and_platform_is_not_shadowed():
    import platform

    import ediffi_platform

    assert hasattr(platform, "python_version")  # the standard library module, not our folder
    assert ediffi_platform.__name__ == "ediffi_platform"


def test_generation_loads_neither_the_training_nor_the_expert_job():
    """Where runs and checkpoints live is ediffi_platform.runs: generation needs no training code."""
    code = (
        "import sys, ediffi_platform.generate\n"
        "print(sorted(m for m in sys.modules if m in ('ediffi_platform.train', 'ediffi_platform.experts')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_platform_functions_fit_on_a_screen():
    """No function of the Ray layer over 80 lines or with more than 6 positional parameters."""
    import ast
    from pathlib import Path

    import ediffi_platform

    too_long = []
    for path in sorted(Path(ediffi_platform.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                positional = len([a for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")])
                if lines > 80 or positional > 6:
                    too_long.append(f"{path.name}:{node.name} ({lines} lines, {positional} positional)")
    assert not too_long, too_long
