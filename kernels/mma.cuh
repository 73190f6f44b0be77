// Tensor-core building blocks for sm_80+ (A100, H100, H200): mma.sync m16n8k16 (bf16 in,
// f32 accumulate), ldmatrix and cp.async. This header owns every fragment-coordinate
// mapping: kernels use the mma_*_row / mma_*_col functions below, and the CUDA emulator's
// models of the three instructions are written in terms of the same functions, so a wrong
// mapping cannot hide in one place. The mappings are those of the PTX ISA ("Matrix
// Fragments for mma.m16n8k16 with floating point type"; ldmatrix's "Matrix fragment for
// ldmatrix"); tests/gpu/ (mma_layout_probe) checks them against the (thread, value) -> coordinate
// layouts that CuTe publishes for SM80_16x8x16_F32BF16BF16F32_TN, and the GPU bundle's
// layout probe (kernels/mma_probe.cu) compares them with the hardware bit for bit.
//
// Lane l of a warp: group g = l >> 2, thread-in-group t = l & 3.
//   A (16 x 16, row-major; 4 registers = 8 bf16, element e = 2 * register + half):
//     row = g + 8 * ((e >> 1) & 1), col = 2 t + (e & 1) + 8 * (e >> 2)
//   B (16 x 8, "col": k x n; 2 registers = 4 bf16): k = 2 t + (e & 1) + 8 * (e >> 1), n = g
//   C/D (16 x 8 f32; 4 values): row = g + 8 * (e >> 1), col = 2 t + (e & 1)
//   ldmatrix .x4 (non-transposed): lane 8 j + r gives the address of row r of 8 x 8 matrix j
//     (16 contiguous bytes); register j of lane l receives matrix j's row l >> 2, columns
//     2 (l & 3) and 2 (l & 3) + 1 (low half first).
//   ldmatrix .x4 .trans: the same row addresses; register j of lane l receives the transpose's
//     row l >> 2: matrix j's rows 2 (l & 3) and 2 (l & 3) + 1 at column l >> 2 (low half first).
//     So a matrix stored with k along its rows (x[k][m], m contiguous) loads as an A or B
//     fragment in k: A's (row l >> 2, cols 2 t, 2 t + 1) and B's (k = 2 t, 2 t + 1, n = g).
#pragma once
#include "common.cuh"

__device__ __forceinline__ int mma_a_row(int lane, int e) { return (lane >> 2) + 8 * ((e >> 1) & 1); }
__device__ __forceinline__ int mma_a_col(int lane, int e) { return 2 * (lane & 3) + (e & 1) + 8 * (e >> 2); }
__device__ __forceinline__ int mma_b_k(int lane, int e) { return 2 * (lane & 3) + (e & 1) + 8 * (e >> 1); }
__device__ __forceinline__ int mma_b_n(int lane, int e) { return (void)e, lane >> 2; }
__device__ __forceinline__ int mma_c_row(int lane, int e) { return (lane >> 2) + 8 * (e >> 1); }
__device__ __forceinline__ int mma_c_col(int lane, int e) { return 2 * (lane & 3) + (e & 1); }
__device__ __forceinline__ int ldsm_row(int lane) { return lane >> 2; }
__device__ __forceinline__ int ldsm_col(int lane, int half) { return 2 * (lane & 3) + half; }

// Two bf16 in one register, low half first.
__device__ __forceinline__ uint32_t pack_bf16x2(bf16 lo, bf16 hi) {
    uint16_t a, b;
    memcpy(&a, &lo, 2);
    memcpy(&b, &hi, 2);
    return (uint32_t)a | ((uint32_t)b << 16);
}

#ifndef VOX2VEC_EMULATOR

__device__ __forceinline__ unsigned lane_id() { return threadIdx.x & 31; }

