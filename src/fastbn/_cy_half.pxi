# Part of fastbn._cy_kernels, included by _cy_kernels.pyx after its declarations, shims and
# helpers; that file's note says how the layers stack.

# --- half precision: float16/bfloat16 bit patterns (uint16 arrays) <-> float32, 1-D dense -------

cdef void _convert_block(const void *src, void *dst, Py_ssize_t n, bint to_float, bint brain,
                         Py_ssize_t t, Py_ssize_t blocks) noexcept nogil:
    cdef Py_ssize_t i0 = _row0(t, n, blocks), i1 = _row0(t + 1, n, blocks)
    if to_float:
        fbn_half_to_float_run(<const uint16_t *> src + i0, <float *> dst + i0, i1 - i0, brain)
    else:
        fbn_float_to_half_run(<const float *> src + i0, <uint16_t *> dst + i0, i1 - i0, brain)


cdef void _convert(const void *src, void *dst, Py_ssize_t n, bint to_float, bint brain,
                   int threads) noexcept nogil:
    cdef Py_ssize_t t
    if threads == 1:
        _convert_block(src, dst, n, to_float, brain, 0, 1)
    else:
        for t in prange(threads, nogil=True, schedule="static", num_threads=threads):
            _convert_block(src, dst, n, to_float, brain, t, threads)


cdef _convert_arrays(int threads, cnp.ndarray src, cnp.ndarray dst, bint to_float,
                     bint brain):
    cdef void *s = _data(src)
    cdef void *d = _data(dst)
    cdef Py_ssize_t n = cnp.PyArray_SIZE(src)
    with nogil:
        _convert(s, d, n, to_float, brain, threads)


cdef void _convert_run(Strided sv, Strided dv, Py_ssize_t r, bint to_float,
                       bint brain) noexcept nogil:
    cdef Py_ssize_t a = r // sv.n1, c = r - a * sv.n1
    if to_float:
        fbn_half_to_float_run(<const uint16_t *> sv.data + a * sv.s0 + c * sv.s1,
                              <float *> dv.data + a * dv.s0 + c * dv.s1, sv.n2, brain)
    else:
        fbn_float_to_half_run(<const float *> sv.data + a * sv.s0 + c * sv.s1,
                              <uint16_t *> dv.data + a * dv.s0 + c * dv.s1, sv.n2, brain)


def convert_runs(int threads, cnp.ndarray src, cnp.ndarray dst, bint brain):
    """dst[a, c, :] = src[a, c, :] between half bit patterns (uint16; bfloat16 if ``brain``)
    and float32, either way round, on (A, C, B) views whose last axis is contiguous: a slice of
    features of an NCHW array and its float32 scratch (fastbn._half)."""
    cdef Strided sv = _strided(src), dv = _strided(dst)
    cdef bint to_float = cnp.PyArray_TYPE(dst) == cnp.NPY_FLOAT32
    cdef Py_ssize_t r, R = sv.n0 * sv.n1
    with nogil:
        if threads == 1:
            for r in range(R):
                _convert_run(sv, dv, r, to_float, brain)
        else:
            for r in prange(R, schedule="static", num_threads=threads):
                _convert_run(sv, dv, r, to_float, brain)


cdef void _normalize_half_block(Strided xv, Strided yv, const float *coef, bint relu,
                                bint brain, Py_ssize_t t, Py_ssize_t nchunks) noexcept nogil:
    """Block t of nchunks: rows of a feature-inner view (A, L), or (a, c) runs of a feature-
    outer one (A, C, B) when yv.n2 > 1; x and y half bit patterns, contiguous runs/rows."""
    cdef Py_ssize_t r, a, c, R
    if xv.n2 > 1:
        R = xv.n0 * xv.n1
        for r in range(_row0(t, R, nchunks), _row0(t + 1, R, nchunks)):
            a = r // xv.n1
            c = r - a * xv.n1
            fbn_normalize_half_run(<const uint16_t *> xv.data + a * xv.s0 + c * xv.s1,
                                   <uint16_t *> yv.data + a * yv.s0 + c * yv.s1, xv.n2,
                                   coef[c], coef[xv.n1 + c], coef[2 * xv.n1 + c],
                                   coef[3 * xv.n1 + c], relu, brain)
    else:
        fbn_normalize_half_rows(<const uint16_t *> xv.data, xv.s0, <uint16_t *> yv.data, yv.s0,
                                _row0(t, xv.n0, nchunks), _row0(t + 1, xv.n0, nchunks), xv.n1,
                                coef, relu, brain)


