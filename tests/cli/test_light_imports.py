"""`import lmserve`, the API client and the CLI's parser load no torch; the engine loads it on first use."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    """A fresh interpreter (this one has torch loaded already), importing this checkout's lmserve."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=REPO_ROOT
    )


def test_package_client_and_cli_parser_import_no_torch() -> None:
    result = run_python(
        "import sys, lmserve, lmserve.serve.client, lmserve.cli.main\n"
        "lmserve.cli.main.build_parser()\n"
        "from lmserve import EngineConfig, GenerationConfig, ServeConfig, pipeline\n"
        "loaded = sorted(name for name in sys.modules if name == 'torch' or name.startswith('torch.'))\n"
        "assert not loaded, loaded[:5]\n"
    )
    assert result.returncode == 0, result.stderr


def test_api_client_help_imports_no_torch() -> None:
    result = run_python(
        "import sys\n"
        "from lmserve.cli.main import main\n"
        "try:\n"
        "    main(['serve', 'api_client', '--help'])\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        "assert 'torch' not in sys.modules\n"
    )
    assert result.returncode == 0, result.stderr
    assert "usage: lmserve serve api_client" in result.stdout


def test_pipeline_stays_the_function_after_the_submodule_is_imported() -> None:
    # lmserve.pipeline is also a module: importing it must not shadow the package's function
    result = run_python(
        "import sys\n"
        "from lmserve.pipeline import Pipeline\n"
        "import lmserve\n"
        "from lmserve import pipeline\n"
        "assert callable(pipeline) and lmserve.pipeline is pipeline, pipeline\n"
        "assert lmserve.Pipeline is Pipeline and 'torch' in sys.modules\n"
    )
    assert result.returncode == 0, result.stderr
