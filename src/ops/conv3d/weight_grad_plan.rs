//! The loop plan both SIMD weight-gradient kernels follow (`avx2::weight_grad_runs`,
//! `avx512::weight_grad_runs`).
//!
//! The product is dW[o, t·kk + k] += Σ_rows a[(row + offs[t])·rs + k] · dy[voxel·co + o]: a
//! GEMM with a tiny output (Co × 27·Ci) and a huge reduction (the voxels). Rows come as *runs*
//! of consecutive rows paired with consecutive voxels of dy (a line of Z voxels for the
//! shifted path, so the padding rows between lines are never visited; dy is read in place,
//! unpadded). The register tile is
//! A vectors of reduction indices (contiguous in `a`) × B output channels (broadcast from
//! dy): per row A loads and B broadcasts feed A·B FMAs, and dW is already in its final
//! [Co, 27·Ci] layout. Runs are taken in cache blocks (the block's rows of `a` and dy stay in
//! L1 while every tile of every tap passes over them).
//!
//! Every output's FMAs run over the rows in run order whatever the tile shapes and the vector
//! width, so AVX2 and AVX-512 give the same bits.

/// Bytes of `a` and dy rows a cache block aims at (about half of a 48 KiB L1).
const BLOCK_BYTES: usize = 24 << 10;

pub struct WeightGradPlan {
    /// Row stride of `a` (values).
    pub rs: usize,
    /// Row offset of each tap group.
    pub offs: Vec<usize>,
    /// Reduction indices per tap group.
    pub kk: usize,
    /// Output channels (dy's row stride).
    pub co: usize,
    /// (first row of `a`, first voxel of dy, rows) of each run.
    pub runs: Vec<(usize, usize, usize)>,
    /// Runs per cache block.
    pub block_runs: usize,
    /// The reduction's vectors in register-tile chunks: (first vector, vectors, valid lanes of
    /// the chunk's last vector).
    pub k_chunks: Vec<(usize, usize, usize)>,
    /// For a chunk of A vectors (index A − 1): the output channels in tiles (first, count).
    pub o_chunks: Vec<Vec<(usize, usize)>>,
}

impl WeightGradPlan {
    /// `lanes` per vector; `max_b[A − 1]`: the most output channels a tile of A vectors holds
    /// in registers (its length is the most vectors a tile takes).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        lanes: usize,
        max_b: &[usize],
        rs: usize,
        offs: &[usize],
        kk: usize,
        co: usize,
        runs: Vec<(usize, usize, usize)>,
    ) -> WeightGradPlan {
        let vectors = kk.div_ceil(lanes);
        let tail = kk - (vectors.max(1) - 1) * lanes;
        let k_chunks = even_chunks(vectors, max_b.len())
            .into_iter()
            .map(|(v0, n)| (v0, n, if v0 + n == vectors { tail } else { lanes }))
            .collect();
        let o_chunks = max_b.iter().map(|&b| even_chunks(co, b)).collect();
        let block_rows = (BLOCK_BYTES / (4 * (rs + co).max(1))).clamp(16, 512);
        // Runs longer than a cache block are cut into consecutive pieces (the same rows in the
        // same order, so the same sums).
        let runs: Vec<(usize, usize, usize)> = runs
            .into_iter()
            .flat_map(|(row, voxel, len)| {
                (0..len).step_by(block_rows).map(move |s| (row + s, voxel + s, (len - s).min(block_rows)))
            })
            .collect();
        let longest = runs.iter().map(|r| r.2).max().unwrap_or(1).max(1);
        WeightGradPlan {
            rs,
            offs: offs.to_vec(),
            kk,
            co,
            runs,
            block_runs: (block_rows / longest).max(1),
            k_chunks,
            o_chunks,
        }
    }

    /// dW's row stride: every tap group's reduction indices.
    pub fn ldw(&self) -> usize {
        self.offs.len() * self.kk
    }

    pub fn blocks(&self) -> std::slice::Chunks<'_, (usize, usize, usize)> {
        self.runs.chunks(self.block_runs)
    }

    /// Every register tile, in the order both kernel sets run them (cache block, tap group,
    /// reduction chunk, output-channel chunk), with its offsets for vectors of `lanes` values.
    pub fn tiles(&self, lanes: usize) -> impl Iterator<Item = Tile<'_>> + '_ {
        self.blocks().flat_map(move |runs| {
            self.offs.iter().enumerate().flat_map(move |(t, &off)| {
                self.k_chunks.iter().flat_map(move |&(v0, vectors, tail)| {
                    self.o_chunks[vectors - 1].iter().map(move |&(o0, channels)| Tile {
                        runs,
                        a: off * self.rs + lanes * v0,
                        dy: o0,
                        dw: o0 * self.ldw() + t * self.kk + lanes * v0,
                        vectors,
                        channels,
                        tail,
                    })
                })
            })
        })
    }

    /// Panics unless every read and write the kernels make stays inside buffers of these
    /// lengths.
    pub fn check(&self, a_len: usize, dy_len: usize, dw_len: usize) {
        assert!(
            dw_len >= self.co * self.ldw(),
            "weight gradient: dW holds {dw_len} values, needs {}",
            self.co * self.ldw()
        );
        if self.kk == 0 || self.co == 0 {
            return;
        }
        let max_off = self.offs.iter().copied().max().unwrap_or(0);
        for &(row, voxel, len) in self.runs.iter().filter(|r| r.2 > 0) {
            assert!(
                (row + len - 1 + max_off) * self.rs + self.kk <= a_len,
                "weight gradient: run at row {row} reads past the input"
            );
            assert!((voxel + len) * self.co <= dy_len, "weight gradient: run at voxel {voxel} reads past dy");
        }
    }
}

