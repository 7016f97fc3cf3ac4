# Part of fastbn._cy_kernels, included by _cy_kernels.pyx after its declarations, shims and
# helpers; that file's note says how the layers stack.

# --- feature-outer family ------------------------------------------------------------------------

cdef void _forward_group(Strided xv, Strided yv, const double *weight, const double *bias,
                         double eps, double *stats, floating *coef, bint relu, Py_ssize_t c0,
                         Py_ssize_t c1, double *sums) noexcept nogil:
    cdef const floating *x = <const floating *> xv.data
    cdef floating *y = <floating *> yv.data
    cdef Py_ssize_t A = xv.n0, C = xv.n1, B = xv.n2, a, c
    cdef double r[2]
    for c in range(c0, c1):
        sums[2 * c] = 0.0
        sums[2 * c + 1] = 0.0
    for a in range(A):
        for c in range(c0, c1):
            _shifted_sums(x + a * xv.s0 + c * xv.s1, B, xv.s2, x[c * xv.s1], r)
            sums[2 * c] += r[0]
            sums[2 * c + 1] += r[1]
    for c in range(c0, c1):
        _forward_feature(sums[2 * c], sums[2 * c + 1], x[c * xv.s1], <double> (A * B), eps,
                         weight[c], bias[c], stats, C, coef, C, c)
    for a in range(A):
        for c in range(c0, c1):
            _normalize_run(x + a * xv.s0 + c * xv.s1, xv.s2, y + a * yv.s0 + c * yv.s1, yv.s2,
                           B, coef, C, c, relu, False)


cdef void _forward_train_outer(Strided xv, Strided yv, const double *weight,
                               const double *bias, double eps, double *stats, floating *coef,
                               bint relu, Py_ssize_t ngroups, int threads,
                               double *sums) noexcept nogil:
    cdef Py_ssize_t C = xv.n1, g
    if threads == 1:
        for g in range(ngroups):
            _forward_group(xv, yv, weight, bias, eps, stats, coef, relu,
                           _row0(g, C, ngroups), _row0(g + 1, C, ngroups), sums)
    else:
        for g in prange(ngroups, nogil=True, schedule="static", num_threads=threads):
            _forward_group(xv, yv, weight, bias, eps, stats, coef, relu,
                           _row0(g, C, ngroups), _row0(g + 1, C, ngroups), sums)


cdef void _normalize_block(Strided xv, Strided yv, const floating *coef, bint relu,
                           Py_ssize_t ac0, Py_ssize_t ac1) noexcept nogil:
    cdef const floating *x = <const floating *> xv.data
    cdef floating *y = <floating *> yv.data
    cdef Py_ssize_t C = xv.n1, ac, a, c
    for ac in range(ac0, ac1):
        a = ac // C
        c = ac - a * C
        _normalize_run(x + a * xv.s0 + c * xv.s1, xv.s2, y + a * yv.s0 + c * yv.s1, yv.s2,
                       xv.n2, coef, C, c, relu, yv.stream)
    if yv.stream:
        fbn_sfence()


cdef void _normalize_outer(Strided xv, Strided yv, const floating *coef, bint relu,
                           int threads) noexcept nogil:
    cdef Py_ssize_t n = xv.n0 * xv.n1, t
    if threads == 1:
        _normalize_block(xv, yv, coef, relu, 0, n)
    else:
        for t in prange(threads, nogil=True, schedule="static", num_threads=threads):
            _normalize_block(xv, yv, coef, relu, _row0(t, n, threads), _row0(t + 1, n, threads))


