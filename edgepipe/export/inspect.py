"""Check a Hugging Face model folder before any heavy work, with one-line errors that say how to fix it."""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepipe.errors import ModelError, cannot_read

_WEIGHT_SUFFIXES = (".safetensors",)
_KEY_ALIASES = {"hidden_size": ("n_embd",), "num_hidden_layers": ("n_layer",), "num_attention_heads": ("n_head",)}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json",
)


@dataclass(frozen=True)
class TensorHeader:
    """One tensor as a safetensors header declares it."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    count: int


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    architecture: str
    config: dict[str, Any]
    weight_files: tuple[Path, ...]
    num_parameters: int
    weight_bytes: int
    sha256: str  # over config, weights and tokenizer, in a fixed order
    tensors: dict[str, TensorHeader] = field(default_factory=dict, compare=False, repr=False)  # as the headers declare them

    @property
    def num_layers(self) -> int:
        return int(self.config.get("num_hidden_layers", 0))


# float dtypes of safetensors -> (numpy view dtype, exponent mask): all exponent bits set = NaN or Inf
_FLOAT_DTYPES = {"F64": ("<u8", 0x7FF0000000000000), "F32": ("<u4", 0x7F800000), "F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80)}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def _check_finite(path: Path, start: int, tensors: list[tuple[str, str, int, int]]) -> None:
    """Refuse NaN or Inf weights: they export fine and then produce garbage on every device."""
    import numpy as np

    data = np.memmap(path, dtype=np.uint8, mode="r")
    try:
        for name, dtype, lo, hi in tensors:
            if dtype not in _FLOAT_DTYPES or hi <= lo:
                continue
            view, mask = _FLOAT_DTYPES[dtype]
            size = np.dtype(view).itemsize
            raw = data[start + lo: start + hi]
            chunk = 1 << 24
            for off in range(0, len(raw) - len(raw) % size, chunk):
                part = np.asarray(raw[off: off + chunk]).view(view)
                if np.any((part & np.array(mask, dtype=view)) == mask):
                    raise ModelError(
                        f"{path.name}: tensor {name!r} holds NaN or Inf values; the checkpoint is broken, re-train or re-save it"
                    )
    finally:
        del data


def _read_safetensors_header(path: Path, size: int) -> tuple[int, dict[str, Any]]:
    """(header length, header) of a safetensors file, refusing truncated or absurd headers."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a header")
            (n,) = struct.unpack("<Q", head)
            if n <= 0 or n > min(size - 8, 100 << 20):
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
    except RecursionError:
        raise ModelError(f"{path.name} has a safetensors header nested too deeply; re-save the model") from None
    except OSError as e:
        raise ModelError(cannot_read("weights file", path, e)) from None
    except ValueError as e:
        raise ModelError(f"{path.name} is not a readable safetensors file ({e}); re-download or re-save the model") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path.name} has a malformed safetensors header; re-save the model")
    return n, header


def _tensor_entry(path: Path, name: str, t: Any) -> tuple[str, int, int, tuple[int, ...]]:
    """(dtype, first byte, end byte, shape) of one header entry, checked against its shape."""
    try:
        lo, hi = (int(v) for v in t["data_offsets"])
        dtype = str(t["dtype"])
        if len(t["shape"]) > 8:
            raise ValueError("too many dimensions")
        shape = tuple(int(d) for d in t["shape"] if not isinstance(d, bool))
        if len(shape) != len(t["shape"]) or any(d < 0 for d in shape):
            raise ValueError("negative dimension")
        count = math.prod(shape)
        if lo < 0 or hi < lo or (dtype in _ITEMSIZE and hi - lo != count * _ITEMSIZE[dtype]):
            raise ValueError("offsets do not match the shape")
    except (KeyError, TypeError, ValueError, OverflowError):
        raise ModelError(f"{path.name}: tensor {name!r} has a malformed header entry; re-save the model") from None
    return dtype, lo, hi, shape


