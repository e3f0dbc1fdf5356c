"""Compile and artifact faults (THREATS 17-23): disk full, killed compiles,
unwritable or occupied outputs, concurrent compiles, corrupted files, artifacts
for another machine or version, and reproducible builds."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import compile_artifact, compile_script, copy_artifact, prefer_full_tvm, run_compiler_code, shared_artifact, slow_except, subprocess_env

import kiln.runtime
from kiln.compiler import artifact as A
from kiln.errors import ArtifactError, CompileError
from kiln.runtime import manifest as mf
from kiln.runtime.hostinfo import host_cpu_flags, host_machine


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, artifact dir) shared by this module; never modify them."""
    return shared_artifact(tmp_path_factory)


@pytest.fixture
def art(tiny, tmp_path):
    """A private copy of the artifact that a test may damage."""
    return copy_artifact(tiny[1], tmp_path / "m.kiln")


@pytest.fixture
def load_spy(monkeypatch):
    """Records every library TVM is asked to load (and still loads it)."""
    prefer_full_tvm()
    from kiln.tvm_compat import runtime

    rt = runtime()
    calls: list[str] = []
    real = rt.runtime.load_module

    def spy(path, *args, **kwargs):
        calls.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(rt.runtime, "load_module", spy)
    return calls


def snapshot(d: Path) -> dict[str, str]:
    """sha256 of every file under d, by relative path."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def leftovers(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.tmp-*")) + sorted(out.parent.glob(f".{out.name}.old-*"))


def read_manifest(a: Path) -> dict:
    return json.loads((a / mf.MANIFEST_NAME).read_text())


def write_manifest(a: Path, m: dict, *, reseal: bool = True) -> None:
    (a / mf.MANIFEST_NAME).write_text(json.dumps(mf.seal(m) if reseal else m, indent=1))


def flip_byte(p: Path, pos: int | None = None) -> None:
    data = bytearray(p.read_bytes())
    pos = len(data) // 2 if pos is None else pos
    data[pos] ^= 0x01
    p.write_bytes(bytes(data))


def fake_artifact(out: Path, payload: bytes = b"old payload") -> dict[str, str]:
    """A minimal artifact written through the real writer (no TVM)."""
    with A.ArtifactWriter(out) as w:
        hw = w.open("data.bin")
        hw.write(payload)
        w.record("data.bin", hw.close())
        w.commit({"magic": mf.MAGIC, "format_version": mf.FORMAT_VERSION})
    return snapshot(out)


# --- 17: disk full ---------------------------------------------------------------


def test_disk_full_while_writing_weights(tiny, tmp_path):
    """ENOSPC on the first write and on the last weight write: CompileError, temp
    dir removed, the earlier artifact at the same path byte-identical and loadable."""
    model, shared = tiny
    out = copy_artifact(shared, tmp_path / "m.kiln")
    before = snapshot(out)
    last_weight_write = 2 + len(read_manifest(out)["params"])  # header length, header, one per tensor
    printed = run_compiler_code(f"""
        import errno, json
        from kiln.compiler import artifact as A
        from kiln.compiler.build import compile_model
        from kiln.errors import CompileError
        real = A.HashingWriter.write
        results = []
        try:
            for fail_at in (1, {last_weight_write}):
                calls = [0]
                def write(self, data, _n=fail_at):
                    calls[0] += 1
                    if calls[0] == _n:
                        raise OSError(errno.ENOSPC, "No space left on device")
                    return real(self, data)
                A.HashingWriter.write = write
                try:
                    compile_model({str(model)!r}, {str(out)!r}, target="llvm", dtype="float32")
                    results.append(["no error", calls[0]])
                except CompileError as e:
                    results.append(["CompileError", str(e)])
                except Exception as e:
                    results.append([type(e).__name__, str(e)])
        finally:
            A.HashingWriter.write = real
        print(json.dumps(results))
    """)
    results = json.loads(printed.strip().splitlines()[-1])
    for kind, msg in results:
        assert kind == "CompileError", (kind, msg)
        assert "disk full" in msg and str(out) in msg
    assert leftovers(out) == []
    assert snapshot(out) == before
    prefer_full_tvm()
    s = kiln.runtime.load(out, max_seq_len=16)
    assert len(s.generate([1, 2, 3], max_new_tokens=2).tokens) == 2


@pytest.mark.parametrize("step", ["fsync", "publish"])
def test_failure_while_committing_keeps_earlier_artifact(tmp_path, monkeypatch, step):
    """A failure after every file is written (manifest fsync, or the swap into
    place) still removes the temp dir and leaves the earlier artifact alone."""
    out = tmp_path / "x.kiln"
    before = fake_artifact(out)

    def boom(*_a, **_k):
        raise OSError(errno.ENOSPC if step == "fsync" else errno.EIO, os.strerror(errno.ENOSPC if step == "fsync" else errno.EIO))

    monkeypatch.setattr(A, "fsync_dir" if step == "fsync" else "_exchange", boom)
    with pytest.raises(CompileError) as ei:
        fake_artifact(out, b"new payload")
    assert str(out) in str(ei.value) and "earlier artifact is intact" in str(ei.value)
    assert leftovers(out) == []
    assert snapshot(out) == before


def test_hashing_writer_closes_file_when_write_fails(tmp_path, monkeypatch):
    hw = A.HashingWriter(tmp_path / "f.bin")

    class Full:
        def write(self, _data):
            raise OSError(errno.ENOSPC, "No space left on device")

        closed = False

        def close(self):
            self.closed = True

    real = hw.f
    hw.f = Full()
    with pytest.raises(OSError):
        hw.write(b"abc")
    assert hw.f.closed
    real.close()


# --- 18: compile killed mid-way ---------------------------------------------------


def test_killed_compile_leaves_nothing_and_next_compile_cleans_up(tiny, tmp_path):
    model, _ = tiny
    out = tmp_path / "k.kiln"
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(compile_script(model, out))],
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            tmps = list(tmp_path.glob(".k.kiln.tmp-*"))
            if tmps and (tmps[0] / "weights.safetensors").exists():
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the compile finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not out.exists()
    assert leftovers(out), "expected the killed compile's temp dir to be left behind"
    assert not any((t / mf.MANIFEST_NAME).exists() for t in leftovers(out))
    # The next compile to that output takes the (kernel-released) lock and removes the leftovers.
    with A.ArtifactWriter(out) as w:
        assert leftovers(out) == [w.tmp]
    assert leftovers(out) == []
    assert not out.exists()


@pytest.mark.parametrize(("phase", "delay"), slow_except([("codegen (", 0.0), ("codegen (", 0.15), ("codegen (", 0.4), ("passes (", 0.0), ("read ", 0.3)],
                                                       ("codegen (", 0.0), ("read ", 0.3)))
def test_ctrl_c_in_codegen_reads_as_interrupted(tiny, tmp_path, phase, delay):
    """SIGINT early in codegen (inside TVM's calls) is `kiln: interrupted`, exit 130,
    not `codegen ... failed: RuntimeError`; nothing is left behind."""
    model, _ = tiny
    out = tmp_path / "i.kiln"
    # SIGINT at its default in the child: a suite started in the background by a non-interactive
    # shell inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler
    proc = subprocess.Popen([sys.executable, "-u", "-m", "kiln.cli", "compile", str(model), "-o", str(out), "--dtype", "float32"],
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if phase in line:
                time.sleep(delay)
                proc.send_signal(signal.SIGINT)
                break
        rest = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = "".join(lines) + rest
    assert any(phase in x for x in lines), err
    assert proc.returncode == 130, err
    assert "kiln: interrupted" in err and "error" not in err.lower() and "BlockBuilder" not in err, err
    assert not out.exists() and leftovers(out) == []


def test_orphaned_temp_dirs_of_dead_compiles_are_removed(tmp_path):
    """A compile that died where no Python handler runs (SIGKILL, an LLVM abort)
    leaves its temp dir; the next compile into the same folder removes it, even
    for another output, but never a live compile's."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tmp_path / f".other.kiln.tmp-{dead.pid}-0123abcd"
    live = tmp_path / f".busy.kiln.tmp-{os.getppid()}-4567cdef"
    for d in (orphan, live):
        d.mkdir()
        (d / "weights.safetensors").write_bytes(b"x" * 1024)
    fake_artifact(tmp_path / "x.kiln")
    assert not orphan.exists() and live.is_dir()


def test_no_lock_file_stays_beside_the_artifact(tmp_path):
    out = tmp_path / "x.kiln"
    fake_artifact(out)
    with pytest.raises(RuntimeError, match="codegen failed"), A.ArtifactWriter(tmp_path / "y.kiln"):
        raise RuntimeError("codegen failed")  # a compile failing half-way: no temp dir, no lock file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.kiln"]


# --- 19: unwritable output, occupied output, concurrent compiles ------------------


def test_read_only_output_dir_chmod(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        try:
            (ro / "probe").touch()
        except PermissionError:
            pass
        else:
            (ro / "probe").unlink()
            pytest.skip("running as root: chmod does not stop writes (see the monkeypatched test below)")
        with pytest.raises(CompileError, match="cannot write to"):
            A.ArtifactWriter(ro / "x.kiln").__enter__()
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("err", [errno.EACCES, errno.EROFS])
def test_read_only_output_dir_lock(tmp_path, monkeypatch, err):
    real_open = os.open

    def ro_open(path, flags, *a, **k):
        if flags & os.O_CREAT:
            raise OSError(err, os.strerror(err), str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", ro_open)
    with pytest.raises(CompileError, match=f"cannot write to {tmp_path}: {os.strerror(err)}"):
        A.ArtifactWriter(tmp_path / "x.kiln").__enter__()
    assert list(tmp_path.iterdir()) == []


def test_read_only_output_dir_mkdir(tmp_path, monkeypatch):
    def no_mkdir(path, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(os, "mkdir", no_mkdir)
    with pytest.raises(CompileError, match="cannot write to .*Permission denied"):
        A.ArtifactWriter(tmp_path / "x.kiln").__enter__()
    monkeypatch.undo()
    # the failed attempt released its lock
    with A.ArtifactWriter(tmp_path / "x.kiln"):
        pass


def test_publish_without_renameat2(tmp_path, monkeypatch):
    """Where RENAME_EXCHANGE is unsupported: rename the old one aside, then the new one in."""
    out = tmp_path / "x.kiln"
    fake_artifact(out, b"old")
    monkeypatch.setattr(A, "_exchange", lambda a, b: False)
    new = fake_artifact(out, b"new")
    assert snapshot(out) == new and leftovers(out) == []


def test_publish_without_renameat2_failing_restores_earlier(tmp_path, monkeypatch):
    out = tmp_path / "x.kiln"
    before = fake_artifact(out, b"old")
    monkeypatch.setattr(A, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def rename(src, dst):
        if ".tmp-" in str(src):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(src))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(CompileError, match="earlier artifact is intact"):
        fake_artifact(out, b"new")
    assert snapshot(out) == before and leftovers(out) == []


def test_output_exists_and_is_not_an_artifact(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("precious")
    f = tmp_path / "file.kiln"
    f.write_text("also precious")
    for target in (d, f):
        before = target.read_text() if target.is_file() else snapshot(target)
        with pytest.raises(CompileError, match="exists and is not a kiln artifact"):
            A.ArtifactWriter(target).__enter__()
        assert (target.read_text() if target.is_file() else snapshot(target)) == before
    assert leftovers(d) == [] and leftovers(f) == []


def test_output_exists_and_is_an_artifact_is_replaced(tmp_path):
    out = tmp_path / "x.kiln"
    old = fake_artifact(out, b"old")
    new = fake_artifact(out, b"new")
    assert old != new and snapshot(out) == new
    assert (out / "data.bin").read_bytes() == b"new"
    assert leftovers(out) == []


def test_two_compiles_at_once(tiny, tmp_path):
    model, _ = tiny
    out = tmp_path / "c.kiln"
    with A.ArtifactWriter(out) as first:
        with pytest.raises(CompileError, match="another kiln compile is writing"):
            A.ArtifactWriter(out).__enter__()
        # a whole second compile_model: refused at once, the first compile's temp dir untouched
        printed = run_compiler_code(f"""
            from kiln.compiler.build import compile_model
            from kiln.errors import CompileError
            try:
                compile_model({str(model)!r}, {str(out)!r}, target="llvm", dtype="float32")
                print("no error")
            except CompileError as e:
                print("CompileError:", e)
        """)
        assert printed.startswith("CompileError:") and "another kiln compile is writing" in printed, printed
        assert first.tmp is not None and first.tmp.is_dir()
        assert not out.exists()
    with A.ArtifactWriter(out):
        pass  # released


# --- 20: one flipped byte -----------------------------------------------------------


def test_spy_sees_the_library_load(art, load_spy):
    """Guards the tests below: an intact artifact does go through load_module."""
    kiln.runtime.load(art, max_seq_len=16)
    assert load_spy == [str(art / "lib" / "cpu.so")]


@pytest.mark.parametrize("rel", ["lib/cpu.so", "weights.safetensors", "tokenizer.json"])
@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_flipped_byte_in_file(art, load_spy, rel, where):
    p = art / rel
    flip_byte(p, {"start": 0, "middle": p.stat().st_size // 2, "end": p.stat().st_size - 1}[where])
    with pytest.raises(ArtifactError, match=f"{rel} fails its sha256 check") as ei:
        kiln.runtime.load(art)
    assert "recompile" in str(ei.value)
    assert load_spy == []


def test_flipped_byte_in_manifest(art, load_spy):
    raw = (art / mf.MANIFEST_NAME).read_bytes()
    # a byte inside the library's recorded hash: still valid JSON, so the self-hash must catch it
    sha = read_manifest(art)["files"]["lib/cpu.so"]["sha256"].encode()
    flip_byte(art / mf.MANIFEST_NAME, raw.index(sha) + 5)
    json.loads((art / mf.MANIFEST_NAME).read_text())
    with pytest.raises(ArtifactError, match="manifest hash mismatch"):
        kiln.runtime.load(art)
    assert load_spy == []


def test_flipped_byte_makes_manifest_invalid_json(art, load_spy):
    raw = bytearray((art / mf.MANIFEST_NAME).read_bytes())
    raw[0] ^= 0x80  # '{' -> 0xFB: not UTF-8
    (art / mf.MANIFEST_NAME).write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="not valid JSON"):
        kiln.runtime.load(art)
    assert load_spy == []


def test_truncated_and_missing_files(art, load_spy):
    lib = art / "lib" / "cpu.so"
    lib.write_bytes(lib.read_bytes()[:-1])
    with pytest.raises(ArtifactError, match="lib/cpu.so fails its sha256 check"):
        kiln.runtime.load(art)
    lib.unlink()
    with pytest.raises(ArtifactError, match="lib/cpu.so listed in the manifest is missing"):
        kiln.runtime.load(art)
    assert load_spy == []


def test_manifest_pointing_at_an_unhashed_library(art, load_spy):
    """A re-sealed manifest whose library is not among the hashed files."""
    (art / "lib" / "other.so").write_bytes((art / "lib" / "cpu.so").read_bytes())
    m = read_manifest(art)
    m["targets"][0]["library"] = "lib/other.so"
    write_manifest(art, m)
    with pytest.raises(ArtifactError, match="lists no hash"):
        kiln.runtime.load(art)
    m["targets"][0]["library"] = "../outside.so"
    m["files"]["../outside.so"] = m["files"]["lib/cpu.so"]
    write_manifest(art, m)
    with pytest.raises(ArtifactError, match="outside the artifact"):
        kiln.runtime.load(art)
    assert load_spy == []


# --- 21: another machine, CPU, OS, ABI, TVM -----------------------------------------


def _absent_cpu_flag() -> str:
    have = host_cpu_flags()
    if not have:
        pytest.skip("/proc/cpuinfo has no flags here")
    for flag in ("amx_tile", "avx512_fp16", "amx_bf16", "sve", "avx512_vp2intersect", "asimd", "avx512f"):
        if flag not in have:
            return flag
    pytest.skip("this CPU has every candidate flag")


def _other_machine() -> str:
    return "aarch64" if host_machine() != "aarch64" else "x86_64"


def edit_machine(m):
    m["targets"][0]["machine"] = _other_machine()
    return [_other_machine(), host_machine()]


def edit_cpu_flags(m):
    flag = _absent_cpu_flag()
    m["targets"][0]["required_cpu_flags"] = [*m["targets"][0]["required_cpu_flags"], flag]
    return [flag, m["targets"][0]["mcpu"]]


def edit_tvm(m):
    here = m["tvm_version"]
    m["tvm_version"] = "0.19.0"
    return ["0.19.0", here]


def edit_abi(m):
    m["runtime_abi"] = mf.RUNTIME_ABI + 1
    return [f"ABI {mf.RUNTIME_ABI + 1}", f"ABI {mf.RUNTIME_ABI}"]


def edit_os(m):
    m["targets"][0]["os"] = "darwin"
    return ["darwin", "linux"]


def edit_gpu_only(m):
    m["targets"] = [{"kind": "cuda", "device": "cuda", "arch": "sm_80", "triple": "x86_64-linux-gnu", "os": "linux", "library": "lib/cpu.so"}]
    return ["'cpu'", "cuda"]


@pytest.mark.parametrize("edit", [edit_machine, edit_cpu_flags, edit_tvm, edit_abi, edit_os, edit_gpu_only])
def test_artifact_for_another_machine(art, load_spy, edit):
    m = read_manifest(art)
    expected = edit(m)
    write_manifest(art, m)  # re-sealed: the self-hash passes, the host check must refuse
    with pytest.raises(ArtifactError) as ei:
        kiln.runtime.load(art)
    msg = str(ei.value)
    for part in expected:
        assert part in msg, (part, msg)
    assert "recompile" in msg
    assert load_spy == []


def test_cpu_artifact_asked_for_cuda(art, load_spy):
    with pytest.raises(ArtifactError, match=r"no code for device 'cuda' \(it has: cpu\).*recompile"):
        kiln.runtime.load(art, device="cuda")
    assert load_spy == []


# --- 22: other format versions, missing fields ---------------------------------------


@pytest.mark.parametrize("version", [2, 0, None, "1", True])
def test_other_format_version(art, load_spy, version):
    m = read_manifest(art)
    if version is None:
        del m["format_version"]
    else:
        m["format_version"] = version
    write_manifest(art, m)
    with pytest.raises(ArtifactError) as ei:
        kiln.runtime.load(art)
    msg = str(ei.value)
    assert f"format version {version!r}" in msg and f"reads version {mf.FORMAT_VERSION}" in msg, msg
    assert load_spy == []


@pytest.mark.parametrize("fields", [["params"], ["kv_cache", "files"], ["manifest_sha256"]])
def test_missing_fields(art, load_spy, fields):
    m = read_manifest(art)
    for f in fields:
        del m[f]
    write_manifest(art, m, reseal="manifest_sha256" not in fields)
    with pytest.raises(ArtifactError) as ei:
        kiln.runtime.load(art)
    msg = str(ei.value)
    assert all(f in msg for f in fields), msg
    assert f"format version {mf.FORMAT_VERSION}" in msg and f"reads version {mf.FORMAT_VERSION}" in msg
    assert load_spy == []


@pytest.mark.parametrize("edit", [
    lambda m: m.update(magic="something-else"),
    lambda m: m["kv_cache"].update(max_seq_len=-5),
    lambda m: m["kv_cache"].update(page_size=0),
    lambda m: m["targets"][0].update(required_cpu_flags="avx2"),
    lambda m: m.update(targets=[]),
    lambda m: m.update(files=[]),
], ids=["magic", "negative-context", "zero-page", "flags-not-a-list", "no-targets", "files-not-a-dict"])
def test_malformed_manifest_fields(art, load_spy, edit):
    m = read_manifest(art)
    edit(m)
    write_manifest(art, m)
    with pytest.raises(ArtifactError, match="not a kiln artifact|malformed"):
        kiln.runtime.load(art)
    assert load_spy == []


def test_weights_header_disagreeing_with_manifest(art, load_spy):
    """With hash checks off (load(verify=False)), read_weights still refuses a
    weights file whose header disagrees with the manifest's param spec."""
    m = read_manifest(art)
    m["params"][0]["shape"] = [m["params"][0]["shape"][0] + 1, m["params"][0]["shape"][1]]
    write_manifest(art, m)
    with pytest.raises(ArtifactError, match=f"param {m['params'][0]['name']} does not match"):
        kiln.runtime.load(art, verify=False)


# --- 23: reproducible builds ---------------------------------------------------------


def test_compiling_twice_gives_identical_hashes(tiny, tmp_path):
    model, first = tiny
    second = compile_artifact(model, tmp_path / "again.kiln")
    m1, m2 = read_manifest(first), read_manifest(second)
    f1, f2 = m1.pop("files"), m2.pop("files")
    for m in (m1, m2):
        m.pop("manifest_sha256")
    assert m1 == m2, "the manifests differ beyond file hashes (a timestamp or a path?)"
    assert set(f1) == set(f2) == {"lib/cpu.so", "weights.safetensors", "tokenizer.json"}
    assert f1 == f2, f"files differ between two compiles: {sorted(n for n in f1 if f1[n] != f2[n])}"
