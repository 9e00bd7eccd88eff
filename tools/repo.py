"""Import the checkout's code from the tools, installed or not.

pyproject's package-dir maps kernels/ and serve/ to `tspeft_rt.kernels` and `tspeft_rt.serve`. In an
environment without the package installed (a GPU machine with torch and triton only), `import_repo`
puts the repo root on sys.path and loads those two folders under their package names by hand.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_repo() -> None:
    sys.path.insert(0, str(ROOT))
    import tspeft_rt

    for name in ("kernels", "serve"):
        if importlib.util.find_spec(f"tspeft_rt.{name}") is None:
            spec = importlib.util.spec_from_file_location(f"tspeft_rt.{name}", ROOT / name / "__init__.py",
                                                          submodule_search_locations=[str(ROOT / name)])
            module = importlib.util.module_from_spec(spec)
            sys.modules[f"tspeft_rt.{name}"] = module
            spec.loader.exec_module(module)
            setattr(tspeft_rt, name, module)