def normalize_half(int threads, cnp.ndarray x, cnp.ndarray y, cnp.ndarray coef, bint relu,
                   bint brain, Py_ssize_t nchunks):
    """Inference forward on half data (uint16 bit patterns; bfloat16 if ``brain``), converted
    through float32 a chunk at a time: feature-outer views (A, C, B) with coef (4, C), or
    feature-inner ones (A, L) with coef (4, L) tiled; unit stride within runs/rows. Split in
    ``nchunks`` blocks (of rows, or of (a, c) runs), shared by the team. Cython only (the
    dispatch layer's half-precision notes)."""
    cdef Strided xv = _strided(x), yv = _strided(y)
    cdef const float *cf = <const float *> _data(coef)
    cdef Py_ssize_t t
    with nogil:
        if threads == 1:
            for t in range(nchunks):
                _normalize_half_block(xv, yv, cf, relu, brain, t, nchunks)
        else:
            for t in prange(nchunks, schedule="static", num_threads=threads):
                _normalize_half_block(xv, yv, cf, relu, brain, t, nchunks)


# --- half precision, feature-outer training: a group of features at a time through float32 --
# The group's runs are converted into float32 scratch of the thread's own, and the float32
# path's steps run on it, in its order (_forward_group, _backward_group): the same bits as
# converting whole arrays, with the half data read and written once and the float32 data in
# cache.

cdef inline float *_half_run_to_scratch(Strided v, float *scratch, Py_ssize_t a, Py_ssize_t c,
                                        Py_ssize_t c0, Py_ssize_t n, bint brain) noexcept nogil:
    """Run (a, c) of a half (A, C, B) view converted into its place in scratch (A, n, B)."""
    cdef float *run = scratch + (a * n + c - c0) * v.n2
    fbn_half_to_float_run(<const uint16_t *> v.data + a * v.s0 + c * v.s1, run, v.n2, brain)
    return run


cdef void _forward_half_group(Strided xv, Strided yv, const double *weight, const double *bias,
                              double eps, double *stats, float *coef, bint relu, bint brain,
                              Py_ssize_t c0, Py_ssize_t c1, double *sums,
                              float *buf) noexcept nogil:
    """Features c0..c1 through buf, the thread's scratch of (A, c1 - c0, B) floats."""
    cdef Py_ssize_t A = xv.n0, C = xv.n1, B = xv.n2, n = c1 - c0, a, c
    cdef float *run
    cdef double r[2]
    for c in range(c0, c1):
        sums[2 * c] = 0.0
        sums[2 * c + 1] = 0.0
    for a in range(A):
        for c in range(c0, c1):
            run = _half_run_to_scratch(xv, buf, a, c, c0, n, brain)
            _shifted_sums(run, B, 1, buf[(c - c0) * B], r)
            sums[2 * c] += r[0]
            sums[2 * c + 1] += r[1]
    for c in range(c0, c1):
        _forward_feature(sums[2 * c], sums[2 * c + 1], buf[(c - c0) * B], <double> (A * B), eps,
                         weight[c], bias[c], stats, C, coef, C, c)
    for a in range(A):
        for c in range(c0, c1):
            run = buf + (a * n + c - c0) * B
            _normalize_run(run, 1, run, 1, B, coef, C, c, relu, False)
            fbn_float_to_half_run(run, <uint16_t *> yv.data + a * yv.s0 + c * yv.s1, B, brain)


def forward_train_half_outer(int threads, cnp.ndarray x, cnp.ndarray y, cnp.ndarray weight,
                             cnp.ndarray bias, double eps, cnp.ndarray stats, cnp.ndarray coef,
                             bint relu, bint brain, Py_ssize_t ngroups):
    """Training forward on half (A, C, B) views (uint16 bits, contiguous runs; bfloat16 if
    ``brain``), a group of features at a time (as forward_train_outer) through float32
    scratch; coef (4, C) float32."""
    cdef Strided xv = _strided(x), yv = _strided(y)
    cdef _Params64 params = _Params64(cnp.PyArray_DIM(weight, 0), 2)
    cdef const double *w = params.of(weight)
    cdef const double *b = params.of(bias)
    cdef double *st = _f64(stats)
    cdef float *cf = <float *> _data(coef)
    cdef Py_ssize_t C = xv.n1, g
    cdef Py_ssize_t widest = _quot(C + ngroups - 1, ngroups)  # features in the largest group
    cdef Py_ssize_t per_thread = max(1, xv.n0 * widest * xv.n2)  # scratch floats
    cdef double *sums = <double *> malloc(2 * C * sizeof(double))
    cdef float *scratch = <float *> malloc(max(1, threads) * per_thread * sizeof(float))
    if sums == NULL or scratch == NULL:
        free(sums); free(scratch)
        _checked(-1)
    with nogil:
        if threads == 1:
            for g in range(ngroups):
                _forward_half_group(xv, yv, w, b, eps, st, cf, relu, brain,
                                    _row0(g, C, ngroups), _row0(g + 1, C, ngroups), sums, scratch)
        else:
            for g in prange(ngroups, schedule="static", num_threads=threads):
                _forward_half_group(xv, yv, w, b, eps, st, cf, relu, brain,
                                    _row0(g, C, ngroups), _row0(g + 1, C, ngroups), sums,
                                    scratch + threadid() * per_thread)
        free(sums)
        free(scratch)


