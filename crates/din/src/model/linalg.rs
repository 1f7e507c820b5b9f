//! Matrix products over the `gemm` crates' f32 kernels (`gemm-f32`, the
//! function the `gemm` facade dispatches f32 to), or, for mixed-precision
//! training ([`Gemm`] with a bf16 [`Kernel`]), with operands rounded to
//! bf16 and sums in f32 (see [`super::bf16`]). All matrices are row-major
//! `f32`.

use gemm_common::Parallelism;

use super::bf16::{training_product, Kernel};

/// Products smaller than this many multiply-adds run on the calling thread.
/// The MLP's products at a training batch of 256 (about 2M multiply-adds)
/// ran faster on one thread than split by `gemm` over two: the MLP's
/// forward and backward passes took 0.058 s of an epoch of
/// `din bench run` instead of 0.085 s (2^16 before).
const PARALLEL_THRESHOLD: usize = 1 << 22;

/// Whether a `rows x cols` matrix with non-negative strides lies inside `len`
/// elements. Checked arithmetic: a huge dimension must not wrap past the
/// check into `gemm`.
fn fits(len: usize, rows: usize, cols: usize, rs: isize, cs: isize) -> bool {
    if rows == 0 || cols == 0 {
        return true;
    }
    let (Ok(rs), Ok(cs)) = (usize::try_from(rs), usize::try_from(cs)) else {
        return false;
    };
    let last = (rows - 1)
        .checked_mul(rs)
        .and_then(|r| (cols - 1).checked_mul(cs).and_then(|c| r.checked_add(c)));
    last.is_some_and(|last| last < len)
}

