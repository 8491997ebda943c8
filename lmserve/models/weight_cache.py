"""Weight cache: a GGUF model's prepared CPU tensors (dense, int4 repack, int8 lm_head) saved once, read on later starts."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmserve.kernels import cpu_native
from lmserve.models.loader import ModelSource

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 2
"""Bump when what load_weights derives changes (dequantization, int4/int8 packing, parameter layout)."""

DISABLE_ENV = "LMSERVE_NO_WEIGHT_CACHE"
_ATTRIBUTE_MARK = "@"  # "qkv_proj@q4.0": element 0 of the module's `q4` tuple, not a state-dict entry


@dataclass(frozen=True)
class WeightCacheKey:
    """Everything the cached tensors depend on; any change gives another entry (the old one is removed)."""

    checkpoint: str
    size: int
    mtime_ns: int
    dtype: str
    model_config: str
    torch_version: str
    cpu_4bit_layout: str
    """Which few-row 4-bit layout the linears keep: kernels/cpu_native.py's LAYOUT for its C kernel, or "torch"."""
    format_version: int = CACHE_FORMAT_VERSION

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:24]


def weight_cache_dir() -> Path:
    """$LMSERVE_CACHE_DIR/weights, else ~/.cache/lmserve/weights."""
    root = os.environ.get("LMSERVE_CACHE_DIR") or Path.home() / ".cache" / "lmserve"
    return Path(root) / "weights"


def weight_cache_enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "") in ("", "0")


@dataclass(frozen=True)
class WeightCache:
    """The cache entry of one (checkpoint file, dtype, model config, torch) combination."""

    key: WeightCacheKey
    path: Path

    def load_into(self, model: nn.Module) -> bool:
        """Fill `model` from the entry; False (and the model untouched) when there is none or it is stale."""
        wait_for_writes()  # an entry this process is still writing
        if not self.path.is_file():
            return False
        try:
            # memory-mapped (decode from it measured as fast as from a fresh build); never rewritten in place
            tensors = load_file(self.path)
            stored_key = _stored_key(self.path)
        except Exception as error:  # a truncated or foreign file: rebuild it
            logger.warning("weight cache %s unreadable (%s); rebuilding it", self.path, error)
            return False
        if stored_key != asdict(self.key) or not _fits(model, tensors):
            return False
        _restore(model, tensors)
        return True

    def save(self, model: nn.Module) -> None:
        """Write the entry atomically and drop older entries of the same checkpoint; failures only warn.

        The file is written by a thread while the engine starts serving: the entry is for the next start, and
        writing ~0.4 GB took ~1 s of a first start (safetensors releases the GIL while it writes). The tensors
        are final once loaded (nothing writes to them); the thread is not a daemon, so a process that exits
        first waits for it, and a reader in this process waits too (load_into). An interrupted write leaves
        no entry, never a partial one."""
        tensors = _collect(model)
        writer = threading.Thread(target=self._write, args=(tensors,), name="lmserve-weight-cache")
        with _writers_lock:
            _writers.append(writer)
        writer.start()

    def _write(self, tensors: dict[str, torch.Tensor]) -> None:
        # the entry is for the next start: on a busy 2-core box this start's loading gets the CPU first
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomically(tensors, self.path, {"key": json.dumps(asdict(self.key))})
        except (OSError, RuntimeError, ValueError) as error:
            logger.warning("could not write the weight cache %s: %s", self.path, error)
            return
        self._remove_older_entries()

    def _remove_older_entries(self) -> None:
        prefix = self.path.name.split("-")[0]
        for other in self.path.parent.glob(f"{prefix}-*.safetensors"):
            if other != self.path:
                other.unlink(missing_ok=True)
        for leftover in self.path.parent.glob(".*.tmp"):  # of a process killed while writing, an hour ago
            with contextlib.suppress(OSError):
                if time.time() - leftover.stat().st_mtime > 3600:
                    leftover.unlink()


WRITER_NICE = 10
"""The writer thread's niceness (Linux priorities are per thread)."""
_writers: list[threading.Thread] = []
_writers_lock = threading.Lock()