cdef void _backward_half_group(Strided gv, Strided xv, Strided ov, Features f, float *coef,
                               bint brain, Py_ssize_t c0, Py_ssize_t c1, double *sums,
                               float *xbuf) noexcept nogil:
    """Features c0..c1 through xbuf, the thread's scratch of 2 (A, c1 - c0, B) floats."""
    cdef Py_ssize_t A = xv.n0, C = xv.n1, B = xv.n2, n = c1 - c0, a, c
    cdef float *gbuf = xbuf + A * n * B
    cdef float *xr
    cdef float *gr
    cdef double m = <double> (A * B)
    cdef double r[3]
    cdef double shift, mean
    for c in range(c0, c1):
        sums[3 * c] = 0.0
        sums[3 * c + 1] = 0.0
        sums[3 * c + 2] = 0.0
    for a in range(A):
        for c in range(c0, c1):
            xr = _half_run_to_scratch(xv, xbuf, a, c, c0, n, brain)
            gr = _half_run_to_scratch(gv, gbuf, a, c, c0, n, brain)
            _backward_sums(gr, 1, xr, 1, B, xbuf[(c - c0) * B], r)
            sums[3 * c] += r[0]
            sums[3 * c + 1] += r[1]
            sums[3 * c + 2] += r[2]
    for c in range(c0, c1):
        shift = xbuf[(c - c0) * B]
        mean = f.mean[c]
        if f.training:
            mean = fbn_refined_mean(mean, f.mean_ulp[c], shift, sums[3 * c], m)
        _grad_coefs(sums[3 * c + 1], sums[3 * c + 2], shift, m, mean, f.invstd[c], f.weight[c],
                    f.training, f.grads, C, coef, C, c)
    for a in range(A):
        for c in range(c0, c1):
            xr = xbuf + (a * n + c - c0) * B
            gr = gbuf + (a * n + c - c0) * B
            if f.training:  # dx written over dy's scratch
                _dx_run(gr, 1, xr, 1, gr, 1, B, coef, C, c)
            else:
                _scale_run(gr, 1, gr, 1, B, coef[2 * C + c])
            fbn_float_to_half_run(gr, <uint16_t *> ov.data + a * ov.s0 + c * ov.s1, B, brain)


def backward_half_outer(int threads, cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx,
                        cnp.ndarray mean_in, cnp.ndarray mean_ulp, cnp.ndarray invstd_in,
                        cnp.ndarray weight, bint training, cnp.ndarray grads, cnp.ndarray coef,
                        bint brain, Py_ssize_t ngroups):
    """Backward on half (A, C, B) views as forward_train_half_outer; coef (5, C) float32."""
    cdef Strided gv = _strided(dy), xv = _strided(x), ov = _strided(dx)
    cdef _Params64 params = _Params64(cnp.PyArray_DIM(weight, 0), 4)
    cdef Features f = _features(params, mean_in, mean_ulp, invstd_in, weight, None, training,
                                grads)
    cdef float *cf = <float *> _data(coef)
    cdef Py_ssize_t C = xv.n1, g
    cdef Py_ssize_t widest = _quot(C + ngroups - 1, ngroups)  # features in the largest group
    cdef Py_ssize_t per_thread = max(1, 2 * xv.n0 * widest * xv.n2)  # scratch floats
    cdef double *sums = <double *> malloc(3 * C * sizeof(double))
    cdef float *scratch = <float *> malloc(max(1, threads) * per_thread * sizeof(float))
    if sums == NULL or scratch == NULL:
        free(sums); free(scratch)
        _checked(-1)
    with nogil:
        if threads == 1:
            for g in range(ngroups):
                _backward_half_group(gv, xv, ov, f, cf, brain, _row0(g, C, ngroups),
                                     _row0(g + 1, C, ngroups), sums, scratch)
        else:
            for g in prange(ngroups, schedule="static", num_threads=threads):
                _backward_half_group(gv, xv, ov, f, cf, brain, _row0(g, C, ngroups),
                                     _row0(g + 1, C, ngroups), sums,
                                     scratch + threadid() * per_thread)
        free(sums)
        free(scratch)