cdef void _backward_group(Strided gv, Strided xv, Strided ov, Features f, floating *coef,
                          Py_ssize_t c0, Py_ssize_t c1, double *sums) noexcept nogil:
    cdef const floating *dy = <const floating *> gv.data
    cdef const floating *x = <const floating *> xv.data
    cdef floating *dx = <floating *> ov.data
    cdef Py_ssize_t A = xv.n0, C = xv.n1, B = xv.n2, a, c
    cdef double m = <double> (A * B)
    cdef double r[3]
    cdef double shift, mean
    for c in range(c0, c1):
        sums[3 * c] = 0.0
        sums[3 * c + 1] = 0.0
        sums[3 * c + 2] = 0.0
    for a in range(A):
        for c in range(c0, c1):
            _backward_sums(dy + a * gv.s0 + c * gv.s1, gv.s2, x + a * xv.s0 + c * xv.s1, xv.s2,
                           B, x[c * xv.s1], r)
            sums[3 * c] += r[0]
            sums[3 * c + 1] += r[1]
            sums[3 * c + 2] += r[2]
    for c in range(c0, c1):
        shift = x[c * xv.s1]
        mean = f.mean[c]
        if f.training:
            mean = fbn_refined_mean(mean, f.mean_ulp[c], shift, sums[3 * c], m)
        _grad_coefs(sums[3 * c + 1], sums[3 * c + 2], shift, m, mean, f.invstd[c], f.weight[c],
                    f.training, f.grads, C, coef, C, c)
    for a in range(A):
        for c in range(c0, c1):
            if f.training:
                _dx_run(dy + a * gv.s0 + c * gv.s1, gv.s2, x + a * xv.s0 + c * xv.s1, xv.s2,
                        dx + a * ov.s0 + c * ov.s1, ov.s2, B, coef, C, c)
            else:  # eval: dx does not depend on x, so an Inf in x must not reach it
                _scale_run(dy + a * gv.s0 + c * gv.s1, gv.s2, dx + a * ov.s0 + c * ov.s1,
                           ov.s2, B, coef[2 * C + c])


cdef void _backward_outer(Strided gv, Strided xv, Strided ov, Features f, floating *coef,
                          Py_ssize_t ngroups, int threads, double *sums) noexcept nogil:
    cdef Py_ssize_t C = xv.n1, g
    if threads == 1:
        for g in range(ngroups):
            _backward_group(gv, xv, ov, f, coef, _row0(g, C, ngroups),
                            _row0(g + 1, C, ngroups), sums)
    else:
        for g in prange(ngroups, nogil=True, schedule="static", num_threads=threads):
            _backward_group(gv, xv, ov, f, coef, _row0(g, C, ngroups),
                            _row0(g + 1, C, ngroups), sums)


cdef void _backward_relu_feature(Strided gv, Strided xv, Strided ov, Features f,
                                 floating *coef, floating *fcoef, Py_ssize_t c) noexcept nogil:
    cdef const floating *dy = <const floating *> gv.data
    cdef const floating *x = <const floating *> xv.data
    cdef floating *dx = <floating *> ov.data
    cdef Py_ssize_t A = xv.n0, C = xv.n1, B = xv.n2, a
    cdef double m = <double> (A * B)
    cdef double shift = x[c * xv.s1]
    cdef double mean = f.mean[c], invstd = f.invstd[c]
    cdef double s1 = 0.0, sdy = 0.0, sdyx = 0.0
    cdef double r[2]
    cdef floating fc[4]
    cdef floating bc[5]
    if f.training:  # the forward's sum, in the forward's order
        for a in range(A):
            _shifted_sums(x + a * xv.s0 + c * xv.s1, B, xv.s2, shift, r)
            s1 += r[0]
        mean = fbn_refined_mean(mean, f.mean_ulp[c], shift, s1, m)
    _forward_coefs(fcoef, C, c, mean, invstd, f.weight[c], f.bias[c])
    for a in range(A):
        _relu_sums_run(dy + a * gv.s0 + c * gv.s1, gv.s2, x + a * xv.s0 + c * xv.s1, xv.s2, B,
                       shift, fcoef, C, c, r)
        sdy += r[0]
        sdyx += r[1]
    _grad_coefs(sdy, sdyx, shift, m, mean, invstd, f.weight[c], f.training, f.grads, C, coef, C,
                c)
    for a in range(4):
        fc[a] = fcoef[a * C + c]
    for a in range(5):
        bc[a] = coef[a * C + c]
    for a in range(A):
        _relu_dx_run(dy + a * gv.s0 + c * gv.s1, gv.s2, x + a * xv.s0 + c * xv.s1, xv.s2,
                     dx + a * ov.s0 + c * ov.s1, ov.s2, B, fc, bc, f.training)


