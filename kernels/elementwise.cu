// Elementwise kernels (grid-stride loops, one element per thread-iteration, outputs written =):
//   cast:   y = x converted between f32 and bf16 (round to nearest even)
//   fill:   y = value (f32)
//   relu:   y = max(x, 0); backward dx = dy where y > 0 (PyTorch's convention)
//   add:    y = a + b (same shape and type)
//   scale_by_scalar: x *= s[0] (f32, in place; s a device scalar, so the host never reads it)
// relu and add also come as NAME_f32x4 / NAME_bf16x8: the same expression per element, 16 bytes
// per access and thread-iteration (n a multiple of 4 / 8, every pointer 16-byte aligned; the
// launcher checks).
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

template <typename T>
__device__ void relu_forward_vec(const T* x, T* y, i64 n) {
    constexpr int V = VEC_OF(T);
    GRID_STRIDE(g, n / V) {
        float v[V];
        ld_lanes(x + g * V, v);
#pragma unroll
        for (int j = 0; j < V; ++j) v[j] = v[j] > 0.f ? v[j] : 0.f;
        st_lanes(y + g * V, v);
    }
}
extern "C" __global__ void relu_forward_f32x4(const float* x, float* y, i64 n) { relu_forward_vec(x, y, n); }
extern "C" __global__ void relu_forward_bf16x8(const bf16* x, bf16* y, i64 n) { relu_forward_vec(x, y, n); }

template <typename T>
__device__ void relu_backward_vec(const T* y, const T* dy, T* dx, i64 n) {
    constexpr int V = VEC_OF(T);
    GRID_STRIDE(g, n / V) {
        float a[V], d[V];
        ld_lanes(y + g * V, a);
        ld_lanes(dy + g * V, d);
#pragma unroll
        for (int j = 0; j < V; ++j) d[j] = a[j] > 0.f ? d[j] : 0.f;
        st_lanes(dx + g * V, d);
    }
}
extern "C" __global__ void relu_backward_f32x4(const float* y, const float* dy, float* dx, i64 n) { relu_backward_vec(y, dy, dx, n); }
extern "C" __global__ void relu_backward_bf16x8(const bf16* y, const bf16* dy, bf16* dx, i64 n) { relu_backward_vec(y, dy, dx, n); }

template <typename T>
__device__ void add_vec(const T* a, const T* b, T* y, i64 n) {
    constexpr int V = VEC_OF(T);
    GRID_STRIDE(g, n / V) {
        float u[V], w[V];
        ld_lanes(a + g * V, u);
        ld_lanes(b + g * V, w);
#pragma unroll
        for (int j = 0; j < V; ++j) u[j] += w[j];
        st_lanes(y + g * V, u);
    }
}
extern "C" __global__ void add_f32x4(const float* a, const float* b, float* y, i64 n) { add_vec(a, b, y, n); }
extern "C" __global__ void add_bf16x8(const bf16* a, const bf16* b, bf16* y, i64 n) { add_vec(a, b, y, n); }
