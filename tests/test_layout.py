"""The package's shape: the public API is light, and the layer contracts hold."""

from __future__ import annotations

import subprocess
import sys

from tests.paths import REPO

HEAVY = ("flwr", "cryptography", "grpc", "simulations", "coordinator", "site_client",
         "fastapi", "uvicorn", "starlette", "prometheus_client")


def test_public_api_loads_neither_flower_nor_cryptography() -> None:
    code = (
        "import sys, fediim\n"
        "from fediim import IIMImputer, FederatedIIM\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_import_contracts_hold() -> None:
    """The layers of DESIGN.md §4, as declared in pyproject.toml (also run by `make test`)."""
    lint = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command;"
            " sys.exit(lint_imports_command())"]
    out = subprocess.run(lint, capture_output=True, text=True, check=False, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr


def test_only_fediim_serve_loads_the_web_stack() -> None:
    """Every other command starts without FastAPI, uvicorn or prometheus-client."""
    web = ("fastapi", "uvicorn", "starlette", "prometheus_client")
    code = ("import sys, fediim.cli, fediim.serve.site\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({web!r})))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_the_site_app_loads_the_engine_only_in_the_round_that_imputes() -> None:
    """Flower starts a new ClientApp process for every message: the handshake, release and
    secure-sum rounds must not pay for scikit-learn, scipy or pandas (seconds per process
    on a busy site), and the estimators stay importable from the package."""
    engine = ("sklearn", "scipy", "pandas")
    code = ("import sys, site_client.app\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({engine!r})))\n"
            "from fediim import IIMImputer, FederatedIIM, knn_imputer, ImputationResult\n"
            "from fediim.federated import site_impute\n"
            "from fediim.impute import glr_imputer\n"
            "print('sklearn' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO)
    assert out.stdout.split() == ["[]", "True"]
