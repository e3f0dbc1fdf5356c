"""Rebuild an artifact's weights.safetensors on a machine the weights cannot be copied to.

The GPU machine takes at most 64 MiB per call: SmolLM2's fp32 weights are
540 MB, its GGUF 98 MB. The GGUF travels in pieces; this script turns it into
the artifact's weights file *there*, with kiln's own GGUF reader (numpy +
`gguf`, no TVM) and kiln's own safetensors writer, following a recipe written
here by the compiler-side family code (which HF tensors make each param).
The runtime then checks the rebuilt file's sha256 against the manifest before
loading anything, so the weights used on the GPU are byte-for-byte those the
CPU artifact was compiled with, or nothing runs.

    here:   python benchmarks/weights_on_device.py recipe MODEL.gguf ART -o recipe.json
    there:  python benchmarks/weights_on_device.py rebuild MODEL.gguf ART --recipe recipe.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def recipe(model: str, art: Path, out: Path) -> None:
    from kiln.frontends.readers import open_checkpoint  # noqa: PLC0415
    from kiln.frontends.config import ModelConfig  # noqa: PLC0415
    from kiln.frontends.models import family_for  # noqa: PLC0415

    ck = open_checkpoint(model)  # lazy: reads the header, not the tensors
    config = ModelConfig.from_dict(ck.config, file=ck.source)
    family = family_for(config.architecture, file=ck.source)
    sources = family.hf_sources(family.adapt_config(config))
    manifest = json.loads((art / "manifest.json").read_text())
    params = [{**p, "sources": list(sources[p["name"]])} for p in manifest["params"]]
    out.write_text(json.dumps({"params": params}, indent=1))


def rebuild(model: str, art: Path, recipe_file: Path) -> int:
    from kiln.compiler.artifact import HashingWriter  # noqa: PLC0415
    from kiln.compiler.weights import write_safetensors  # noqa: PLC0415
    from kiln.frontends.gguf_reader import open_gguf  # noqa: PLC0415

    params = json.loads(recipe_file.read_text())["params"]
    manifest = json.loads((art / "manifest.json").read_text())
    want = manifest["files"]["weights.safetensors"]
    ck = open_gguf(Path(model))
    by_name = {p["name"]: p for p in params}

    def produce(name: str) -> np.ndarray:
        parts = [ck.load(s) for s in by_name[name]["sources"]]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    order = [p["name"] for p in params]
    target = art / "weights.safetensors"
    target.unlink(missing_ok=True)
    got = write_safetensors(HashingWriter(target), order, {p["name"]: tuple(p["shape"]) for p in params},
                            {p["name"]: p["dtype"] for p in params}, produce)
    same = got["sha256"] == want["sha256"] and got["size"] == want["size"]
    print(f"rebuilt {target}: {got['size']} bytes, sha256 {got['sha256'][:16]}..., manifest {want['sha256'][:16]}...: "
          f"{'identical' if same else 'DIFFERENT'}")
    return 0 if same else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["recipe", "rebuild"])
    ap.add_argument("model")
    ap.add_argument("artifact")
    ap.add_argument("-o", "--output", default="recipe.json")
    ap.add_argument("--recipe", default="recipe.json")
    a = ap.parse_args()
    if a.mode == "recipe":
        recipe(a.model, Path(a.artifact), Path(a.output))
        return 0
    return rebuild(a.model, Path(a.artifact), Path(a.recipe))


if __name__ == "__main__":
    sys.exit(main())
