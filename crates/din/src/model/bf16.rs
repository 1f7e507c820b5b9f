//! bf16 inference: the hidden layers of the attention unit (after the
//! first) and of the DNN multiplied with bf16 weights and activations,
//! accumulated in f32.
//!
//! The precision is asked for ([`Precision`]: a config field, `--precision`)
//! and resolved at run time from the CPU's features into the [`Kernel`] that
//! runs the products:
//!
//! * [`Kernel::Amx`]: AMX tiles (`tdpbf16ps`, Intel Sapphire Rapids and
//!   later), 32 x 32 blocks of four 16 x 16 tiles over weights packed once in
//!   16-column panels. Written in `asm!` (the AMX intrinsics are not stable
//!   Rust); Linux lends the tile state only to a process that asks for it
//!   (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), which [`bf16_hardware`] does, and
//!   refuses while a thread has a signal stack too small for the tiles:
//!   call [`bf16_hardware`] before starting threads (the `din` binary does,
//!   first thing). Where the request fails, the AVX512-BF16 kernel runs.
//! * [`Kernel::Avx512Bf16`]: `vdpbf16ps` (AVX512-BF16: AMD Zen 4 and later,
//!   Intel Cooper Lake and Sapphire Rapids onward), a hand-written microkernel over weights packed
//!   once in bf16 pairs. Hand-written because the `gemm` crates have no bf16
//!   kernel, and oneDNN would add a C++ library to the build for one product.
//!   Both hardware kernels round the activations with `vcvtne2ps2bf16`.
//! * [`Kernel::Emulated`]: the same arithmetic on any CPU: weights and
//!   activations rounded to bf16 (round to nearest even), products and sums
//!   in f32 through the FP32 `gemm` kernels. A product of two bf16 values is
//!   exact in f32, so this differs from the hardware only in the order of
//!   the sums (and below 1e-38, where the hardware flushes to zero). It is no faster than FP32; it is what `bf16` gives where the
//!   CPU has no bf16 instructions, so that scores are those of bf16
//!   everywhere, and what the tests check the hardware kernel against.
//! * [`Kernel::Fp32`]: the FP32 path, bit for bit what it was.
//!
//! `auto` takes bf16 only where the hardware runs it faster than FP32
//! ([`auto_choice`]): AMX always, AVX512-BF16 only where `vdpbf16ps`
//! measures faster than FP32's FMAs by [`AUTO_MIN_SPEEDUP`]
//! ([`avx512bf16_speedup`]; on the Sapphire Rapids Xeon this was written
//! on it runs at half their FLOP/s). The environment variable
//! `DIN_BF16_KERNEL=avx512bf16` hides AMX, so that `bf16` runs the
//! AVX512-BF16 kernel (to compare the two) and `auto` decides as on a CPU
//! without AMX.
//!
//! What stays in f32: embeddings, the first attention layer (its inputs
//! are `2D` wide, under 10% of the unit's work in the tutorial model), the
//! score and logit layers, biases, activations and pooling. On AMX the
//! attention unit's inference is fused instead (see
//! `attention::chunked`): rows go through every layer a block of 32 at a
//! time, each layer's activations rounded straight into the next product's
//! operand, and the first layer runs on AMX too, on split operands that
//! keep about 16 bits of its inputs and weights (`split_weights`: f32's
//! accuracy for practical purposes, at three bf16 products).

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
    /// where it has them, emulated (the same arithmetic, no faster) where not.
    Bf16,
    /// bf16 where the CPU's bf16 instructions are faster than f32 (see
    /// [`auto_choice`]), f32 elsewhere.
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
            Precision::Auto => auto_choice(bf16_hardware(), avx512bf16_speedup),
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
    /// bf16 products on AMX tiles (`tdpbf16ps`).
    Amx,
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
            Kernel::Amx => "bf16 on AMX",
            Kernel::Emulated => "bf16 emulated in f32 (this CPU has no AVX512-BF16: the same arithmetic, no faster)",
        }
    }
}

/// Panics unless this CPU runs `kernel` (a hardware kernel only where
/// [`hardware_kernels`] lists it).
pub(crate) fn assert_runs(kernel: Kernel) {
    assert!(
        matches!(kernel, Kernel::Fp32 | Kernel::Emulated) || hardware_kernels().contains(&kernel),
        "this CPU cannot run the {kernel:?} kernel"
    );
}

/// The bf16 kernel this CPU has, if any: AMX, else AVX512-BF16 (see the
/// module's docs for `DIN_BF16_KERNEL`). The first call asks Linux for the
/// AMX tile state; make it before starting threads.
pub fn bf16_hardware() -> Option<Kernel> {
    let all = hardware_kernels();
    let avx512_only = std::env::var("DIN_BF16_KERNEL").is_ok_and(|v| v == "avx512bf16");
    all.iter().copied().find(|&k| !(avx512_only && k == Kernel::Amx))
}

/// How much faster than FP32 the AVX512-BF16 kernel must multiply, in
/// peak FLOP/s, for `auto` to take it: its products gain at most that
/// much, and it pays for rounding the activations and packing the weights
/// that FP32 does not.
pub const AUTO_MIN_SPEEDUP: f64 = 1.5;

/// The kernel `auto` runs, given the bf16 kernel [`bf16_hardware`] found
/// and, called only for AVX512-BF16, [`avx512bf16_speedup`]: AMX always
/// (its tiles multiply several times faster than FP32's FMAs); AVX512-BF16
/// only where `vdpbf16ps` outpaces FP32 by [`AUTO_MIN_SPEEDUP`], since on
/// some cores it is the slower of the two (on the Sapphire Rapids Xeons
/// measured here, half FP32's rate: a CPU whose AMX is off or not granted
/// would score at about half FP32's speed); FP32 otherwise.
pub fn auto_choice(hardware: Option<Kernel>, speedup: impl FnOnce() -> Option<f64>) -> Kernel {
    match hardware {
        Some(Kernel::Amx) => Kernel::Amx,
        Some(Kernel::Avx512Bf16) if speedup().is_some_and(|s| s >= AUTO_MIN_SPEEDUP) => Kernel::Avx512Bf16,
        _ => Kernel::Fp32,
    }
}

/// `vdpbf16ps`'s peak FLOP/s over FP32's `vfmadd231ps`'s on this core:
/// both instructions timed on 512-bit registers, in 24 independent chains
/// (more than any core's latency times its throughput), alternated 8 times
/// and the fastest of each kept, so that an interruption only makes a
/// slower run that is dropped. About 2 on cores that run `vdpbf16ps` as
/// fast as an FMA (it does twice the products); 0.5 on the Xeon this was
/// written on. `None` where the CPU has no AVX512-BF16. Measured once, in
/// about a millisecond, and only when `auto` has to decide.
pub fn avx512bf16_speedup() -> Option<f64> {
    static SPEEDUP: OnceLock<Option<f64>> = OnceLock::new();
    *SPEEDUP.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16") {
            const ROUNDS: usize = 8192;
            let (mut dot, mut fma) = (f64::INFINITY, f64::INFINITY);
            for _ in 0..8 {
                // SAFETY: the CPU has AVX512F and AVX512-BF16 (just detected).
                dot = dot.min(unsafe { avx512::dot_seconds(ROUNDS) });
                fma = fma.min(unsafe { avx512::fma_seconds(ROUNDS) });
            }
            // A `vdpbf16ps` does 32 multiply-adds, a `vfmadd231ps` 16.
            return (dot > 0.0).then(|| 2.0 * fma / dot);
        }
        None
    })
}

/// A line for logs: the kernel `precision` resolved to, and, where this
/// CPU's AVX512-BF16 is too slow to pay off, that: why `auto` turned it
/// down, or that `bf16` runs it anyway.
pub fn describe_choice(precision: Precision, kernel: Kernel) -> String {
    describe_with(precision, kernel, avx512bf16_turned_down())
}

/// [`describe_choice`], given the speedup of an AVX512-BF16 that `auto`
/// turned down (`None`: none was).
fn describe_with(precision: Precision, kernel: Kernel, turned_down: Option<f64>) -> String {
    match (precision, kernel, turned_down) {
        (Precision::Auto, Kernel::Fp32, Some(speedup)) => format!(
            "fp32 (auto: this CPU's AVX512-BF16 multiplies at {speedup:.2}x its FP32 FLOP/s, \
             under the {AUTO_MIN_SPEEDUP}x it needs to pay off; `bf16` still runs it)"
        ),
        (_, Kernel::Avx512Bf16, Some(speedup)) => format!(
            "{} (this CPU multiplies there at {speedup:.2}x its FP32 FLOP/s: \
             likely slower than fp32, which `auto` would run)",
            kernel.describe()
        ),
        _ => kernel.describe().to_string(),
    }
}

/// The measured speedup, where `auto` would have had AVX512-BF16 to
/// choose and turned it down.
fn avx512bf16_turned_down() -> Option<f64> {
    match bf16_hardware() {
        Some(Kernel::Avx512Bf16) => avx512bf16_speedup().filter(|&s| s < AUTO_MIN_SPEEDUP),
        _ => None,
    }
}