cdef void _backward_relu_outer(Strided gv, Strided xv, Strided ov, Features f,
                               floating *coef, floating *fcoef, int threads) noexcept nogil:
    cdef Py_ssize_t c
    if threads == 1:
        for c in range(xv.n1):
            _backward_relu_feature(gv, xv, ov, f, coef, fcoef, c)
    else:
        for c in prange(xv.n1, nogil=True, schedule="static", num_threads=threads):
            _backward_relu_feature(gv, xv, ov, f, coef, fcoef, c)


# --- feature-inner family -------------------------------------------------------------------------

cdef int _inner_scratch(Py_ssize_t S, Py_ssize_t nchunks, Py_ssize_t L, Py_ssize_t C,
                        double **shift, double **partial, double **sums) noexcept nogil:
    """A feature-inner call's scratch: shift (L,), partial (S, nchunks, L) zeroed, sums
    (S, C); -1, with nothing left allocated, when out of memory. _free_inner_scratch frees."""
    shift[0] = <double *> malloc(max(1, L) * sizeof(double))
    partial[0] = <double *> calloc(max(1, S * nchunks * L), sizeof(double))
    sums[0] = <double *> malloc(max(1, S * C) * sizeof(double))
    if shift[0] == NULL or partial[0] == NULL or sums[0] == NULL:
        _free_inner_scratch(shift[0], partial[0], sums[0])
        return -1
    return 0


cdef void _free_inner_scratch(double *shift, double *partial, double *sums) noexcept nogil:
    free(shift)
    free(partial)
    free(sums)


cdef void _accumulate(const floating *x, Strided xv, const double *shift, double *partial,
                      Py_ssize_t nchunks, int threads) noexcept nogil:
    """Forward sums of every row block into partial (2, nchunks, L); x is xv's data."""
    cdef Py_ssize_t A = xv.n0, L = xv.n1, t
    if threads == 1:
        for t in range(nchunks):
            _accumulate_rows(x, xv.s0, xv.s1, _row0(t, A, nchunks), _row0(t + 1, A, nchunks), L,
                             shift, partial + t * L, partial + (nchunks + t) * L)
    else:
        for t in prange(nchunks, nogil=True, schedule="static", num_threads=threads):
            _accumulate_rows(x, xv.s0, xv.s1, _row0(t, A, nchunks), _row0(t + 1, A, nchunks), L,
                             shift, partial + t * L, partial + (nchunks + t) * L)


cdef void _normalize_inner(Strided xv, Strided yv, const floating *coef, Py_ssize_t nchunks,
                           bint relu, int threads) noexcept nogil:
    cdef const floating *x = <const floating *> xv.data
    cdef floating *y = <floating *> yv.data
    cdef Py_ssize_t A = xv.n0, L = xv.n1, t
    if threads == 1:
        _normalize_rows(x, xv.s0, xv.s1, y, yv.s0, yv.s1, 0, A, L, coef, relu, yv.stream)
    else:
        for t in prange(nchunks, nogil=True, schedule="static", num_threads=threads):
            _normalize_rows(x, xv.s0, xv.s1, y, yv.s0, yv.s1, _row0(t, A, nchunks),
                            _row0(t + 1, A, nchunks), L, coef, relu, yv.stream)


