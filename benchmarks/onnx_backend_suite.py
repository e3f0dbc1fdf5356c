"""ONNX's backend test suite through kiln (issue 18): every case compiled for llvm by
kiln's real compile (compile_onnx: read, import, passes, codegen, artifact) and run
through kiln.runtime.load(...).run, compared with the case's expected outputs.

    python benchmarks/onnx_backend_suite.py [-k SUBSTRING] [--suites node,simple,...]
        [--jobs 1] [--timeout 180] [--json OUT] [--resume] [--markdown]
    python benchmarks/onnx_backend_suite.py --table-from OUT.json [--markdown]

Cases (the installed onnx package's own; no network):
  node               onnx.backend.test.case.node (the Python cases the data/node folders are
                     generated from: onnx.backend.test.loader.load_node_model_tests)
  simple, pytorch-converted, pytorch-operator
                     data/<suite>/<case>/model.onnx + test_data_set_*/{input,output}_*.pb
  light              data/light/light_<net>.onnx + light_<net>_output_0.pb: ResNet-50,
                     Inception v1/v2, DenseNet-121, VGG-19, ShuffleNet, SqueezeNet, AlexNet,
                     ZFNet-512 with ConstantOfShape weights; inputs made as onnx's runner
                     makes them (arange(n) / n in the input's shape), tolerances from
                     data/real/test_<net>/data.json (data/real holds only those stubs)

Verdicts: pass (every output's shape and dtype equal, values within rtol 1e-3 /
atol 1e-5, NaN equal to NaN), mismatch, unsupported (a KilnError at compile: kiln's
clean one-line refusal, message kept), unclean (any other exception type at compile,
a KilnError or exception at run time, a crashed worker: type and last line kept),
timeout, skipped (out of scope, with the reason: training ops, sequence / optional /
map values, string tensors).

Opsets: kiln takes default-domain opsets 7-23 (frontends/onnx.py OPSETS). The node
cases are stamped with the newest opset that defines each op (up to 28 in onnx
1.23), pytorch-converted mostly opset 6. kiln refuses those as given ("re-export
with an opset in that range"); where every node's schema is the same at the
nearest opset kiln takes, the case is re-stamped to it (the re-export the message
asks for: the graph is unchanged) and that result is the verdict; `as_given` keeps
the refusal. Cases whose schema changed stay refused.

Cases, verdicts and the comparison live in tests/helpers/onnx_backend.py (the test
suite's sample, tests/test_onnx_backend.py, uses the same). Each case runs in a long-lived worker process (TVM imported once; restarted after
a crash, a timeout, or --recycle cases), so a hang or a segfault costs one case.
Inputs whose declared shape is not fully static are pinned to the test data's
shape with input_shapes (recorded per case as `pinned`).

Compile cost: kiln links its C kernels (passes/kernels/cpu/*.c) into every CPU
library; compiler/cpu_codegen.py keeps their objects in the kiln cache (once per
compiler, flags and sources), so a node case compiles in 0.1-0.3 s, not ~2.7 s.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import multiprocessing as mp
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from multiprocessing.connection import wait
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers.onnx_backend import ATOL, RTOL, SUITES, Case, Result, collect, run_case  # noqa: E402

STATUSES = ("pass", "mismatch", "unsupported", "unclean", "timeout", "skipped")


def worker(conn, tmp: str) -> None:
    from kiln.tvm_compat import compiler  # noqa: PLC0415 - the full TVM before kiln's runtime loads

    compiler()
    tmp = Path(tmp)
    while True:
        case = conn.recv()
        if case is None:
            return
        conn.send(run_case(case, tmp))


# ---------------------------------------------------------------- the parent: slots, timeouts, results

class Slot:
    def __init__(self, ctx, root: Path):
        self.ctx, self.root, self.proc, self.case, self.deadline, self.done = ctx, root, None, None, 0.0, 0

    def start(self):
        self.conn, child = self.ctx.Pipe()
        tmp = tempfile.mkdtemp(dir=self.root)
        self.proc = self.ctx.Process(target=worker, args=(child, tmp), daemon=True)
        self.proc.start()
        child.close()
        self.tmp, self.done = tmp, 0

    def stop(self, kill=False):
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            with contextlib.suppress(OSError):
                self.conn.send(None)
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.proc = None


def run_all(cases: list[Case], jobs: int, timeout: float, model_timeout: float, recycle: int, on_result) -> None:
    ctx = mp.get_context("spawn")
    root = Path(tempfile.mkdtemp(prefix="kiln-onnx-suite-"))
    slots = [Slot(ctx, root) for _ in range(max(1, jobs))]
    todo = collections.deque(cases)
    try:
        while todo or any(s.case for s in slots):
            for s in slots:
                if s.case is None and todo:
                    if s.proc is None or s.done >= recycle:
                        s.stop()
                        s.start()
                    s.case = todo.popleft()
                    s.started = time.perf_counter()
                    s.deadline = s.started + (model_timeout if s.case.suite == "light" else timeout) + (10 if s.done == 0 else 0)
                    s.conn.send(s.case)
            busy = [s for s in slots if s.case]
            ready = wait([s.conn for s in busy] + [s.proc.sentinel for s in busy], timeout=max(0.05, min(s.deadline for s in busy) - time.perf_counter()))
            now = time.perf_counter()
            for s in busy:
                r = None
                if s.conn in ready or s.proc.sentinel in ready:
                    try:
                        r = s.conn.recv()
                    except (EOFError, OSError):
                        s.proc.join(5)
                        r = Result(s.case.name, s.case.suite, s.case.family, "unclean", f"worker died (exit code {s.proc.exitcode}) in compile or run",
                                   opset=s.case.opset, restamped_from=s.case.restamped_from, as_given=s.case.as_given, expanded=s.case.expanded)
                        s.stop(kill=True)
                elif now > s.deadline:
                    r = Result(s.case.name, s.case.suite, s.case.family, "timeout", f"no result after {now - s.started:.0f} s",
                               opset=s.case.opset, restamped_from=s.case.restamped_from, as_given=s.case.as_given, expanded=s.case.expanded)
                    s.stop(kill=True)
                if r is not None:
                    r.seconds = r.seconds or round(now - s.started, 3)
                    s.case, s.done = None, s.done + 1
                    on_result(r)
    finally:
        for s in slots:
            s.stop(kill=s.case is not None)
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- tables

def counts(results: list[dict], key) -> dict[str, collections.Counter]:
    out: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in results:
        out[key(r)][r["status"]] += 1
        out[key(r)]["restamped"] += r.get("restamped_from") is not None
    return out


def table(results: list[dict], markdown: bool) -> str:
    node = [r for r in results if r["suite"] == "node"]
    models = [r for r in results if r["suite"] != "node"]
    lines = []
    for title, rows in (("op family (node cases)", counts(node, lambda r: r["family"])),
                        ("suite (model cases)", counts(models, lambda r: r["suite"]))):
        if not rows:
            continue
        rows = dict(sorted(rows.items(), key=lambda kv: kv[0].lower()))
        total = sum(rows.values(), collections.Counter())
        cols = ["cases", *STATUSES, "restamped"]
        body = [(k, [sum(c[s] for s in STATUSES), *(c[s] for s in STATUSES), c["restamped"]]) for k, c in rows.items()]
        body.append(("total", [sum(total[s] for s in STATUSES), *(total[s] for s in STATUSES), total["restamped"]]))
        if markdown:
            lines += [f"| {title} | {' | '.join(cols)} |", "|---" * (len(cols) + 1) + "|"]
            lines += [f"| {'**total**' if k == 'total' else k} | {' | '.join(str(v) for v in vals)} |" for k, vals in body]
        else:
            w = max(len(k) for k, _ in body + [(title, None)])
            lines.append(f"{title:<{w}} " + " ".join(f"{c:>11}" for c in cols))
            lines += [f"{k:<{w}} " + " ".join(f"{v:>11}" for v in vals) for k, vals in body]
        lines.append("")
    return "\n".join(lines)


_REFUSALS = (  # (kind, pattern): the first that matches names the refusal; group 1 is the operator
    ("operator kiln does not convert", r"operator (\S+) \(node .* is (?:not supported|outside the default ONNX domain)"),
    ("opset outside 7-23", r"opset (\d+) is outside"),
    ("TVM's importer failed on the node", r"failed on node \S+ \((\w+)\), opset \d+: (.*)"),
    ("kiln's converter refused", r"node \S+ \((\w+)\), opset \d+: (.*)"),
    ("kiln's passes failed", r"kiln's passes failed for llvm: (.*)"),
    ("codegen failed", r"codegen for .* failed: (.*)"),
    ("input / initializer dtype", r"has ONNX data type (\d+)"),
)


def refusals(results: list[dict]) -> collections.Counter:
    """Clean refusals by (kind, operator or opset or dtype, reason), counted over the cases."""
    out: collections.Counter = collections.Counter()
    for r in results:
        if r["status"] != "unsupported":
            continue
        for kind, pat in _REFUSALS:
            m = re.search(pat, r["detail"])
            if m:
                g = m.groups()
                if kind.startswith("kiln's passes") or kind.startswith("codegen"):
                    key = (kind, r["family"], re.sub(r"\s+", " ", g[0])[:110])
                else:
                    key = (kind, g[0], re.sub(r"\s+", " ", g[1])[:110] if len(g) > 1 else "")
                break
        else:
            key = ("other", r["family"], r["detail"].split(": ", 1)[-1][:110])
        out[key] += 1
    return out


def refusal_lines(results: list[dict], markdown: bool) -> str:
    rows = sorted(refusals(results).items(), key=lambda kv: (kv[0][0], -kv[1], kv[0][1]))
    if markdown:
        return "\n".join(["| kind | op / opset / dtype | cases | message |", "|---|---|---|---|"]
                         + [f"| {k} | {op} | {n} | {why.replace('|', '/')} |" for (k, op, why), n in rows])
    return "\n".join(f"{n:5d}  {k}: {op}  {why}" for (k, op, why), n in rows)


# ---------------------------------------------------------------- main

def dump(doc: dict) -> str:
    """The results as JSON, one case a line."""
    head = json.dumps({k: v for k, v in doc.items() if k != "cases"}, indent=1)[:-2]
    return head + ',\n "cases": [\n' + ",\n".join(json.dumps(c) for c in doc["cases"]) + "\n]}\n"


def _machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-k", help="only cases whose name (suite/test_name) contains this")
    ap.add_argument("--suites", default=",".join(SUITES), help=f"comma list of {', '.join(SUITES)}")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    ap.add_argument("--timeout", type=float, default=180, help="seconds per case (default 180)")
    ap.add_argument("--model-timeout", type=float, default=1200, help="seconds per light network (default 1200)")
    ap.add_argument("--recycle", type=int, default=250, help="restart a worker after this many cases (default 250)")
    ap.add_argument("--json", type=Path, help="write per-case results here (rewritten as cases finish)")
    ap.add_argument("--resume", action="store_true", help="keep the cases already in --json, run the rest")
    ap.add_argument("--table-from", type=Path, help="print the table of a results file and exit")
    ap.add_argument("--markdown", action="store_true", help="the table as markdown")
    ap.add_argument("-q", "--quiet", action="store_true", help="no line per case")
    args = ap.parse_args(argv)

    if args.table_from:
        doc = json.loads(args.table_from.read_text())
        print(table(doc["cases"], args.markdown))
        print(refusal_lines(doc["cases"], args.markdown))
        return 0
    suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    bad = [s for s in suites if s not in SUITES]
    if bad:
        ap.error(f"unknown suite {bad[0]}; suites: {', '.join(SUITES)}")
    os.environ.setdefault("TVM_NUM_THREADS", "1")  # the workers' runtime: tiny graphs, a shared machine
    t0 = time.perf_counter()
    cases = collect(suites, args.k)
    import onnx  # noqa: PLC0415

    import kiln  # noqa: PLC0415

    src = Path(kiln.__file__).parent
    head = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    doc = {"command": " ".join(["python", "benchmarks/onnx_backend_suite.py", *(argv if argv is not None else sys.argv[1:])]),
           "date": time.strftime("%Y-%m-%d"), "machine": _machine(), "kiln_version": kiln.__version__, "kiln_commit": head or None, "kiln_source": str(src),
           "onnx_version": onnx.__version__, "rtol": RTOL, "atol": ATOL, "target": "llvm", "finished": False, "cases": []}
    done: dict[str, dict] = {}
    if args.resume and args.json and args.json.is_file():
        done = {r["name"]: r for r in json.loads(args.json.read_text())["cases"]}
    results = [done[c.name] for c in cases if c.name in done]
    todo = []
    for c in cases:
        if c.name in done:
            continue
        if c.skip:
            results.append(asdict(Result(c.name, c.suite, c.family, "skipped", c.skip, opset=c.opset, expanded=c.expanded)))
        else:
            todo.append(c)
    print(f"{len(cases)} cases ({len(todo)} to run, {len(results)} skipped or already done) in {time.perf_counter() - t0:.0f} s", flush=True)
    last_write = [0.0]

    def save(final=False, force=False):
        if args.json and (final or force or time.perf_counter() - last_write[0] > 30):
            doc["cases"], doc["finished"] = sorted(results, key=lambda r: r["name"]), final
            doc["seconds"] = round(time.perf_counter() - t0)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.json.with_suffix(".tmp")
            tmp.write_text(dump(doc))
            tmp.replace(args.json)
            last_write[0] = time.perf_counter()

    def on_result(r: Result):
        results.append(asdict(r))
        if not args.quiet:
            print(f"[{len(results)}/{len(cases)}] {r.status:<11} {r.name} {r.seconds:.1f}s {r.detail[:160]}", flush=True)
        save()

    try:
        run_all(todo, args.jobs, args.timeout, args.model_timeout, args.recycle, on_result)
    except KeyboardInterrupt:
        save(force=True)
        print("interrupted: partial results kept", file=sys.stderr)
        return 130
    save(final=True)
    print(table(results, args.markdown))
    print(refusal_lines(results, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