/// `c[m,n] (+)= a[m,k] · b[k,n]` on `kernel`, `a[i, p]` at
/// `a[i * a_rs + p * a_cs]`, `b[p, j]` at `b[p * b_rs + j * b_cs]`.
#[allow(clippy::too_many_arguments)]
fn product(
    kernel: Kernel,
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    a: &[f32],
    (a_rs, a_cs): (isize, isize),
    b: &[f32],
    (b_rs, b_cs): (isize, isize),
    accumulate: bool,
    may_split: bool,
) {
    assert!(
        m.checked_mul(n).is_some_and(|mn| c.len() >= mn)
            && fits(a.len(), m, k, a_rs, a_cs)
            && fits(b.len(), k, n, b_rs, b_cs),
        "matrix product shape mismatch"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].iter_mut().for_each(|x| *x = 0.0);
        }
        return;
    }
    if kernel.is_bf16() {
        // `fits` checked the strides non-negative.
        let u = |(r, c): (isize, isize)| (r as usize, c as usize);
        let (a, b) = ((a, u((a_rs, a_cs))), (b, u((b_rs, b_cs))));
        return training_product(kernel, (m, n, k), c, a, b, accumulate, may_split);
    }
    let parallelism =
        if may_split && m.saturating_mul(n).saturating_mul(k) >= PARALLEL_THRESHOLD && rayon::current_num_threads() > 1
        {
            Parallelism::Rayon(0)
        } else {
            Parallelism::None
        };
    // What the `gemm` facade does before it hands f32 to `gemm-f32`: its
    // kernels want a column-major destination, so a row-major `c` (column
    // stride 1 below its row stride `n`) is computed as `cᵀ = bᵀ·aᵀ`, the
    // same sums in the same order. Strides here are never negative, the
    // facade's other rewrite.
    let (dst_cs, dst_rs) = (1, n as isize);
    let transpose = dst_cs < dst_rs;
    let (m, n, (dst_cs, dst_rs), (lhs, lhs_cs, lhs_rs), (rhs, rhs_cs, rhs_rs)) = if transpose {
        (
            n,
            m,
            (dst_rs, dst_cs),
            (b.as_ptr(), b_rs, b_cs),
            (a.as_ptr(), a_rs, a_cs),
        )
    } else {
        (
            m,
            n,
            (dst_cs, dst_rs),
            (a.as_ptr(), a_cs, a_rs),
            (b.as_ptr(), b_cs, b_rs),
        )
    };
    // SAFETY: the assert above checks that every matrix holds the elements
    // addressed by its shape and strides (transposing swaps shapes and
    // strides together); `c` does not alias `a` or `b` (guaranteed by the
    // borrow checker: `c` is a unique borrow).
    unsafe {
        gemm_f32::gemm::f32::get_gemm_fn()(
            m,
            n,
            k,
            c.as_mut_ptr(),
            dst_cs,
            dst_rs,
            accumulate,
            lhs,
            lhs_cs,
            lhs_rs,
            rhs,
            rhs_cs,
            rhs_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// How products multiply: in f32 ([`Kernel::Fp32`]), or, for
/// mixed-precision training, with both operands rounded to bf16 and the
/// sums in f32 on a bf16 kernel; over the rayon pool when large, or on the
/// calling thread only ([`Gemm::serial`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gemm {
    kernel: Kernel,
    may_split: bool,
}

impl Gemm {
    /// f32 products, split over the rayon pool when large.
    pub const F32: Gemm = Gemm {
        kernel: Kernel::Fp32,
        may_split: true,
    };

    /// Products on `kernel`, split over the rayon pool when large.
    ///
    /// # Panics
    /// At the first product, if `kernel` is a hardware kernel this CPU lacks.
    pub fn new(kernel: Kernel) -> Gemm {
        Gemm {
            kernel,
            may_split: true,
        }
    }

    /// The same products on the calling thread only, for code that is
    /// already running one rayon task per block of rows.
    pub fn serial(self) -> Gemm {
        Gemm {
            may_split: false,
            ..self
        }
    }

    /// The kernel of these products.
    pub fn kernel(self) -> Kernel {
        self.kernel
    }

    /// `c[m,n] (+)= a[m,k] · b[k,n]`.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(self, m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32], accumulate: bool) {
        self.matmul_lda(m, k, n, a, k, b, c, accumulate);
    }

    /// `c[m,n] (+)= a · b` where row `i` of `a` starts at `a[i * lda]`
    /// (`lda >= k`): a block of columns of a wider matrix.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_lda(
        self,
        m: usize,
        k: usize,
        n: usize,
        a: &[f32],
        lda: usize,
        b: &[f32],
        c: &mut [f32],
        accumulate: bool,
    ) {
        assert!(lda >= k, "row stride {lda} below the row width {k}");
        let (a_s, b_s) = ((lda as isize, 1), (n as isize, 1));
        product(self.kernel, m, n, k, c, a, a_s, b, b_s, accumulate, self.may_split);
    }

    /// `c[m,n] (+)= aᵀ · b` where `a` is stored `[k,m]` and `b` is `[k,n]`.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_at_b(self, m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32], accumulate: bool) {
        let (a_s, b_s) = ((1, m as isize), (n as isize, 1));
        product(self.kernel, m, n, k, c, a, a_s, b, b_s, accumulate, self.may_split);
    }

    /// `c[m,n] (+)= a · bᵀ` where `a` is `[m,k]` and `b` is stored `[n,k]`.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_a_bt(self, m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32], accumulate: bool) {
        let (a_s, b_s) = ((k as isize, 1), (1, k as isize));
        product(self.kernel, m, n, k, c, a, a_s, b, b_s, accumulate, self.may_split);
    }
}

/// `c[m,n] (+)= a[m,k] · b[k,n]`, split over the rayon pool when large.
pub fn matmul(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32], accumulate: bool) {
    Gemm::F32.matmul(m, k, n, a, b, c, accumulate);
}

/// `c[m,n] (+)= aᵀ · b` where `a` is stored `[k,m]` and `b` is `[k,n]`.
pub fn matmul_at_b(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32], accumulate: bool) {
    Gemm::F32.matmul_at_b(m, k, n, a, b, c, accumulate);
}

/// `c[m,n] (+)= a · bᵀ` where `a` is `[m,k]` and `b` is stored `[n,k]`.
pub fn matmul_a_bt(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32], accumulate: bool) {
    Gemm::F32.matmul_a_bt(m, k, n, a, b, c, accumulate);
}

/// The f32 products on the calling thread only, for code that is already
/// running one rayon task per block of rows.
pub mod serial {
    use super::Gemm;

    const F32: Gemm = Gemm {
        may_split: false,
        ..Gemm::F32
    };