# --- half precision, feature-inner training: row blocks through float32 chunks ---------------
# _forward_train_inner and _backward_inner with the row loops on converted chunks (the C
# functions above keep the float32 loops' blocks, hence their bits).

cdef int _half_column_shifts(Strided xv, Py_ssize_t C, Py_ssize_t B, bint brain,
                             double *shift) noexcept nogil:
    """shift (L,) of a half feature-inner view, as _column_shifts on its float32 copy; -1
    when out of memory."""
    cdef Py_ssize_t L = xv.n1, first = min(L, C * B)
    cdef float *row = <float *> malloc(max(1, first) * sizeof(float))
    if row == NULL:
        return -1
    fbn_half_to_float_run(<const uint16_t *> xv.data, row, first, brain)
    _column_shifts(row, 1, L, C, B, shift)
    free(row)
    return 0


cdef enum HalfRowsPass:
    HALF_FORWARD_SUMS
    HALF_NORMALIZE
    HALF_BACKWARD_SUMS
    HALF_DX


cdef struct HalfRows:
    # One call's half feature-inner views and scratch, shared by its passes over row blocks.
    Strided gv      # dy (backward)
    Strided xv
    Strided ov      # y or dx
    const double *shift
    double *partial  # (S, nchunks, L)
    const float *coef
    Py_ssize_t nchunks
    bint relu, training, brain


cdef void _half_rows_block(const HalfRows *h, HalfRowsPass op, Py_ssize_t t) noexcept nogil:
    """Row block t of one pass (_backward_rows's role, for half rows)."""
    cdef const uint16_t *x = <const uint16_t *> h.xv.data
    cdef const uint16_t *dy = <const uint16_t *> h.gv.data
    cdef Py_ssize_t A = h.xv.n0, L = h.xv.n1, n = h.nchunks
    cdef Py_ssize_t a0 = _row0(t, A, n), a1 = _row0(t + 1, A, n)
    cdef double *p = h.partial
    if op == HALF_FORWARD_SUMS:
        fbn_accumulate_half_rows(x, h.xv.s0, a0, a1, L, h.shift, p + t * L, p + (n + t) * L,
                                 h.brain)
    elif op == HALF_NORMALIZE:
        fbn_normalize_half_rows(x, h.xv.s0, <uint16_t *> h.ov.data, h.ov.s0, a0, a1, L, h.coef,
                                h.relu, h.brain)
    elif op == HALF_BACKWARD_SUMS:
        fbn_accumulate_backward_half_rows(dy, h.gv.s0, x, h.xv.s0, a0, a1, L, h.shift,
                                          p + t * L, p + (n + t) * L, p + (2 * n + t) * L,
                                          h.brain)
    else:
        fbn_dx_half_rows(dy, h.gv.s0, x, h.xv.s0, <uint16_t *> h.ov.data, h.ov.s0, a0, a1, L,
                         h.coef, h.training, h.brain)


cdef void _half_rows_all(const HalfRows *h, HalfRowsPass op, int threads) noexcept nogil:
    cdef Py_ssize_t t
    if threads == 1:
        for t in range(h.nchunks):
            _half_rows_block(h, op, t)
    else:
        for t in prange(h.nchunks, schedule="static", num_threads=threads):
            _half_rows_block(h, op, t)


cdef int _half_rows_scratch(HalfRows *h, Py_ssize_t S, Py_ssize_t C, Py_ssize_t B,
                            double **sums) noexcept nogil:
    """_inner_scratch for h, its shift filled; -1 (nothing left allocated) when out of
    memory."""
    cdef double *shift
    if _inner_scratch(S, h.nchunks, h.xv.n1, C, &shift, &h.partial, sums) != 0:
        return -1
    h.shift = shift
    if _half_column_shifts(h.xv, C, B, h.brain, shift) != 0:
        _free_inner_scratch(shift, h.partial, sums[0])
        return -1
    return 0


