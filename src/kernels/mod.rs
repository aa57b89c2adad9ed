//! CPU kernels MLX's CPU backend lacks, for Linux without a GPU.
//!
//! MLX stays the model runner; on its CPU backend pensieve swaps in two
//! kernels where MLX is slow (issue 14's measurements): matrix products on
//! quantized weights that stay quantized ([`quant`]: MLX's affine 4- and
//! 8-bit layouts, which GGUF Q4_0/Q4_1/Q8_0 load into), and a fused attention
//! with an online softmax and a vectorized `exp` ([`attention`]). They enter
//! MLX through a Python module the binary registers (`pensieve_kernels`,
//! `engine/py/kernels.rs`); the shim's `cpu_kernels.py` puts them in the
//! model. This module has no Python in it: the kernels take slices.
//!
//! Every kernel has a portable version and, on x86-64, versions compiled for
//! AVX2+FMA and AVX-512 chosen at run time ([`Isa`]). The portable one is the
//! reference the property tests hold the others to.

pub mod attention;
pub mod ffi;
mod pool;
pub mod quant;
pub mod rope;

pub(crate) use pool::parallel_for;
pub use pool::threads;

use std::sync::OnceLock;

/// An instruction set a kernel can be compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain Rust: whatever the target baseline allows (SSE2 on x86-64, NEON
    /// on arm64, where LLVM vectorizes the loops by itself).
    Portable,
    /// x86-64 with AVX2, FMA and F16C (Haswell and later, Zen).
    Avx2,
    /// x86-64 with AVX-512 F/BW/VL and VNNI (Ice Lake and later, Zen 4).
    Avx512,
}

impl Isa {
    /// The best this CPU runs, unless `PENSIEVE_KERNELS_ISA` (portable, avx2,
    /// avx512) asks for less.
    pub fn best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            let found = Self::available().into_iter().max().unwrap_or(Isa::Portable);
            match std::env::var("PENSIEVE_KERNELS_ISA").ok().as_deref() {
                Some("portable") => Isa::Portable,
                Some("avx2") => found.min(Isa::Avx2),
                _ => found,
            }
        })
    }

    /// Every instruction set this CPU can run (the portable one always).
    pub fn available() -> Vec<Isa> {
        #[allow(unused_mut)]
        let mut v = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
                v.push(Isa::Avx2);
                if is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
                {
                    v.push(Isa::Avx512);
                }
            }
        }
        v
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2+fma",
            Isa::Avx512 => "avx512+vnni",
        }
    }
}

/// A pointer that may be written from several threads, each to its own
/// disjoint elements (the caller's promise, stated where it is used).
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub *mut f32);
impl SharedOut {
    /// The address of element `i` (a method, so closures capture the whole
    /// `SharedOut`, which is `Sync`, not its raw pointer field).
    pub(crate) fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

// SAFETY: only used to write disjoint elements from the threads of one
// `parallel_for`, which ends before the buffer's borrow does.
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}

pub mod elementwise;
