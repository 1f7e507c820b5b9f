//! bf16 inference: the hidden layers of the attention unit (after the
//! first) and of the DNN multiplied with bf16 weights and activations,
//! accumulated in f32.
//!
//! The precision is asked for ([`Precision`]: a config field, `--precision`)
//! and resolved at run time from the CPU's features into the [`Kernel`] that
//! runs the products:
//!
//! * [`Kernel::Avx512Bf16`]: `vdpbf16ps` (AVX512-BF16: AMD Zen 4 and later,
//!   Intel Cooper Lake and Sapphire Rapids onward), a hand-written microkernel over weights packed
//!   once in bf16 pairs. Hand-written because the `gemm` crates have no bf16
//!   kernel, and oneDNN would add a C++ library to the build for one product.
//! * [`Kernel::Emulated`]: the same arithmetic on any CPU: weights and
//!   activations rounded to bf16 (round to nearest even), products and sums
//!   in f32 through the FP32 `gemm` kernels. A product of two bf16 values is
//!   exact in f32, so this differs from the hardware only in the order of
//!   the sums (and below 1e-38, where the hardware flushes to zero). It is no faster than FP32; it is what `bf16` gives where the
//!   CPU has no bf16 instructions, so that scores are those of bf16
//!   everywhere, and what the tests check the hardware kernel against.
//! * [`Kernel::Fp32`]: the FP32 path, bit for bit what it was.
//!
//! `auto` takes bf16 only where the hardware has it. AMX (Intel Sapphire
//! Rapids) is not used yet: its intrinsics are not stable Rust, and Linux
//! asks each process to request the tile state; on such a CPU `auto` takes
//! the AVX512-BF16 kernel, which those CPUs also have.
//!
//! What stays in f32: embeddings, the first attention layer (its inputs
//! are `2D` wide, under 10% of the unit's work in the tutorial model), the
//! score and logit layers, biases, activations and pooling.

use std::cell::RefCell;
use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::linalg::serial;

/// The precision asked for at inference.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 throughout (the default).
    #[default]
    Fp32,
    /// bf16 products with f32 accumulation: on the CPU's bf16 instructions
    /// where it has them, emulated (same scores, no faster) where not.
    Bf16,
    /// bf16 where the CPU has bf16 instructions, f32 elsewhere.
    Auto,
}

impl Precision {
    /// Whether this is the default, `fp32` (left out of `config.json`).
    pub fn is_fp32(&self) -> bool {
        *self == Precision::Fp32
    }

    /// The kernel this precision runs on this CPU.
    pub fn resolve(self) -> Kernel {
        match self {
            Precision::Fp32 => Kernel::Fp32,
            Precision::Bf16 => bf16_hardware().unwrap_or(Kernel::Emulated),
            Precision::Auto => bf16_hardware().unwrap_or(Kernel::Fp32),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Auto => "auto",
        })
    }
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fp32" => Ok(Precision::Fp32),
            "bf16" => Ok(Precision::Bf16),
            "auto" => Ok(Precision::Auto),
            other => Err(format!("unknown precision {other:?}: expected fp32, bf16 or auto")),
        }
    }
}

/// What computes the attention unit's products (see the module's docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Kernel {
    /// f32 products.
    #[default]
    Fp32,
    /// bf16 products on AVX512-BF16 (`vdpbf16ps`).
    Avx512Bf16,
    /// bf16 products emulated with f32 arithmetic.
    Emulated,
}

impl Kernel {
    /// Whether the products are in bf16.
    pub fn is_bf16(self) -> bool {
        self != Kernel::Fp32
    }

    /// A line for logs: the precision and what runs it.
    pub fn describe(self) -> &'static str {
        match self {
            Kernel::Fp32 => "fp32",
            Kernel::Avx512Bf16 => "bf16 on AVX512-BF16",
            Kernel::Emulated => "bf16 emulated in f32 (this CPU has no AVX512-BF16: same scores, no faster)",
        }
    }
}

