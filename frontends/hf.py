"""Open a Hugging Face checkpoint (safetensors only) as a validated `Checkpoint`.

Accepted paths: a model directory, one `.safetensors` file (config.json beside
it), or a sharded `model.safetensors.index.json`. Every file read must resolve
inside the model directory (THREATS 13): `..`, absolute shard names and
symlinks that point elsewhere are refused. The one exception is the HF hub
cache, whose `snapshots/<rev>/` files are symlinks into the repo's `blobs/`.

Pickle files (`.bin`, `.pt`, ...) are never opened, and no Python file of the
model directory is ever imported: `auto_map` is ignored, the architecture
registry decides (THREATS 10, 14).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelFormatError
from .checkpoint import Checkpoint, TokenizerFiles
from .config import ModelConfig
from .safetensors_io import FLOAT_DTYPES, SafetensorsFile, open_regular_file, parse_json

MAX_CONFIG_BYTES = 10 * 1024 * 1024
MAX_INDEX_BYTES = 50 * 1024 * 1024
MAX_TOKENIZER_BYTES = 50 * 1024 * 1024
MAX_TEMPLATE_BYTES = 10 * 1024 * 1024

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class _ModelDir:
    """The model directory and the roots that files read from it may resolve into."""

    def __init__(self, directory: Path):
        self.dir = directory
        try:
            self.root = directory.resolve(strict=True)
        except (OSError, RuntimeError) as e:
            raise ModelFormatError(f"{directory}: cannot resolve model directory: {e}") from None
        self.roots = [self.root]
        # HF hub cache: models--org--name/snapshots/<rev>/file -> ../../blobs/<sha>
        blobs = self.root.parent.parent / "blobs"
        if self.root.parent.name == "snapshots" and blobs.is_dir():
            self.roots.append(blobs.resolve())

    def file(self, name: str, *, label: str | None = None) -> Path:
        """`dir/name`, after checking that it resolves inside the model directory."""
        path = self.dir / name
        shown = label or str(path)
        try:
            target = path.resolve(strict=True)
        except FileNotFoundError:
            raise ModelFormatError(f"{shown}: no such file") from None
        except (OSError, RuntimeError) as e:  # symlink loops, permissions
            raise ModelFormatError(f"{shown}: cannot resolve: {e}") from None
        if not any(target == r or target.is_relative_to(r) for r in self.roots):
            raise ModelFormatError(f"{shown}: resolves to {target}, outside the model directory {self.root}; refusing to read it")
        return path

    def has(self, name: str) -> bool:
        p = self.dir / name
        return p.exists() or p.is_symlink()


def _read_capped(path: Path, cap: int) -> bytes:
    fh, size = open_regular_file(path, str(path))
    with fh:
        if size > cap:
            raise ModelFormatError(f"{path}: file is {size} bytes, over the {cap}-byte limit")
        data = fh.read(cap + 1)
    if len(data) > cap:
        raise ModelFormatError(f"{path}: file grew past the {cap}-byte limit while being read")
    return data


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _read_json_object(path: Path, cap: int, *, strict_keys: bool = True) -> dict:
    hook = _no_duplicates if strict_keys else None
    obj = parse_json(_read_capped(path, cap), str(path), "file", object_pairs_hook=hook, encoding="utf-8-sig")
    if not isinstance(obj, dict):
        raise ModelFormatError(f"{path}: top level must be a JSON object, got {type(obj).__name__}")
    return obj


def _pickle_error(where: Path, pickles: list[str]) -> ModelFormatError:
    listed = ", ".join(pickles[:3]) + (f" (and {len(pickles) - 3} more)" if len(pickles) > 3 else "")
    what = "is a pickle checkpoint" if where.name in pickles else f"holds only pickle checkpoint files ({listed}) and no safetensors"
    return ModelFormatError(
        f"{where}: {what}; kiln does not load pickle checkpoints because unpickling can run arbitrary code. "
        "Convert the model to safetensors first (in a sandbox, e.g. transformers "
        "`from_pretrained(dir).save_pretrained(out, safe_serialization=True)`) and pass the new directory"
    )


def _locate(path: Path) -> tuple[_ModelDir, Path | None, list[str]]:
    """-> (model dir, index file or None, shard file names)."""
    if path.is_dir():
        mdir = _ModelDir(path)
        if mdir.has(INDEX_NAME):
            return mdir, mdir.file(INDEX_NAME), []
        if mdir.has(SINGLE_NAME):
            return mdir, None, [SINGLE_NAME]
        entries = sorted(p.name for p in path.iterdir())
        shards = [n for n in entries if n.endswith(".safetensors")]
        if len(shards) == 1:
            return mdir, None, shards
        if shards:
            raise ModelFormatError(
                f"{path}: several .safetensors files ({', '.join(shards[:4])}) but no {INDEX_NAME}: "
                "pass the index or one file"
            )
        indexes = [n for n in entries if n.endswith(".safetensors.index.json")]
        if len(indexes) == 1:
            return mdir, mdir.file(indexes[0]), []
        pickles = [n for n in entries if n.lower().endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise _pickle_error(path, pickles)
        raise ModelFormatError(f"{path}: no {SINGLE_NAME} or {INDEX_NAME} in this directory")
    name = path.name
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise _pickle_error(path, [name])
    mdir = _ModelDir(path.parent)
    if name.endswith(".index.json"):
        return mdir, mdir.file(name), []
    if name.endswith(".safetensors"):
        mdir.file(name)
        return mdir, None, [name]
    raise ModelFormatError(f"{path}: not a checkpoint: expected a directory, a .safetensors file or a {INDEX_NAME}")


def _shard_name(name: Any, index: Path, tensor: str) -> str:
    """Shard names are plain file names in the model directory: no dirs, no `..`."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or any(c in name for c in ("/", "\\", "\0"))
        or Path(name).is_absolute()
        or Path(name).name != name
    ):
        raise ModelFormatError(f"{index}: weight_map[{tensor!r}] = {name!r} is not a plain file name in the model directory")
    if not name.endswith(".safetensors"):
        raise ModelFormatError(f"{index}: weight_map[{tensor!r}] = {name!r} is not a .safetensors file")
    return name


