// Helpers of the fully connected layer, whose products are cuBLAS SGEMMs:
//   fill_rows: y[r, j] = b[j] for a [rows, cols] matrix (the bias, before y += x W^T)     (=)
#include "common.cuh"

extern "C" __global__ void fill_rows(float* y, const float* b, i64 rows, i64 cols) {
    GRID_STRIDE(i, rows * cols) y[i] = b[i % cols];
}
