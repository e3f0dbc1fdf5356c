"""ONNX graphs on a GPU through the bundle (issue 18): correctness of small graphs with their
weights against onnxruntime's CPU outputs computed where they were compiled, and speed of
ResNet-50 / BERT-base compiled with --no-weights (their weights do not travel to the GPU
machine) on random weights, beside torch eager on the same GPU in the same run.

    # here (the compiler machine): export, compile for cuda:sm_90, reference outputs, bundle
    python benchmarks/onnx_gpu.py prepare DIR [--arch sm_90]
    # on the GPU machine, with the bundle's site-packages on PYTHONPATH (see BENCHMARKS.md)
    python DIR/onnx_gpu.py run DIR [--seconds 3] [--json-out FILE]

Timing: both sides take numpy inputs and return numpy outputs (host -> GPU -> host, as a
caller of GraphModel.run sees it), 3 warm-up runs, then medians over --seconds. The torch
peer runs the same torch modules in fp32 eager (TF32 off, as kiln's fp32 is), and with
torch.backends.cudnn.benchmark on.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # onnx_vs_ort.py sits beside this file, here and in a prepared DIR
from onnx_vs_ort import timed  # noqa: E402  (3 warm-up runs, then the median over `seconds`)
SMALL = ("cnn-tiny", "bert-tiny", "rapidocr-cls")  # compiled with weights: checked against onnxruntime
BIG = {"resnet50": ["image=1,3,224,224"], "bert-base": ["input_ids=1,128", "attention_mask=1,128"]}


def prepare(d: Path, arch: str) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import onnxruntime as ort  # noqa: PLC0415
    from onnx_vs_ort import MODELS  # noqa: PLC0415

    d.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln")) / "onnx-bench"  # the .onnx files stay here
    work.mkdir(parents=True, exist_ok=True)
    refs, failed = {}, {}
    for name in (*SMALL, *BIG):
        try:
            path, feeds = MODELS[name](work / f"{name}.onnx")
        except SystemExit as err:  # rapidocr's wheel not in the cache
            print(f"skip {name}: {err}")
            continue
        for suffix, dtype in (("cuda", []), ("cuda16", ["--dtype", "float16"])):
            art = d / f"{name}-{suffix}.kiln"
            if art.exists():
                continue
            pins = BIG.get(name) or []
            extra = ["--no-weights"] if name in BIG else []
            r = subprocess.run([sys.executable, "-m", "kiln.cli", "compile", str(path), "-o", str(art), "--target", f"cuda:{arch}", "--quiet",
                                *sum((["--input-shape", p] for p in pins), []), *extra, *dtype], capture_output=True, text=True)
            if r.returncode:
                failed[f"{name}-{suffix}"] = (r.stderr.strip().splitlines() or ["?"])[-1]
                print(f"compile failed: {name}-{suffix}: {failed[f'{name}-{suffix}']}")
        if name in SMALL:
            want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
            np.savez(d / f"{name}-io.npz", **{f"in:{k}": v for k, v in feeds.items()}, **{f"out:{i}": w for i, w in enumerate(want)})
            refs[name] = True
    (d / "compile_failures.json").write_text(json.dumps(failed, indent=1))
    shutil.copy(__file__, d / "onnx_gpu.py")
    shutil.copy(ROOT / "benchmarks" / "onnx_vs_ort.py", d / "onnx_vs_ort.py")  # the torch ResNet-50 the peer runs
    print(f"prepared {d}: {sorted(p.name for p in d.glob('*.kiln'))}")


def torch_peer(name: str, d: Path, half: bool = False):
    """(callable on numpy feeds, description) of the same model in torch eager on the GPU, or None."""
    import torch  # noqa: PLC0415

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    if name == "resnet50":
        from onnx_vs_ort import resnet50_module  # noqa: PLC0415

        net = resnet50_module().cuda().eval()
        feed = "image"
        if half:
            net = net.half()
    else:
        try:
            from transformers import BertConfig, BertModel  # noqa: PLC0415
        except ImportError:
            return None, "transformers not installed here"
        net = BertModel(BertConfig()).cuda().eval()
        feed = None
        if half:
            net = net.half()

    @torch.inference_mode()
    def run(feeds):
        if feed:
            x = torch.from_numpy(feeds[feed]).cuda()
            out = net(x.half() if half else x)
        else:
            out = net(input_ids=torch.from_numpy(feeds["input_ids"]).cuda(),
                      attention_mask=torch.from_numpy(feeds["attention_mask"]).cuda()).last_hidden_state
        return out.float().cpu().numpy()

    return run, f"torch {torch.__version__} eager {'fp16 (.half())' if half else 'fp32 (TF32 off)'}, cudnn.benchmark"


def run(d: Path, seconds: float, json_out: Path | None) -> None:
    from kiln.runtime import load  # noqa: PLC0415
    from kiln.runtime.graph import random_inputs  # noqa: PLC0415

    rows = [{"model": n, "check": "compile for CUDA failed", "error": e}
            for n, e in json.loads((d / "compile_failures.json").read_text()).items()] if (d / "compile_failures.json").exists() else []
    for name in SMALL:
        io = d / f"{name}-io.npz"
        if not io.exists():
            continue
        z = np.load(io)
        feeds = {k[3:]: z[k] for k in z.files if k.startswith("in:")}
        want = [z[f"out:{i}"] for i in range(sum(k.startswith("out:") for k in z.files))]
        for suffix in ("cuda", "cuda16"):
            if not (d / f"{name}-{suffix}.kiln").exists():
                continue
            m = load(d / f"{name}-{suffix}.kiln", device="cuda")
            got = list(m.run(feeds).values())
            err = max(float(np.abs(g.astype(np.float64) - w).max() / max(np.abs(w).max(), 1e-30)) for g, w in zip(got, want))
            rows.append({"model": f"{name}-{suffix}", "check": "vs onnxruntime CPU (fp32)", "max_rel_err": err})
            print(json.dumps(rows[-1]), flush=True)
    for name, suffix in [(n, s) for n in BIG for s in ("cuda", "cuda16")]:
        art = d / f"{name}-{suffix}.kiln"
        if not art.exists():
            continue
        m = load(art, device="cuda", random_weights=True)
        feeds, _ = random_inputs(m.inputs)
        k_s, k_n = timed(lambda: m.run(feeds), seconds)
        row = {"model": f"{name}-{suffix}", "kiln_ms": round(k_s * 1e3, 3), "kiln_runs": k_n}
        try:
            peer, desc = torch_peer(name, d, half=suffix == "cuda16")
        except Exception as err:  # noqa: BLE001 - the peer is optional: say why it did not run
            peer, desc = None, f"{type(err).__name__}: {err}"
        if peer is not None:
            p_s, p_n = timed(lambda: peer(feeds), seconds)
            row.update({"peer": desc, "peer_ms": round(p_s * 1e3, 3), "peer_runs": p_n, "kiln_over_peer": round(k_s / p_s, 3)})
        else:
            row["peer"] = f"not run: {desc}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    if json_out:
        json_out.write_text(json.dumps(rows, indent=1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("dir")
    p.add_argument("--arch", default="sm_90")
    r = sub.add_parser("run")
    r.add_argument("dir")
    r.add_argument("--seconds", type=float, default=3.0)
    r.add_argument("--json-out", default=None)
    a = ap.parse_args()
    if a.cmd == "prepare":
        prepare(Path(a.dir), a.arch)
    else:
        run(Path(a.dir), a.seconds, Path(a.json_out) if a.json_out else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