    /// `c[m,n] (+)= a[m,k] · b[k,n]`.
    pub fn matmul(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32], accumulate: bool) {
        F32.matmul(m, k, n, a, b, c, accumulate);
    }

    /// `c[m,n] (+)= a · b` where row `i` of `a` starts at `a[i * lda]`
    /// (`lda >= k`): a block of columns of a wider matrix.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_lda(m: usize, k: usize, n: usize, a: &[f32], lda: usize, b: &[f32], c: &mut [f32], accumulate: bool) {
        F32.matmul_lda(m, k, n, a, lda, b, c, accumulate);
    }

    /// `c[m,n] (+)= aᵀ · b` where `a` is stored `[k,m]` and `b` is `[k,n]`.
    pub fn matmul_at_b(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32], accumulate: bool) {
        F32.matmul_at_b(m, k, n, a, b, c, accumulate);
    }

    /// `c[m,n] (+)= a · bᵀ` where `a` is `[m,k]` and `b` is stored `[n,k]`.
    pub fn matmul_a_bt(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32], accumulate: bool) {
        F32.matmul_a_bt(m, k, n, a, b, c, accumulate);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(
        m: usize,
        k: usize,
        n: usize,
        a: impl Fn(usize, usize) -> f32,
        b: impl Fn(usize, usize) -> f32,
    ) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a(i, p) * b(p, j)).sum();
            }
        }
        c
    }

    #[test]
    fn all_three_layouts_match_a_naive_product() {
        let (m, k, n) = (7, 5, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let want = naive(m, k, n, |i, p| a[i * k + p], |p, j| b[p * n + j]);
        let mut c = vec![1.0; m * n];
        matmul(m, k, n, &a, &b, &mut c, false);
        for (x, y) in c.iter().zip(&want) {
            assert!((x - y).abs() < 1e-5);
        }
        // aᵀ stored [k, m]
        let at: Vec<f32> = (0..k * m).map(|idx| a[(idx % m) * k + idx / m]).collect();
        let mut c2 = vec![1.0; m * n];
        matmul_at_b(m, k, n, &at, &b, &mut c2, true);
        for (x, y) in c2.iter().zip(&want) {
            assert!((x - (y + 1.0)).abs() < 1e-5, "accumulate adds to c");
        }
        // bᵀ stored [n, k]
        let bt: Vec<f32> = (0..n * k).map(|idx| b[(idx % k) * n + idx / k]).collect();
        let mut c3 = vec![0.0; m * n];
        matmul_a_bt(m, k, n, &a, &bt, &mut c3, false);
        for (x, y) in c3.iter().zip(&want) {
            assert!((x - y).abs() < 1e-5);
        }
    }

    #[test]
    fn a_column_block_of_a_wider_matrix() {
        // a = columns 1..3 of a [4, 5] matrix, times b [2, 3].
        let wide: Vec<f32> = (0..20).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..6).map(|i| (i as f32 * 0.7).sin()).collect();
        let want = naive(4, 2, 3, |i, p| wide[i * 5 + 1 + p], |p, j| b[p * 3 + j]);
        let mut c = vec![0.0; 12];
        serial::matmul_lda(4, 2, 3, &wide[1..], 5, &b, &mut c, false);
        for (x, y) in c.iter().zip(&want) {
            assert!((x - y).abs() < 1e-5);
        }
    }

    #[test]
    #[should_panic(expected = "shape mismatch")]
    fn a_matrix_past_its_buffer_is_refused() {
        let mut c = vec![0.0; 4];
        serial::matmul_lda(2, 2, 2, &[0.0; 5], 4, &[0.0; 4], &mut c, false);
    }

    /// Dimensions whose products wrap around `usize` are refused, not
    /// wrapped past the bounds check.
    #[test]
    fn dimensions_that_overflow_are_refused() {
        let huge = usize::MAX / 2 + 2;
        assert!(!fits(10, 2, huge, 1, 2), "(huge - 1) * 2 wraps to a small number");
        assert!(!fits(10, huge, 2, 2, 1));
        assert!(!fits(10, 2, 2, -1, 1), "negative strides");
        assert!(fits(4, 2, 2, 2, 1) && !fits(3, 2, 2, 2, 1));
        let caught = std::panic::catch_unwind(|| {
            // m * n = 2^64 wraps to 0, which an empty `c` would "hold".
            matmul(1 << 33, 0, 1 << 31, &[], &[], &mut [], false);
        });
        let message = caught.expect_err("refused");
        let message = message
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| message.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        assert!(message.contains("shape mismatch"), "{message}");
    }

    #[test]
    fn empty_inner_dimension_gives_zeros() {
        let mut c = vec![3.0; 4];
        matmul(2, 0, 2, &[], &[], &mut c, false);
        assert_eq!(c, vec![0.0; 4]);
    }
}
