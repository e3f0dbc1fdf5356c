"""cuBLAS (through torch.matmul, bf16) on the shapes of gemm_wg_check.cu: the peer for kiln's
prefill GEMM, run in the same device call. Prints TFLOP/s per shape."""
import torch

shapes = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)]
print(f"{'M':>6} {'N':>7} {'K':>6} | cublas TF/s")
for N, K in shapes:
    for M in (128, 512, 2048, 8192):
        if N * M > 600e6:
            continue
        a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.05
        for _ in range(3):
            a @ w.T
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(20):
            a @ w.T
        e1.record()
        torch.cuda.synchronize()
        ms = e0.elapsed_time(e1) / 20
        print(f"{M:>6} {N:>7} {K:>6} | {2 * M * N * K / ms / 1e9:9.1f}   ({ms * 1e3:.1f} us)")
