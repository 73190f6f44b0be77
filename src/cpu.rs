//! CPU backend building blocks: a GEMM on strided slices (matrixmultiply's packed kernels,
//! parallelised here over blocks of the output), and deterministic parallel reductions.
//!
//! Determinism: every reduction splits its rows into a number of groups that depends only on
//! the problem size, never on the thread count, and adds the group partials in order. The
//! same inputs give bit-identical results on 1 or 64 threads.

use std::ops::Range;

use rayon::prelude::*;

/// Strided matrix view: element (i, j) at `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// Row-major matrix with `cols` columns.
    pub fn rows(data: &'a [f32], cols: usize) -> Mat<'a> {
        Mat { data, rs: cols, cs: 1 }
    }
    /// The transpose of a row-major matrix with `cols` columns.
    pub fn rows_t(data: &'a [f32], cols: usize) -> Mat<'a> {
        Mat { data, rs: 1, cs: cols }
    }
}

/// `C[m, n] = A[m, k] · B[k, n] + beta · C`, C row-major with `ldc` columns, single-threaded.
pub fn gemm(m: usize, k: usize, n: usize, a: Mat, b: Mat, beta: f32, c: &mut [f32], ldc: usize) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..m {
            for v in &mut c[i * ldc..i * ldc + n] {
                *v *= beta;
            }
        }
        return;
    }
    assert!(c.len() >= (m - 1) * ldc + n, "gemm: output too small");
    assert!(a.data.len() > (m - 1) * a.rs + (k - 1) * a.cs, "gemm: A too small");
    assert!(b.data.len() > (k - 1) * b.rs + (n - 1) * b.cs, "gemm: B too small");
    // SAFETY: bounds of all three operands were checked above for the given strides.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.data.as_ptr(),
            a.rs as isize,
            a.cs as isize,
            b.data.as_ptr(),
            b.rs as isize,
            b.cs as isize,
            beta,
            c.as_mut_ptr(),
            ldc as isize,
            1,
        );
    }
}

/// Multi-threaded `C = A · B + beta · C` (C row-major, `n` columns), split over row blocks of C,
/// or over column blocks when C has few rows. Each output element is computed by exactly one
/// task, so the result does not depend on the thread count.
pub fn par_gemm(m: usize, k: usize, n: usize, a: Mat, b: Mat, beta: f32, c: &mut [f32]) {
    let threads = rayon::current_num_threads();
    let flops = m * k * n;
    if threads == 1 || flops < 1 << 18 {
        return gemm(m, k, n, a, b, beta, c, n);
    }
    if m >= 16 * threads || m >= n {
        let block = m.div_ceil(threads * 4).max(8);
        c.par_chunks_mut(block * n).enumerate().for_each(|(bi, cb)| {
            let r0 = bi * block;
            let rows = cb.len() / n;
            let a_off = Mat { data: &a.data[r0 * a.rs..], rs: a.rs, cs: a.cs };
            gemm(rows, k, n, a_off, b, beta, cb, n);
        });
    } else {
        // Few rows: split the columns; each task writes a disjoint column block through a
        // raw pointer (rows interleave, so no safe chunking exists).
        let block = n.div_ceil(threads * 4).max(16);
        let ptr = SyncPtr(c.as_mut_ptr());
        (0..n.div_ceil(block)).into_par_iter().for_each(|bj| {
            let j0 = bj * block;
            let cols = block.min(n - j0);
            let b_off = Mat { data: &b.data[j0 * b.cs..], rs: b.rs, cs: b.cs };
            let len = (m - 1) * n + cols;
            // SAFETY: tasks write disjoint column ranges [j0, j0 + cols) of C.
            let cb = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(j0), len) };
            gemm(m, k, cols, a, b_off, beta, cb, n);
        });
    }
}

#[derive(Clone, Copy)]
pub struct SyncPtr<T>(pub *mut T);
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}
impl<T> SyncPtr<T> {
    pub fn get(self) -> *mut T {
        self.0
    }
}

/// Fixed split of `rows` into groups (independent of the thread count).
pub fn row_groups(rows: usize, min_rows_per_group: usize) -> Vec<Range<usize>> {
    let groups = rows.div_ceil(min_rows_per_group.max(1)).clamp(1, 64);
    (0..groups).map(|g| (g * rows / groups)..((g + 1) * rows / groups)).collect()
}

