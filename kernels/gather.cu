// Voxel gathers and channel concatenation.
//   gather_rows: out[p, c] = f[offs[p], c] (f32 out, f f32 or bf16); one thread per (p, c)   (=)
//   scatter_add_rows: df[offs[p], c] += dy[p, c] (f32, atomics: pairs may share a voxel, so
//     the order of the few colliding additions is not fixed)                              (+=)
//   copy_cols: dst[r, dst_off + j] = src[r, src_off + j] for j < width (f32)               (=)
#include "common.cuh"

template <typename T>
__device__ void gather_rows(const T* f, const i64* offs, float* out, i64 P, int C) {
    GRID_STRIDE(i, P * C) {
        i64 p = i / C;
        int c = (int)(i - p * C);
        out[i] = ld(f, offs[p] * C + c);
    }
}
extern "C" __global__ void gather_rows_f32(const float* f, const i64* offs, float* out, i64 P, int C) { gather_rows(f, offs, out, P, C); }
extern "C" __global__ void gather_rows_bf16(const bf16* f, const i64* offs, float* out, i64 P, int C) { gather_rows(f, offs, out, P, C); }

extern "C" __global__ void scatter_add_rows(const float* dy, const i64* offs, float* df, i64 P, int C) {
    GRID_STRIDE(i, P * C) {
        i64 p = i / C;
        int c = (int)(i - p * C);
        atomicAdd(&df[offs[p] * C + c], dy[i]);
    }
}

extern "C" __global__ void copy_cols(const float* src, i64 src_ld, i64 src_off, float* dst, i64 dst_ld, i64 dst_off, i64 rows, i64 width) {
    GRID_STRIDE(i, rows * width) {
        i64 r = i / width, j = i - r * width;
        dst[r * dst_ld + dst_off + j] = src[r * src_ld + src_off + j];
    }
}
