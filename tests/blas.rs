//! The OpenBLAS route must compute what the wheel's reference BLAS computes.
//! (Its own test binary: the BLAS choice is process-wide.)

mod common;

use pensieve::blas::{self, Target};

#[test]
fn openblas_logits_match_the_reference_blas() {
    if !cfg!(target_os = "linux") {
        return;
    }
    let cfg = common::config();
    let tokens: Vec<u32> = (0..48).map(|i| (i * 37 % 700) as u32).collect();
    let before = blas::calls();
    let out = pensieve::engine::logits_per_blas(&cfg.venv_dir(), None, &cfg.cache_root(), &tokens, &[Target::OpenBlas, Target::Reference])
        .unwrap();
    let after = blas::calls();
    assert!(after.0 > before.0, "the OpenBLAS pass went through OpenBLAS: {before:?} -> {after:?}");
    assert!(after.1 > before.1, "the reference pass went through the reference BLAS: {before:?} -> {after:?}");
    let (a, b) = (&out[0], &out[1]);
    assert_eq!(a.len(), b.len());
    assert!(a.len() >= tokens.len() * 500);
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let max_diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(scale > 0.1, "logits are not degenerate: {scale}");
    assert!(max_diff <= 1e-4 * scale.max(1.0), "max |diff| {max_diff} vs max |logit| {scale}");
    eprintln!("max |logit diff| {max_diff:e} (max |logit| {scale})");
}
