"""Calibration and evaluation text: the shipped KJV corpus or the user's .txt / .jsonl / dataset folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # torch loads in the functions that make tensors: the CLI reads DEFAULT_DATASET without it
    import torch

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DEFAULT_DATASET = "kjv"
SHIPPED_FILES = {"calib": DATA_DIR / "kjv_calib.txt", "heldout": DATA_DIR / "kjv_heldout.txt"}
HUB_DATASETS = ("wikitext2", "c4", "ptb", "pileval", "gsm8k", "neuralmagic_calibration", "open-platypus")
_FOLDER_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet", ".arrow")


class TextEncoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


def load_text(dataset: str | None, split: str) -> str:
    """All text of a dataset: `kjv` (shipped; split 'calib' or 'heldout'), a file or a folder.

    A user's file is used whole for either split: keep calibration and evaluation files apart yourself.
    """
    if dataset in (None, DEFAULT_DATASET):
        return SHIPPED_FILES[split].read_text(encoding="utf-8")
    path = Path(dataset)
    if not path.exists():
        hint = (
            f" ({dataset!r} is a hub dataset; nothing is downloaded here)" if dataset in HUB_DATASETS else ""
        )
        raise FileNotFoundError(
            f"calibration/evaluation dataset {dataset!r} not found{hint}; give '{DEFAULT_DATASET}' "
            "(shipped), a .txt file, a .jsonl file with a 'text' field, or a local HF dataset folder"
        )
    texts = _read_folder(path) if path.is_dir() else _read_file(path)
    text = "\n\n".join(t for t in texts if t.strip())
    if not text.strip():
        raise ValueError(f"dataset {dataset!r} contains no text")
    return text


def _read_file(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(path)
    if suffix in (".parquet", ".arrow"):
        return _read_table(path)
    raise ValueError(
        f"dataset file {str(path)!r} has an unsupported type {suffix!r}; use .txt, .jsonl, .parquet or .arrow"
    )


def _read_jsonl(path: Path) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{number}: each JSON line needs a string 'text' field")
            texts.append(record["text"])
    return texts


def _read_table(path: Path) -> list[str]:
    try:
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError as error:
        raise ValueError(
            f"reading {path.name} needs pyarrow (pip install pyarrow), or convert it to .jsonl"
        ) from error
    if path.suffix.lower() == ".parquet":
        table = pyarrow.parquet.read_table(path)
    else:
        table = _read_arrow(path)
    if "text" not in table.column_names:
        raise ValueError(f"{path} has no 'text' column (columns: {table.column_names})")
    return [t for t in table.column("text").to_pylist() if isinstance(t, str)]


def _read_arrow(path: Path):  # type: ignore[no-untyped-def]
    import pyarrow.ipc

    with path.open("rb") as source:
        try:
            return pyarrow.ipc.open_stream(source).read_all()  # what `datasets` save_to_disk writes
        except Exception:
            source.seek(0)
            return pyarrow.ipc.open_file(source).read_all()


def _read_folder(path: Path) -> list[str]:
    """A local HF dataset folder: its train split if one is named, else every data file in it."""
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in _FOLDER_SUFFIXES and p.is_file())
    files = [p for p in files if p.name not in ("dataset_info.json", "state.json", "dataset_dict.json")]
    train = [p for p in files if "train" in p.relative_to(path).as_posix()]
    chosen = train or files
    if not chosen:
        raise ValueError(f"dataset folder {str(path)!r} holds no .jsonl, .txt, .parquet or .arrow files")
    return [text for file in chosen for text in _read_file(file)]


def calibration_samples(
    tokenizer: TextEncoder, dataset: str | None, num_samples: int, seqlen: int, seed: int = 0
) -> torch.Tensor:
    """[num_samples, seqlen] token windows at random offsets of the tokenized text (LMDeploy's way).

    Windows may overlap when the text is shorter than num_samples x seqlen tokens.
    """
    if num_samples < 1 or seqlen < 2:
        raise ValueError(f"{num_samples=} must be >= 1 and {seqlen=} >= 2")
    import torch

    ids = torch.tensor(tokenizer.encode(load_text(dataset, "calib")), dtype=torch.long)
    if len(ids) <= seqlen:
        raise ValueError(f"calibration text has {len(ids)} tokens; calib_seqlen={seqlen} needs more")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seqlen, (num_samples,), generator=generator)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def evaluation_tokens(tokenizer: TextEncoder, dataset: str | None, num_tokens: int) -> torch.Tensor:
    """The first num_tokens tokens of the held-out text; ValueError when it is shorter."""
    ids = tokenizer.encode(load_text(dataset, "heldout"))
    if len(ids) < num_tokens:
        raise ValueError(f"evaluation text has {len(ids)} tokens, fewer than num_tokens={num_tokens}")
    import torch

    return torch.tensor(ids[:num_tokens], dtype=torch.long)