/// One register tile: A = `vectors` vectors of reduction indices × B = `channels` output
/// channels over a block of runs; offsets (in values) into `a`, dy and dW.
pub struct Tile<'p> {
    pub runs: &'p [(usize, usize, usize)],
    pub a: usize,
    pub dy: usize,
    pub dw: usize,
    pub vectors: usize,
    pub channels: usize,
    /// Valid lanes of the last vector.
    pub tail: usize,
}

/// 0..n in ⌈n / max⌉ chunks of near-equal size: (start, size).
fn even_chunks(n: usize, max: usize) -> Vec<(usize, usize)> {
    let c = n.div_ceil(max.max(1));
    let mut start = 0;
    (0..c)
        .map(|i| {
            let size = n / c + usize::from(i < n % c);
            start += size;
            (start - size, size)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_in_order() {
        assert_eq!(even_chunks(12, 4), vec![(0, 4), (4, 4), (8, 4)]);
        assert_eq!(even_chunks(5, 4), vec![(0, 3), (3, 2)]);
        assert_eq!(
            even_chunks(64, 6),
            [(0, 6), (6, 6), (12, 6), (18, 6), (24, 6), (30, 6), (36, 6), (42, 6), (48, 6), (54, 5), (59, 5)]
        );
        assert!(even_chunks(0, 4).is_empty());
        let p = WeightGradPlan::new(16, &[16, 12, 8, 6], 5, &[0], 15, 20, vec![(0, 0, 3)]);
        assert_eq!(p.k_chunks, vec![(0, 1, 15)]);
        // A run longer than a cache block (here 512 rows) is cut in order.
        let p = WeightGradPlan::new(16, &[16, 12, 8, 6], 1, &[0], 3, 1, vec![(7, 3, 1100)]);
        assert_eq!(p.runs, vec![(7, 3, 512), (519, 515, 512), (1031, 1027, 76)]);
        let p = WeightGradPlan::new(8, &[8, 6, 4], 32, &[0, 3], 96, 32, vec![(0, 0, 3)]);
        assert_eq!(p.k_chunks, vec![(0, 3, 8), (3, 3, 8), (6, 3, 8), (9, 3, 8)]);
    }
}