// d = a b + c (m16n8k16, bf16 x bf16 -> f32).
__device__ __forceinline__ void mma_bf16_16816(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

// Four 8 x 8 b16 matrices from shared memory; `row` is this lane's row address.
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* row) {
    unsigned addr = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// ldmatrix .x4 .trans (see the header): four transposed 8 x 8 b16 matrices.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* row) {
    unsigned addr = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// 16 bytes global -> shared, asynchronously; bytes beyond src_bytes (0 or 16) are zero-filled.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
    unsigned addr = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

#else  // The CUDA emulator's models, in terms of the mappings above.

#include <cstdio>
#include <cstdlib>

inline unsigned lane_id() { return emu_linear_tid() % 32; }


inline float emu_bf16_lo(uint32_t r) { return __bfloat162float(__nv_bfloat16{(uint16_t)(r & 0xffffu)}); }
inline float emu_bf16_hi(uint32_t r) { return __bfloat162float(__nv_bfloat16{(uint16_t)(r >> 16)}); }

// Every lane posts its fragments; after the rendezvous each lane rebuilds A, B and C from all
// 32 lanes through the mapping functions and computes its own four outputs.
inline void mma_bf16_16816(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
    const unsigned t = emu_linear_tid(), w = t / 32, l = t % 32;
    unsigned* slot = emu_warp_slots[w][l];
    for (int i = 0; i < 4; ++i) slot[i] = a[i];
    slot[4] = b[0];
    slot[5] = b[1];
    for (int i = 0; i < 4; ++i) memcpy(&slot[6 + i], &c[i], 4);
    emu_syncwarp();
    float A[16][16], B[16][8], C[16][8];
    for (int q = 0; q < 32; ++q) {
        const unsigned* s = emu_warp_slots[w][q];
        for (int e = 0; e < 8; ++e) A[mma_a_row(q, e)][mma_a_col(q, e)] = (e & 1) ? emu_bf16_hi(s[e / 2]) : emu_bf16_lo(s[e / 2]);
        for (int e = 0; e < 4; ++e) B[mma_b_k(q, e)][mma_b_n(q, e)] = (e & 1) ? emu_bf16_hi(s[4 + e / 2]) : emu_bf16_lo(s[4 + e / 2]);
        for (int e = 0; e < 4; ++e) memcpy(&C[mma_c_row(q, e)][mma_c_col(q, e)], &s[6 + e], 4);
    }
    float out[4];
    for (int e = 0; e < 4; ++e) {
        const int m = mma_c_row(l, e), n = mma_c_col(l, e);
        float acc = C[m][n];
        for (int k = 0; k < 16; ++k) acc += A[m][k] * B[k][n];
        out[e] = acc;
    }
    emu_syncwarp();
    for (int e = 0; e < 4; ++e) d[e] = out[e];
}

// ldmatrix .x4 (trans false) or .x4.trans: every lane posts its row address; after the
// rendezvous register j of lane l takes its two halves from matrix j's rows (lanes 8 j + row).
inline void emu_ldmatrix_x4(uint32_t r[4], const void* row, bool trans) {
    emu_check_align(row, 16, "ldmatrix row");
    const unsigned t = emu_linear_tid(), w = t / 32, l = t % 32;
    uintptr_t p = (uintptr_t)row;
    memcpy(emu_warp_slots[w][l], &p, sizeof(p));
    emu_syncwarp();
    for (int j = 0; j < 4; ++j) {
        uint16_t half[2];
        for (int h = 0; h < 2; ++h) {
            // Plain: row l >> 2, column 2 (l & 3) + h. Transposed: row 2 (l & 3) + h, column l >> 2.
            const int mrow = trans ? ldsm_col(l, h) : ldsm_row(l), mcol = trans ? ldsm_row(l) : ldsm_col(l, h);
            uintptr_t src;
            memcpy(&src, emu_warp_slots[w][8 * j + mrow], sizeof(src));
            half[h] = ((const uint16_t*)src)[mcol];
        }
        r[j] = (uint32_t)half[0] | ((uint32_t)half[1] << 16);
    }
    emu_syncwarp();
}
inline void ldmatrix_x4(uint32_t r[4], const void* row) { emu_ldmatrix_x4(r, row, false); }
inline void ldmatrix_x4_trans(uint32_t r[4], const void* row) { emu_ldmatrix_x4(r, row, true); }

inline void cp_async_16(void* smem, const void* gmem, int src_bytes) {
    emu_check_align(smem, 16, "cp.async shared");
    emu_check_align(gmem, 16, "cp.async global");
    memset(smem, 0, 16);
    if (src_bytes > 0) memcpy(smem, gmem, src_bytes);
}
inline void cp_async_commit() {}
inline void cp_async_wait_all() {}

#endif
