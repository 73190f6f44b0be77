// Helpers of the fully connected layer, whose products are cuBLAS SGEMMs:
//   fill_rows: y[r, j] = b[j] for a [rows, cols] matrix (the bias, before y += x W^T)     (=)
#include "common.cuh"

extern "C" __global__ void fill_rows(float* y, const float* b, i64 rows, i64 cols) {
    ChannelCursor cc(GRID_FIRST, GRID_STEP, (int)cols);
    for (i64 i = GRID_FIRST; i < rows * cols; i += GRID_STEP, cc.advance()) y[i] = b[cc.c];
}