/// Deterministic parallel reduction of `width` f64 accumulators over `rows` rows:
/// `f(range, acc)` adds the contribution of rows `range` into `acc`.
pub fn par_reduce_rows<F>(rows: usize, width: usize, f: F) -> Vec<f64>
where
    F: Fn(Range<usize>, &mut [f64]) + Sync,
{
    let groups = row_groups(rows, 2048);
    if groups.len() <= 1 {
        // One group: no fork (a rayon dispatch costs more than a small tensor's work).
        let mut acc = vec![0.0f64; width];
        if let Some(r) = groups.into_iter().next() {
            f(r, &mut acc);
        }
        return acc;
    }
    let partials: Vec<Vec<f64>> = groups
        .into_par_iter()
        .map(|r| {
            let mut acc = vec![0.0f64; width];
            f(r, &mut acc);
            acc
        })
        .collect();
    let mut total = vec![0.0f64; width];
    for p in partials {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total
}

/// Σ of equally long vectors, added in order (deterministic).
pub fn sum_in_order(parts: Vec<Vec<f32>>, len: usize) -> Vec<f32> {
    let mut it = parts.into_iter();
    let mut acc = it.next().unwrap_or_else(|| vec![0.0f32; len]);
    for p in it {
        for (a, b) in acc.iter_mut().zip(p) {
            *a += b;
        }
    }
    acc
}

/// acc[i] += g[i], in parallel: a gradient added onto the one accumulated so far, in
/// autograd's order (`prev + g`; IEEE addition commutes, so also `g + prev`).
pub fn add_onto(acc: &mut [f32], g: &[f32]) {
    assert_eq!(acc.len(), g.len(), "add_onto: lengths differ");
    const CHUNK: usize = 1 << 14;
    let add = |(a, b): (&mut [f32], &[f32])| a.iter_mut().zip(b).for_each(|(a, b)| *a += *b);
    if acc.len() <= CHUNK {
        add((acc, g));
    } else {
        acc.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).for_each(add);
    }
}

/// `g` added onto `prev` when there is one (`add_onto`), else `g` itself.
pub fn added_onto(prev: Option<Vec<f32>>, g: Vec<f32>) -> Vec<f32> {
    match prev {
        Some(mut p) => {
            add_onto(&mut p, &g);
            p
        }
        None => g,
    }
}

/// A new vector of `n` f32 built in parallel chunks: `f(i, chunk)` fills chunk i (elements
/// i·chunk.., the last one shorter), which it receives zeroed. Each chunk is zeroed just before
/// `f` writes it, while it is in cache, so an output costs one pass over memory instead of the
/// two of `vec![0.0; n]` followed by the writes.
pub fn par_build(n: usize, chunk: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) -> Vec<f32> {
    par_build_init(n, chunk, || (), |_, i, c| f(i, c))
}

/// `par_build` without the zeroing, for producers that write every element themselves (the
/// convolution kernels, copies): `f(i, chunk)` gets chunk i uninitialised.
///
/// # Safety
/// `f` must initialise every element of its chunk before returning.
pub unsafe fn par_build_uninit(
    n: usize,
    chunk: usize,
    f: impl Fn(usize, &mut [std::mem::MaybeUninit<f32>]) + Sync + Send,
) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(n);
    if n > 0 && n <= chunk {
        f(0, &mut v.spare_capacity_mut()[..n]); // one chunk: no fork
    } else if n > 0 {
        v.spare_capacity_mut()[..n].par_chunks_mut(chunk.max(1)).enumerate().for_each(|(i, c)| f(i, c));
    }
    // SAFETY: the caller's `f` initialised every chunk.
    unsafe { v.set_len(n) };
    v
}

