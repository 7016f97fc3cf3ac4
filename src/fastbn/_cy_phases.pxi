# Part of fastbn._cy_kernels, included by _cy_kernels.pyx after its declarations, shims and
# helpers; that file's note says how the layers stack.

# --- split phases (fastbn.phases): reductions and the dx pass, apart -----------------------------
# Twins of the Numba kernels of the same names: raw sums around each feature's shift (row 0
# holds the shift), and the dx pass from coefficients the caller built from the whole batch's
# sums. The loops are the fused kernels' own helpers, in their order.

cdef void _stats_group(const floating *x, Strided xv, double *sums, Py_ssize_t c0,
                       Py_ssize_t c1) noexcept nogil:
    cdef Py_ssize_t A = xv.n0, C = xv.n1, B = xv.n2, a, c
    cdef double r[2]
    for c in range(c0, c1):
        sums[c] = x[c * xv.s1]
        sums[C + c] = 0.0
        sums[2 * C + c] = 0.0
    for a in range(A):
        for c in range(c0, c1):
            _shifted_sums(x + a * xv.s0 + c * xv.s1, B, xv.s2, x[c * xv.s1], r)
            sums[C + c] += r[0]
            sums[2 * C + c] += r[1]


cdef void _stats_outer(const floating *x, Strided xv, double *sums, Py_ssize_t ngroups,
                       int threads) noexcept nogil:
    cdef Py_ssize_t C = xv.n1, g
    if threads == 1:
        for g in range(ngroups):
            _stats_group(x, xv, sums, _row0(g, C, ngroups), _row0(g + 1, C, ngroups))
    else:
        for g in prange(ngroups, nogil=True, schedule="static", num_threads=threads):
            _stats_group(x, xv, sums, _row0(g, C, ngroups), _row0(g + 1, C, ngroups))


cdef void _shifted_stats_inner(const floating *x, Strided xv, double *out, Py_ssize_t C,
                               Py_ssize_t nchunks, Py_ssize_t B, int threads, double *shift,
                               double *partial, double *sums) noexcept nogil:
    """Per feature, into out (3, C): the shift, sum(x - shift) and sum((x - shift)**2), in the
    caller's scratch (_inner_scratch with 2 sums)."""
    cdef Py_ssize_t L = xv.n1, c
    _column_shifts(x, xv.s1, L, C, B, shift)
    _accumulate(x, xv, shift, partial, nchunks, threads)
    _fold_columns(partial, 2, nchunks, L, C, B, sums)
    for c in range(C):
        out[c] = shift[c * B]
        out[C + c] = sums[c]
        out[2 * C + c] = sums[C + c]


cdef int _stats_inner(const floating *x, Strided xv, double *out, Py_ssize_t C,
                      Py_ssize_t nchunks, Py_ssize_t B, int threads) noexcept nogil:
    cdef double *shift
    cdef double *partial
    cdef double *sums
    if _inner_scratch(2, nchunks, xv.n1, C, &shift, &partial, &sums) != 0:
        return -1
    _shifted_stats_inner(x, xv, out, C, nchunks, B, threads, shift, partial, sums)
    _free_inner_scratch(shift, partial, sums)
    return 0


cdef void _reduce_group(const floating *x, Strided gv, Strided xv, double *sums, Py_ssize_t c0,
                        Py_ssize_t c1) noexcept nogil:
    cdef const floating *dy = <const floating *> gv.data
    cdef Py_ssize_t A = xv.n0, C = xv.n1, B = xv.n2, a, c
    cdef double r[3]
    for c in range(c0, c1):
        sums[c] = x[c * xv.s1]
        sums[C + c] = 0.0
        sums[2 * C + c] = 0.0
        sums[3 * C + c] = 0.0
    for a in range(A):
        for c in range(c0, c1):
            _backward_sums(dy + a * gv.s0 + c * gv.s1, gv.s2, x + a * xv.s0 + c * xv.s1, xv.s2,
                           B, x[c * xv.s1], r)
            sums[C + c] += r[0]
            sums[2 * C + c] += r[1]
            sums[3 * C + c] += r[2]