/// Panics unless this CPU runs `kernel` ([`Kernel::Avx512Bf16`] only
/// where [`bf16_hardware`] finds it).
pub(crate) fn assert_runs(kernel: Kernel) {
    assert!(
        kernel != Kernel::Avx512Bf16 || bf16_hardware() == Some(kernel),
        "this CPU has no AVX512-BF16"
    );
}

/// The bf16 kernel this CPU has, if any.
pub fn bf16_hardware() -> Option<Kernel> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512bf16")
    {
        return Some(Kernel::Avx512Bf16);
    }
    None
}

/// `x` rounded to bf16 (to nearest, ties to even), as its 16 bits. NaN
/// stays NaN (quiet, its sign kept); values past bf16's largest round to
/// infinity. Written out rather than taken from `half`: the same few
/// integer operations vectorise in the activation loops below.
#[inline]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let nan = ((b >> 16) | 0x40) as u16;
    if x.is_nan() {
        nan
    } else {
        rounded
    }
}

/// The f32 value of bf16 bits (exact).
#[inline]
pub fn bf16_value(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// `x` rounded to the nearest bf16, as an f32.
#[inline]
pub fn round_bf16(x: f32) -> f32 {
    bf16_value(bf16_bits(x))
}

/// Columns of a packed panel (two AVX-512 registers of f32).
const NR: usize = 32;
/// Rows of one microkernel tile.
const MR: usize = 8;

thread_local! {
    /// Each thread's activations in bf16: rounded f32 (emulated) or packed
    /// pairs (hardware).
    static ROUNDED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static PACKED: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// A `[k, n]` weight matrix in bf16, in the form its kernel reads.
#[derive(Debug, Clone)]
pub struct Bf16Matrix {
    k: usize,
    n: usize,
    kernel: Kernel,
    /// Emulated: the weights rounded to bf16, `[k, n]` f32.
    rounded: Vec<f32>,
    /// AVX512-BF16: panels of [`NR`] columns, each `[ceil(k/2), NR]` pairs
    /// `(W[2p, j], W[2p+1, j])` (low half first), zero past `k` and `n`.
    packed: Vec<u32>,
}

impl Bf16Matrix {
    /// The `[k, n]` row-major `w` in bf16 for `kernel`.
    ///
    /// # Panics
    /// If `w` is not `k * n` long, or `kernel` is not a bf16 kernel this CPU
    /// runs ([`Kernel::Emulated`], or what [`bf16_hardware`] gives).
    pub fn new(k: usize, n: usize, w: &[f32], kernel: Kernel) -> Self {
        assert_eq!(w.len(), k * n, "weight shape");
        assert_runs(kernel);
        let mut m = Bf16Matrix {
            k,
            n,
            kernel,
            rounded: Vec::new(),
            packed: Vec::new(),
        };
        match kernel {
            Kernel::Fp32 => panic!("Bf16Matrix for the fp32 kernel"),
            Kernel::Emulated => m.rounded = w.iter().map(|&x| round_bf16(x)).collect(),
            Kernel::Avx512Bf16 => m.packed = pack_weights(k, n, w),
        }
        m
    }

    /// `c[m, n] = bf16(a)[m, k] · W`, summed in f32; `a` is row-major `[m, k]`.
    pub fn matmul(&self, m: usize, a: &[f32], c: &mut [f32]) {
        let (k, n) = (self.k, self.n);
        assert!(a.len() >= m * k && c.len() >= m * n, "bf16 product shape mismatch");
        match self.kernel {
            Kernel::Emulated => ROUNDED.with(|r| {
                let mut r = r.borrow_mut();
                r.clear();
                r.extend(a[..m * k].iter().map(|&x| round_bf16(x)));
                serial::matmul(m, k, n, &r, &self.rounded, c, false);
            }),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Bf16 => {
                // SAFETY: `new` made this matrix for this kernel only after
                // `bf16_hardware` found AVX512F, AVX512BW and AVX512-BF16.
                unsafe { packed_product(m, k, n, a, &self.packed, c, avx512::tile) };
            }
            _ => unreachable!("no bf16 kernel {:?} on this architecture", self.kernel),
        }
    }

    /// [`Bf16Matrix::matmul`] over the rayon pool, in blocks of rows.
    pub fn matmul_parallel(&self, m: usize, a: &[f32], c: &mut [f32]) {
        /// Rows per task: enough for whole tiles and to amortise packing.
        const ROWS: usize = 64;
        let (k, n) = (self.k, self.n);
        if m <= ROWS || k == 0 || n == 0 {
            return self.matmul(m, a, c);
        }
        assert!(a.len() >= m * k && c.len() >= m * n, "bf16 product shape mismatch");
        c[..m * n]
            .par_chunks_mut(ROWS * n)
            .zip(a[..m * k].par_chunks(ROWS * k))
            .for_each(|(c, a)| self.matmul(c.len() / n, a, c));
    }
}

/// The kernel a unit infers with, and its weights in bf16, made at the
/// first bf16 inference from the weights of that moment and dropped when
/// the weights may change ([`Bf16State::invalidate`]). Not part of the
/// model's value: any two compare equal, and a clone makes its own.
#[derive(Debug, Default)]
pub(crate) struct Bf16State {
    kernel: Kernel,
    layers: OnceLock<Vec<Bf16Matrix>>,
}

impl Clone for Bf16State {
    fn clone(&self) -> Self {
        Bf16State {
            kernel: self.kernel,
            layers: OnceLock::new(),
        }
    }
}

impl PartialEq for Bf16State {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Bf16State {
    /// The kernel inference runs on.
    pub(crate) fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// Infers with `kernel` from now on.
    pub(crate) fn set(&mut self, kernel: Kernel) {
        self.kernel = kernel;
        self.invalidate();
    }

    /// Forgets the bf16 weights (the f32 weights may change).
    pub(crate) fn invalidate(&mut self) {
        self.layers = OnceLock::new();
    }

    /// With a bf16 kernel, the weights in bf16, made by `make` the first time.
    pub(crate) fn layers(&self, make: impl FnOnce(Kernel) -> Vec<Bf16Matrix>) -> Option<&[Bf16Matrix]> {
        if !self.kernel.is_bf16() {
            return None;
        }
        Some(self.layers.get_or_init(|| make(self.kernel)))
    }
}

/// The store masks of a tile's two halves for its first `cols` columns
/// (1 to [`NR`]): bit `j` of each stores column `j` of that half.
fn store_masks(cols: usize) -> (u16, u16) {
    let mask = |n: usize| ((1u32 << n.min(16)) - 1) as u16;
    (mask(cols), mask(cols.saturating_sub(16)))
}

/// Packs `w` (`[k, n]`) into the panels [`Bf16Matrix::packed`] describes.
fn pack_weights(k: usize, n: usize, w: &[f32]) -> Vec<u32> {
    let kp = k.div_ceil(2);
    let panels = n.div_ceil(NR);
    let mut out = vec![0u32; panels * kp * NR];
    for jp in 0..panels {
        for p in 0..kp {
            for j in 0..NR.min(n - jp * NR) {
                let col = jp * NR + j;
                let lo = bf16_bits(w[2 * p * n + col]);
                let hi = if 2 * p + 1 < k {
                    bf16_bits(w[(2 * p + 1) * n + col])
                } else {
                    0
                };
                out[(jp * kp + p) * NR + j] = u32::from(lo) | u32::from(hi) << 16;
            }
        }
    }
    out
}

/// A microkernel: `rows` (at most [`MR`]) rows of packed activations
/// (`a`, row stride `kp`, [`MR`] rows readable) times one panel (`b`,
/// `[kp, NR]`) into `cols` (at most [`NR`]) columns of `c` (row stride
/// `ldc`), overwriting them.
type Tile = unsafe fn(a: *const u32, rows: usize, kp: usize, b: *const u32, c: *mut f32, ldc: usize, cols: usize);

/// `c[m, n] = bf16(a) · W` over packed weights, tile by tile: each panel
/// (16 KiB at `k = 256`) stays in L1 while the rows pass it.
///
/// # Safety
/// `tile` must be runnable on this CPU.
unsafe fn packed_product(m: usize, k: usize, n: usize, a: &[f32], packed: &[u32], c: &mut [f32], tile: Tile) {
    let kp = k.div_ceil(2);
    let panels = n.div_ceil(NR);
    assert_eq!(packed.len(), panels * kp * NR, "packed weight shape");
    if k == 0 {
        c[..m * n].iter_mut().for_each(|x| *x = 0.0);
        return;
    }
    PACKED.with(|buf| {
        let mut buf = buf.borrow_mut();
        // Rows padded to a whole tile with zeros, so the kernel reads MR rows.
        let rows = m.div_ceil(MR) * MR;
        buf.clear();
        buf.resize(rows * kp, 0);
        for (row, out) in a[..m * k].chunks_exact(k).zip(buf.chunks_exact_mut(kp)) {
            let (pairs, last) = row.split_at(k & !1);
            for (o, pair) in out.iter_mut().zip(pairs.chunks_exact(2)) {
                *o = u32::from(bf16_bits(pair[0])) | u32::from(bf16_bits(pair[1])) << 16;
            }
            if let Some(&x) = last.first() {
                out[kp - 1] = u32::from(bf16_bits(x));
            }
        }
        for jp in 0..panels {
            let cols = NR.min(n - jp * NR);
            let b = &packed[jp * kp * NR..(jp + 1) * kp * NR];
            for i0 in (0..m).step_by(MR) {
                let rows = MR.min(m - i0);
                let a_tile = &buf[i0 * kp..(i0 + MR) * kp];
                let c_tile = &mut c[i0 * n + jp * NR..];
                // The last row's columns must be in `c`.
                assert!(c_tile.len() >= (rows - 1) * n + cols);
                // SAFETY: `a_tile` holds MR rows of `kp` pairs, `b` a panel
                // of `kp * NR`, and `c_tile` the `rows` rows of `cols`
                // columns at stride `n` (checked above); `tile` runs on this
                // CPU (the caller's contract).
                unsafe { tile(a_tile.as_ptr(), rows, kp, b.as_ptr(), c_tile.as_mut_ptr(), n, cols) };
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{store_masks, MR, NR};

    /// The AVX512-BF16 microkernel (see [`super::Tile`]): `MR x NR`
    /// accumulators, 16 registers; per pair of `k`, two panel loads and
    /// `MR` broadcasts feed `2 MR` `vdpbf16ps`.
    ///
    /// # Safety
    /// The CPU has AVX512F and AVX512-BF16; the pointers hold what
    /// [`super::Tile`] says.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn tile(
        a: *const u32,
        rows: usize,
        kp: usize,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        cols: usize,
    ) {
        const _: () = assert!(NR == 32);
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for p in 0..kp {
            // SAFETY (all loads): in bounds by the caller's contract.
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR) as *const _));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16) as *const _));
            for (r, acc) in acc.iter_mut().enumerate() {
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(r * kp + p) as i32));
                acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
                acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
            }
        }
        let (m0, m1) = store_masks(cols);
        for (r, acc) in acc.iter().enumerate().take(rows) {
            let row = c.wrapping_add(r * ldc);
            // Masked stores touch only the `cols` columns.
            _mm512_mask_storeu_ps(row, m0, acc[0]);
            _mm512_mask_storeu_ps(row.wrapping_add(16), m1, acc[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The microkernel in scalar code: like the AVX-512 one it computes all
    /// `MR x NR` lanes (reading every row and column it may read), lane by
    /// lane as Intel describes `vdpbf16ps` (the high pair's product added
    /// first), and stores through [`store_masks`]: checks the packing, the
    /// tiling and the masks on any CPU.
    unsafe fn portable_tile(
        a: *const u32,
        rows: usize,
        kp: usize,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        cols: usize,
    ) {
        let mut acc = [[0.0f32; NR]; MR];
        for (r, acc) in acc.iter_mut().enumerate() {
            for (j, acc) in acc.iter_mut().enumerate() {
                for p in 0..kp {
                    let (x, y) = (*a.add(r * kp + p), *b.add(p * NR + j));
                    *acc += bf16_value((x >> 16) as u16) * bf16_value((y >> 16) as u16);
                    *acc += bf16_value(x as u16) * bf16_value(y as u16);
                }
            }
        }
        let (m0, m1) = store_masks(cols);
        let mask = u32::from(m0) | u32::from(m1) << 16;
        for (r, acc) in acc.iter().enumerate().take(rows) {
            for (j, &v) in acc.iter().enumerate() {
                if mask >> j & 1 == 1 {
                    *c.add(r * ldc + j) = v;
                }
            }
        }
    }

    #[test]
    fn store_masks_cover_exactly_the_first_columns() {
        for cols in 1..=NR {
            let (m0, m1) = store_masks(cols);
            let mask = u64::from(m0) | u64::from(m1) << 16;
            assert_eq!(mask, (1u64 << cols) - 1, "{cols} columns");
        }
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as f32 + 0.5) * 0.6180339 + seed as f32 * 0.37).sin() * 1.7)
            .collect()
    }

    /// `bf16(a) · bf16(w)` in f64, the value every bf16 kernel rounds, and
    /// `Σ |a_p w_p|`, per element.
    fn reference(m: usize, k: usize, n: usize, a: &[f32], w: &[f32]) -> Vec<(f64, f64)> {
        let mut c = vec![(0.0, 0.0); m * n];
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    let x = f64::from(round_bf16(a[i * k + p])) * f64::from(round_bf16(w[p * n + j]));
                    c[i * n + j].0 += x;
                    c[i * n + j].1 += x.abs();
                }
            }
        }
        c
    }

    /// Within the error bound of summing `k` exact products in f32 in any
    /// order: `k u Σ|a_p w_p|` (u: f32's unit roundoff).
    fn assert_near(name: &str, got: &[f32], want: &[(f64, f64)], k: usize) {
        let u = f64::from(f32::EPSILON) / 2.0;
        for (i, (g, (w, abs))) in got.iter().zip(want).enumerate() {
            let tol = k as f64 * u * abs * 1.01;
            assert!((f64::from(*g) - w).abs() <= tol, "{name}: element {i}: {g} against {w}");
        }
    }

    #[test]
    fn rounding_is_to_nearest_even_and_keeps_nan_and_infinity() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties to even (1).
        assert_eq!(bf16_bits(1.0 + 2f32.powi(-8)), 0x3f80);
        // 1 + 3·2^-8 lies halfway between 1 + 2^-7 and 1 + 2^-6: to even.
        assert_eq!(bf16_bits(1.0 + 3.0 * 2f32.powi(-8)), 0x3f82);
        // Just above halfway rounds up.
        assert_eq!(bf16_bits(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(bf16_bits(-2.5), 0xc020);
        assert!(bf16_value(bf16_bits(f32::NAN)).is_nan());
        assert!(bf16_value(bf16_bits(-f32::NAN)).is_nan());
        assert_eq!(bf16_value(bf16_bits(f32::INFINITY)), f32::INFINITY);
        assert_eq!(bf16_value(bf16_bits(f32::MAX)), f32::INFINITY, "past bf16's largest");
        assert_eq!(bf16_bits(-0.0), 0x8000);
        // Every bf16 value is its own rounding.
        for h in (0..=u16::MAX).step_by(7) {
            let x = bf16_value(h);
            if !x.is_nan() {
                assert_eq!(bf16_bits(x), h);
            }
        }
    }

    #[test]
    fn precisions_parse_print_and_resolve() {
        for p in [Precision::Fp32, Precision::Bf16, Precision::Auto] {
            assert_eq!(p.to_string().parse::<Precision>(), Ok(p));
        }
        assert!("fp16".parse::<Precision>().unwrap_err().contains("fp32, bf16 or auto"));
        assert_eq!(Precision::Fp32.resolve(), Kernel::Fp32);
        assert!(Precision::Bf16.resolve().is_bf16());
        assert_eq!(Precision::Auto.resolve().is_bf16(), bf16_hardware().is_some());
    }

    /// Shapes with every kind of edge: odd `k`, `n` past a panel and short
    /// of one, rows short of a tile, one row, one column.
    const SHAPES: [(usize, usize, usize); 9] = [
        (0, 5, 7),
        (2, 0, 3),
        (1, 1, 1),
        (3, 5, 7),
        (8, 16, 32),
        (9, 17, 33),
        (20, 256, 128),
        (13, 255, 64),
        (256, 128, 80),
    ];

    #[test]
    fn the_packed_kernel_and_the_emulation_give_the_bf16_product() {
        for (m, k, n) in SHAPES {
            let (a, w) = (values(m * k, 1), values(k * n, 2));
            let want = reference(m, k, n, &a, &w);
            let mut c = vec![f32::NAN; m * n];
            Bf16Matrix::new(k, n, &w, Kernel::Emulated).matmul(m, &a, &mut c);
            assert_near(&format!("emulated {m}x{k}x{n}"), &c, &want, k);
            let mut c2 = vec![f32::NAN; m * n + 3];
            // SAFETY: the scalar model runs anywhere.
            unsafe { packed_product(m, k, n, &a, &pack_weights(k, n, &w), &mut c2, portable_tile) };
            assert_near(&format!("packed {m}x{k}x{n}"), &c2, &want, k);
            assert!(c2[m * n..].iter().all(|x| x.is_nan()), "nothing written past c");
        }
    }

    #[test]
    fn bf16_is_near_fp32_and_not_equal_to_it() {
        let (m, k, n) = (20, 256, 128);
        let (a, w) = (values(m * k, 3), values(k * n, 4));
        let mut fp32 = vec![0.0; m * n];
        serial::matmul(m, k, n, &a, &w, &mut fp32, false);
        let mut bf = vec![0.0; m * n];
        Bf16Matrix::new(k, n, &w, Kernel::Emulated).matmul(m, &a, &mut bf);
        let want = reference(m, k, n, &a, &w);
        let mut differs = false;
        for (i, ((x, y), (_, abs))) in fp32.iter().zip(&bf).zip(&want).enumerate() {
            // Each operand's relative error is at most 2^-9, so each
            // product's about 2^-8, plus f32's own sums.
            let bound = abs * (2f64.powi(-8) + 2.0 * k as f64 * f64::from(f32::EPSILON));
            assert!(f64::from((x - y).abs()) <= bound, "element {i}: fp32 {x}, bf16 {y}");
            differs |= x != y;
        }
        assert!(differs, "bf16 rounds something");
    }

    #[test]
    fn the_parallel_product_is_the_serial_one() {
        let (m, k, n) = (300, 40, 33);
        let (a, w) = (values(m * k, 8), values(k * n, 9));
        let mat = Bf16Matrix::new(k, n, &w, bf16_hardware().unwrap_or(Kernel::Emulated));
        let (mut serial, mut parallel) = (vec![0.0; m * n], vec![f32::NAN; m * n]);
        mat.matmul(m, &a, &mut serial);
        rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap()
            .install(|| mat.matmul_parallel(m, &a, &mut parallel));
        assert_eq!(serial, parallel, "rows are independent: the same sums");
    }

    #[test]
    fn the_hardware_kernel_is_refused_where_the_cpu_lacks_it() {
        if bf16_hardware().is_some() {
            eprintln!("skipped: this CPU has AVX512-BF16");
            return;
        }
        let made = std::panic::catch_unwind(|| Bf16Matrix::new(1, 1, &[1.0], Kernel::Avx512Bf16));
        assert!(made.is_err(), "no AVX512-BF16 matrix on this CPU");
    }

    #[test]
    fn the_hardware_kernel_matches_its_scalar_model() {
        let Some(kernel) = bf16_hardware() else {
            eprintln!("skipped: this CPU has no AVX512-BF16 (the kernel's scalar model is tested above)");
            return;
        };
        for (m, k, n) in SHAPES {
            let (a, w) = (values(m * k, 5), values(k * n, 6));
            let want = reference(m, k, n, &a, &w);
            let mut c = vec![f32::NAN; m * n + 40];
            Bf16Matrix::new(k, n, &w, kernel).matmul(m, &a, &mut c);
            assert_near(&format!("{kernel:?} {m}x{k}x{n}"), &c, &want, k);
            assert!(c[m * n..].iter().all(|x| x.is_nan()), "nothing written past c");
        }
    }
}