def _check_safetensors(path: Path) -> dict[str, TensorHeader]:
    """Parse the header; catch truncated or corrupt files cheaply. Return its tensors."""
    size = path.stat().st_size
    n, header = _read_safetensors_header(path, size)
    end = 0
    tensors, found = [], {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        dtype, lo, hi, shape = _tensor_entry(path, name, t)
        end = max(end, hi)
        found[name] = TensorHeader(path.name, dtype, shape, math.prod(shape))
        tensors.append((name, dtype, lo, hi))
    if 8 + n + end != size:
        raise ModelError(
            f"{path.name} is truncated or padded ({size} bytes, header says {8 + n + end}); re-download or re-save the model"
        )
    _check_finite(path, 8 + n, tensors)
    return found


def _all_tensors(weights: list[Path], index: dict[str, str] | None) -> dict[str, TensorHeader]:
    """Every tensor of the checkpoint; a name in two files, or where the index does not put it, is refused."""
    tensors: dict[str, TensorHeader] = {}
    for w in weights:
        for name, t in _check_safetensors(w).items():
            if name in tensors:
                raise ModelError(f"tensor {name!r} is in both {tensors[name].file} and {w.name}; re-save the model")
            tensors[name] = t
    for name, shard in (index or {}).items():
        if name not in tensors or tensors[name].file != shard:
            raise ModelError(f"model.safetensors.index.json puts tensor {name!r} in {shard}, which does not hold it; re-save the model")
    return tensors


def check_weights(info: ModelInfo) -> None:
    """:func:`check_tensors` on an inspected model (run after the cheaper fit check of the target)."""
    check_tensors(info.config, info.tensors)


def check_tensors(config: dict[str, Any], tensors: dict[str, TensorHeader]) -> None:
    """Every tensor the config implies present, of its shape and a floating dtype, and nothing else:
    transformers would initialise a missing one at random (and the fp32 reference with it), and
    silently drop an unexpected one. Architectures without a checkpoint table get the dtype check."""
    from edgepipe.quantize.architectures import CKPT_IGNORED_SUFFIXES, checkpoint_tensors

    _check_dtypes(tensors, CKPT_IGNORED_SUFFIXES)
    table = checkpoint_tensors(config)
    if table is not None:
        _check_required(config, tensors, table[0])
        _check_unexpected(config, tensors, *table)


def _check_dtypes(tensors: dict[str, TensorHeader], ignored_suffixes: tuple[str, ...]) -> None:
    for name, t in tensors.items():
        if t.dtype not in _FLOAT_DTYPES and not name.endswith(ignored_suffixes):
            raise ModelError(f"tensor {name!r} is stored as {t.dtype}, not a float; the checkpoint is a broken conversion, re-save it in fp32/fp16/bf16")


# integer buffers an encoder checkpoint may carry (BERT's position ids), not weights
ENCODER_BUFFERS = (".position_ids", ".token_type_ids")


def check_encoder_weights(model_dir: Path) -> None:
    """An encoder folder's safetensors, as :func:`inspect_model` checks a decoder's: headers, sizes,
    index, finite values, and a float dtype for every weight (the per-architecture shape tables are
    the decoders'; what transformers would initialise is caught when it loads the checkpoint). A folder
    with PyTorch ``.bin`` weights only is left to that load."""
    from edgepipe.quantize.architectures import CKPT_IGNORED_SUFFIXES

    model_dir = Path(model_dir)
    if not any(model_dir.glob("*.safetensors")) and not (model_dir / "model.safetensors.index.json").is_file():
        return
    weights, weight_map = _weight_files(model_dir)
    _check_dtypes(_all_tensors(weights, weight_map), CKPT_IGNORED_SUFFIXES + ENCODER_BUFFERS)


def _check_required(config: dict[str, Any], tensors: dict[str, TensorHeader], required: dict[str, tuple[int, ...]]) -> None:
    for name, shape in required.items():
        if name not in tensors:
            raise ModelError(f"tensor {name!r} is missing from the safetensors (config.json implies it: "
                             f"num_hidden_layers={config.get('num_hidden_layers')}, tie_word_embeddings={config.get('tie_word_embeddings')}); "
                             "pass the complete checkpoint or fix config.json")
        if tensors[name].shape != shape:
            raise ModelError(f"tensor {name!r} has shape {list(tensors[name].shape)} but config.json implies {list(shape)}; "
                             "the config does not belong to these weights")


def _check_unexpected(
    config: dict[str, Any], tensors: dict[str, TensorHeader], required: dict[str, tuple[int, ...]], optional: set[str]
) -> None:
    from edgepipe.quantize.architectures import CKPT_IGNORED_SUFFIXES

    for name, t in tensors.items():
        if name in optional:
            if t.shape != (int(config["vocab_size"]), int(config["hidden_size"])):
                raise ModelError(f"tensor {name!r} has shape {list(t.shape)}; config.json implies [vocab_size, hidden_size]")
        elif name not in required and not name.endswith(CKPT_IGNORED_SUFFIXES):
            raise ModelError(f"tensor {name!r} is not part of a {config['architectures'][0]} with this config.json; "
                             "the config does not belong to these weights (check num_hidden_layers and the architecture)")


def hash_files(paths: list[Path]) -> str:
    """sha256 over each file's name and bytes, in the given order: a model folder's content key."""
    h = hashlib.sha256()
    for p in paths:
        _regular(p)
        h.update(p.name.encode() + b"\0")
        try:
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        except OSError as e:
            raise ModelError(cannot_read("model file", p, e)) from None
    return h.hexdigest()


def _regular(path: Path) -> None:
    """Refuse a folder, FIFO or device where a model file belongs (a FIFO blocks the reader for good)."""
    if path.exists() and not path.is_file():
        raise ModelError(f"{path} is not a regular file (a folder, a pipe or a device); put the model's file there")


def _read_json(path: Path, fix: str) -> Any:
    """A small JSON file of a model folder, bounded in size and depth."""
    try:
        if path.stat().st_size > MAX_INDEX_BYTES:
            raise ValueError("too large")
        return json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise ModelError(f"{path} is nested too deeply; {fix}") from None
    except OSError as e:
        raise ModelError(cannot_read("model file", path, e)) from None
    except (UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"{path} is not valid JSON ({type(e).__name__}); {fix}") from None


def _read_config(path: Path, supported: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """``config.json`` of a model folder, its shape fields checked: (config, architecture)."""
    if not path.exists():
        raise ModelError(f"model folder {path} does not exist; pass --model with a Hugging Face model folder")
    if not path.is_dir():
        raise ModelError(f"{path} is a file; pass --model with a Hugging Face model folder (config.json + *.safetensors + tokenizer.json)")
    cfg_path = path / "config.json"
    _regular(cfg_path)
    if not cfg_path.is_file():
        raise ModelError(f"{path} has no config.json; it is not a Hugging Face model folder (save it with save_pretrained)")
    config = _read_json(cfg_path, "re-save the model's config")
    if not isinstance(config, dict):
        raise ModelError(f"{cfg_path} must hold a JSON object; re-save the model's config")
    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise ModelError(f"{cfg_path} has no 'architectures' list; re-save the model with save_pretrained")
    arch = archs[0]
    if arch not in supported:
        raise ModelError(f"architecture {arch} is not supported; supported: {', '.join(sorted(supported))}")
    required = ("hidden_size", "num_hidden_layers", "vocab_size")
    optional = ("num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size", "max_position_embeddings")
    for key in required + optional:
        # GPT-2 style configs (routed to the generic exporter by the preflight) spell a few keys their own way
        v = next((config.get(k) for k in (key, *_KEY_ALIASES.get(key, ())) if config.get(k) is not None), None)
        if (key in required or v is not None) and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ModelError(f"{cfg_path}: {key} must be a positive integer, got {v!r}; fix the config")
    return config, arch


MAX_INDEX_BYTES = 64 << 20  # an index maps tensor names to file names: far larger is not one


def _read_index(index: Path) -> dict[str, str]:
    """``weight_map`` of a sharded checkpoint's index: tensor name -> plain file name in the folder."""
    doc = _read_json(index, "re-save the model")
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelError(f"{index} is malformed (no weight_map object); re-save the model")
    for name, shard in weight_map.items():
        bad = not isinstance(shard, str) or not shard.endswith(_WEIGHT_SUFFIXES)
        if bad or Path(shard).name != shard or "\\" in shard:
            raise ModelError(f"{index.name} maps tensor {str(name)[:100]!r} to {str(shard)[:100]!r}, "
                             "not a safetensors file inside the model folder; re-save the model")
    return weight_map


def _weight_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a folder and its index's weight map: the shards the index names (plain
    file names in the folder; they may be symlinks, as in a Hugging Face hub snapshot), or every
    ``*.safetensors``."""
    index = path / "model.safetensors.index.json"
    weight_map = None
    if index.is_file():
        weight_map = _read_index(index)
        weights = [path / n for n in sorted(set(weight_map.values()))]
        missing = [w.name for w in weights if not w.is_file()]
        if missing:
            raise ModelError(f"{path} is missing weight shard {missing[0]} listed in {index.name}; finish the download")
    else:
        weights = sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
    for w in weights:
        _regular(w)
    if not weights:
        bins = list(path.glob("*.bin"))
        hint = " (only PyTorch .bin files: re-save with save_pretrained(safe_serialization=True))" if bins else ""
        raise ModelError(f"{path} has no *.safetensors weights{hint}; pass a complete model folder")
    return weights, weight_map


def _check_tokenizer(path: Path, vocab_size: int) -> None:
    _regular(path / "tokenizer.json")
    if not (path / "tokenizer.json").is_file():
        raise ModelError(
            f"{path} has no tokenizer.json; save the tokenizer into the folder (AutoTokenizer.from_pretrained(...).save_pretrained(folder))"
        )
    try:
        with open(path / "tokenizer.json", "rb") as f:
            f.read(1)
    except OSError as e:
        raise ModelError(cannot_read("tokenizer file", path / "tokenizer.json", e)) from None
    try:
        from tokenizers import Tokenizer

        tok_vocab = Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    except Exception as e:  # the tokenizers library raises plain Exceptions
        raise ModelError(
            f"{path / 'tokenizer.json'} cannot be read by tokenizers ({str(e).splitlines()[0][:150] if str(e) else type(e).__name__}); "
            "re-save the tokenizer"
        ) from None
    if tok_vocab > vocab_size:
        raise ModelError(
            f"tokenizer.json has {tok_vocab} tokens but config.json vocab_size is {vocab_size}; "
            "the tokenizer does not belong to this model"
        )


def inspect_model(path: Path | str, supported: dict[str, Any] | None = None) -> ModelInfo:
    """Validate a model folder: config, architecture, weight files (headers, sizes, finite values),
    tokenizer. :func:`check_weights` then checks the tensors against what the config implies."""
    from edgepipe.export.genai_builder import SUPPORTED_ARCHITECTURES

    path = Path(path)
    config, arch = _read_config(path, SUPPORTED_ARCHITECTURES if supported is None else supported)
    weights, weight_map = _weight_files(path)
    tensors = _all_tensors(weights, weight_map)
    params = sum(t.count for t in tensors.values())
    _check_tokenizer(path, config["vocab_size"])
    hashed = [path / "config.json", *weights] + [path / n for n in TOKENIZER_FILES if (path / n).is_file()]
    return ModelInfo(
        path=path.resolve(),
        architecture=arch,
        config=config,
        weight_files=tuple(weights),
        num_parameters=params,
        weight_bytes=sum(w.stat().st_size for w in weights),
        sha256=hash_files(hashed),
        tensors=tensors,
    )