cdef void _reduce_outer(const floating *x, Strided gv, Strided xv, double *sums,
                        Py_ssize_t ngroups, int threads) noexcept nogil:
    cdef Py_ssize_t C = xv.n1, g
    if threads == 1:
        for g in range(ngroups):
            _reduce_group(x, gv, xv, sums, _row0(g, C, ngroups), _row0(g + 1, C, ngroups))
    else:
        for g in prange(ngroups, nogil=True, schedule="static", num_threads=threads):
            _reduce_group(x, gv, xv, sums, _row0(g, C, ngroups), _row0(g + 1, C, ngroups))


cdef int _reduce_inner(const floating *x, Strided gv, Strided xv, double *out, Py_ssize_t C,
                       Py_ssize_t nchunks, Py_ssize_t B, int threads) noexcept nogil:
    cdef Py_ssize_t L = xv.n1, c
    cdef double *shift
    cdef double *partial
    cdef double *sums
    if _inner_scratch(3, nchunks, L, C, &shift, &partial, &sums) != 0:
        return -1
    _column_shifts(x, xv.s1, L, C, B, shift)
    # the sums pass of the fused backward (x stands in for the coefficients it does not read)
    _backward_rows_all(gv, xv, xv, shift, partial, x, nchunks, True, True, threads)
    _fold_columns(partial, 3, nchunks, L, C, B, sums)
    for c in range(C):
        out[c] = shift[c * B]
        out[C + c] = sums[c]
        out[2 * C + c] = sums[C + c]
        out[3 * C + c] = sums[2 * C + c]
    _free_inner_scratch(shift, partial, sums)
    return 0


cdef void _relu_reduce_feature(Strided gv, Strided xv, const floating *fcoef, double *sums,
                               Py_ssize_t c) noexcept nogil:
    cdef const floating *dy = <const floating *> gv.data
    cdef const floating *x = <const floating *> xv.data
    cdef Py_ssize_t A = xv.n0, C = xv.n1, B = xv.n2, a
    cdef double shift = x[c * xv.s1]
    cdef double s1 = 0.0, sdy = 0.0, sdyx = 0.0
    cdef double r[2]
    for a in range(A):
        _shifted_sums(x + a * xv.s0 + c * xv.s1, B, xv.s2, shift, r)
        s1 += r[0]
    for a in range(A):
        _relu_sums_run(dy + a * gv.s0 + c * gv.s1, gv.s2, x + a * xv.s0 + c * xv.s1, xv.s2, B,
                       shift, fcoef, C, c, r)
        sdy += r[0]
        sdyx += r[1]
    sums[c] = shift
    sums[C + c] = s1
    sums[2 * C + c] = sdy
    sums[3 * C + c] = sdyx


cdef void _relu_reduce_outer(Strided gv, Strided xv, const floating *fcoef, double *sums,
                             int threads) noexcept nogil:
    cdef Py_ssize_t c
    if threads == 1:
        for c in range(xv.n1):
            _relu_reduce_feature(gv, xv, fcoef, sums, c)
    else:
        for c in prange(xv.n1, nogil=True, schedule="static", num_threads=threads):
            _relu_reduce_feature(gv, xv, fcoef, sums, c)


cdef int _relu_reduce_inner(Strided gv, Strided xv, const floating *fcoef, double *out,
                            Py_ssize_t C, Py_ssize_t nchunks, Py_ssize_t B,
                            int threads) noexcept nogil:
    cdef const floating *x = <const floating *> xv.data
    cdef Py_ssize_t L = xv.n1, c
    cdef double *shift
    cdef double *partial
    cdef double *sums
    if _inner_scratch(2, nchunks, L, C, &shift, &partial, &sums) != 0:
        return -1
    # shift and sum(x - shift) as _stats_inner; the rows 2 and 3 of out are the ReLU's sums
    _shifted_stats_inner(x, xv, out, C, nchunks, B, threads, shift, partial, sums)
    for c in range(2 * nchunks * L):
        partial[c] = 0.0
    _relu_rows_all(gv, xv, xv, shift, partial, fcoef, fcoef, nchunks, True, True, threads)
    _fold_columns(partial, 2, nchunks, L, C, B, sums)
    for c in range(C):
        out[2 * C + c] = sums[c]
        out[3 * C + c] = sums[C + c]
    _free_inner_scratch(shift, partial, sums)
    return 0


