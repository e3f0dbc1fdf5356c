// kiln: helpers shared by every kiln CUDA header (compiler/cuda_codegen.py
// puts this file first): conversions between the cache/weight dtypes and fp32,
// cp.async (global -> shared, 16 bytes, asynchronous), vector loads to fp32.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
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

}  // namespace kiln
