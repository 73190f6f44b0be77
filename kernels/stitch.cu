// Sliding-window stitching on the device (the host oracle is src/eval/sliding.rs, Plan::stitch
// and Plan::blend). A window's output at one pyramid level, [PX, PY, PZ, C] channels last (f32
// or bf16: one batch item of the window batch), goes into the whole volume's map of that
// level, [OX, OY, OZ, C] f32. Which window voxel lands where is separable, so the host gives
// per axis a table of (output coordinate, window coordinate[, Gaussian weight]) pairs for
// this window (nx, ny, nz entries); one thread per (entry x, entry y, entry z, channel).
//
//   stitch_window: map[out] = window[in]                                         (=)
//     The central-region rule: the tables hold only the voxels this window owns, so
//     every map voxel is written by exactly one window of the plan.
//   blend_window: acc[out] += wx wy wz window[in], and weight[out voxel] += wx wy wz (by the
//     channel-0 thread)                                                          (+=)
//     MONAI's Gaussian blending; windows are queued one after another on one stream and each
//     map voxel appears at most once per window, so the sums are race-free and their order
//     is the windows' order: deterministic.
//   blend_normalize: acc[v, c] /= weight[v]                                       (=)
#include "common.cuh"

// Thread i's (x entry, y entry, z entry, channel) of a window's nx x ny x nz x C entries.
struct StitchEntry {
    int ex, ey, ez, c;
};
__device__ __forceinline__ StitchEntry stitch_entry(i64 i, int ny, int nz, int C) {
    StitchEntry s;
    s.c = (int)(i % C);
    i /= C;
    s.ez = (int)(i % nz);
    i /= nz;
    s.ey = (int)(i % ny);
    s.ex = (int)(i / ny);
    return s;
}

template <typename T>
__device__ void stitch_window(const T* src, float* dst, const int* xo, const int* xi, int nx, const int* yo, const int* yi, int ny, const int* zo, const int* zi, int nz, int PY, int PZ,
                              int OY, int OZ, int C) {
    GRID_STRIDE(i, (i64)nx * ny * nz * C) {
        const StitchEntry s = stitch_entry(i, ny, nz, C);
        const i64 in = (((i64)xi[s.ex] * PY + yi[s.ey]) * PZ + zi[s.ez]) * C + s.c;
        const i64 out = (((i64)xo[s.ex] * OY + yo[s.ey]) * OZ + zo[s.ez]) * C + s.c;
        dst[out] = ld(src, in);
    }
}
extern "C" __global__ void stitch_window_f32(const float* src, float* dst, const int* xo, const int* xi, int nx, const int* yo, const int* yi, int ny, const int* zo, const int* zi, int nz,
                                             int PY, int PZ, int OY, int OZ, int C) {
    stitch_window(src, dst, xo, xi, nx, yo, yi, ny, zo, zi, nz, PY, PZ, OY, OZ, C);
}
extern "C" __global__ void stitch_window_bf16(const bf16* src, float* dst, const int* xo, const int* xi, int nx, const int* yo, const int* yi, int ny, const int* zo, const int* zi, int nz,
                                              int PY, int PZ, int OY, int OZ, int C) {
    stitch_window(src, dst, xo, xi, nx, yo, yi, ny, zo, zi, nz, PY, PZ, OY, OZ, C);
}

template <typename T>
__device__ void blend_window(const T* src, float* acc, float* weight, const int* xo, const int* xi, const float* xw, int nx, const int* yo, const int* yi, const float* yw, int ny,
                             const int* zo, const int* zi, const float* zw, int nz, int PY, int PZ, int OY, int OZ, int C) {
    GRID_STRIDE(i, (i64)nx * ny * nz * C) {
        const StitchEntry s = stitch_entry(i, ny, nz, C);
        // The same product, in the same order, as the host's (wx wy) wz.
        const float w = xw[s.ex] * yw[s.ey] * zw[s.ez];
        const i64 in = (((i64)xi[s.ex] * PY + yi[s.ey]) * PZ + zi[s.ez]) * C + s.c;
        const i64 v = ((i64)xo[s.ex] * OY + yo[s.ey]) * OZ + zo[s.ez];
        acc[v * C + s.c] += w * ld(src, in);
        if (s.c == 0) weight[v] += w;
    }
}
extern "C" __global__ void blend_window_f32(const float* src, float* acc, float* weight, const int* xo, const int* xi, const float* xw, int nx, const int* yo, const int* yi, const float* yw,
                                            int ny, const int* zo, const int* zi, const float* zw, int nz, int PY, int PZ, int OY, int OZ, int C) {
    blend_window(src, acc, weight, xo, xi, xw, nx, yo, yi, yw, ny, zo, zi, zw, nz, PY, PZ, OY, OZ, C);
}
extern "C" __global__ void blend_window_bf16(const bf16* src, float* acc, float* weight, const int* xo, const int* xi, const float* xw, int nx, const int* yo, const int* yi, const float* yw,
                                             int ny, const int* zo, const int* zi, const float* zw, int nz, int PY, int PZ, int OY, int OZ, int C) {
    blend_window(src, acc, weight, xo, xi, xw, nx, yo, yi, yw, ny, zo, zi, zw, nz, PY, PZ, OY, OZ, C);
}

extern "C" __global__ void blend_normalize(float* acc, const float* weight, i64 voxels, int C) {
    GRID_STRIDE(i, voxels * C) { acc[i] /= weight[i / C]; }
}
