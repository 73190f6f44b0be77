// Elementwise kernels (grid-stride loops, one element per thread-iteration, outputs written =):
//   cast:   y = x converted between f32 and bf16 (round to nearest even)
//   fill:   y = value (f32)
//   relu:   y = max(x, 0); backward dx = dy where y > 0 (PyTorch's convention)
//   add:    y = a + b (same shape and type)
//   scale_by_scalar: x *= s[0] (f32, in place; s a device scalar, so the host never reads it)
#include "common.cuh"

extern "C" __global__ void cast_f32_to_bf16(const float* x, bf16* y, i64 n) {
    GRID_STRIDE(i, n) y[i] = __float2bfloat16_rn(x[i]);
}
extern "C" __global__ void cast_bf16_to_f32(const bf16* x, float* y, i64 n) {
    GRID_STRIDE(i, n) y[i] = __bfloat162float(x[i]);
}
extern "C" __global__ void fill_f32(float* y, float value, i64 n) {
    GRID_STRIDE(i, n) y[i] = value;
}
extern "C" __global__ void scale_by_scalar_f32(float* x, const float* s, i64 n) {
    float k = s[0];
    GRID_STRIDE(i, n) x[i] *= k;
}

template <typename T>
__device__ void relu_forward(const T* x, T* y, i64 n) {
    GRID_STRIDE(i, n) {
        float v = ld(x, i);
        st(y, i, v > 0.f ? v : 0.f);
    }
}
extern "C" __global__ void relu_forward_f32(const float* x, float* y, i64 n) { relu_forward(x, y, n); }
extern "C" __global__ void relu_forward_bf16(const bf16* x, bf16* y, i64 n) { relu_forward(x, y, n); }

template <typename T>
__device__ void relu_backward(const T* y, const T* dy, T* dx, i64 n) {
    GRID_STRIDE(i, n) st(dx, i, ld(y, i) > 0.f ? ld(dy, i) : 0.f);
}
extern "C" __global__ void relu_backward_f32(const float* y, const float* dy, float* dx, i64 n) { relu_backward(y, dy, dx, n); }
extern "C" __global__ void relu_backward_bf16(const bf16* y, const bf16* dy, bf16* dx, i64 n) { relu_backward(y, dy, dx, n); }

template <typename T>
__device__ void add(const T* a, const T* b, T* y, i64 n) {
    GRID_STRIDE(i, n) st(y, i, ld(a, i) + ld(b, i));
}
extern "C" __global__ void add_f32(const float* a, const float* b, float* y, i64 n) { add(a, b, y, n); }
extern "C" __global__ void add_bf16(const bf16* a, const bf16* b, bf16* y, i64 n) { add(a, b, y, n); }
