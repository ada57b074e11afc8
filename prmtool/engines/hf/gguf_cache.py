"""GGUF models, converted once into a transformers folder that later loads read in a second.

transformers reads a .gguf file by rebuilding its tokenizer and dequantizing every tensor: about
25 seconds for the embedded 135M model on two CPU cores, paid again by every load (each stage
of a recipe, each partition's process). The first load now saves what it built (safetensors in
the dtype it was loaded in, the tokenizer, the chat template) in the model cache, and later
loads read that folder: the same weights bit for bit, the same token ids, about 0.3 seconds.

The cache folder: PRMTOOL_MODEL_CACHE, else PRMTOOL_CACHE_DIR/models, else
~/.cache/prmtool/models (XDG_CACHE_HOME respected). PRMTOOL_MODEL_CACHE=off reads the .gguf file
on every load. Each model gets a folder per dtype, keyed by a hash of the file's bytes and by
transformers' version (a changed file or a new transformers converts again; copies of one file,
in several virtual environments, share one folder); the float32 one (CPU runs, training) takes
about four times a 4-bit file's size, the bfloat16 one (GPU runs) half that. Any of them may be
deleted at any time; one whose files no longer have the sizes it was written with (a file deleted
or cut short) is converted again.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from prmtool.engines.model_files import ModelLocation

SOURCE_FILE = "prmtool-converted-from.json"  # what the folder was built from, for whoever looks


def model_cache_dir() -> Path | None:
    """Where converted models live; None when PRMTOOL_MODEL_CACHE is "off"."""
    chosen = os.environ.get("PRMTOOL_MODEL_CACHE")
    if chosen:
        return None if chosen.lower() == "off" else Path(chosen).expanduser()
    if os.environ.get("PRMTOOL_CACHE_DIR"):
        return Path(os.environ["PRMTOOL_CACHE_DIR"]) / "models"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "prmtool" / "models"


def loadable(location: ModelLocation, dtype: torch.dtype) -> ModelLocation:
    """The location to hand `from_pretrained` for weights in `dtype`: a GGUF file's converted
    folder (converting it now if this is its first load in that dtype), any other location
    unchanged. Where the cache cannot be written
    (a read-only or full disk), the GGUF file itself, as before."""
    root = model_cache_dir()
    if location.gguf_file is None or root is None:
        return location
    gguf = Path(location.path).resolve()
    source = {
        "content": content_key(gguf, root),
        "size": gguf.stat().st_size,
        "transformers": transformers.__version__,
        "dtype": str(dtype).removeprefix("torch."),
    }
    key = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:16]
    source["file"] = str(gguf)  # the copy it was first converted from, for whoever looks
    folder = root / f"{gguf.stem}-{source['dtype']}-{key}"
    if not intact(folder):
        try:
            _convert(location, folder, source, dtype)
        except OSError:
            return location
    return ModelLocation(str(folder))


def content_key(gguf: Path, root: Path) -> str:
    """A hash of the file's bytes, so that copies of one model (the same package in several
    virtual environments) share one converted folder. It is computed once per path, size and
    modification time and remembered under the cache's `digests/` (about 0.2 s for the
    embedded model's file)."""
    import xxhash

    stat = gguf.stat()
    where = json.dumps([str(gguf), stat.st_size, stat.st_mtime_ns])
    memo = root / "digests" / f"{hashlib.sha256(where.encode()).hexdigest()[:16]}.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return json.loads(memo.read_text())["xxh3"]
    hasher = xxhash.xxh3_128()
    with open(gguf, "rb") as handle:
        while chunk := handle.read(1 << 22):
            hasher.update(chunk)
    digest = hasher.hexdigest()
    with contextlib.suppress(OSError):  # a read-only cache: computed again next time
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(json.dumps({"file": str(gguf), "xxh3": digest}))
    return digest


def intact(folder: Path) -> bool:
    """Whether a converted folder is there with every file at the size it was written with."""
    try:
        recorded = json.loads((folder / SOURCE_FILE).read_text())
        return all((folder / name).stat().st_size == size for name, size in recorded["files"].items())
    except (OSError, ValueError, KeyError, AttributeError):
        return False


def _convert(location: ModelLocation, folder: Path, source: dict, dtype: torch.dtype) -> None:
    """Write the converted model into a temporary folder beside `folder`, then rename it into
    place: a reader never sees half a model, and two processes converting at once (partitions
    starting together) both end with the one folder that won the rename."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        _save_converted(location, building, dtype)
        files = {path.name: path.stat().st_size for path in building.iterdir()}
        (building / SOURCE_FILE).write_text(json.dumps(source | {"files": files}, indent=1) + "\n")
        _readable_as_umask_allows(building)
        _move_into_place(building, folder)
    finally:
        shutil.rmtree(building, ignore_errors=True)


def _save_converted(location: ModelLocation, building: Path, dtype: torch.dtype) -> None:
    """The GGUF file loaded by transformers in `dtype`, saved as a plain transformers folder."""
    kwargs = location.from_pretrained_kwargs()
    transformers.utils.logging.disable_progress_bar()
    with contextlib.redirect_stderr(io.StringIO()):  # transformers' GGUF bars are plain tqdm
        tokenizer = AutoTokenizer.from_pretrained(location.folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(location.folder, dtype=dtype, **kwargs)
    # Dequantized on load, it is a plain float model; without the GGUF marks save_pretrained
    # writes it (and later loads do not take it for a quantized one).
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(building)
    tokenizer.save_pretrained(building)


def _move_into_place(building: Path, folder: Path) -> None:
    """Rename `building` to `folder`. A damaged folder there is moved aside first and deleted
    (the cache's own files); if another process's finished copy is there first, that one stays."""
    if intact(folder):
        return
    aside = None
    if folder.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}-damaged-", dir=folder.parent))
        with contextlib.suppress(OSError):  # another process moved it first
            folder.rename(aside / folder.name)
    try:
        building.rename(folder)
    except OSError:
        if not intact(folder):
            raise
    finally:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)


def _readable_as_umask_allows(folder: Path) -> None:
    """mkdtemp (and safetensors) create owner-only files; a cache another user of a shared
    PRMTOOL_MODEL_CACHE reads gets the permissions the umask gives any new file."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)