cdef void _elemt_block(Strided gv, Strided xv, Strided ov, const floating *coef,
                       const floating *fcoef, Py_ssize_t ac0, Py_ssize_t ac1) noexcept nogil:
    """dx runs ac0..ac1 of (A, C, B) views; with fcoef (not NULL), dy masked by the ReLU."""
    cdef const floating *dy = <const floating *> gv.data
    cdef const floating *x = <const floating *> xv.data
    cdef floating *dx = <floating *> ov.data
    cdef Py_ssize_t C = xv.n1, B = xv.n2, ac, a, c, i
    cdef floating fc[4]
    cdef floating bc[5]
    for ac in range(ac0, ac1):
        a = ac // C
        c = ac - a * C
        if fcoef == NULL:
            _dx_run(dy + a * gv.s0 + c * gv.s1, gv.s2, x + a * xv.s0 + c * xv.s1, xv.s2,
                    dx + a * ov.s0 + c * ov.s1, ov.s2, B, coef, C, c)
        else:
            for i in range(4):
                fc[i] = fcoef[i * C + c]
            for i in range(5):
                bc[i] = coef[i * C + c]
            _relu_dx_run(dy + a * gv.s0 + c * gv.s1, gv.s2, x + a * xv.s0 + c * xv.s1, xv.s2,
                         dx + a * ov.s0 + c * ov.s1, ov.s2, B, fc, bc, True)


cdef void _elemt_outer(Strided gv, Strided xv, Strided ov, const floating *coef,
                       const floating *fcoef, int threads) noexcept nogil:
    cdef Py_ssize_t n = xv.n0 * xv.n1, t
    if threads == 1:
        _elemt_block(gv, xv, ov, coef, fcoef, 0, n)
    else:
        for t in prange(threads, nogil=True, schedule="static", num_threads=threads):
            _elemt_block(gv, xv, ov, coef, fcoef, _row0(t, n, threads), _row0(t + 1, n, threads))


def stats_outer(int threads, cnp.ndarray x, cnp.ndarray sums, Py_ssize_t ngroups):
    """sums (3, C) = shift, sum(x - shift), sum((x - shift)**2) of a (A, C, B) view."""
    cdef Strided xv = _strided(x)
    cdef double *out = _f64(sums)
    cdef void *xp = xv.data
    cdef bint f32 = _is_float(x)
    with nogil:
        if f32:
            _stats_outer(<const float *> xp, xv, out, ngroups, threads)
        else:
            _stats_outer(<const double *> xp, xv, out, ngroups, threads)


def stats_inner(int threads, cnp.ndarray x, cnp.ndarray sums, Py_ssize_t nchunks, Py_ssize_t B):
    """The same on a feature-inner view (A, L)."""
    cdef Strided xv = _strided(x)
    cdef double *out = _f64(sums)
    cdef Py_ssize_t C = cnp.PyArray_DIM(sums, 1)
    cdef void *xp = xv.data
    cdef bint f32 = _is_float(x)
    cdef int status
    with nogil:
        if f32:
            status = _stats_inner(<const float *> xp, xv, out, C, nchunks, B, threads)
        else:
            status = _stats_inner(<const double *> xp, xv, out, C, nchunks, B, threads)
    _checked(status)


def backward_reduce_outer(int threads, cnp.ndarray dy, cnp.ndarray x, cnp.ndarray sums,
                          Py_ssize_t ngroups):
    """sums (4, C) = shift, sum(x - shift), sum(dy), sum(dy * (x - shift)) of (A, C, B) views."""
    cdef Strided gv = _strided(dy), xv = _strided(x)
    cdef double *out = _f64(sums)
    cdef void *xp = xv.data
    cdef bint f32 = _is_float(x)
    with nogil:
        if f32:
            _reduce_outer(<const float *> xp, gv, xv, out, ngroups, threads)
        else:
            _reduce_outer(<const double *> xp, gv, xv, out, ngroups, threads)


def backward_reduce_inner(int threads, cnp.ndarray dy, cnp.ndarray x, cnp.ndarray sums,
                          Py_ssize_t nchunks, Py_ssize_t B):
    """The same on feature-inner views (A, L)."""
    cdef Strided gv = _strided(dy), xv = _strided(x)
    cdef double *out = _f64(sums)
    cdef Py_ssize_t C = cnp.PyArray_DIM(sums, 1)
    cdef void *xp = xv.data
    cdef bint f32 = _is_float(x)
    cdef int status
    with nogil:
        if f32:
            status = _reduce_inner(<const float *> xp, gv, xv, out, C, nchunks, B, threads)
        else:
            status = _reduce_inner(<const double *> xp, gv, xv, out, C, nchunks, B, threads)
    _checked(status)


