// Voxel gathers and channel concatenation.
//   gather_rows: out[p, c] = f[offs[p], c] (f32 out, f f32 or bf16); one thread per (p, c)   (=)
//   scatter_segments: the gather's backward without atomics. The host sorts the pairs by
//     voxel (stable): segment u covers order[start[u] .. start[u + 1]), all at voxel
//     voxel[u]; one thread per (u, c) sums its pairs' dy in that fixed order and writes
//     df[voxel[u], c] (f32 or bf16, rounded once); df's other voxels are left as they are
//     (the caller zeroes them). Segments with voxel[u] < 0 are padding and write nothing:
//     U is a bound fixed by the shapes, not the batch's count, so the launch is the same
//     for every batch.                                                                   (=)
//   copy_cols: dst[r, dst_off + j] = src[r, src_off + j] for j < width (f32)               (=)
//   pad_channels_bf16: y [rows, W] = x [rows, C] with columns C .. W zero (bf16)           (=)
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

template <typename T>
__device__ void scatter_segments(const float* dy, const i64* order, const i64* start, const i64* voxel, T* df, i64 U, int C) {
    GRID_STRIDE(i, U * C) {
        i64 u = i / C;
        int c = (int)(i - u * C);
        if (voxel[u] < 0) continue;
        float s = 0.f;
        for (i64 q = start[u]; q < start[u + 1]; ++q) s += dy[order[q] * C + c];
        st(df, voxel[u] * C + c, s);
    }
}
extern "C" __global__ void scatter_segments_f32(const float* dy, const i64* order, const i64* start, const i64* voxel, float* df, i64 U, int C) {
    scatter_segments(dy, order, start, voxel, df, U, C);
}
extern "C" __global__ void scatter_segments_bf16(const float* dy, const i64* order, const i64* start, const i64* voxel, bf16* df, i64 U, int C) {
    scatter_segments(dy, order, start, voxel, df, U, C);
}

extern "C" __global__ void copy_cols(const float* src, i64 src_ld, i64 src_off, float* dst, i64 dst_ld, i64 dst_off, i64 rows, i64 width) {
    RowCursor rc(GRID_FIRST, GRID_STEP, (int)width);
    for (i64 i = GRID_FIRST; i < rows * width; i += GRID_STEP, rc.advance()) dst[rc.r * dst_ld + dst_off + rc.j] = src[rc.r * src_ld + src_off + rc.j];
}

extern "C" __global__ void pad_channels_bf16(const bf16* x, bf16* y, int C, int W, i64 rows) {
    RowCursor rc(GRID_FIRST, GRID_STEP, W);
    for (i64 i = GRID_FIRST; i < rows * W; i += GRID_STEP, rc.advance()) y[i] = rc.j < C ? x[rc.r * C + rc.j] : __float2bfloat16_rn(0.f);
}
