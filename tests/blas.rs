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
    let out = pensieve::engine::logits_per_blas(
        &cfg.venv_dir(),
        Some(pensieve::config::BUILTIN_DEMO),
        &cfg.cache_root(),
        &tokens,
        &[Target::OpenBlas, Target::Reference],
    )
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

    // One token: every matmul has one row, and the OpenBLAS route sends
    // those to sgemv (what each decode step of a single sequence does).
    let gemv_before = blas::gemv_calls();
    let out = pensieve::engine::logits_per_blas(
        &cfg.venv_dir(),
        Some(pensieve::config::BUILTIN_DEMO),
        &cfg.cache_root(),
        &tokens[..1],
        &[Target::OpenBlas, Target::Reference],
    )
    .unwrap();
    assert!(blas::gemv_calls() > gemv_before, "one-row products went through sgemv");
    let scale = out[1].iter().fold(0f32, |m, x| m.max(x.abs()));
    let max_diff = out[0].iter().zip(&out[1]).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(max_diff <= 1e-4 * scale.max(1.0), "one token: max |diff| {max_diff} vs max |logit| {scale}");

    // The sgemv route against a plain triple loop, for every transpose
    // combination, one row and one column, strided operands, beta 0 over
    // garbage (NaN) and beta 1 over existing values.
    assert!(blas::select(Target::OpenBlas));
    let mut seed = 7u64;
    let mut rnd = move || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    };
    for (m, n, k) in [(1usize, 37usize, 19usize), (23, 1, 11), (1, 1, 9)] {
        for (ta, tb) in [(111, 111), (111, 112), (112, 111), (112, 112)] {
            for beta in [0.0f32, 1.0] {
                // Leading dimensions wider than the rows, as views produce.
                let (ra, ca) = if ta == 111 { (m, k) } else { (k, m) };
                let (rb, cb) = if tb == 111 { (k, n) } else { (n, k) };
                let (lda, ldb, ldc) = (ca + 3, cb + 2, n + 1);
                let a: Vec<f32> = (0..ra * lda).map(|_| rnd()).collect();
                let b: Vec<f32> = (0..rb * ldb).map(|_| rnd()).collect();
                let init: Vec<f32> = (0..m * ldc).map(|_| if beta == 0.0 { f32::NAN } else { rnd() }).collect();
                let mut c = init.clone();
                let before = blas::gemv_calls();
                // SAFETY: a, b and c hold the rows and strides the call states.
                unsafe {
                    blas::cblas_sgemm(
                        101,
                        ta,
                        tb,
                        m as i32,
                        n as i32,
                        k as i32,
                        1.5,
                        a.as_ptr(),
                        lda as i32,
                        b.as_ptr(),
                        ldb as i32,
                        beta,
                        c.as_mut_ptr(),
                        ldc as i32,
                    );
                }
                assert_eq!(blas::gemv_calls(), before + 1, "({m},{n},{k}) {ta}/{tb} went through sgemv");
                for i in 0..m {
                    for j in 0..n {
                        let mut want = 0f32;
                        for p in 0..k {
                            let x = if ta == 111 { a[i * lda + p] } else { a[p * lda + i] };
                            let y = if tb == 111 { b[p * ldb + j] } else { b[j * ldb + p] };
                            want += x * y;
                        }
                        want = 1.5 * want + if beta == 0.0 { 0.0 } else { beta * init[i * ldc + j] };
                        let got = c[i * ldc + j];
                        assert!((got - want).abs() <= 1e-4, "({m},{n},{k}) {ta}/{tb} beta {beta} at {i},{j}: {got} vs {want}");
                    }
                }
            }
        }
    }
}