def backward_relu_reduce_outer(int threads, cnp.ndarray dy, cnp.ndarray x, cnp.ndarray fcoef,
                               cnp.ndarray sums):
    """As backward_reduce_outer, dy masked by the forward's ReLU output (from fcoef)."""
    cdef Strided gv = _strided(dy), xv = _strided(x)
    cdef double *out = _f64(sums)
    cdef void *fc = _data(fcoef)
    cdef bint f32 = _is_float(x)
    with nogil:
        if f32:
            _relu_reduce_outer(gv, xv, <const float *> fc, out, threads)
        else:
            _relu_reduce_outer(gv, xv, <const double *> fc, out, threads)


def backward_relu_reduce_inner(int threads, cnp.ndarray dy, cnp.ndarray x, cnp.ndarray fcoef,
                               cnp.ndarray sums, Py_ssize_t nchunks, Py_ssize_t B):
    """The same on feature-inner views (A, L), fcoef tiled to the columns."""
    cdef Strided gv = _strided(dy), xv = _strided(x)
    cdef double *out = _f64(sums)
    cdef Py_ssize_t C = cnp.PyArray_DIM(sums, 1)
    cdef void *fc = _data(fcoef)
    cdef bint f32 = _is_float(x)
    cdef int status
    with nogil:
        if f32:
            status = _relu_reduce_inner(gv, xv, <const float *> fc, out, C, nchunks, B, threads)
        else:
            status = _relu_reduce_inner(gv, xv, <const double *> fc, out, C, nchunks, B,
                                        threads)
    _checked(status)


def backward_elemt_outer(int threads, cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx,
                         cnp.ndarray coef):
    """dx = (dy + (x * s - mean_hi) * u1' + u2') * k on (A, C, B) views."""
    cdef Strided gv = _strided(dy), xv = _strided(x), ov = _strided(dx)
    cdef void *cf = _data(coef)
    cdef bint f32 = _is_float(x)
    with nogil:
        if f32:
            _elemt_outer(gv, xv, ov, <const float *> cf, <const float *> NULL, threads)
        else:
            _elemt_outer(gv, xv, ov, <const double *> cf, <const double *> NULL, threads)


def backward_elemt_inner(int threads, cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx,
                         cnp.ndarray coef, Py_ssize_t nchunks):
    """The same on feature-inner views, coefficients tiled to the columns."""
    cdef Strided gv = _strided(dy), xv = _strided(x), ov = _strided(dx)
    cdef void *cf = _data(coef)
    cdef bint f32 = _is_float(x)
    with nogil:
        if f32:
            _backward_rows_all(gv, xv, ov, NULL, NULL, <const float *> cf, nchunks, False, True,
                               threads)
        else:
            _backward_rows_all(gv, xv, ov, NULL, NULL, <const double *> cf, nchunks, False,
                               True, threads)


def backward_relu_elemt_outer(int threads, cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx,
                              cnp.ndarray coef, cnp.ndarray fcoef):
    """The dx pass of relu(batch_norm(x)) on (A, C, B) views."""
    cdef Strided gv = _strided(dy), xv = _strided(x), ov = _strided(dx)
    cdef void *cf = _data(coef)
    cdef void *fc = _data(fcoef)
    cdef bint f32 = _is_float(x)
    with nogil:
        if f32:
            _elemt_outer(gv, xv, ov, <const float *> cf, <const float *> fc, threads)
        else:
            _elemt_outer(gv, xv, ov, <const double *> cf, <const double *> fc, threads)


def backward_relu_elemt_inner(int threads, cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx,
                              cnp.ndarray coef, cnp.ndarray fcoef, Py_ssize_t nchunks):
    """The same on feature-inner views."""
    cdef Strided gv = _strided(dy), xv = _strided(x), ov = _strided(dx)
    cdef void *cf = _data(coef)
    cdef void *fc = _data(fcoef)
    cdef bint f32 = _is_float(x)
    with nogil:
        if f32:
            _relu_rows_all(gv, xv, ov, NULL, NULL, <const float *> cf, <const float *> fc,
                           nchunks, False, True, threads)
        else:
            _relu_rows_all(gv, xv, ov, NULL, NULL, <const double *> cf, <const double *> fc,
                           nchunks, False, True, threads)