/// Every bf16 kernel this CPU runs, the fastest first (detected once).
pub fn hardware_kernels() -> &'static [Kernel] {
    static KERNELS: OnceLock<Vec<Kernel>> = OnceLock::new();
    KERNELS.get_or_init(|| {
        let mut all = Vec::new();
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
        {
            #[cfg(target_os = "linux")]
            if amx::available() && agrees_with_its_model(Kernel::Amx) {
                all.push(Kernel::Amx);
            }
            if agrees_with_its_model(Kernel::Avx512Bf16) {
                all.push(Kernel::Avx512Bf16);
            }
        }
        all
    })
}

/// Whether a hardware kernel, run once on a product of small multiples
/// of 1/4 (exact in bf16, and summed exactly in f32 in any order), gives
/// exactly what its scalar model gives: a kernel that misbehaves on some
/// CPU (or under some hypervisor) is never used. Takes microseconds.
#[cfg(target_arch = "x86_64")]
fn agrees_with_its_model(kernel: Kernel) -> bool {
    // SAFETY (all three): the caller found the kernel's features (and, for
    // AMX, was granted the tile state); the scalar models run anywhere.
    agree(|m, k, n, a, w, c, hardware| unsafe {
        match (kernel, hardware) {
            (Kernel::Avx512Bf16, true) => {
                packed_product(m, k, n, a, &pack_weights(k, n, w), c, avx512::tile, avx512::convert)
            }
            (Kernel::Avx512Bf16, false) => {
                packed_product(m, k, n, a, &pack_weights(k, n, w), c, portable_tile, convert_scalar)
            }
            #[cfg(target_os = "linux")]
            (Kernel::Amx, true) => {
                tiled_product(m, k, n, a, &pack_tiles(k, n, w), c, Some(amx::block), avx512::convert)
            }
            _ => tiled_product(m, k, n, a, &pack_tiles(k, n, w), c, None, convert_scalar),
        }
    })
}

/// Whether `product` (`c = a · w`, `[m, k] · [k, n]`, by a kernel when its
/// last argument is `true`, by its scalar model when `false`) gives the
/// same bits both ways (see [`agrees_with_its_model`]).
fn agree(product: impl Fn(usize, usize, usize, &[f32], &[f32], &mut [f32], bool)) -> bool {
    let (m, k, n) = (37, 70, 45);
    let value = |i: usize, step: usize| ((i * step % 17) as f32 - 8.0) / 4.0;
    let a: Vec<f32> = (0..m * k).map(|i| value(i, 7)).collect();
    let w: Vec<f32> = (0..k * n).map(|i| value(i, 11)).collect();
    let (mut got, mut want) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
    product(m, k, n, &a, &w, &mut got, true);
    product(m, k, n, &a, &w, &mut want, false);
    got == want
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

/// Columns of a packed AVX512-BF16 panel (two AVX-512 registers of f32).
const NR: usize = 32;
/// Rows of one AVX512-BF16 microkernel tile.
const MR: usize = 8;
/// Rows and columns of a tile of AMX (16 x 16 f32 results).
const TILE: usize = 16;
/// Pairs of `k` in one row of an AMX operand tile (64 bytes).
const TILE_PAIRS: usize = 16;

thread_local! {
    /// Each thread's activations in bf16: rounded f32 (emulated) or packed
    /// pairs (hardware).
    static ROUNDED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static PACKED: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    /// Each thread's operands of [`training_product`]. Taken out while in
    /// use (not borrowed), so that a product that waits on rayon while this
    /// thread runs another task's product does not collide with it.
    static OPERANDS: RefCell<[Vec<f32>; 2]> = const { RefCell::new([Vec::new(), Vec::new()]) };
    /// Each thread's row-major copy of a strided matrix that
    /// [`Bf16Matrix::refill_strided`] packs (borrowed only while it does).
    static GATHERED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Each thread's second operand of [`training_product`] in bf16, taken
    /// out while in use like [`OPERANDS`].
    static TRAINING_B: RefCell<Option<Bf16Matrix>> = const { RefCell::new(None) };
}

/// `out = x[rows, cols]` row-major, `x[i, j]` at `src[i * rs + j * cs]`;
/// returns `out`.
fn gather<'o>(rows: usize, cols: usize, src: &[f32], (rs, cs): (usize, usize), out: &'o mut Vec<f32>) -> &'o [f32] {
    if cs == 1 {
        out.clear();
        out.reserve(rows * cols);
        for i in 0..rows {
            out.extend_from_slice(&src[i * rs..i * rs + cols]);
        }
    } else {
        // A transpose, mostly (`rs == 1`): in blocks of 16 rows, each
        // source column a contiguous run of 16; full 16 x 16 blocks of a
        // transpose in AVX-512 registers where the CPU has it.
        const B: usize = 16;
        // Every element is written below: the buffer is only grown, not
        // cleared (its old values are overwritten).
        out.truncate(rows * cols);
        out.resize(rows * cols, 0.0);
        #[cfg(target_arch = "x86_64")]
        let wide = rs == 1 && std::arch::is_x86_feature_detected!("avx512f");
        for i0 in (0..rows).step_by(B) {
            let bi = B.min(rows - i0);
            let block = &mut out[i0 * cols..(i0 + bi) * cols];
            let mut j = 0;
            #[cfg(target_arch = "x86_64")]
            if wide && bi == B {
                while j + B <= cols {
                    // The 16 x 16 source block, rows j.. (each 16 values
                    // from i0), and its place in `block`.
                    let last = i0 + (j + B - 1) * cs + B;
                    assert!(last <= src.len() && (B - 1) * cols + j + B <= block.len());
                    // SAFETY: checked above: 16 runs of 16 at stride `cs`
                    // from `i0 + j * cs` are in `src`, 16 rows of 16 at
                    // stride `cols` from `j` in `block`; the CPU has AVX-512F.
                    unsafe { avx512::transpose16(src.as_ptr().add(i0 + j * cs), cs, block.as_mut_ptr().add(j), cols) };
                    j += B;
                }
            }
            for j in j..cols {
                if rs == 1 {
                    // Column `j` of the transposed source: a contiguous run.
                    let run = &src[i0 + j * cs..i0 + j * cs + bi];
                    for (i, &v) in run.iter().enumerate() {
                        block[i * cols + j] = v;
                    }
                } else {
                    for i in 0..bi {
                        block[i * cols + j] = src[(i0 + i) * rs + j * cs];
                    }
                }
            }
        }
    }
    out
}

/// A product of mixed-precision training: `c[m, n] (+)= bf16(a) · bf16(b)`
/// summed in f32, `a[i, p]` at `a[i * a_rs + p * a_cs]` and `b[p, j]` at
/// `b[p * b_rs + j * b_cs]` (the caller has checked that they lie inside
/// their slices, and that no dimension is zero). Both operands change from
/// one step to the next (weights, activations, gradients), so each call
/// packs `b` again (into this thread's reused [`Bf16Matrix`]); the
/// product is then inference's, on any bf16 kernel (the emulation included,
/// so that this driver is tested on every CPU). `may_split` runs it over
/// the rayon pool in blocks of rows.
///
/// # Panics
/// If `kernel` is not a bf16 kernel this CPU runs.
#[allow(clippy::too_many_arguments)]
pub(super) fn training_product(
    kernel: Kernel,
    (m, n, k): (usize, usize, usize),
    c: &mut [f32],
    (a, a_strides): (&[f32], (usize, usize)),
    (b, b_strides): (&[f32], (usize, usize)),
    accumulate: bool,
    may_split: bool,
) {
    let [mut ra, mut rc] = OPERANDS.with(|o| std::mem::take(&mut *o.borrow_mut()));
    // The kernels (and the emulation) round `a` themselves, and `b` when
    // they pack it. A row-major operand is read where it is.
    let a = match a_strides == (k, 1) {
        true => &a[..m * k],
        false => gather(m, k, a, a_strides, &mut ra),
    };
    let mut w = TRAINING_B
        .with(|t| t.borrow_mut().take())
        .filter(|w| w.kernel == kernel)
        .unwrap_or_else(|| Bf16Matrix::empty(kernel));
    w.refill_strided(k, n, b, b_strides);
    let out = if accumulate {
        // Overwritten by the product: grown, never cleared.
        if rc.len() < m * n {
            rc.resize(m * n, 0.0);
        }
        &mut rc[..m * n]
    } else {
        &mut c[..m * n]
    };
    if may_split {
        w.matmul_parallel(m, a, out);
    } else {
        w.matmul(m, a, out);
    }
    if accumulate {
        c[..m * n].iter_mut().zip(&rc[..m * n]).for_each(|(c, x)| *c += x);
    }
    OPERANDS.with(|o| *o.borrow_mut() = [ra, rc]);
    TRAINING_B.with(|t| *t.borrow_mut() = Some(w));
}

/// A `[k, n]` weight matrix in bf16, in the form its kernel reads.
#[derive(Debug, Clone)]
pub struct Bf16Matrix {
    k: usize,
    n: usize,
    kernel: Kernel,
    /// Emulated: the weights rounded to bf16, `[k, n]` f32.
    rounded: Vec<f32>,
    /// Hardware: bf16 pairs `(W[2p, j], W[2p+1, j])` (low half first), zero
    /// past `k` and `n`, in panels of columns: AVX512-BF16 [`NR`] columns,
    /// each `[ceil(k/2), NR]` ([`pack_weights`]); AMX [`TILE`] columns,
    /// an even number of them, each `[pairs, TILE]` with the pairs rounded up
    /// to whole tiles ([`pack_tiles`]).
    packed: Vec<u32>,
}