def _read_index(mdir: _ModelDir, index: Path) -> dict[str, str]:
    """-> tensor name -> shard file name, validated."""
    obj = _read_json_object(index, MAX_INDEX_BYTES)
    weight_map = obj.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelFormatError(f"{index}: field 'weight_map' must be a non-empty object of tensor name -> shard file")
    return {t: _shard_name(s, index, t) for t, s in weight_map.items()}


def _open_shards(mdir: _ModelDir, index: Path | None, shard_names: list[str]) -> tuple[dict[str, SafetensorsFile], dict[str, str]]:
    """-> (shard name -> open file, tensor name -> shard name); every tensor in exactly one shard."""
    weight_map = _read_index(mdir, index) if index is not None else None
    if weight_map is not None:
        shard_names = list(dict.fromkeys(weight_map.values()))
    files: dict[str, SafetensorsFile] = {}
    owner: dict[str, str] = {}
    try:
        for shard in shard_names:
            label = str(mdir.dir / shard)
            if weight_map is not None and not mdir.has(shard):
                first = next(t for t, s in weight_map.items() if s == shard)
                raise ModelFormatError(f"{index}: shard {shard!r} (holding tensor {first!r}) does not exist: {label}")
            f = files[shard] = SafetensorsFile(mdir.file(shard, label=label))
            for t in f.names:
                if t in owner:
                    raise ModelFormatError(f"{label}: tensor {t!r} is also in shard {owner[t]!r}; a tensor must be in exactly one shard")
                owner[t] = shard
                if f.dtype(t) not in FLOAT_DTYPES + ("F8_E4M3",):
                    raise ModelFormatError(f"{label}: tensor {t} has dtype {f.dtype(t)}, supported: {', '.join(FLOAT_DTYPES)}, F8_E4M3")
        if weight_map is not None:
            for t, s in weight_map.items():
                if owner.get(t) != s:
                    where = f"it is in {owner[t]!r}" if t in owner else "no shard has it"
                    raise ModelFormatError(f"{index}: weight_map puts tensor {t!r} in {s!r}, but {where}")
            extra = [t for t in owner if t not in weight_map]
            if extra:
                raise ModelFormatError(f"{mdir.dir / owner[extra[0]]}: tensor {extra[0]!r} is not listed in {index.name}")
    except BaseException:
        for f in files.values():
            f.close()
        raise
    return files, owner