def wait_for_writes() -> None:
    """Until every entry this process started writing is on disk (or failed)."""
    with _writers_lock:
        writers = list(_writers)
        _writers.clear()
    for writer in writers:
        writer.join()


def weight_cache_for(
    source: ModelSource, model_config: Any, dtype: torch.dtype, device: torch.device
) -> WeightCache | None:
    """The cache entry for a GGUF checkpoint loaded in bfloat16 on the CPU; None when it does not apply or is off.

    Only that case is cached: its tensors are dequantized and repacked (int4, int8) at every load, ~10x the time
    of reading the entry; float32 runs only dequantize, and safetensors folders are already read by memory map.
    """
    if source.kind != "gguf" or device.type != "cpu" or dtype != torch.bfloat16 or not weight_cache_enabled():
        return None
    if _is_sharded():
        return None  # each rank holds another shard under the same names and shapes: one entry would not do
    checkpoint = source.gguf_path.resolve()
    stat = checkpoint.stat()
    key = WeightCacheKey(
        checkpoint=str(checkpoint),
        size=stat.st_size,
        mtime_ns=stat.st_mtime_ns,
        dtype=str(dtype),
        model_config=repr(model_config),
        torch_version=torch.__version__,
        cpu_4bit_layout=cpu_native.LAYOUT if cpu_native.kernel_available() else "torch",
    )
    # entries of the same checkpoint, dtype and config share the prefix; a newer file state replaces the older
    model = hashlib.sha256(f"{checkpoint}:{dtype}:{model_config!r}".encode()).hexdigest()[:16]
    return WeightCache(key, weight_cache_dir() / f"{model}-{key.digest()}.safetensors")


def _write_atomically(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """A reader sees the old entry or the whole new one, never a partial file (concurrent starts included)."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".", suffix=".tmp", delete=False) as tmp:
        temp_path = Path(tmp.name)
    try:
        save_file(tensors, temp_path, metadata=metadata)
        os.replace(temp_path, path)
    finally:
        temp_path.unlink(missing_ok=True)


def _is_sharded() -> bool:
    """Whether this process is one of several tensor-parallel ranks (torch.distributed with world size > 1)."""
    distributed = torch.distributed
    return bool(
        distributed.is_available() and distributed.is_initialized() and distributed.get_world_size() > 1
    )


def _stored_key(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
    return dict(json.loads(metadata.get("key", "{}")))


def _collect(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict plus the derived tensor tuples modules keep as plain attributes (Linear.q4 / int4, lm_head_int8)."""
    tensors = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    for module_name, module in model.named_modules():
        for attribute, value in _tensor_tuples(module):
            for index, tensor in enumerate(value):
                tensors[f"{module_name}{_ATTRIBUTE_MARK}{attribute}.{index}"] = tensor.contiguous()
    return tensors


def _tensor_tuples(module: nn.Module) -> list[tuple[str, tuple[torch.Tensor, ...]]]:
    return [
        (name, value)
        for name, value in vars(module).items()
        if isinstance(value, tuple) and value and all(isinstance(item, torch.Tensor) for item in value)
    ]


def _fits(model: nn.Module, tensors: dict[str, torch.Tensor]) -> bool:
    """Whether the entry holds exactly the model's state-dict names, shapes and dtypes."""
    expected = model.state_dict()
    stored = {name: tensor for name, tensor in tensors.items() if _ATTRIBUTE_MARK not in name}
    return stored.keys() == expected.keys() and all(
        stored[name].shape == tensor.shape and stored[name].dtype == tensor.dtype
        for name, tensor in expected.items()
    )


def _restore(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    state = {name: tensor for name, tensor in tensors.items() if _ATTRIBUTE_MARK not in name}
    model.load_state_dict(state, strict=True, assign=True)
    attributes: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        if _ATTRIBUTE_MARK in name:
            module_name, _, rest = name.partition(_ATTRIBUTE_MARK)
            attribute, _, index = rest.rpartition(".")
            attributes.setdefault((module_name, attribute), {})[int(index)] = tensor
    for (module_name, attribute), items in attributes.items():
        setattr(model.get_submodule(module_name), attribute, tuple(items[i] for i in range(len(items))))
