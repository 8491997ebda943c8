"""FakeEngine and its tokenizer satisfy the Protocols the server is typed with; serve/ stays torch-free."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from fake_engine import ByteTokenizer, FakeEngine

from lmserve.engine.client import ChatTokenizer, EngineClient

ROOT = Path(__file__).resolve().parents[2]
# engine modules that serve/ may import at run time: the rest pull torch
TORCH_FREE = {"lmserve.engine.client"}


def test_fake_engine_is_an_engine_client_at_run_time() -> None:
    engine = FakeEngine()
    assert isinstance(engine, EngineClient) and isinstance(engine.tokenizer, ChatTokenizer)
    assert not isinstance(object(), EngineClient)


def test_fake_tokenizer_speaks_the_real_tokenizer_interface() -> None:
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode_chat([{"role": "user", "content": "hé"}])
    assert ids == list("<user>hé\n<assistant>".encode())
    assert tokenizer.decode(ids) == "<user>hé\n<assistant>" and len(ids) < tokenizer.vocab_size


def test_mypy_accepts_the_fake_engine_as_an_engine_client() -> None:
    api = pytest.importorskip("mypy.api")
    # fake_engine.py assigns FakeEngine to EngineClient under TYPE_CHECKING (mypy's config skips tests/)
    stdout, stderr, status = api.run([str(ROOT / "tests/serve/fake_engine.py")])
    assert status == 0, stdout + stderr


def _runtime_imports(path: Path) -> set[str]:
    """Modules imported by `path` outside `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text())
    guarded = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
        for node in ast.walk(block)
    }
    modules: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
    return modules


@pytest.mark.parametrize(
    "path",
    [*sorted((ROOT / "lmserve/serve").glob("*.py")), ROOT / "lmserve/engine/client.py"],
    ids=lambda p: p.name,
)
def test_serving_code_imports_no_torch(path: Path) -> None:
    for module in _runtime_imports(path):
        assert module.split(".")[0] != "torch", f"{path.name} imports {module}"
        if module.startswith("lmserve.engine") or module.startswith("lmserve.models"):
            assert module in TORCH_FREE, f"{path.name} imports {module}, which pulls torch"