cdef int _forward_train_inner(Strided xv, Strided yv, const double *weight, const double *bias,
                              double eps, double *stats, floating *coef, Py_ssize_t C,
                              Py_ssize_t nchunks, Py_ssize_t B, bint relu,
                              int threads) noexcept nogil:
    cdef const floating *x = <const floating *> xv.data
    cdef Py_ssize_t A = xv.n0, L = xv.n1
    cdef double m = <double> (A * _quot(L, C))
    cdef double *shift
    cdef double *partial
    cdef double *sums
    if _inner_scratch(2, nchunks, L, C, &shift, &partial, &sums) != 0:
        return -1
    _column_shifts(x, xv.s1, L, C, B, shift)
    _accumulate(x, xv, shift, partial, nchunks, threads)
    _fold_columns(partial, 2, nchunks, L, C, B, sums)  # backward_relu_inner repeats this
    # every feature's statistics and coefficients, vectorized (_cy_finish_t.h)
    if floating is float:
        finish_forward_f(sums, C, shift, B, m, eps, weight, bias, stats, coef, L)
    else:
        finish_forward_d(sums, C, shift, B, m, eps, weight, bias, stats, coef, L)
    _tile_columns(coef, 4, L, C, B)
    _normalize_inner(xv, yv, coef, nchunks, relu, threads)
    _free_inner_scratch(shift, partial, sums)
    return 0


cdef void _backward_rows(Strided gv, Strided xv, Strided ov, const double *shift,
                         double *partial, const floating *coef, Py_ssize_t nchunks,
                         bint sums_pass, bint training, Py_ssize_t t) noexcept nogil:
    """One row block of backward: its sums into partial (3, nchunks, L), or its dx rows."""
    cdef const floating *dy = <const floating *> gv.data
    cdef const floating *x = <const floating *> xv.data
    cdef floating *dx = <floating *> ov.data
    cdef Py_ssize_t A = xv.n0, L = xv.n1
    cdef Py_ssize_t a0 = _row0(t, A, nchunks), a1 = _row0(t + 1, A, nchunks)
    if sums_pass:
        _accumulate_backward_rows(dy, gv.s0, gv.s1, x, xv.s0, xv.s1, a0, a1, L, shift,
                                  partial + t * L, partial + (nchunks + t) * L,
                                  partial + (2 * nchunks + t) * L)
    else:
        _dx_rows(dy, gv.s0, gv.s1, x, xv.s0, xv.s1, dx, ov.s0, ov.s1, a0, a1, L, coef, training,
                 ov.stream)


cdef void _backward_rows_all(Strided gv, Strided xv, Strided ov, const double *shift,
                             double *partial, const floating *coef, Py_ssize_t nchunks,
                             bint sums_pass, bint training, int threads) noexcept nogil:
    cdef Py_ssize_t t
    if threads == 1:
        for t in range(nchunks):
            _backward_rows(gv, xv, ov, shift, partial, coef, nchunks, sums_pass, training, t)
    else:
        for t in prange(nchunks, nogil=True, schedule="static", num_threads=threads):
            _backward_rows(gv, xv, ov, shift, partial, coef, nchunks, sums_pass, training, t)


cdef int _backward_inner(Strided gv, Strided xv, Strided ov, Features f, floating *coef,
                         Py_ssize_t C, Py_ssize_t nchunks, Py_ssize_t B,
                         int threads) noexcept nogil:
    cdef const floating *x = <const floating *> xv.data
    cdef Py_ssize_t A = xv.n0, L = xv.n1
    cdef double m = <double> (A * _quot(L, C))
    cdef double *shift
    cdef double *partial
    cdef double *sums
    if _inner_scratch(3, nchunks, L, C, &shift, &partial, &sums) != 0:
        return -1
    _column_shifts(x, xv.s1, L, C, B, shift)
    _backward_rows_all(gv, xv, ov, shift, partial, coef, nchunks, True, f.training, threads)
    _fold_columns(partial, 3, nchunks, L, C, B, sums)
    # every feature's gradients and dx coefficients, vectorized (_cy_finish_t.h)
    if floating is float:
        finish_backward_f(sums, C, shift, B, m, f.mean, f.mean_ulp, f.invstd, f.weight,
                          f.training, f.grads, coef, L)
    else:
        finish_backward_d(sums, C, shift, B, m, f.mean, f.mean_ulp, f.invstd, f.weight,
                          f.training, f.grads, coef, L)
    _tile_columns(coef, 5, L, C, B)
    _backward_rows_all(gv, xv, ov, shift, partial, coef, nchunks, False, f.training, threads)
    _free_inner_scratch(shift, partial, sums)
    return 0


