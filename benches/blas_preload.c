/* LD_PRELOAD library for the comparison benchmark: gives Python processes
 * (mlx_lm.server, in-process mlx_lm) the same OpenBLAS sgemm that pensieve
 * routes MLX to, so "same BLAS" comparisons really are. Built by compare.sh. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int,
                         const float *, int, float, float *, int);

void cblas_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta,
                 float *c, int ldc) {
    static sgemm_fn fn;
    if (!fn) {
        void *h = dlopen(OPENBLAS_PATH, RTLD_NOW | RTLD_LOCAL);
        if (h) fn = (sgemm_fn)dlsym(h, "scipy_cblas_sgemm");
        if (!fn) { fprintf(stderr, "blas_preload: cannot load %s\n", OPENBLAS_PATH); abort(); }
    }
    fn(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
