"""`kiln.runtime.load`: a language-model artifact gives a Session
(runtime/session.py), a graph artifact (ONNX, manifest kind "graph") a
GraphModel (runtime/graph.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import RequestError
from . import manifest as mf
from .artifact import open_artifact
from .graph import GraphModel
from .session import Session
from .tensor_parallel import TensorParallelSession
from .session import load as load_session


def _peek(path: str | Path) -> dict:
    """The manifest as JSON before any check, to pick a loader; {} when unreadable (the
    full checks of load / open_artifact then say what is wrong)."""
    try:
        p = Path(path) / mf.MANIFEST_NAME
        if p.stat().st_size > mf.MAX_MANIFEST_BYTES:
            return {}
        m = json.loads(p.read_bytes())
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return {}
    return m if isinstance(m, dict) else {}


def artifact_kind(path: str | Path) -> str | None:
    """The manifest's kind ("graph"), None for a language model or anything unreadable."""
    kind = _peek(path).get("kind")
    return kind if isinstance(kind, str) else None


def load(path: str | Path, device: str = "cpu", threads: int | None = None, verify: bool = True, **session_options) -> Session | GraphModel:
    """Load an artifact (checks manifest, machine and hashes first). A language
    model gives a Session (session_options: see runtime.session.load); a graph
    artifact gives a GraphModel with run({name: array}) -> {name: array}."""
    peek = _peek(path)
    if peek.get("kind") != mf.GRAPH_KIND:
        if peek.get("tensor_parallel"):  # split over GPUs: one disco worker per shard
            session_options["cls"] = TensorParallelSession
        return load_session(path, device=device, threads=threads, verify=verify, **session_options)
    random_weights = bool(session_options.pop("random_weights", False))
    given = sorted(k for k, v in session_options.items() if v not in (None, False))
    if given:
        raise RequestError(f"{path}: a graph artifact takes no {', '.join(given)} (those are for language models)")
    if threads is not None:
        if not 1 <= threads <= 1024:
            raise RequestError(f"threads must be in [1, 1024], got {threads}")
        os.environ["TVM_NUM_THREADS"] = str(threads)
    return GraphModel(open_artifact(path, device=device, verify_hashes=verify), device=device, random_weights=random_weights)