def _token_text(raw: Any, field: str, file: Path) -> str | None:
    if raw is None or isinstance(raw, str):
        return raw
    if isinstance(raw, dict) and isinstance(raw.get("content"), str):
        return raw["content"]
    raise ModelFormatError(f"{file}: field '{field}' must be a string or an object with a string 'content'")


def _chat_template(raw: Any, file: Path) -> str | None:
    if raw is None or isinstance(raw, str):
        return raw
    if isinstance(raw, list):
        for i, item in enumerate(raw):
            if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not isinstance(item.get("template"), str):
                raise ModelFormatError(f"{file}: field 'chat_template[{i}]' must be an object with string 'name' and 'template'")
        named = {item["name"]: item["template"] for item in raw}
        return named.get("default")
    raise ModelFormatError(f"{file}: field 'chat_template' must be a string or a list of {{name, template}}")


def _read_tokenizer(mdir: _ModelDir) -> TokenizerFiles | None:
    if not mdir.has("tokenizer.json"):
        return None
    tok_path = mdir.file("tokenizer.json")
    raw = _read_capped(tok_path, MAX_TOKENIZER_BYTES)
    # Parsed only to reject garbage early; the text itself is what ships.
    if not isinstance(parse_json(raw, str(tok_path), "file", encoding="utf-8-sig"), dict):
        raise ModelFormatError(f"{tok_path}: top level must be a JSON object")
    tok = TokenizerFiles(tokenizer_json=raw.decode("utf-8-sig"))
    if mdir.has("tokenizer_config.json"):
        cfg_path = mdir.file("tokenizer_config.json")
        cfg = _read_json_object(cfg_path, MAX_TOKENIZER_BYTES)
        tok.chat_template = _chat_template(cfg.get("chat_template"), cfg_path)
        tok.bos_token = _token_text(cfg.get("bos_token"), "bos_token", cfg_path)
        tok.eos_token = _token_text(cfg.get("eos_token"), "eos_token", cfg_path)
        add_bos = cfg.get("add_bos_token", False)
        if add_bos is None:
            add_bos = False
        if not isinstance(add_bos, bool):
            raise ModelFormatError(f"{cfg_path}: field 'add_bos_token' must be true or false, got {add_bos!r}")
        tok.add_bos = add_bos
    if mdir.has("chat_template.jinja"):  # newer transformers save it here; it wins
        jinja = mdir.file("chat_template.jinja")
        try:
            tok.chat_template = _read_capped(jinja, MAX_TEMPLATE_BYTES).decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise ModelFormatError(f"{jinja}: not valid UTF-8 (byte {e.start})") from None
    return tok


def open_config_only(path: Path) -> Checkpoint:
    """A Checkpoint with a config and no tensors (`kiln compile --no-weights`):
    `path` is a config.json or a directory holding one; read with the same
    limits and checks as a full checkpoint's config."""
    path = Path(path)
    config_path = path / "config.json" if path.is_dir() else path
    if not config_path.exists():
        raise ModelFormatError(f"{config_path}: no such file")
    config = _read_json_object(config_path, MAX_CONFIG_BYTES)
    ModelConfig.from_dict(config, file=str(config_path))
    return Checkpoint(config=config, tensor_names=[], load=None, tokenizer=None, source=str(config_path), format="config-only")


