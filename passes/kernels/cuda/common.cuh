// kiln: helpers shared by every kiln CUDA header (compiler/cuda_codegen.py
// puts this file first): conversions between the cache/weight dtypes and fp32,
// cp.async (global -> shared, 16 bytes, asynchronous), vector loads to fp32.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <stdint.h>

namespace kiln {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = valid ? 16 : 0;  // 0 source bytes: the 16 destination bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

template <typename A, typename B> struct RowsSame { static constexpr bool value = false; };
template <typename A> struct RowsSame<A, A> { static constexpr bool value = true; };

// D += A . B on tensor cores, m16n8k16 (A row-major 16 x 16, B "col" 16 x 8 as [n][k]), 16-bit in, fp32 accumulate.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  if constexpr (RowsSame<T, __nv_bfloat16>::value) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// Two 16-bit values of T in one 32-bit register (low half: a), as MMA operands hold them.
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float a, float b) {
  if constexpr (RowsSame<T, __nv_bfloat16>::value) {
    __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&v);
  } else {
    __half2 v = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&v);
  }
}

// Four 8 x 8 matrices of 16-bit values from shared memory (lane i gives the row address of
// matrix i / 8, row i % 8; register j holds matrix j, row lane / 4, columns 2 (lane % 4) + 0, 1);
// _trans: each matrix transposed on the way.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}

// VEC elements of T (8 x 16-bit = one 16-byte load; 8 x fp32 = two) to fp32.
template <typename T, int VEC, bool GLOBAL = true>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float* out) {
  if constexpr (sizeof(T) == 2) {
    static_assert(VEC % 8 == 0, "16-bit loads are 8 wide");
#pragma unroll
    for (int c = 0; c < VEC / 8; ++c) {
      uint4 raw = GLOBAL ? __ldg(reinterpret_cast<const uint4*>(p) + c) : reinterpret_cast<const uint4*>(p)[c];
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int j = 0; j < 8; ++j) out[c * 8 + j] = to_float(e[j]);
    }
  } else {
    static_assert(VEC % 4 == 0, "fp32 loads are 4 wide");
#pragma unroll
    for (int c = 0; c < VEC / 4; ++c) {
      float4 raw = GLOBAL ? __ldg(reinterpret_cast<const float4*>(p) + c) : reinterpret_cast<const float4*>(p)[c];
      out[c * 4 + 0] = raw.x; out[c * 4 + 1] = raw.y; out[c * 4 + 2] = raw.z; out[c * 4 + 3] = raw.w;
    }
  }
}

// int8 / e4m3 codes (passes/kv_quant.py): the KV cache, fp8 weights (qgemv, gemm_tn_q)
constexpr int kKvInt8 = 0, kKvFp8 = 1;

template <int FMT> __device__ __forceinline__ float kv_qmax() { return FMT == kKvInt8 ? 127.f : 448.f; }

template <int FMT>
__device__ __forceinline__ float kv_decode(uint32_t c) {
  if constexpr (FMT == kKvInt8) {
    return static_cast<float>(static_cast<int8_t>(c & 0xFF));
  } else {
    const uint32_t mag = c & 0x7F;
    return __uint_as_float((mag ? (mag << 20) + (120u << 23) : 0u) | ((c & 0x80) << 24));
  }
}

// The 4 codes of a 32-bit word -> floats (before the row scale), the same values
// as kv_decode: int8 through the mantissa of 2^23 (one PRMT + one FADD per code,
// no I2F); fp8 with the hardware e4m3x2 -> f16x2 conversion on sm_89+ (codes
// 0x7F / 0xFF, NaN in e4m3fn, are never written).
template <int FMT>
__device__ __forceinline__ void kv_decode4(uint32_t w, float* f) {
  if constexpr (FMT == kKvInt8) {
    const uint32_t b = w ^ 0x80808080u;  // signed -> biased by 128
#pragma unroll
    for (int j = 0; j < 4; ++j) f[j] = __uint_as_float(__byte_perm(b, 0x4B000000u, 0x7650 + j)) - 8388736.f;  // 2^23 + 128
  } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    const __half2_raw lo = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(w & 0xFFFF), __NV_E4M3);
    const __half2_raw hi = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(w >> 16), __NV_E4M3);
    const float2 a = __half22float2(__half2(lo)), b = __half22float2(__half2(hi));
    f[0] = a.x; f[1] = a.y; f[2] = b.x; f[3] = b.y;
#else
#pragma unroll
    for (int j = 0; j < 4; ++j) f[j] = kv_decode<FMT>(w >> (8 * j));
#endif
  }
}

// Sum each of R per-thread partials over the block (warp shuffles, then shared memory
// across the NW warps); the result is valid in threads 0..R-1 (thread r: sum r). The
// epilogue of the expert GEMVs (moe.cuh, qmoe.cuh). qgemv.cuh keeps its own inline copy:
// calling this made Llama-3-8B's q4g128 down GEMV 21.8 -> 24.6 us on the H200 (ncu,
// 2026-12-01; benchmarks/NOTES.md), the MoE kernels' SASS was unchanged by it.
template <int NW, int R>
__device__ __forceinline__ float block_sum_rows(const float* acc) {
  __shared__ float part[NW][R];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float v = acc[r];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) part[warp][r] = v;
  }
  __syncthreads();
  float v = 0.f;
  if (threadIdx.x < R) {
#pragma unroll
    for (int w = 0; w < NW; ++w) v += part[w][threadIdx.x];
  }
  return v;
}

}  // namespace kiln
