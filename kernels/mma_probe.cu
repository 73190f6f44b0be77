// The tensor-core layout probe: checks mma.cuh's fragment mappings, on the hardware and on
// the CUDA emulator (tests/gpu/, case mma_layout_probe; the GPU bundle runs it first).
//
// One warp, out[l * PROBE_STRIDE + ...] for lane l (all written, =):
//   [0, 4)   the four D values of mma m16n8k16 with A[m][k] = 16 m + k and
//            B[k][n] = [k == n] + 2 [k == n + 8] (bf16, exact), each lane building its
//            fragments through the mapping functions: D[m][n] = A[m][n] + 2 A[m][n + 8] at
//            (mma_c_row, mma_c_col) when the mappings agree with the hardware;
//   [4, 12)  the four registers of an ldmatrix .x4 of A's quadrants from shared memory
//            (matrix j = rows 8 (j & 1), cols 8 (j >> 1)), two bf16 each, as floats;
//   [12, 28) the mapping's A coordinates (row, col) of elements e = 0..8;
//   [28, 36) B coordinates (k, n) of e = 0..4;  [36, 44) C coordinates (row, col) of e = 0..4;
//   [44, 52) the four registers of an ldmatrix .x4 .trans of the same quadrants, as floats.
// A is staged through 512 bytes of dynamic shared memory (the launch's shared_bytes; at least
// 512), so the probe also exercises DYNAMIC_SHARED and the emulator's model of it.
// On the emulator the D values only show self-consistency (its mma model uses the same
// mappings); the coordinate tables are what the test checks against CuTe's layouts there.
#include "mma.cuh"

#define PROBE_STRIDE 52

// Four ldmatrix registers as 8 floats (low half first).
__device__ __forceinline__ void probe_store_regs(float* o, const uint32_t regs[4]) {
    for (int q = 0; q < 4; ++q) {
        bf16 lo, hi;
        uint16_t bl = (uint16_t)(regs[q] & 0xffffu), bh = (uint16_t)(regs[q] >> 16);
        memcpy(&lo, &bl, 2);
        memcpy(&hi, &bh, 2);
        o[2 * q] = __bfloat162float(lo);
        o[2 * q + 1] = __bfloat162float(hi);
    }
}

extern "C" __global__ void mma_layout_probe(float* out) {
    DYNAMIC_SHARED(bf16, As);  // [16][16]
    const int l = (int)lane_id();
    float* o = out + l * PROBE_STRIDE;
    for (int e = l; e < 256; e += 32) As[e] = __float2bfloat16_rn((float)e);
    __syncthreads();
    uint32_t a[4], b[2];
    for (int q = 0; q < 4; ++q) {
        bf16 lo = __float2bfloat16_rn((float)(mma_a_row(l, 2 * q) * 16 + mma_a_col(l, 2 * q)));
        bf16 hi = __float2bfloat16_rn((float)(mma_a_row(l, 2 * q + 1) * 16 + mma_a_col(l, 2 * q + 1)));
        a[q] = pack_bf16x2(lo, hi);
    }
    for (int q = 0; q < 2; ++q) {
        float v[2];
        for (int h = 0; h < 2; ++h) {
            int k = mma_b_k(l, 2 * q + h), n = mma_b_n(l, 2 * q + h);
            v[h] = (k == n ? 1.f : 0.f) + (k == n + 8 ? 2.f : 0.f);
        }
        b[q] = pack_bf16x2(__float2bfloat16_rn(v[0]), __float2bfloat16_rn(v[1]));
    }
    float c[4] = {0.f, 0.f, 0.f, 0.f}, d[4];
    mma_bf16_16816(d, a, b, c);
    for (int e = 0; e < 4; ++e) o[e] = d[e];
    const int j = l / 8, r = l % 8;
    uint32_t regs[4];
    ldmatrix_x4(regs, &As[(8 * (j & 1) + r) * 16 + 8 * (j >> 1)]);
    probe_store_regs(o + 4, regs);
    ldmatrix_x4_trans(regs, &As[(8 * (j & 1) + r) * 16 + 8 * (j >> 1)]);
    probe_store_regs(o + 44, regs);
    for (int e = 0; e < 8; ++e) {
        o[12 + 2 * e] = (float)mma_a_row(l, e);
        o[13 + 2 * e] = (float)mma_a_col(l, e);
    }
    for (int e = 0; e < 4; ++e) {
        o[28 + 2 * e] = (float)mma_b_k(l, e);
        o[29 + 2 * e] = (float)mma_b_n(l, e);
        o[36 + 2 * e] = (float)mma_c_row(l, e);
        o[37 + 2 * e] = (float)mma_c_col(l, e);
    }
}