def forward_train_half_inner(int threads, cnp.ndarray x, cnp.ndarray y, cnp.ndarray weight,
                             cnp.ndarray bias, double eps, cnp.ndarray stats, cnp.ndarray coef,
                             Py_ssize_t nchunks, Py_ssize_t B, bint relu, bint brain):
    """Training forward on half feature-inner views (A, L) (uint16 bits, contiguous rows;
    bfloat16 if ``brain``); coef (4, L) float32."""
    cdef HalfRows h
    cdef Py_ssize_t C = cnp.PyArray_DIM(weight, 0)
    cdef _Params64 params = _Params64(C, 2)
    cdef const double *w = params.of(weight)
    cdef const double *b = params.of(bias)
    cdef double *st = _f64(stats)
    cdef float *cf = <float *> _data(coef)
    cdef double *sums
    cdef int status
    h.xv = _strided(x)
    h.ov = _strided(y)
    h.gv = h.xv  # (unused)
    h.coef = cf
    h.nchunks = nchunks
    h.relu, h.training, h.brain = relu, True, brain
    cdef double m = <double> (h.xv.n0 * _quot(h.xv.n1, C))
    with nogil:
        status = _half_rows_scratch(&h, 2, C, B, &sums)
        if status == 0:
            _half_rows_all(&h, HALF_FORWARD_SUMS, threads)
            _fold_columns(h.partial, 2, nchunks, h.xv.n1, C, B, sums)
            finish_forward_f(sums, C, h.shift, B, m, eps, w, b, st, cf, h.xv.n1)
            _tile_columns(cf, 4, h.xv.n1, C, B)
            _half_rows_all(&h, HALF_NORMALIZE, threads)
            _free_inner_scratch(<double *> h.shift, h.partial, sums)
    _checked(status)


def backward_half_inner(int threads, cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx,
                        cnp.ndarray mean_in, cnp.ndarray mean_ulp, cnp.ndarray invstd_in,
                        cnp.ndarray weight, bint training, cnp.ndarray grads, cnp.ndarray coef,
                        Py_ssize_t nchunks, Py_ssize_t B, bint brain):
    """Backward (no ReLU) on half feature-inner views as forward_train_half_inner; coef
    (5, L) float32; dx may be dy."""
    cdef HalfRows h
    cdef Py_ssize_t C = cnp.PyArray_DIM(weight, 0)
    cdef _Params64 params = _Params64(C, 4)
    cdef Features f = _features(params, mean_in, mean_ulp, invstd_in, weight, None, training,
                                grads)
    cdef float *cf = <float *> _data(coef)
    cdef double *sums
    cdef int status
    h.gv = _strided(dy)
    h.xv = _strided(x)
    h.ov = _strided(dx)
    h.coef = cf
    h.nchunks = nchunks
    h.relu, h.training, h.brain = False, training, brain
    cdef double m = <double> (h.xv.n0 * _quot(h.xv.n1, C))
    with nogil:
        status = _half_rows_scratch(&h, 3, C, B, &sums)
        if status == 0:
            _half_rows_all(&h, HALF_BACKWARD_SUMS, threads)
            _fold_columns(h.partial, 3, nchunks, h.xv.n1, C, B, sums)
            finish_backward_f(sums, C, h.shift, B, m, f.mean, f.mean_ulp, f.invstd, f.weight,
                              f.training, f.grads, cf, h.xv.n1)
            _tile_columns(cf, 5, h.xv.n1, C, B)
            _half_rows_all(&h, HALF_DX, threads)
            _free_inner_scratch(<double *> h.shift, h.partial, sums)
    _checked(status)


_HALF_PATHS = ("best", "avx512f", "f16c", "software")


def half_conversion(path=None):
    """The float16 conversion the kernels make: "avx512f" or "f16c" (the CPU's conversion
    instructions) or "software" (portable C loops). With ``path``, that one is chosen first
    ("best": the best this CPU runs; one it lacks falls back to the best). For the tests."""
    if path is not None:
        fbn_half_select(_HALF_PATHS.index(path))
    return _HALF_PATHS[fbn_half_path()]


fbn_half_select(0)  # the best conversion this CPU has, from import on


def float16_to_float32(int threads, cnp.ndarray src, cnp.ndarray dst):
    """dst[i] = float32 of the float16 bit pattern src[i] (uint16), exactly."""
    _convert_arrays(threads, src, dst, True, False)


def bfloat16_to_float32(int threads, cnp.ndarray src, cnp.ndarray dst):
    """dst[i] = float32 of the bfloat16 bit pattern src[i] (uint16), exactly."""
    _convert_arrays(threads, src, dst, True, True)


def float32_to_float16(int threads, cnp.ndarray src, cnp.ndarray dst):
    """dst[i] = float16 bits of src[i], rounded to nearest even (NaN and overflow as NumPy)."""
    _convert_arrays(threads, src, dst, False, False)


def float32_to_bfloat16(int threads, cnp.ndarray src, cnp.ndarray dst):
    """dst[i] = bfloat16 bits of src[i], rounded to nearest even, NaN kept quiet."""
    _convert_arrays(threads, src, dst, False, True)
