"""The ``structvit`` console command's entry point, outside the ``structvit`` package.

``import structvit`` registers the models with timm, so it imports torch and timm (seconds).
A console entry point inside the package (``structvit.cli:main``) would pay that before
printing ``--help``. This package's ``__init__`` is light: it runs ``structvit/cli.py`` --
which imports nothing from the package at module level -- without importing the package,
so ``structvit --help`` and ``structvit --version`` answer without torch; a sub-command
imports its module (and with it ``structvit``) only when it runs.
"""
import importlib.util
import sys
from pathlib import Path

__all__ = ["main"]


def _cli():
    """``structvit/cli.py`` as a module of its own (the package's ``__init__`` is not run)."""
    spec = importlib.util.find_spec("structvit")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the structvit package is not installed", name="structvit")
    path = Path(next(iter(spec.submodule_search_locations))) / "cli.py"
    module_spec = importlib.util.spec_from_file_location("structvit_cli._cli", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    # once the package is imported anyway, its own module is the one to run (tests monkeypatch it)
    cli = sys.modules.get("structvit.cli") or _cli()
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