impl Bf16Matrix {
    /// The `[k, n]` row-major `w` in bf16 for `kernel`.
    ///
    /// # Panics
    /// If `w` is not `k * n` long, or `kernel` is not a bf16 kernel this CPU
    /// runs ([`Kernel::Emulated`], or one of [`hardware_kernels`]).
    pub fn new(k: usize, n: usize, w: &[f32], kernel: Kernel) -> Self {
        let mut m = Bf16Matrix::empty(kernel);
        m.refill(k, n, w);
        m
    }

    /// A `[0, 0]` matrix on `kernel`, to be filled by [`Bf16Matrix::refill`].
    ///
    /// # Panics
    /// As [`Bf16Matrix::new`].
    pub(crate) fn empty(kernel: Kernel) -> Self {
        assert_runs(kernel);
        Bf16Matrix {
            k: 0,
            n: 0,
            kernel,
            rounded: Vec::new(),
            packed: Vec::new(),
        }
    }

    /// The kernel this matrix is packed for.
    pub(crate) fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// [`Bf16Matrix::refill`] from a `[k, n]` matrix read at strides
    /// `(rs, cs)` (`w[p, j]` at `w[p * rs + j * cs]`; `(1, k)` reads the
    /// transpose of a row-major `[n, k]`), gathered row-major first unless
    /// it is row-major already. The caller has checked that it lies in `w`.
    pub(crate) fn refill_strided(&mut self, k: usize, n: usize, w: &[f32], strides: (usize, usize)) {
        if strides == (n, 1) {
            return self.refill(k, n, &w[..k * n]);
        }
        GATHERED.with(|g| {
            let mut g = g.borrow_mut();
            let w = gather(k, n, w, strides, &mut g);
            self.refill(k, n, w);
        });
    }