def open_hf_checkpoint(path: Path) -> Checkpoint:
    """Open an HF safetensors checkpoint, validating every file it reads.

    Raises ModelFormatError (naming the file and the tensor or field) for
    malformed or hostile input; never unpickles and never imports model code.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise ModelFormatError(f"{path}: no such file or directory")
    mdir, index, shard_names = _locate(path)

    config_path = mdir.file("config.json") if mdir.has("config.json") else None
    if config_path is None:
        raise ModelFormatError(f"{mdir.dir / 'config.json'}: no such file (config.json must sit beside the weights)")
    config = _read_json_object(config_path, MAX_CONFIG_BYTES)
    ModelConfig.from_dict(config, file=str(config_path))  # fail early; callers rebuild it from the raw dict

    files, owner = _open_shards(mdir, index, shard_names)
    tokenizer = _read_tokenizer(mdir)
    source = str(path)

    def raw(name: str):
        shard = owner.get(name)
        if shard is None:
            raise ModelFormatError(f"{source}: no tensor named {name!r}")
        return files[shard].load(name)

    dtypes = {t: files[s].dtype(t) for t, s in owner.items()}
    load, names = _fp8_blocks(config, raw, dtypes, source)
    return Checkpoint(
        config=config,
        tensor_names=names,
        load=load,
        tokenizer=tokenizer,
        source=source,
        format="safetensors",
        tensor_dtypes={t: dtypes[t] for t in names},
    )


SCALE_SUFFIX = "_scale_inv"


def _fp8_blocks(config: dict, raw, dtypes: dict, source: str):
    """-> (load, tensor names) of the checkpoint as float weights. DeepSeek-V3 ships its matrices as
    fp8 e4m3 (`quantization_config`: quant_method fp8, weight_block_size [bm, bn]) with one float
    scale per bm x bn block in `X.weight_scale_inv  # [ceil(rows / bm), ceil(cols / bn)]`:
    W = codes x scale of their block. kiln dequantizes them here, in float32, so every family
    and every --quant reads float weights; the scale tensors are not tensors of the model."""
    fp8 = [t for t, d in dtypes.items() if d == "F8_E4M3"]
    if not fp8:
        return raw, list(dtypes)
    q = config.get("quantization_config")
    block = q.get("weight_block_size") if isinstance(q, dict) else None
    if not (isinstance(q, dict) and q.get("quant_method") == "fp8" and isinstance(block, list) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= 1 << 16 for b in block)):
        raise ModelFormatError(f"{source}: tensor {fp8[0]} is fp8 (F8_E4M3) but config.json's quantization_config is not "
                               f"quant_method fp8 with weight_block_size [rows, cols]")
    bm, bn = block
    for t in fp8:
        if t + SCALE_SUFFIX not in dtypes:
            raise ModelFormatError(f"{source}: fp8 tensor {t} has no {t + SCALE_SUFFIX}")
    scales = {t + SCALE_SUFFIX for t in fp8}
    orphans = [t for t in dtypes if t.endswith(SCALE_SUFFIX) and t not in scales]
    if orphans:
        raise ModelFormatError(f"{source}: tensor {orphans[0]} scales no fp8 tensor")

    def load(name: str):
        arr = raw(name)
        if dtypes.get(name) != "F8_E4M3":
            return arr
        if arr.ndim != 2:
            raise ModelFormatError(f"{source}: fp8 tensor {name} has shape {list(arr.shape)}; block scales need a matrix")
        sc = np.asarray(raw(name + SCALE_SUFFIX), dtype=np.float32)
        rows, cols = arr.shape
        want = (-(-rows // bm), -(-cols // bn))
        if sc.shape != want:
            raise ModelFormatError(f"{source}: tensor {name + SCALE_SUFFIX} has shape {list(sc.shape)}, expected {list(want)} "
                                   f"for {list(arr.shape)} in blocks of {bm} x {bn}")
        if not np.isfinite(sc).all():
            raise ModelFormatError(f"{source}: tensor {name + SCALE_SUFFIX} has NaN/Inf scales")
        full = np.repeat(np.repeat(sc, bm, axis=0), bn, axis=1)[:rows, :cols]
        return arr.astype(np.float32) * full

    return load, [t for t in dtypes if t not in scales]
