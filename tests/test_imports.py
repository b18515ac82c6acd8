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