cdef void _relu_rows(Strided gv, Strided xv, Strided ov, const double *shift, double *partial,
                     const floating *coef, const floating *fcoef, Py_ssize_t nchunks,
                     bint sums_pass, bint training, Py_ssize_t t) noexcept nogil:
    cdef const floating *dy = <const floating *> gv.data
    cdef const floating *x = <const floating *> xv.data
    cdef floating *dx = <floating *> ov.data
    cdef Py_ssize_t A = xv.n0, L = xv.n1
    cdef Py_ssize_t a0 = _row0(t, A, nchunks), a1 = _row0(t + 1, A, nchunks)
    if sums_pass:
        _relu_sums_rows(dy, gv.s0, gv.s1, x, xv.s0, xv.s1, a0, a1, L, shift, fcoef,
                        partial + t * L, partial + (nchunks + t) * L)
    else:
        _relu_dx_rows(dy, gv.s0, gv.s1, x, xv.s0, xv.s1, dx, ov.s0, ov.s1, a0, a1, L, coef,
                      fcoef, training)


cdef void _relu_rows_all(Strided gv, Strided xv, Strided ov, const double *shift,
                         double *partial, const floating *coef, const floating *fcoef,
                         Py_ssize_t nchunks, bint sums_pass, bint training,
                         int threads) noexcept nogil:
    cdef Py_ssize_t t
    if threads == 1:
        for t in range(nchunks):
            _relu_rows(gv, xv, ov, shift, partial, coef, fcoef, nchunks, sums_pass, training, t)
    else:
        for t in prange(nchunks, nogil=True, schedule="static", num_threads=threads):
            _relu_rows(gv, xv, ov, shift, partial, coef, fcoef, nchunks, sums_pass, training, t)


cdef int _backward_relu_inner(Strided gv, Strided xv, Strided ov, Features f,
                              floating *coef, floating *fcoef, Py_ssize_t C,
                              Py_ssize_t nchunks, Py_ssize_t B, int threads) noexcept nogil:
    cdef const floating *x = <const floating *> xv.data
    cdef Py_ssize_t A = xv.n0, L = xv.n1, c
    cdef double m = <double> (A * _quot(L, C))
    cdef double mean
    cdef double *shift
    cdef double *partial
    cdef double *sums
    if _inner_scratch(2, nchunks, L, C, &shift, &partial, &sums) != 0:
        return -1
    _column_shifts(x, xv.s1, L, C, B, shift)
    if f.training:  # the forward's sums, as _forward_train_inner takes them
        _accumulate(x, xv, shift, partial, nchunks, threads)
        _fold_columns(partial, 2, nchunks, L, C, B, sums)
    for c in range(C):
        mean = f.mean[c]
        if f.training:
            mean = fbn_refined_mean(mean, f.mean_ulp[c], shift[c * B], sums[c], m)
        _forward_coefs(fcoef, L, c, mean, f.invstd[c], f.weight[c], f.bias[c])
        f.grads[c] = mean  # parked here until the gradients are known
    _tile_columns(fcoef, 4, L, C, B)
    for c in range(2 * nchunks * L):
        partial[c] = 0.0
    _relu_rows_all(gv, xv, ov, shift, partial, coef, fcoef, nchunks, True, f.training, threads)
    _fold_columns(partial, 2, nchunks, L, C, B, sums)
    for c in range(C):  # f.grads[c] holds the mean until _grad_coefs overwrites it
        _grad_coefs(sums[c], sums[C + c], shift[c * B], m, f.grads[c], f.invstd[c], f.weight[c],
                    f.training, f.grads, C, coef, L, c)
    _tile_columns(coef, 5, L, C, B)
    _relu_rows_all(gv, xv, ov, shift, partial, coef, fcoef, nchunks, False, f.training, threads)
    _free_inner_scratch(shift, partial, sums)
    return 0
