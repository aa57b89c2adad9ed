/* LD_PRELOAD library for the comparison benchmark: gives Python processes
 * (mlx_lm.server, in-process mlx_lm) the BLAS that pensieve routes MLX to,
 * so "same BLAS" comparisons really are: OpenBLAS's sgemm, and (unless
 * BLAS_PRELOAD_GEMV=0) one-row and one-column products through OpenBLAS's
 * sgemv, the way src/blas.rs routes them. Built by scripts/python-openblas. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int,
                         const float *, int, float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int,
                         const float *, int, float, float *, int);

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

static sgemm_fn gemm;
static sgemv_fn gemv;
static int use_gemv = -1;

static void load(void) {
    void *h = dlopen(OPENBLAS_PATH, RTLD_NOW | RTLD_LOCAL);
    if (h) {
        gemm = (sgemm_fn)dlsym(h, "scipy_cblas_sgemm");
        gemv = (sgemv_fn)dlsym(h, "scipy_cblas_sgemv");
    }
    if (!gemm || !gemv) { fprintf(stderr, "blas_preload: cannot load %s\n", OPENBLAS_PATH); abort(); }
    const char *e = getenv("BLAS_PRELOAD_GEMV");
    use_gemv = !(e && strcmp(e, "0") == 0);
}

/* c = alpha * op(a) * op(b) + beta * c as a matrix-vector product when
 * op(a) has one row or op(b) one column. Returns 0 for other shapes. */
static int as_gemv(int order, int ta, int tb, int m, int n, int k, float alpha,
                   const float *a, int lda, const float *b, int ldb, float beta,
                   float *c, int ldc) {
    if (order != ROW_MAJOR || m <= 0 || n <= 0 || k <= 0) return 0;
    if (m == 1) {
        if (beta == 0.0f) memset(c, 0, sizeof(float) * (size_t)n);
        int inc_a = ta == NO_TRANS ? 1 : lda;
        if (tb == NO_TRANS) gemv(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, a, inc_a, beta, c, 1);
        else gemv(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, a, inc_a, beta, c, 1);
        return 1;
    }
    if (n == 1) {
        if (beta == 0.0f) for (int i = 0; i < m; i++) c[(size_t)i * ldc] = 0.0f;
        int inc_b = tb == NO_TRANS ? ldb : 1;
        if (ta == NO_TRANS) gemv(ROW_MAJOR, NO_TRANS, m, k, alpha, a, lda, b, inc_b, beta, c, ldc);
        else gemv(ROW_MAJOR, TRANS, k, m, alpha, a, lda, b, inc_b, beta, c, ldc);
        return 1;
    }
    return 0;
}

void cblas_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta,
                 float *c, int ldc) {
    if (use_gemv < 0) load();
    if (use_gemv && as_gemv(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)) return;
    gemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