/// `par_build` with per-thread scratch state made by `init` (as rayon's `for_each_init`).
pub fn par_build_init<T>(
    n: usize,
    chunk: usize,
    init: impl Fn() -> T + Sync + Send,
    f: impl Fn(&mut T, usize, &mut [f32]) + Sync + Send,
) -> Vec<f32> {
    // Zero bytes are the f32 0.0, so after write_bytes the chunk is initialised and may be
    // viewed as &mut [f32] (MaybeUninit<f32> has f32's layout).
    fn zeroed(c: &mut [std::mem::MaybeUninit<f32>]) -> &mut [f32] {
        // SAFETY: as said above.
        unsafe {
            std::ptr::write_bytes(c.as_mut_ptr(), 0, c.len());
            &mut *(c as *mut [std::mem::MaybeUninit<f32>] as *mut [f32])
        }
    }
    let mut v: Vec<f32> = Vec::with_capacity(n);
    if n > 0 && n <= chunk {
        // One chunk: no fork (a rayon dispatch costs more than a small tensor's work).
        f(&mut init(), 0, zeroed(&mut v.spare_capacity_mut()[..n]));
    } else if n > 0 {
        v.spare_capacity_mut()[..n]
            .par_chunks_mut(chunk.max(1))
            .enumerate()
            .for_each_init(init, |state, (i, c)| f(state, i, zeroed(c)));
    }
    // SAFETY: every element of 0..n was initialised by its chunk above.
    unsafe { v.set_len(n) };
    v
}

/// Elementwise map of one slice into a new vector, in parallel.
pub fn par_map(x: &[f32], f: impl Fn(f32) -> f32 + Sync + Send) -> Vec<f32> {
    const CHUNK: usize = 1 << 14;
    par_build(x.len(), CHUNK, |i, o| {
        for (o, &i) in o.iter_mut().zip(&x[i * CHUNK..]) {
            *o = f(i);
        }
    })
}

/// Elementwise map of two slices into a new vector, in parallel.
pub fn par_zip(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync + Send) -> Vec<f32> {
    assert_eq!(a.len(), b.len());
    const CHUNK: usize = 1 << 14;
    par_build(a.len(), CHUNK, |i, o| {
        for ((o, &a), &b) in o.iter_mut().zip(&a[i * CHUNK..]).zip(&b[i * CHUNK..]) {
            *o = f(a, b);
        }
    })
}

/// Sum of the rows of a row-major [rows, width] matrix, deterministic.
pub fn sum_rows(x: &[f32], width: usize) -> Vec<f32> {
    let rows = x.len().checked_div(width).unwrap_or(0);
    par_reduce_rows(rows, width, |r, acc| {
        for row in x[r.start * width..r.end * width].chunks_exact(width) {
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += v as f64;
            }
        }
    })
    .into_iter()
    .map(|v| v as f32)
    .collect()
}

/// Keep freed memory in the allocator instead of returning it to the OS. A training step
/// frees and re-allocates the same large buffers (gradients, im2col blocks) every step;
/// returning them makes the kernel fault in and zero fresh pages each time. Binaries call
/// this once at start-up; they use mimalloc.
pub fn retain_freed_memory() {
    // mimalloc's `mi_option_purge_delay` (15 in mimalloc 2.x and 3.x): -1 = never purge.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: setting an allocator option is thread-safe and takes plain integers.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// Blocked, parallel transpose: returns [cols, width] with out[c·width + r] = src[r·stride + c]
/// for r < rows (≤ width) and c < cols; columns rows..width of the result are zero.
pub fn transpose_padded(src: &[f32], rows: usize, cols: usize, stride: usize, width: usize) -> Vec<f32> {
    const T: usize = 16;
    assert!(
        rows <= width && (rows == 0 || cols == 0 || (rows - 1) * stride + cols <= src.len()),
        "transpose_padded: bad sizes"
    );
    let mut out = vec![0.0f32; cols * width];
    if width == 0 {
        return out;
    }
    out.par_chunks_mut(T * width).enumerate().for_each(|(cb, dst)| {
        let c0 = cb * T;
        let nc = dst.len() / width;
        for r0 in (0..rows).step_by(T) {
            for c in 0..nc {
                let d = &mut dst[c * width..];
                for r in r0..(r0 + T).min(rows) {
                    d[r] = src[r * stride + c0 + c];
                }
            }
        }
    });
    out
}

/// Fill each row of a [rows, width] block with `bias` (if any); returns the GEMM beta that
/// accumulates onto it (1) or overwrites (0).
pub fn fill_rows(block: &mut [f32], width: usize, bias: Option<&[f32]>) -> f32 {
    match bias {
        Some(b) => {
            for row in block.chunks_exact_mut(width) {
                row.copy_from_slice(b);
            }
            1.0
        }
        None => 0.0,
    }
}