    /// Makes this matrix the `[k, n]` row-major `w`, on the same kernel,
    /// in the buffers it already has: mixed-precision training makes one
    /// per product, and fresh buffers each time cost page faults.
    ///
    /// # Panics
    /// If `w` is not `k * n` long.
    pub(crate) fn refill(&mut self, k: usize, n: usize, w: &[f32]) {
        assert_eq!(w.len(), k * n, "weight shape");
        (self.k, self.n) = (k, n);
        match self.kernel {
            Kernel::Fp32 => panic!("Bf16Matrix for the fp32 kernel"),
            Kernel::Emulated => {
                self.rounded.clear();
                self.rounded.extend(w.iter().map(|&x| round_bf16(x)));
            }
            Kernel::Avx512Bf16 => pack_weights_into(k, n, w, &mut self.packed),
            Kernel::Amx => pack_tiles_into(k, n, w, &mut self.packed),
        }
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
                // `hardware_kernels` found AVX512F, AVX512BW and AVX512-BF16.
                unsafe { packed_product(m, k, n, a, &self.packed, c, avx512::tile, avx512::convert) };
            }
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            Kernel::Amx => {
                // SAFETY: `new` made this matrix for this kernel only after
                // `hardware_kernels` found AMX (its tile state granted) and
                // AVX512-BF16.
                unsafe { tiled_product(m, k, n, a, &self.packed, c, Some(amx::block), avx512::convert) };
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

/// Products over activations packed once, for the attention unit's fused
/// AMX inference (see `attention::chunked`): each layer's activations are
/// rounded straight into the next product's operand
/// (`pack_row`), and the first layer's product runs on split
/// operands (`split_weights`, `pack_split_row`).
impl Bf16Matrix {
    /// Whether this matrix multiplies packed activations: the AMX kernel.
    pub(crate) fn takes_packed(&self) -> bool {
        self.kernel == Kernel::Amx
    }

    /// Pairs per row of the packed activations this matrix multiplies.
    pub(crate) fn packed_stride(&self) -> usize {
        tile_pairs(self.k)
    }

    /// Rows of a packed operand for `m` rows: whole AMX blocks of 2 [`TILE`].
    pub(crate) fn packed_rows(m: usize) -> usize {
        m.div_ceil(2 * TILE) * 2 * TILE
    }

    /// `row` (`[k]`) rounded to bf16 pairs into `out` (one packed row,
    /// [`Bf16Matrix::packed_stride`] long; zero past `k`).
    ///
    /// # Panics
    /// Unless [`Bf16Matrix::takes_packed`] and the lengths are those.
    pub(crate) fn pack_row(&self, row: &[f32], out: &mut [u32]) {
        assert!(
            self.takes_packed() && row.len() == self.k && out.len() == self.packed_stride(),
            "packed row shape"
        );
        #[cfg(target_arch = "x86_64")]
        // SAFETY: an AMX matrix is made only where `hardware_kernels` found
        // AMX, which it accepts only with AVX512F, AVX512BW and AVX512-BF16.
        unsafe {
            avx512::convert(row, out)
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("no AMX on this architecture");
    }

    /// Rows of `x` (`[rows, k]`) through PReLU after adding `bias`
    /// (`[k]`), `max(v, 0) + alpha·min(v, 0)` with `v = x + bias` (ReLU
    /// where `alpha` is `None`), rounded to bf16 pairs into `out` (`rows`
    /// packed rows): what [`crate::model::Rowwise::add_apply_in_place`]
    /// then [`Bf16Matrix::pack_row`] give, bit for bit, in one pass.
    ///
    /// # Panics
    /// Unless [`Bf16Matrix::takes_packed`] and the lengths are those.
    pub(crate) fn pack_prelu_rows(&self, x: &[f32], bias: &[f32], alpha: Option<&[f32]>, out: &mut [u32]) {
        let (k, stride) = (self.k, self.packed_stride());
        let rows = x.len() / k.max(1);
        assert!(
            self.takes_packed()
                && x.len() == rows * k
                && bias.len() == k
                && alpha.is_none_or(|a| a.len() == k)
                && out.len() == rows * stride,
            "activated rows' shape"
        );
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `pack_row`.
        unsafe {
            avx512::prelu_rows(x, k, bias, alpha, out, stride)
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("no AMX on this architecture");
    }

    /// The first attention layer's split row for query `q` and key `k`
    /// (both `[D]`), into `out` (one packed row): `x = [q*k, k]` as
    /// `[hi(x), lo(x), hi(x)]` ([`split_weights`]), for a matrix made from
    /// `split_weights` of `[Wp; Wk']` (`k = 6D`).
    ///
    /// # Panics
    /// Unless [`Bf16Matrix::takes_packed`] and the lengths are those.
    pub(crate) fn pack_split_row(&self, q: &[f32], k: &[f32], out: &mut [u32]) {
        assert!(
            self.takes_packed() && q.len() == k.len() && self.k == 6 * q.len() && out.len() == self.packed_stride(),
            "split row shape"
        );
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `pack_row`.
        unsafe {
            avx512::split_row(q, k, out)
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("no AMX on this architecture");
    }

    /// `c[m, n] = a · W` over packed activations: row `i` of `a` at
    /// `a[i * stride..]` (`stride` = [`Bf16Matrix::packed_stride`]) as
    /// [`Bf16Matrix::pack_row`] writes them, [`Bf16Matrix::packed_rows`]`(m)`
    /// rows (those past `m` are read and their results dropped).
    ///
    /// # Panics
    /// Unless [`Bf16Matrix::takes_packed`] and the lengths are those.
    pub(crate) fn matmul_packed(&self, m: usize, a: &[u32], c: &mut [f32], session: &TileSession) {
        assert!(self.takes_packed(), "packed activations are AMX's");
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        // SAFETY: an AMX matrix is made only where `hardware_kernels` found
        // AMX (its tile state granted); `session` configured the tiles on
        // this thread (it cannot leave it).
        unsafe {
            let _ = &session.0;
            product_of_packed(m, self.k, self.n, a, &self.packed, c, Some(amx::block), true)
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        unreachable!("no AMX here ({m} rows, {} {}, {session:?})", a.len(), c.len());
    }

    /// The AMX tiles configured on this thread for
    /// [`Bf16Matrix::matmul_packed`], until the session is dropped: a
    /// fused pass configures them once per chunk, not once per product
    /// (`ldtilecfg` and `tilerelease` each time cost 6% of its time).
    ///
    /// # Panics
    /// Unless [`Bf16Matrix::takes_packed`].
    pub(crate) fn tile_session(&self) -> TileSession {
        assert!(self.takes_packed(), "tiles are AMX's");
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        // SAFETY: as in `matmul_packed`.
        return TileSession(unsafe { amx::Tiles::configure() });
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        unreachable!("no AMX here");
    }
}

/// AMX tiles configured on the thread that holds it (see
/// [`Bf16Matrix::tile_session`]); neither `Send` nor `Sync`. While it is
/// held, the thread must not run anything that configures and releases
/// tiles of its own ([`Bf16Matrix::matmul`] on AMX), nor wait on rayon
/// (which could run such a job on it): the release would leave the
/// session's products without tiles.
#[derive(Debug)]
pub(crate) struct TileSession(#[cfg(all(target_arch = "x86_64", target_os = "linux"))] amx::Tiles);

/// `w` (`[r, n]`, row-major) split for a product that keeps about 16 bits
/// of each operand: `[hi(w); hi(w); lo(w)]` (`[3r, n]`), where `hi(x)` is
/// `x` rounded to bf16 and `lo(x)` the rest, `x - hi(x)`, rounded to bf16.
/// Against an operand `[hi(x), lo(x), hi(x)]` the bf16 product sums
/// `hi(x)·hi(w) + lo(x)·hi(w) + hi(x)·lo(w)`, which leaves out only
/// `lo(x)·lo(w)` (under 2^-16 of `|x·w|`; bf16 alone errs by up to 2^-8).
/// The attention unit's first layer takes its inputs this way: it sees the
/// embeddings themselves, and costs three bf16 products of width `2D`.
pub(crate) fn split_weights(w: &[f32]) -> Vec<f32> {
    let hi: Vec<f32> = w.iter().map(|&x| round_bf16(x)).collect();
    let lo = w.iter().zip(&hi).map(|(&x, &h)| round_bf16(x - h));
    let mut out = Vec::with_capacity(3 * w.len());
    out.extend_from_slice(&hi);
    out.extend_from_slice(&hi);
    out.extend(lo);
    out
}

/// [`Bf16Matrix::pack_split_row`] in scalar code ([`bf16_bits`]): the
/// model the AVX-512 form is tested against.
#[cfg_attr(not(test), allow(dead_code))]
fn split_row_scalar(q: &[f32], k: &[f32], out: &mut [u32]) {
    let x: Vec<f32> = q.iter().zip(k).map(|(a, b)| a * b).chain(k.iter().copied()).collect();
    let hi: Vec<f32> = x.iter().map(|&v| round_bf16(v)).collect();
    let lo = x.iter().zip(&hi).map(|(&v, &h)| round_bf16(v - h));
    let row: Vec<f32> = hi.iter().copied().chain(lo).chain(hi.iter().copied()).collect();
    convert_scalar(&row, out);
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

/// Packs `w` (`[k, n]`) into `panels` panels of `width` columns, each
/// `[pairs, width]` bf16 pairs (`pairs >= ceil(k/2)`), zero past `k`, `n`.
fn pack_panels(k: usize, n: usize, w: &[f32], width: usize, pairs: usize, panels: usize) -> Vec<u32> {
    let mut out = Vec::new();
    pack_panels_into(k, n, w, width, pairs, panels, &mut out);
    out
}

/// [`pack_panels`] into `out`, reusing its allocation.
fn pack_panels_into(k: usize, n: usize, w: &[f32], width: usize, pairs: usize, panels: usize, out: &mut Vec<u32>) {
    // Not cleared: the values are written below, then the padding zeroed.
    out.truncate(panels * pairs * width);
    out.resize(panels * pairs * width, 0);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512bw") {
        /// The same loop in the AVX-512 build (every bf16 hardware kernel
        /// implies it), where the rounding vectorises.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
        unsafe fn wide(k: usize, n: usize, w: &[f32], width: usize, pairs: usize, out: &mut [u32]) {
            fill_panels(k, n, w, width, pairs, out);
        }
        // SAFETY: the CPU has the features `wide` is compiled for.
        unsafe { wide(k, n, w, width, pairs, out) };
    } else {
        fill_panels(k, n, w, width, pairs, out);
    }
    #[cfg(not(target_arch = "x86_64"))]
    fill_panels(k, n, w, width, pairs, out);
    // Zero past `k` (whole rows of pairs) and past `n` (columns of the last
    // panel, and whole padding panels).
    if pairs == 0 {
        return; // k = 0: nothing to pack
    }
    let filled = n.div_ceil(width);
    for (jp, panel) in out.chunks_exact_mut(pairs * width).enumerate() {
        let cols = if jp < filled { width.min(n - jp * width) } else { 0 };
        for (p, row) in panel.chunks_exact_mut(width).enumerate() {
            let from = if p < k.div_ceil(2) { cols } else { 0 };
            row[from..].fill(0);
        }
    }
}

/// The body of [`pack_panels_into`]: writes every pair of rows below
/// `ceil(k/2)` and columns below `n` (`out` is long enough); the caller
/// zeroes the rest.
#[inline(always)]
fn fill_panels(k: usize, n: usize, w: &[f32], width: usize, pairs: usize, out: &mut [u32]) {
    for jp in 0..n.div_ceil(width) {
        let (c0, cols) = (jp * width, width.min(n - jp * width));
        for p in 0..k.div_ceil(2) {
            let lo = &w[2 * p * n + c0..][..cols];
            let row = &mut out[(jp * pairs + p) * width..][..cols];
            if 2 * p + 1 < k {
                let hi = &w[(2 * p + 1) * n + c0..][..cols];
                for ((o, &l), &h) in row.iter_mut().zip(lo).zip(hi) {
                    *o = u32::from(bf16_bits(l)) | u32::from(bf16_bits(h)) << 16;
                }
            } else {
                for (o, &l) in row.iter_mut().zip(lo) {
                    *o = u32::from(bf16_bits(l));
                }
            }
        }
    }
}

/// `w` in the AVX512-BF16 kernel's panels (see [`Bf16Matrix::packed`]).
fn pack_weights(k: usize, n: usize, w: &[f32]) -> Vec<u32> {
    pack_panels(k, n, w, NR, k.div_ceil(2), n.div_ceil(NR))
}

/// [`pack_weights`] into `out`.
fn pack_weights_into(k: usize, n: usize, w: &[f32], out: &mut Vec<u32>) {
    pack_panels_into(k, n, w, NR, k.div_ceil(2), n.div_ceil(NR), out);
}

/// Pairs of `k` rounded up to whole AMX tiles.
fn tile_pairs(k: usize) -> usize {
    k.div_ceil(2 * TILE_PAIRS) * TILE_PAIRS
}

/// `w` in the AMX kernel's panels (see [`Bf16Matrix::packed`]).
fn pack_tiles(k: usize, n: usize, w: &[f32]) -> Vec<u32> {
    pack_panels(k, n, w, TILE, tile_pairs(k), n.div_ceil(2 * TILE) * 2)
}

/// [`pack_tiles`] into `out`.
fn pack_tiles_into(k: usize, n: usize, w: &[f32], out: &mut Vec<u32>) {
    pack_panels_into(k, n, w, TILE, tile_pairs(k), n.div_ceil(2 * TILE) * 2, out);
}

/// Rounds a row of activations to bf16 pairs: `out[p]` holds `row[2p]`
/// (low half) and `row[2p + 1]`; the rest of `out` is zeroed.
type Convert = unsafe fn(row: &[f32], out: &mut [u32]);

/// [`Convert`] in scalar code ([`bf16_bits`]).
fn convert_scalar(row: &[f32], out: &mut [u32]) {
    out.iter_mut().for_each(|o| *o = 0);
    for (o, pair) in out.iter_mut().zip(row.chunks(2)) {
        let hi = pair.get(1).map_or(0, |&x| bf16_bits(x));
        *o = u32::from(bf16_bits(pair[0])) | u32::from(hi) << 16;
    }
}

/// Each thread's packing buffer, resized to `rows * stride` pairs and
/// filled with `a`'s `m` rows of `k` (the rest zero).
fn with_packed<R>(
    m: usize,
    k: usize,
    a: &[f32],
    rows: usize,
    stride: usize,
    convert: Convert,
    f: impl FnOnce(&[u32]) -> R,
) -> R {
    PACKED.with(|buf| {
        let mut buf = buf.borrow_mut();
        if buf.len() < rows * stride {
            buf.resize(rows * stride, 0);
        }
        let buf = &mut buf[..rows * stride];
        // `convert` writes every pair of a row (zeros past `k`), so only
        // the padding rows need clearing: not the whole buffer each call.
        let (filled, padding) = buf.split_at_mut(m * stride);
        for (row, out) in a[..m * k].chunks_exact(k).zip(filled.chunks_exact_mut(stride)) {
            // SAFETY: the caller's `convert` runs on this CPU.
            unsafe { convert(row, out) };
        }
        padding.fill(0);
        f(buf)
    })
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
/// `tile` and `convert` must be runnable on this CPU.
#[allow(clippy::too_many_arguments)]
unsafe fn packed_product(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    packed: &[u32],
    c: &mut [f32],
    tile: Tile,
    convert: Convert,
) {
    let kp = k.div_ceil(2);
    let panels = n.div_ceil(NR);
    assert_eq!(packed.len(), panels * kp * NR, "packed weight shape");
    if k == 0 {
        c[..m * n].iter_mut().for_each(|x| *x = 0.0);
        return;
    }
    // Rows padded to a whole tile with zeros, so the kernel reads MR rows.
    with_packed(m, k, a, m.div_ceil(MR) * MR, kp, convert, |buf| {
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

/// The microkernel in scalar code: like the AVX-512 one it computes all
/// `MR x NR` lanes (reading every row and column it may read), lane by
/// lane as Intel describes `vdpbf16ps` (the high pair's product added
/// first), and stores through [`store_masks`]: checks the packing, the
/// tiling and the masks on any CPU.
/// # Safety
/// The pointers hold what [`Tile`] says.
unsafe fn portable_tile(a: *const u32, rows: usize, kp: usize, b: *const u32, c: *mut f32, ldc: usize, cols: usize) {
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

/// An AMX block: rows `0..2 TILE` of packed activations (`a`, row stride
/// `lda` pairs, `kp` pairs each, a multiple of [`TILE_PAIRS`]) times two
/// adjacent panels (`b`, each `[kp, TILE]`) into the `2 TILE x 2 TILE`
/// f32 results at `out`, row-major with row stride `ldo` (tile `2 r + c`:
/// rows `16 r..`, columns `16 c..`).
type Block = unsafe fn(a: *const u32, lda: usize, b: *const u32, kp: usize, out: *mut f32, ldo: usize);

/// `c[m, n] = bf16(a) · W` over AMX panels, `2 TILE x 2 TILE` blocks at a
/// time: `block` (`None`: [`portable_block`], the scalar model) stores a
/// block that lies wholly inside `c` there, and computes one that reaches
/// past `m` or `n` into a buffer, whose rows and columns inside `c` are
/// copied out.
///
/// # Safety
/// `block` and `convert` must be runnable on this CPU.
#[allow(clippy::too_many_arguments)]
unsafe fn tiled_product(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    packed: &[u32],
    c: &mut [f32],
    block: Option<Block>,
    convert: Convert,
) {
    if k == 0 || m == 0 || n == 0 {
        // Nothing to pack: zeros, or nothing at all.
        // SAFETY: the caller's contract.
        return unsafe { product_of_packed(m, k, n, &[], packed, c, block, false) };
    }
    let kp = tile_pairs(k);
    // Rows padded to whole blocks with zeros, so the tiles read 2 TILE rows.
    with_packed(m, k, a, Bf16Matrix::packed_rows(m), kp, convert, |buf| {
        // SAFETY: `buf` holds `Bf16Matrix::packed_rows(m)` rows of `kp`
        // pairs; `block` runs on this CPU (the caller's contract).
        unsafe { product_of_packed(m, k, n, buf, packed, c, block, false) }
    });
}

/// The blocks of [`tiled_product`] over activations packed already: `a`
/// holds [`Bf16Matrix::packed_rows`]`(m)` rows of `tile_pairs(k)` pairs (rows past `m`
/// are read, their results dropped), `packed` the AMX panels of `W`. A
/// hardware `block` runs in tiles configured here, or with `configured`
/// in those of a [`TileSession`] the caller holds.
///
/// # Safety
/// `block` must be runnable on this CPU; with `configured`, the tiles are
/// configured on this thread.
#[allow(clippy::too_many_arguments)]
unsafe fn product_of_packed(
    m: usize,
    k: usize,
    n: usize,
    a: &[u32],
    packed: &[u32],
    c: &mut [f32],
    block: Option<Block>,
    configured: bool,
) {
    const SIDE: usize = 2 * TILE;
    let kp = tile_pairs(k);
    let pairs_of_panels = n.div_ceil(SIDE);
    assert_eq!(packed.len(), pairs_of_panels * 2 * kp * TILE, "packed weight shape");
    assert!(c.len() >= m * n, "bf16 product shape mismatch");
    if k == 0 {
        c[..m * n].iter_mut().for_each(|x| *x = 0.0);
        return;
    }
    if m == 0 || n == 0 {
        return;
    }
    assert!(a.len() >= Bf16Matrix::packed_rows(m) * kp, "packed activations' shape");
    #[repr(C, align(64))]
    struct Out([f32; SIDE * SIDE]);
    // Written whole by each block before it is read: not zeroed first (the
    // fused path calls this per block of rows, and a 4 KiB memset each
    // time cost 3% of its time).
    let mut out = std::mem::MaybeUninit::<Out>::uninit();
    let hardware = block.is_some();
    let block = block.unwrap_or(portable_block);
    // SAFETY: a hardware block runs on this CPU (the caller's contract).
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    let _tiles = (hardware && !configured).then(|| unsafe { amx::Tiles::configure() });
    for i0 in (0..m).step_by(SIDE) {
        for jb in 0..pairs_of_panels {
            let a_block = &a[i0 * kp..(i0 + SIDE) * kp];
            let b = &packed[jb * 2 * kp * TILE..(jb + 1) * 2 * kp * TILE];
            let c0 = jb * SIDE;
            if i0 + SIDE <= m && c0 + SIDE <= n {
                // SAFETY: `a_block` holds 2 TILE rows of `kp` pairs, `b`
                // two panels of `kp * TILE`; the block's rows and
                // columns lie inside `c` (`m * n`, checked above); the
                // block runs on this CPU with its tiles configured above.
                unsafe { block(a_block.as_ptr(), kp, b.as_ptr(), kp, c.as_mut_ptr().add(i0 * n + c0), n) };
                continue;
            }
            // SAFETY: as above, into `out` (`SIDE x SIDE`), which the block
            // then holds whole.
            let out = unsafe {
                block(a_block.as_ptr(), kp, b.as_ptr(), kp, out.as_mut_ptr() as *mut f32, SIDE);
                out.assume_init_ref()
            };
            let cols = SIDE.min(n - c0);
            for r in i0..(i0 + SIDE).min(m) {
                c[r * n + c0..r * n + c0 + cols].copy_from_slice(&out.0[(r - i0) * SIDE..][..cols]);
            }
        }
    }
}

/// The AMX block in scalar code (see [`Block`]): every lane of the four
/// tiles, each `tdpbf16ps` step adding a pair's two products (the even
/// element's first, as Intel's intrinsics guide describes it). Checks the
/// panels, the padding, the direct stores and the copying out on any CPU.
///
/// # Safety
/// The pointers hold what [`Block`] says.
unsafe fn portable_block(a: *const u32, lda: usize, b: *const u32, kp: usize, out: *mut f32, ldo: usize) {
    for t in 0..4 {
        let (r0, panel) = (TILE * (t / 2), t % 2);
        for r in 0..TILE {
            for j in 0..TILE {
                let mut acc = 0.0f32;
                for p in 0..kp {
                    let (x, y) = (*a.add((r0 + r) * lda + p), *b.add((panel * kp + p) * TILE + j));
                    acc += bf16_value(x as u16) * bf16_value(y as u16);
                    acc += bf16_value((x >> 16) as u16) * bf16_value((y >> 16) as u16);
                }
                *out.add((r0 + r) * ldo + panel * TILE + j) = acc;
            }
        }
    }
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

    /// `$op zmm{r}, zmm30, zmm31` for the 24 registers `r` below, `rounds`
    /// times, timed: 24 independent chains of one instruction, each
    /// started from `$x` (a normal number: no slow path for subnormals).
    macro_rules! timed_chains {
        ($op:literal, $rounds:expr, $x:expr) => {
            timed_chains!($op, $rounds, $x; 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23)
        };
        ($op:literal, $rounds:expr, $x:expr; $($r:literal)*) => {{
            let start = std::time::Instant::now();
            // Every vector register is the C ABI's to clobber, so the
            // chains may use any of them.
            std::arch::asm!(
                $(concat!("vmovaps zmm", $r, ", zmm30"),)*
                "2:",
                $(concat!($op, " zmm", $r, ", zmm30, zmm31"),)*
                "dec rcx",
                "jnz 2b",
                inout("rcx") $rounds.max(1) => _,
                in("zmm30") $x,
                in("zmm31") $x,
                clobber_abi("C"),
                options(nomem, nostack),
            );
            start.elapsed().as_secs_f64()
        }};
    }

    /// Seconds for `rounds` rounds of 24 independent `vdpbf16ps` (see
    /// [`super::avx512bf16_speedup`]); the operands are bf16 pairs of 1/64.
    ///
    /// # Safety
    /// The CPU has AVX512F and AVX512-BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn dot_seconds(rounds: usize) -> f64 {
        // 1/64 in bf16 is 0x3c80: sums stay small and exact.
        let x = _mm512_set1_epi32(0x3c80_3c80);
        timed_chains!("vdpbf16ps", rounds, x)
    }

    /// Seconds for `rounds` rounds of 24 independent `vfmadd231ps`.
    ///
    /// # Safety
    /// The CPU has AVX512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn fma_seconds(rounds: usize) -> f64 {
        let x = _mm512_set1_ps(1.0 / 64.0);
        timed_chains!("vfmadd231ps", rounds, x)
    }

    /// `dst[i * ld_dst + j] = src[j * ld_src + i]` for `i, j < 16`: a
    /// 16 x 16 transpose in registers (32-bit, then 64-bit interleaves
    /// within 128-bit lanes, then two rounds of lane shuffles).
    ///
    /// # Safety
    /// The CPU has AVX512F; `src` holds 16 runs of 16 floats at stride
    /// `ld_src`, `dst` 16 rows of 16 at stride `ld_dst`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose16(src: *const f32, ld_src: usize, dst: *mut f32, ld_dst: usize) {
        let r: [__m512; 16] = std::array::from_fn(|j| _mm512_loadu_ps(src.add(j * ld_src)));
        let (pd, ps) = (_mm512_castps_pd, _mm512_castpd_ps);
        let mut u = [_mm512_setzero_ps(); 16];
        for g in 0..4 {
            let (a, b, c, d) = (r[4 * g], r[4 * g + 1], r[4 * g + 2], r[4 * g + 3]);
            let (t0, t1) = (_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
            let (t2, t3) = (_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
            // u[4g + c], lane L: rows 4g..4g+4 of column 4L + c.
            u[4 * g] = ps(_mm512_unpacklo_pd(pd(t0), pd(t2)));
            u[4 * g + 1] = ps(_mm512_unpackhi_pd(pd(t0), pd(t2)));
            u[4 * g + 2] = ps(_mm512_unpacklo_pd(pd(t1), pd(t3)));
            u[4 * g + 3] = ps(_mm512_unpackhi_pd(pd(t1), pd(t3)));
        }
        for c in 0..4 {
            // Rows 0-7, then 8-15: lanes (L0, L2) and (L1, L3) of each pair.
            let v0 = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]);
            let v4 = _mm512_shuffle_f32x4::<0xdd>(u[c], u[4 + c]);
            let w0 = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
            let w4 = _mm512_shuffle_f32x4::<0xdd>(u[8 + c], u[12 + c]);
            let store = |col: usize, v: __m512| _mm512_storeu_ps(dst.add(col * ld_dst), v);
            store(c, _mm512_shuffle_f32x4::<0x88>(v0, w0));
            store(8 + c, _mm512_shuffle_f32x4::<0xdd>(v0, w0));
            store(4 + c, _mm512_shuffle_f32x4::<0x88>(v4, w4));
            store(12 + c, _mm512_shuffle_f32x4::<0xdd>(v4, w4));
        }
    }

    /// [`super::Convert`] with `vcvtne2ps2bf16` (round to nearest even, as
    /// [`super::bf16_bits`], except that subnormals become zero), 32
    /// values at a time.
    ///
    /// # Safety
    /// The CPU has AVX512F and AVX512-BF16; `out` holds at least
    /// `ceil(row.len() / 2)` pairs.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn convert(row: &[f32], out: &mut [u32]) {
        let k = row.len();
        assert!(2 * out.len() >= k, "room for the row's pairs");
        let (src, dst) = (row.as_ptr(), out.as_mut_ptr() as *mut u16);
        let mut i = 0;
        while i + 32 <= k {
            // SAFETY: 32 values from `i` are in `row`, their halves in `out`.
            let lo = _mm512_loadu_ps(src.add(i));
            let hi = _mm512_loadu_ps(src.add(i + 16));
            // The second operand gives the low 16 halves.
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(dst.add(i) as *mut _, v);
            i += 32;
        }
        if i < k {
            let mut last = [0u16; 32];
            let n = k - i;
            let mask = |from: usize| ((1u32 << n.saturating_sub(from).min(16)) - 1) as u16;
            // SAFETY: the masked loads read only values inside `row`.
            let lo = _mm512_maskz_loadu_ps(mask(0), src.add(i));
            let hi = _mm512_maskz_loadu_ps(mask(16), src.add(i + 16.min(n)));
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(last.as_mut_ptr() as *mut _, v);
            // SAFETY: the halves `i..k` are in `out`.
            std::ptr::copy_nonoverlapping(last.as_ptr(), dst.add(i), n);
        }
        // The rest of `out` is zero (an odd `k`'s last high half too).
        for h in k..2 * out.len() {
            // SAFETY: inside `out`.
            *dst.add(h) = 0;
        }
    }

    /// [`super::Bf16Matrix::pack_prelu_rows`]: rows of `k` values of `x`,
    /// 32 at a time, into rows of `stride` pairs of `out`.
    ///
    /// # Safety
    /// The CPU has AVX512F, AVX512BW, AVX512VL and AVX512-BF16; `x` holds
    /// whole rows, `out` as many rows of `stride >= ceil(k/2)` pairs,
    /// `bias` and `alpha` `k` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn prelu_rows(
        x: &[f32],
        k: usize,
        bias: &[f32],
        alpha: Option<&[f32]>,
        out: &mut [u32],
        stride: usize,
    ) {
        let rows = x.len().checked_div(k).unwrap_or(0);
        assert!(
            2 * stride >= k && out.len() >= rows * stride && bias.len() >= k && alpha.is_none_or(|a| a.len() >= k),
            "activated rows' shape"
        );
        let zero = _mm512_setzero_ps();
        // `max(v, 0) + a·min(v, 0)`, as the scalar form computes it: no
        // fused multiply-add, so the same bits.
        let act = |v: __m512, a: Option<__m512>| match a {
            Some(a) => _mm512_add_ps(_mm512_max_ps(v, zero), _mm512_mul_ps(a, _mm512_min_ps(v, zero))),
            None => _mm512_max_ps(v, zero),
        };
        // Values `i..i + 32` of a row at `src` into halves `i..` at `dst`,
        // loaded and stored through `m0`, `m1` (values `i..i + 16`, then
        // the next 16) unless `full`.
        let step = |src: *const f32, dst: *mut u16, i: usize, full: bool, m0: u16, m1: u16| {
            // SAFETY (for the caller to uphold): the values read and the
            // halves written lie inside `x`, `bias`, `alpha` and `out`.
            let load = |p: *const f32| match full {
                true => (_mm512_loadu_ps(p.add(i)), _mm512_loadu_ps(p.add(i + 16))),
                false => (
                    _mm512_maskz_loadu_ps(m0, p.add(i)),
                    _mm512_maskz_loadu_ps(m1, p.add(i + 16.min(k - i))),
                ),
            };
            let (x0, x1) = load(src);
            let (b0, b1) = load(bias.as_ptr());
            let (a0, a1) = match alpha {
                Some(a) => {
                    let (a0, a1) = load(a.as_ptr());
                    (Some(a0), Some(a1))
                }
                None => (None, None),
            };
            let (y0, y1) = (act(_mm512_add_ps(x0, b0), a0), act(_mm512_add_ps(x1, b1), a1));
            // The second operand gives the low 16 halves.
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(y1, y0));
            match full {
                true => _mm512_storeu_si512(dst.add(i) as *mut _, v),
                false => _mm512_mask_storeu_epi16(dst.add(i) as *mut i16, u32::from(m0) | u32::from(m1) << 16, v),
            }
        };
        let whole = k - k % 32;
        let tail = k - whole;
        let mask = |from: usize| ((1u32 << tail.saturating_sub(from).min(16)) - 1) as u16;
        let (m0, m1) = (mask(0), mask(16));
        for r in 0..rows {
            let (src, dst) = (x.as_ptr().add(r * k), out.as_mut_ptr().add(r * stride) as *mut u16);
            for i in (0..whole).step_by(32) {
                // SAFETY: values `i..i + 32` lie in the row (and in `bias`,
                // `alpha`), their halves in the row of `out` (`2 stride >= k`).
                step(src, dst, i, true, 0, 0);
            }
            if tail > 0 {
                // SAFETY: the masks cover the `tail` values from `whole`.
                step(src, dst, whole, false, m0, m1);
            }
            for h in k..2 * stride {
                // SAFETY: inside the row of `out`.
                *dst.add(h) = 0;
            }
        }
    }

    /// [`super::Bf16Matrix::pack_split_row`]: `x = [q*k, k]` (`2D`) as
    /// `[hi(x), lo(x), hi(x)]` bf16 halves, zero after, 16 lanes at a time.
    ///
    /// # Safety
    /// The CPU has AVX512F, AVX512BW, AVX512VL and AVX512-BF16; `out` holds
    /// at least `6 D` halves.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn split_row(q: &[f32], k: &[f32], out: &mut [u32]) {
        let d = q.len();
        assert!(k.len() == d && 2 * out.len() >= 6 * d, "split row shape");
        let dst = out.as_mut_ptr() as *mut u16;
        let x = 2 * d; // halves per third of the row
        let mut c = 0;
        while c < d {
            let lanes = (d - c).min(16);
            let mask = ((1u32 << lanes) - 1) as u16;
            // SAFETY: the masked loads read `lanes` values from `c`, inside
            // `q` and `k`; the masked stores write `lanes` halves at
            // `c`, `d + c` of each third, inside `out` (checked above).
            let (qv, kv) = (
                _mm512_maskz_loadu_ps(mask, q.as_ptr().add(c)),
                _mm512_maskz_loadu_ps(mask, k.as_ptr().add(c)),
            );
            for (v, at) in [(_mm512_mul_ps(qv, kv), c), (kv, d + c)] {
                let hi: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
                let hi_f32 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
                let lo: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(_mm512_sub_ps(v, hi_f32)));
                _mm256_mask_storeu_epi16(dst.add(at) as *mut i16, mask, hi);
                _mm256_mask_storeu_epi16(dst.add(x + at) as *mut i16, mask, lo);
                _mm256_mask_storeu_epi16(dst.add(2 * x + at) as *mut i16, mask, hi);
            }
            c += lanes;
        }
        for h in 3 * x..2 * out.len() {
            // SAFETY: inside `out`.
            *dst.add(h) = 0;
        }
    }
}

/// AMX: the tile state asked of Linux, the tile configuration, and the
/// block kernel. Written with `asm!`: the AMX intrinsics are not stable.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod amx {
    use std::arch::asm;

    use super::{TILE, TILE_PAIRS};

    /// Whether the CPU has AMX-TILE and AMX-BF16 and Linux granted this
    /// process the tile state (asked once, here). Linux refuses while some
    /// thread has a signal stack too small for the tiles' 8 KiB; the
    /// calling thread's is enlarged first, so asking before any other
    /// thread starts succeeds.
    pub(super) fn available() -> bool {
        // CPUID leaf 7, sub-leaf 0, EDX: bit 22 AMX-BF16, bit 24 AMX-TILE.
        let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
        if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
            return false;
        }
        enlarge_signal_stack();
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl with this request only changes the process's
        // permissions.
        unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
    }

    /// Gives the calling thread a 64 KiB signal stack if it has a smaller
    /// one (Rust's main thread has 8 KiB), so that Linux grants the tiles.
    /// The old stack's owner still frees it; the new one lives as long as
    /// the process.
    fn enlarge_signal_stack() {
        const SIZE: usize = 64 << 10;
        // SAFETY: reading the current signal stack.
        let mut old: libc::stack_t = unsafe { std::mem::zeroed() };
        if unsafe { libc::sigaltstack(std::ptr::null(), &mut old) } != 0 {
            return;
        }
        if old.ss_flags & libc::SS_DISABLE != 0 || old.ss_size >= SIZE || old.ss_flags & libc::SS_ONSTACK != 0 {
            return;
        }
        let stack = Box::leak(vec![0u8; SIZE].into_boxed_slice());
        let new = libc::stack_t {
            ss_sp: stack.as_mut_ptr().cast(),
            ss_flags: 0,
            ss_size: SIZE,
        };
        // SAFETY: `stack` lives for the rest of the process.
        unsafe { libc::sigaltstack(&new, std::ptr::null_mut()) };
    }

    /// The tile configuration: palette 1, tiles 0 to 7 of 16 rows of 64
    /// bytes (0-3 results, 4-5 activations, 6-7 weights).
    #[repr(C, align(64))]
    struct Config {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    static CONFIG: Config = {
        let mut colsb = [0u16; 16];
        let mut rows = [0u8; 16];
        let mut t = 0;
        while t < 8 {
            colsb[t] = 64;
            rows[t] = TILE as u8;
            t += 1;
        }
        Config {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb,
            rows,
        }
    };

    /// The tiles configured on this thread; released when dropped.
    #[derive(Debug)]
    pub(super) struct Tiles(std::marker::PhantomData<*const ()>);

    impl Tiles {
        /// Loads [`CONFIG`].
        ///
        /// # Safety
        /// The CPU has AMX and this process was granted the tile state.
        pub(super) unsafe fn configure() -> Tiles {
            asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly, preserves_flags));
            Tiles(std::marker::PhantomData)
        }
    }

    impl Drop for Tiles {
        fn drop(&mut self) {
            // SAFETY: made by `configure`, so the CPU has AMX.
            unsafe { asm!("tilerelease", options(nostack, nomem, preserves_flags)) };
        }
    }

    /// [`super::Block`] on AMX: tiles 0-3 accumulate the four results over
    /// `kp / 16` steps, each loading two activation tiles (4, 5) and two
    /// weight tiles (6, 7) and issuing four `tdpbf16ps`.
    ///
    /// # Safety
    /// The tiles are configured on this thread ([`Tiles::configure`]); the
    /// pointers hold what [`super::Block`] says; `kp` is a positive
    /// multiple of 16.
    pub(super) unsafe fn block(a: *const u32, lda: usize, b: *const u32, kp: usize, out: *mut f32, ldo: usize) {
        const _: () = assert!(TILE == 16 && TILE_PAIRS == 16);
        let a1 = a.add(TILE * lda);
        let b1 = b.add(kp * TILE);
        let out1 = out.add(TILE * ldo);
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "2:",
            "tileloadd tmm4, [{a0} + {sa}*1]",
            "tileloadd tmm6, [{b0} + {sb}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm7, [{b1} + {sb}*1]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{a1} + {sa}*1]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a0}, 64",
            "add {a1}, 64",
            "add {b0}, 1024",
            "add {b1}, 1024",
            "dec {steps}",
            "jnz 2b",
            "tilestored [{out0} + {so}*1], tmm0",
            "tilestored [{out0} + {so}*1 + 64], tmm1",
            "tilestored [{out1} + {so}*1], tmm2",
            "tilestored [{out1} + {so}*1 + 64], tmm3",
            a0 = inout(reg) a => _,
            a1 = inout(reg) a1 => _,
            b0 = inout(reg) b => _,
            b1 = inout(reg) b1 => _,
            steps = inout(reg) kp / TILE_PAIRS => _,
            sa = in(reg) lda * 4,
            sb = in(reg) 64usize,
            so = in(reg) ldo * 4,
            out0 = in(reg) out,
            out1 = in(reg) out1,
            options(nostack),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(
            Precision::Auto.resolve(),
            auto_choice(bf16_hardware(), avx512bf16_speedup)
        );
    }

    #[test]
    fn auto_takes_amx_and_takes_avx512bf16_only_where_it_outpaces_fp32() {
        let never = || -> Option<f64> { panic!("the speed is asked only for AVX512-BF16") };
        assert_eq!(auto_choice(Some(Kernel::Amx), never), Kernel::Amx);
        assert_eq!(auto_choice(None, never), Kernel::Fp32);
        let avx = Some(Kernel::Avx512Bf16);
        // Twice FP32's rate (as where `vdpbf16ps` is as fast as an FMA).
        assert_eq!(auto_choice(avx, || Some(2.0)), Kernel::Avx512Bf16);
        assert_eq!(auto_choice(avx, || Some(AUTO_MIN_SPEEDUP)), Kernel::Avx512Bf16);
        // Half FP32's rate (the Xeon this was written on), and just short.
        assert_eq!(auto_choice(avx, || Some(0.5)), Kernel::Fp32);
        assert_eq!(auto_choice(avx, || Some(AUTO_MIN_SPEEDUP - 0.01)), Kernel::Fp32);
        assert_eq!(auto_choice(avx, || None), Kernel::Fp32);
    }

    #[test]
    fn the_lines_say_why_auto_turned_avx512bf16_down_and_warn_when_bf16_runs_it() {
        let auto = describe_with(Precision::Auto, Kernel::Fp32, Some(0.5));
        assert_eq!(
            auto,
            "fp32 (auto: this CPU's AVX512-BF16 multiplies at 0.50x its FP32 FLOP/s, \
             under the 1.5x it needs to pay off; `bf16` still runs it)"
        );
        let bf16 = describe_with(Precision::Bf16, Kernel::Avx512Bf16, Some(0.48));
        assert_eq!(
            bf16,
            "bf16 on AVX512-BF16 (this CPU multiplies there at 0.48x its FP32 FLOP/s: \
             likely slower than fp32, which `auto` would run)"
        );
        // Nothing turned down, or another kernel: the kernel's own line.
        for (p, k) in [(Precision::Auto, Kernel::Fp32), (Precision::Bf16, Kernel::Avx512Bf16)] {
            assert_eq!(describe_with(p, k, None), k.describe());
        }
        assert_eq!(describe_with(Precision::Auto, Kernel::Amx, Some(0.5)), "bf16 on AMX");
        assert_eq!(describe_with(Precision::Fp32, Kernel::Fp32, Some(0.5)), "fp32");
    }

    #[test]
    fn the_speed_probe_measures_where_the_cpu_has_avx512bf16() {
        #[cfg(target_arch = "x86_64")]
        let has = std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16");
        #[cfg(not(target_arch = "x86_64"))]
        let has = false;
        let Some(speedup) = avx512bf16_speedup() else {
            assert!(!has, "measured wherever the CPU has AVX512-BF16");
            return;
        };
        assert!(has);
        // Any real core lies far inside this: 0.5 and 2 are what the
        // instruction tables give (a probe timing nothing gives 0 or inf).
        assert!((0.1..=8.0).contains(&speedup), "speedup {speedup}");
        let line = describe_choice(Precision::Auto, Precision::Auto.resolve());
        let bf16 = describe_choice(Precision::Bf16, Precision::Bf16.resolve());
        if speedup < AUTO_MIN_SPEEDUP && bf16_hardware() == Some(Kernel::Avx512Bf16) {
            assert!(
                line.starts_with("fp32 (auto: ") && line.contains(&format!("{speedup:.2}x")),
                "{line}"
            );
            assert!(
                bf16.starts_with("bf16 on AVX512-BF16 (") && bf16.contains("likely slower"),
                "{bf16}"
            );
        } else {
            assert_eq!(line, Precision::Auto.resolve().describe());
            assert_eq!(bf16, Precision::Bf16.resolve().describe());
        }
    }

    /// Shapes with every kind of edge: odd `k`, `n` past a panel and short
    /// of one, rows short of a tile and of a block, `k` past a whole tile,
    /// an odd number of AMX panels, one row, one column.
    const SHAPES: [(usize, usize, usize); 11] = [
        (0, 5, 7),
        (2, 0, 3),
        (1, 1, 1),
        (3, 5, 7),
        (8, 16, 32),
        (9, 17, 33),
        (20, 256, 128),
        (13, 255, 64),
        (256, 128, 80),
        (33, 40, 200),
        (70, 33, 17),
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
            // SAFETY: the scalar models run anywhere.
            unsafe {
                packed_product(
                    m,
                    k,
                    n,
                    &a,
                    &pack_weights(k, n, &w),
                    &mut c2,
                    portable_tile,
                    convert_scalar,
                )
            };
            assert_near(&format!("packed {m}x{k}x{n}"), &c2, &want, k);
            assert!(c2[m * n..].iter().all(|x| x.is_nan()), "nothing written past c");
            let mut c3 = vec![f32::NAN; m * n + 3];
            // SAFETY: as above.
            unsafe { tiled_product(m, k, n, &a, &pack_tiles(k, n, &w), &mut c3, None, convert_scalar) };
            assert_near(&format!("tiled {m}x{k}x{n}"), &c3, &want, k);
            assert!(c3[m * n..].iter().all(|x| x.is_nan()), "nothing written past c");
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
    fn packing_into_a_used_buffer_leaves_nothing_of_its_old_contents() {
        // Odd k (a half-empty last pair), n short of a panel, and shapes
        // that shrink and grow the buffer.
        let shapes = [(37, 70), (5, 3), (64, 33), (1, 1), (33, 17)];
        for (what, pack, into) in [
            (
                "AVX512-BF16 panels",
                pack_weights as fn(usize, usize, &[f32]) -> Vec<u32>,
                pack_weights_into as fn(usize, usize, &[f32], &mut Vec<u32>),
            ),
            ("AMX panels", pack_tiles, pack_tiles_into),
        ] {
            let mut out = vec![u32::MAX; 5000];
            for (i, &(k, n)) in shapes.iter().enumerate() {
                let w = values(k * n, 10 + i as u32);
                into(k, n, &w, &mut out);
                assert_eq!(
                    out,
                    pack(k, n, &w),
                    "{what}, {k} x {n} after {:?}",
                    shapes.get(i.wrapping_sub(1))
                );
                out.iter_mut().for_each(|x| *x = u32::MAX); // every value must be written again
            }
        }
    }

    #[test]
    fn gather_copies_every_layout() {
        // Transposes with whole 16 x 16 blocks and edges both ways, a
        // block of columns of a wider matrix, and a general stride.
        for (rows, cols) in [(1, 1), (16, 16), (37, 70), (64, 33), (15, 48), (48, 15)] {
            let src = values(rows * cols * 4 + 100, 5);
            for (rs, cs) in [(1, rows + 3), (cols + 2, 1), (1, rows), (3, 3 * rows + 1)] {
                let mut out = vec![f32::NAN; 7]; // stale contents are replaced
                let got = gather(rows, cols, &src, (rs, cs), &mut out).to_vec();
                let want: Vec<f32> = (0..rows * cols)
                    .map(|x| src[(x / cols) * rs + (x % cols) * cs])
                    .collect();
                assert_eq!(got, want, "{rows} x {cols}, strides ({rs}, {cs})");
            }
        }
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
    fn the_hardware_kernels_are_refused_where_the_cpu_lacks_them() {
        for kernel in [Kernel::Avx512Bf16, Kernel::Amx] {
            if hardware_kernels().contains(&kernel) {
                eprintln!("skipped for {kernel:?}: this CPU has it");
                continue;
            }
            let made = std::panic::catch_unwind(|| Bf16Matrix::new(1, 1, &[1.0], kernel));
            assert!(made.is_err(), "no {kernel:?} matrix on this CPU");
        }
        assert!(bf16_hardware().is_none_or(|k| hardware_kernels().contains(&k)));
    }

    #[test]
    fn a_kernel_that_disagrees_with_its_model_is_caught() {
        let model = |m, k, n, a: &[f32], w: &[f32], c: &mut [f32]| {
            // SAFETY: the scalar models run anywhere.
            unsafe { tiled_product(m, k, n, a, &pack_tiles(k, n, w), c, None, convert_scalar) }
        };
        assert!(agree(|m, k, n, a, w, c, _| model(m, k, n, a, w, c)));
        // The f32 product rounds nothing here either: it agrees.
        assert!(agree(|m, k, n, a, w, c, hw| if hw {
            serial::matmul(m, k, n, a, w, c, false)
        } else {
            model(m, k, n, a, w, c)
        }));
        for wrong in 0..3 {
            assert!(!agree(|m, k, n, a, w, c, hw| {
                model(m, k, n, a, w, c);
                if hw {
                    match wrong {
                        0 => c[m * n - 1] += 0.25,       // one element off
                        1 => c[n..2 * n].fill(f32::NAN), // a row unwritten
                        _ => c.swap(0, 1),               // columns swapped
                    }
                }
            }));
        }
    }

    #[test]
    fn the_scalar_conversion_pads_with_zero_pairs() {
        let mut out = [7u32; 4];
        convert_scalar(&[1.0, -2.0, 0.5], &mut out);
        assert_eq!(out, [0xc000_3f80, 0x0000_3f00, 0, 0]);
    }

    #[test]
    fn the_hardware_kernels_match_their_scalar_models() {
        if hardware_kernels().is_empty() {
            eprintln!("skipped: this CPU has no AVX512-BF16 (the kernels' scalar models are tested above)");
            return;
        }
        for &kernel in hardware_kernels() {
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

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_vector_conversion_is_the_scalar_one() {
        if hardware_kernels().is_empty() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let specials = [
            0.0,
            -0.0,
            1.0 + 2f32.powi(-8),
            f32::from_bits(0x3f80_8001),
            f32::INFINITY,
            f32::MAX,
            -3.3e38,
        ];
        for k in [1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100] {
            let mut row = values(k, k as u32);
            row.iter_mut().zip(specials).for_each(|(x, s)| *x = s);
            for pairs in [k.div_ceil(2), k.div_ceil(2) + 5] {
                let (mut want, mut got) = (vec![7u32; pairs], vec![7u32; pairs + 1]);
                convert_scalar(&row, &mut want);
                // SAFETY: the CPU has AVX512-BF16 (checked above).
                unsafe { avx512::convert(&row, &mut got[..pairs]) };
                assert_eq!(got[..pairs], want[..], "k = {k}, {pairs} pairs");
                assert_eq!(got[pairs], 7, "nothing written past the row's pairs");
            }
        }
    }

    #[test]
    fn a_split_keeps_sixteen_bits() {
        // hi(x) + lo(x) within 2^-16 |x| of x, where hi(x) alone is only
        // within 2^-9 |x|; lo is zero where x is a bf16 value.
        let w = values(999, 5);
        let split = split_weights(&w);
        assert_eq!(split.len(), 3 * w.len());
        let (hi, rest) = split.split_at(w.len());
        let (hi2, lo) = rest.split_at(w.len());
        assert_eq!(hi, hi2);
        let mut coarse = 0.0f32;
        for ((&x, &h), &l) in w.iter().zip(hi).zip(lo) {
            assert_eq!(h, round_bf16(x));
            assert_eq!(l, round_bf16(l), "lo is a bf16 value");
            assert!((h + l - x).abs() <= x.abs() * 2f32.powi(-16), "{x}: {h} + {l}");
            coarse = coarse.max((h - x).abs() / x.abs());
        }
        assert!(coarse > 2f32.powi(-12), "the rest matters: {coarse}");
        let exact = [1.0, -0.5, 3.0, 0.0];
        assert!(split_weights(&exact)[8..].iter().all(|&l| l == 0.0));
    }

    #[test]
    fn the_vector_split_is_the_scalar_one() {
        if hardware_kernels().is_empty() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        for d in [1, 3, 8, 15, 16, 17, 33, 40] {
            let (q, k) = (values(d, 1), values(d, 2));
            for pairs in [(6 * d).div_ceil(2), (6 * d).div_ceil(2) + 7] {
                let (mut want, mut got) = (vec![7u32; pairs], vec![7u32; pairs + 1]);
                split_row_scalar(&q, &k, &mut want);
                // SAFETY: the CPU has AVX512-BF16 (checked above).
                unsafe { avx512::split_row(&q, &k, &mut got[..pairs]) };
                assert_eq!(got[..pairs], want[..], "d = {d}, {pairs} pairs");
                assert_eq!(got[pairs], 7, "nothing written past the row");
            }
            // The row holds [hi(x), lo(x), hi(x)] for x = [q*k, k].
            let mut row = vec![0u32; 3 * d];
            split_row_scalar(&q, &k, &mut row);
            let half = |i: usize| bf16_value((row[i / 2] >> (16 * (i % 2))) as u16);
            for j in 0..2 * d {
                let x = if j < d { q[j] * k[j] } else { k[j - d] };
                assert_eq!(half(j), round_bf16(x));
                assert_eq!(half(2 * d + j), round_bf16(x - round_bf16(x)));
                assert_eq!(half(4 * d + j), round_bf16(x));
            }
        }
    }

    #[test]
    fn activated_rows_are_the_activation_then_the_conversion() {
        if hardware_kernels().is_empty() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        for k in [1, 15, 16, 17, 31, 32, 33, 64, 100, 256] {
            let rows = 3;
            let mut x = values(rows * k, k as u32);
            x[0] = -0.0;
            x[rows * k - 1] = f32::INFINITY;
            let (bias, alpha) = (values(k, 9), values(k, 10));
            for a in [Some(&alpha[..]), None] {
                for stride in [k.div_ceil(2), k.div_ceil(2) + 5] {
                    let mut want = vec![7u32; rows * stride];
                    for (r, out) in want.chunks_exact_mut(stride).enumerate() {
                        let y: Vec<f32> = (0..k)
                            .map(|j| {
                                let v = x[r * k + j] + bias[j];
                                v.max(0.0) + a.map_or(0.0, |a| a[j]) * v.min(0.0)
                            })
                            .collect();
                        convert_scalar(&y, out);
                    }
                    let mut got = vec![7u32; rows * stride + 1];
                    // SAFETY: the CPU has AVX512-BF16 (checked above).
                    unsafe { avx512::prelu_rows(&x, k, &bias, a, &mut got[..rows * stride], stride) };
                    assert_eq!(
                        got[..rows * stride],
                        want[..],
                        "k = {k}, stride {stride}, PReLU {}",
                        a.is_some()
                    );
                    assert_eq!(got[rows * stride], 7, "nothing written past the rows");
                }
            }
        }
    }
}
