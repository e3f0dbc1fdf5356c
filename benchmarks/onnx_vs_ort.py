"""kiln vs onnxruntime (CPUExecutionProvider) on ONNX graphs, same threads, one run.

    python benchmarks/onnx_vs_ort.py [--models bert-base,resnet50,rapidocr-cls,bert-tiny,cnn-tiny]
        [--threads 2] [--seconds 5] [--rounds 4] [--quant q8] [--workdir DIR] [--json-out FILE]

Models (random weights, exported here with torch.onnx.export unless said):
  bert-base     BertModel 12 layers, hidden 768, batch 1 x seq 128, fp32 (the issue's BERT-base shape)
  resnet50      a ResNet-50 (bottleneck blocks 3-4-6-3), batch 1 x 3 x 224 x 224, fp32
  rapidocr-cls  rapidocr-onnxruntime 1.4.4's text-direction classifier (from its PyPI wheel), 1 x 3 x 48 x 192
  bert-tiny / cnn-tiny  the test suite's tiny models (tests/helpers/onnx_models.py)

kiln compiles each with its input shape pinned (`--input-shape`, the shapes are
fixed here) for this CPU; both run with the same thread count (TVM_NUM_THREADS,
ORT intra_op_num_threads, inter_op 1). They take turns in --rounds rounds
(a shared box's load moves within seconds), each timed for --seconds / --rounds
per round after 3 warm-up runs; the table shows the median of the rounds' medians, kiln/ort (below 1: kiln faster) and
kiln's max relative difference from onnxruntime's output. With --quant FMT kiln
also compiles the graph with `--quant FMT` (matmul / Gemm / Conv weights) and the
table adds its time, its speed-up over kiln fp32 and its output's relative L2
error against onnxruntime's (fp32) output.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def export_bert_base(path: Path) -> tuple[Path, dict]:
    import torch  # noqa: PLC0415
    from transformers import BertConfig, BertModel  # noqa: PLC0415

    torch.manual_seed(0)
    bert = BertModel(BertConfig()).eval()  # bert-base-uncased's shape

    class Encoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.randint(0, 30522, (1, 128))
    if not path.exists():
        torch.onnx.export(Encoder(bert), (ids, torch.ones_like(ids)), str(path), dynamo=False, input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"], opset_version=17,
                          dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}})
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((1, 128), np.int64)}
    return path, feeds


def resnet50_module():
    """A ResNet-50 (bottleneck blocks 3-4-6-3) in torch, random weights (seed 0), eval mode."""
    import torch  # noqa: PLC0415
    from torch import nn  # noqa: PLC0415

    class Bottleneck(nn.Module):
        def __init__(self, cin, width, stride):
            super().__init__()
            cout = width * 4
            self.body = nn.Sequential(nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
            self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            return torch.relu(self.body(x) + self.down(x))

    def stage(cin, width, n, stride):
        return [Bottleneck(cin, width, stride)] + [Bottleneck(width * 4, width, 1) for _ in range(n - 1)]

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                        *stage(64, 64, 3, 1), *stage(256, 128, 4, 2), *stage(512, 256, 6, 2), *stage(1024, 512, 3, 2),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 1000)).eval()
    return net


def export_resnet50(path: Path) -> tuple[Path, dict]:
    import torch  # noqa: PLC0415

    net = resnet50_module()
    x = torch.randn(1, 3, 224, 224)
    if not path.exists():
        torch.onnx.export(net, (x,), str(path), dynamo=False, input_names=["image"], output_names=["logits"], opset_version=17,
                          dynamic_axes={"image": {0: "batch"}})
    return path, {"image": x.numpy()}


def rapidocr_cls(path: Path) -> tuple[Path, dict]:
    from helpers.onnx_models import RAPIDOCR_CLS, RAPIDOCR_PACKAGE, pypi_onnx_model  # noqa: PLC0415

    p = pypi_onnx_model(RAPIDOCR_PACKAGE, RAPIDOCR_CLS)
    if p is None:
        raise SystemExit("rapidocr-cls: not in the kiln cache; run with KILN_FETCH_MODELS=1 to download the wheel")
    return p, {"x": np.random.default_rng(0).uniform(-1, 1, (1, 3, 48, 192)).astype(np.float32)}


def tiny(kind: str):
    def make(path: Path) -> tuple[Path, dict]:
        from helpers.onnx_models import export_bert, export_cnn  # noqa: PLC0415

        if kind == "bert":
            export_bert(path)
            return path, {"input_ids": np.random.default_rng(0).integers(0, 100, (1, 32)).astype(np.int64),
                          "attention_mask": np.ones((1, 32), np.int64)}
        export_cnn(path)
        return path, {"image": np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)}
    return make


MODELS = {"bert-base": export_bert_base, "resnet50": export_resnet50, "rapidocr-cls": rapidocr_cls, "bert-tiny": tiny("bert"), "cnn-tiny": tiny("cnn")}


def timed(fn, seconds: float) -> tuple[float, int]:
    for _ in range(3):
        fn()
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="bert-base,resnet50,rapidocr-cls")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=5.0, help="timed seconds per contestant, split over --rounds")
    ap.add_argument("--rounds", type=int, default=4, help="rounds in which kiln, onnxruntime (and kiln --quant) take turns")
    ap.add_argument("--workdir", default=str(Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln")) / "onnx-bench"))
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--quant", default=None, help="also time kiln with this weight format (q8, q4g32, ...)")
    a = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(a.threads)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    import onnxruntime as ort  # noqa: PLC0415

    from kiln.tvm_compat import compiler  # noqa: PLC0415

    compiler()  # the full TVM first: the runtime would otherwise load it runtime-only
    from kiln.compiler.onnx_build import compile_onnx  # noqa: PLC0415
    from kiln.runtime import load  # noqa: PLC0415

    rows = []
    for name in a.models.split(","):
        path, feeds = MODELS[name](work / f"{name}.onnx")
        pins = [f"{k}={','.join(map(str, v.shape))}" for k, v in feeds.items()]
        art = work / f"{name}.kiln"
        t0 = time.perf_counter()
        compile_onnx(path, art, input_shapes=pins)
        compile_s = time.perf_counter() - t0
        m = load(art, threads=a.threads)
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = a.threads, 1
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        want = sess.run(None, feeds)
        got = list(m.run(feeds).values())
        err = max(float(np.abs(g - w).max() / max(np.abs(w).max(), 1e-30)) for g, w in zip(got, want))
        runs = {"kiln": lambda: m.run(feeds), "ort": lambda: sess.run(None, feeds)}
        if a.quant:
            qart = work / f"{name}-{a.quant}.kiln"
            compile_onnx(path, qart, input_shapes=pins, quant=a.quant, quality_check=False)
            qm = load(qart, threads=a.threads)
            qgot = list(qm.run(feeds).values())
            runs["quant"] = lambda: qm.run(feeds)
            l2 = max(float(np.linalg.norm(g.astype(np.float64) - w) / max(np.linalg.norm(w.astype(np.float64)), 1e-30)) for g, w in zip(qgot, want))
        # contestants interleaved in rounds (a shared box's load moves within seconds): each round times each one for
        # seconds / rounds; the result is the median of the rounds' medians
        per = {k: [] for k in runs}
        for _ in range(a.rounds):
            for k, fn in runs.items():
                per[k].append(timed(fn, a.seconds / a.rounds))
        med = {k: statistics.median(t for t, _ in v) for k, v in per.items()}
        n = {k: sum(c for _, c in v) for k, v in per.items()}
        rounds = {k: [round(t * 1e3, 2) for t, _ in v] for k, v in per.items()}
        k_ms, o_ms = med["kiln"], med["ort"]
        row = {"model": name, "inputs": pins, "kiln_ms": round(k_ms * 1e3, 3), "ort_ms": round(o_ms * 1e3, 3), "ratio": round(k_ms / o_ms, 3),
               "kiln_runs": n["kiln"], "ort_runs": n["ort"], "max_rel_err": err, "compile_s": round(compile_s, 1), "rounds_ms": rounds}
        if a.quant:
            q_ms = med["quant"]
            row.update({"quant": a.quant, "quant_ms": round(q_ms * 1e3, 3), "quant_runs": n["quant"], "fp32_over_quant": round(k_ms / q_ms, 3),
                        "quant_rel_l2": l2})
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nthreads {a.threads}, onnxruntime {ort.__version__}, medians")
    q = f" {'kiln ' + a.quant + ' ms':>12s} {'fp32/' + a.quant:>9s} {a.quant + ' rel L2':>11s}" if a.quant else ""
    print(f"{'model':14s} {'kiln ms':>10s} {'ort ms':>10s} {'kiln/ort':>9s} {'max rel err':>12s} {'compile s':>10s}" + q)
    for r in rows:
        q = f" {r['quant_ms']:12.2f} {r['fp32_over_quant']:9.2f} {r['quant_rel_l2']:11.1e}" if a.quant else ""
        print(f"{r['model']:14s} {r['kiln_ms']:10.2f} {r['ort_ms']:10.2f} {r['ratio']:9.2f} {r['max_rel_err']:12.1e} {r['compile_s']:10.1f}" + q)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
