# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, embedsignature=True
"""Cython/OpenMP kernels: the optional compiled twin of :mod:`fastbn._numba_kernels`.

How the layers stack
--------------------
- ``_cy_runs.h`` (C): loops over one run or a block of rows, one body for float and double.
  The sums carry ``#pragma omp simd reduction``, the only place where reordering is allowed.
- this module: ``cdef ... nogil`` functions over raw pointers and element strides, fused over
  ``floating`` (float, double); ``prange(..., nogil=True, schedule="static")`` hands groups of
  features or blocks of rows to threads, and each ``prange`` body is one call to a function
  that owns its loop, so no variable is shared by accident;
- ``def`` entry points with the names, arguments and results of the Numba kernels, plus a
  leading ``threads`` argument (1: the loops run without waking a thread team). The dispatch
  layer (:mod:`fastbn._drivers`) validates nothing twice: arrays arrive with the right dtypes,
  shapes, aligned data and strides that are whole numbers of elements (it checks the last two).
  Per-feature vectors may be float32 or float64 (``_Params64``). Seven entry points have no
  Numba twin: ``forward_train_half_outer``, ``backward_half_outer``,
  ``forward_train_half_inner``, ``backward_half_inner``, ``normalize_half`` and
  ``convert_runs`` (the half-precision paths that go through float32 in cache, Cython only)
  and ``half_conversion`` (which float16 conversion runs, for the tests).

Files: this module declares the C loops, turns arrays into pointers and holds the fused shims
and per-feature steps; ``_cy_families.pxi`` the two kernel families (feature-outer: runs of one
feature; feature-inner: blocks of rows); ``_cy_entries.pxi`` their ``def`` entry points;
``_cy_phases.pxi`` the split phases of :mod:`fastbn.phases`; ``_cy_half.pxi`` the
half-precision paths; ``_cy_call.pxi`` the compiled call path. The C loops are in
``_cy_runs.h`` (helpers, conversions) and its per-type bodies ``_cy_runs_t.h`` (runs),
``_cy_rows_t.h`` (rows) and ``_cy_finish_t.h`` (per-feature finishing), and ``_cy_half.h``
(half-precision conversions and fused loops).

The math, the summation order of every reduction that has a fixed order (per-feature sums add
runs sample by sample; feature-inner partials are folded in the same fixed order), and the
form of every elementwise expression are those of the Numba kernels; see that module's notes.
"""
from cython cimport floating
from cython.parallel cimport prange, threadid
from libc.stdlib cimport calloc, malloc, free
from libc.string cimport memcpy

cimport numpy as cnp

cnp.import_array()

cdef extern from "_cy_runs.h" nogil:
    ctypedef Py_ssize_t fbn_idx
    ctypedef unsigned short uint16_t
    int fbn_half_select(int choice)
    int fbn_half_path()
    void fbn_half_to_float_run(const uint16_t *src, float *dst, fbn_idx n, int brain)
    void fbn_float_to_half_run(const float *src, uint16_t *dst, fbn_idx n, int brain)
    void fbn_normalize_half_run(const uint16_t *x, uint16_t *y, fbn_idx n, float s, float hi,
                                float scale, float shift, int relu, int brain)
    void fbn_normalize_half_rows(const uint16_t *x, fbn_idx rs, uint16_t *y, fbn_idx yrs,
                                 fbn_idx a0, fbn_idx a1, fbn_idx L, const float *coef,
                                 int relu, int brain)
    void fbn_accumulate_half_rows(const uint16_t *x, fbn_idx rs, fbn_idx a0, fbn_idx a1,
                                  fbn_idx L, const double *shift, double *p0, double *p1,
                                  int brain)
    void fbn_accumulate_backward_half_rows(const uint16_t *dy, fbn_idx drs, const uint16_t *x,
                                           fbn_idx rs, fbn_idx a0, fbn_idx a1, fbn_idx L,
                                           const double *shift, double *p0, double *p1,
                                           double *p2, int brain)
    void fbn_dx_half_rows(const uint16_t *dy, fbn_idx drs, const uint16_t *x, fbn_idx rs,
                          uint16_t *dx, fbn_idx ors, fbn_idx a0, fbn_idx a1, fbn_idx L,
                          const float *coef, int training, int brain)
    void shifted_sums_f(const float *x, fbn_idx n, fbn_idx st, double shift, double *out)
    void shifted_sums_d(const double *x, fbn_idx n, fbn_idx st, double shift, double *out)
    void backward_sums_f(const float *dy, fbn_idx sdy, const float *x, fbn_idx sx, fbn_idx n,
                         double shift, double *out)
    void backward_sums_d(const double *dy, fbn_idx sdy, const double *x, fbn_idx sx, fbn_idx n,
                         double shift, double *out)
    void normalize_run_f(const float *x, fbn_idx sx, float *y, fbn_idx sy, fbn_idx n, float s,
                         float hi, float scale, float shift, int relu, int stream)
    void normalize_run_d(const double *x, fbn_idx sx, double *y, fbn_idx sy, fbn_idx n,
                         double s, double hi, double scale, double shift, int relu,
                         int stream)
    void dx_run_f(const float *dy, fbn_idx sdy, const float *x, fbn_idx sx, float *dx,
                  fbn_idx sdx, fbn_idx n, float s, float hi, float k, float u1, float u2)
    void dx_run_d(const double *dy, fbn_idx sdy, const double *x, fbn_idx sx, double *dx,
                  fbn_idx sdx, fbn_idx n, double s, double hi, double k, double u1, double u2)
    void scale_run_f(const float *dy, fbn_idx sdy, float *dx, fbn_idx sdx, fbn_idx n, float k)
    void scale_run_d(const double *dy, fbn_idx sdy, double *dx, fbn_idx sdx, fbn_idx n,
                     double k)
    void fbn_sfence()
    void update_running_f(float *rm, float *rv, const double *stats, fbn_idx C, double momentum,
                          double var_factor)
    void update_running_d(double *rm, double *rv, const double *stats, fbn_idx C,
                          double momentum, double var_factor)
    void relu_sums_run_f(const float *dy, fbn_idx sdy, const float *x, fbn_idx sx, fbn_idx n,
                         double shift, float s, float hi, float scale, float offset,
                         double *out)
    void relu_sums_run_d(const double *dy, fbn_idx sdy, const double *x, fbn_idx sx,
                         fbn_idx n, double shift, double s, double hi, double scale,
                         double offset, double *out)
    void relu_dx_run_f(const float *dy, fbn_idx sdy, const float *x, fbn_idx sx, float *dx,
                       fbn_idx sdx, fbn_idx n, const float *fc, const float *bc, int training)
    void relu_dx_run_d(const double *dy, fbn_idx sdy, const double *x, fbn_idx sx, double *dx,
                       fbn_idx sdx, fbn_idx n, const double *fc, const double *bc,
                       int training)
    void accumulate_rows_f(const float *x, fbn_idx rs, fbn_idx cs, fbn_idx a0, fbn_idx a1,
                           fbn_idx L, const double *shift, double *p0, double *p1)
    void accumulate_rows_d(const double *x, fbn_idx rs, fbn_idx cs, fbn_idx a0, fbn_idx a1,
                           fbn_idx L, const double *shift, double *p0, double *p1)
    void accumulate_backward_rows_f(const float *dy, fbn_idx drs, fbn_idx dcs, const float *x,
                                    fbn_idx rs, fbn_idx cs, fbn_idx a0, fbn_idx a1, fbn_idx L,
                                    const double *shift, double *p0, double *p1, double *p2)
    void accumulate_backward_rows_d(const double *dy, fbn_idx drs, fbn_idx dcs,
                                    const double *x, fbn_idx rs, fbn_idx cs, fbn_idx a0,
                                    fbn_idx a1, fbn_idx L, const double *shift, double *p0,
                                    double *p1, double *p2)
    void normalize_rows_f(const float *x, fbn_idx rs, fbn_idx cs, float *y, fbn_idx yrs,
                          fbn_idx ycs, fbn_idx a0, fbn_idx a1, fbn_idx L, const float *coef,
                          int relu, int stream)
    void normalize_rows_d(const double *x, fbn_idx rs, fbn_idx cs, double *y, fbn_idx yrs,
                          fbn_idx ycs, fbn_idx a0, fbn_idx a1, fbn_idx L, const double *coef,
                          int relu, int stream)
    void dx_rows_f(const float *dy, fbn_idx drs, fbn_idx dcs, const float *x, fbn_idx rs,
                   fbn_idx cs, float *dx, fbn_idx ors, fbn_idx ocs, fbn_idx a0, fbn_idx a1,
                   fbn_idx L, const float *coef, int stream)
    void dx_rows_d(const double *dy, fbn_idx drs, fbn_idx dcs, const double *x, fbn_idx rs,
                   fbn_idx cs, double *dx, fbn_idx ors, fbn_idx ocs, fbn_idx a0, fbn_idx a1,
                   fbn_idx L, const double *coef, int stream)
    void scale_rows_f(const float *dy, fbn_idx drs, fbn_idx dcs, float *dx, fbn_idx ors,
                      fbn_idx ocs, fbn_idx a0, fbn_idx a1, fbn_idx L, const float *k)
    void scale_rows_d(const double *dy, fbn_idx drs, fbn_idx dcs, double *dx, fbn_idx ors,
                      fbn_idx ocs, fbn_idx a0, fbn_idx a1, fbn_idx L, const double *k)
    void relu_sums_rows_f(const float *dy, fbn_idx drs, fbn_idx dcs, const float *x,
                          fbn_idx rs, fbn_idx cs, fbn_idx a0, fbn_idx a1, fbn_idx L,
                          const double *shift, const float *fcoef, double *p0, double *p1)
    void relu_sums_rows_d(const double *dy, fbn_idx drs, fbn_idx dcs, const double *x,
                          fbn_idx rs, fbn_idx cs, fbn_idx a0, fbn_idx a1, fbn_idx L,
                          const double *shift, const double *fcoef, double *p0, double *p1)
    void relu_dx_rows_f(const float *dy, fbn_idx drs, fbn_idx dcs, const float *x, fbn_idx rs,
                        fbn_idx cs, float *dx, fbn_idx ors, fbn_idx ocs, fbn_idx a0,
                        fbn_idx a1, fbn_idx L, const float *coef, const float *fcoef,
                        int training)
    void relu_dx_rows_d(const double *dy, fbn_idx drs, fbn_idx dcs, const double *x,
                        fbn_idx rs, fbn_idx cs, double *dx, fbn_idx ors, fbn_idx ocs,
                        fbn_idx a0, fbn_idx a1, fbn_idx L, const double *coef,
                        const double *fcoef, int training)
    double fbn_prescale_of(double mean, double invstd)
    double fbn_refined_mean(double mean, double mean_ulp, double shift, double sx, double m)
    void forward_coefs_f(float *coef, fbn_idx W, fbn_idx c, double mean, double invstd,
                         double weight, double bias, double s)
    void forward_coefs_d(double *coef, fbn_idx W, fbn_idx c, double mean, double invstd,
                         double weight, double bias, double s)
    int forward_feature_f(double s1, double s2, double shift, double m, double eps,
                          double weight, double bias, double *stats, fbn_idx C, float *coef,
                          fbn_idx W, fbn_idx c, int exact)
    int forward_feature_d(double s1, double s2, double shift, double m, double eps,
                          double weight, double bias, double *stats, fbn_idx C, double *coef,
                          fbn_idx W, fbn_idx c, int exact)
    int grad_coefs_f(double sdy, double sdyx, double shift, double m, double mean,
                     double invstd, double weight, int training, double *grads, fbn_idx C,
                     float *coef, fbn_idx W, fbn_idx c, int exact)
    int grad_coefs_d(double sdy, double sdyx, double shift, double m, double mean,
                     double invstd, double weight, int training, double *grads, fbn_idx C,
                     double *coef, fbn_idx W, fbn_idx c, int exact)
    void fbn_fold_features(const double *partial, fbn_idx S, fbn_idx nchunks, fbn_idx L,
                           fbn_idx C, double *sums)
    void finish_forward_f(const double *sums, fbn_idx C, const double *shift, fbn_idx B,
                          double m, double eps, const double *weight, const double *bias,
                          double *stats, float *coef, fbn_idx W)
    void finish_forward_d(const double *sums, fbn_idx C, const double *shift, fbn_idx B,
                          double m, double eps, const double *weight, const double *bias,
                          double *stats, double *coef, fbn_idx W)
    void finish_eval_f(const double *running_mean, const double *running_var, fbn_idx C,
                       double eps, const double *weight, const double *bias, double *stats,
                       float *coef, fbn_idx W)
    void finish_eval_d(const double *running_mean, const double *running_var, fbn_idx C,
                       double eps, const double *weight, const double *bias, double *stats,
                       double *coef, fbn_idx W)
    void finish_backward_f(const double *sums, fbn_idx C, const double *shift, fbn_idx B,
                           double m, const double *mean, const double *mean_ulp,
                           const double *invstd, const double *weight, int training,
                           double *grads, float *coef, fbn_idx W)
    void finish_backward_d(const double *sums, fbn_idx C, const double *shift, fbn_idx B,
                           double m, const double *mean, const double *mean_ulp,
                           const double *invstd, const double *weight, int training,
                           double *grads, double *coef, fbn_idx W)


# --- arrays as pointers ---------------------------------------------------------------------

cdef struct Strided:
    char *data
    Py_ssize_t n0, n1, n2   # shape (n2 = 1 for 2-D views)
    Py_ssize_t s0, s1, s2   # strides in elements
    bint stream             # as an output: large enough for non-temporal stores


#: Outputs of at least this many bytes are written with non-temporal stores by the row loops
#: of the feature-inner family and by the feature-outer eval normalize (see _cy_runs.h; in the
#: feature-outer training kernels, whose second pass reads a group back from cache, they
#: measured no faster for forward and 2-12% slower for backward, NCHW 64x128x56x56 on 2
#: threads, so those keep regular stores). The dispatch layer sets it to 3/4 of the
#: last-level cache when it loads this module (fastbn._backends.last_level_cache_bytes): a
#: larger output mostly cannot stay in cache for its consumer anyway; a smaller one may.
cdef Py_ssize_t _stream_min_bytes = 24 * 2**20


def stream_min_bytes(n=None):
    """From how many bytes an output is written with non-temporal stores; with ``n``, set that
    first (the tests force both ways). Returns the value in force."""
    global _stream_min_bytes
    if n is not None:
        _stream_min_bytes = n
    return _stream_min_bytes


cdef Strided _strided(cnp.ndarray arr):
    cdef Strided v
    cdef int nd = cnp.PyArray_NDIM(arr)
    cdef Py_ssize_t item = cnp.PyArray_ITEMSIZE(arr)
    v.data = cnp.PyArray_BYTES(arr)
    v.n0 = cnp.PyArray_DIM(arr, 0) if nd > 0 else 1
    v.n1 = cnp.PyArray_DIM(arr, 1) if nd > 1 else 1
    v.n2 = cnp.PyArray_DIM(arr, 2) if nd > 2 else 1
    v.s0 = cnp.PyArray_STRIDE(arr, 0) // item if nd > 0 else 0
    v.s1 = cnp.PyArray_STRIDE(arr, 1) // item if nd > 1 else 0
    v.s2 = cnp.PyArray_STRIDE(arr, 2) // item if nd > 2 else 0
    v.stream = cnp.PyArray_NBYTES(arr) >= _stream_min_bytes
    return v


cdef inline double *_f64(cnp.ndarray arr):
    """A C-contiguous float64 array's data (stats, grads: the dispatch layer allocates them
    so)."""
    return <double *> cnp.PyArray_DATA(arr)


cdef class _Params64:
    """Per-feature parameters (weight, bias, mean, invstd, running statistics) as float64
    pointers. They arrive contiguous, float32 or float64 (see fastbn._validate._vector): float64
    ones are read in place, float32 ones converted here into memory this object owns, which
    costs less than a NumPy conversion per vector on small calls (NC 32x512)."""
    cdef double *buf
    cdef Py_ssize_t C, used, capacity

    def __cinit__(self, Py_ssize_t C, Py_ssize_t capacity):
        self.C = C
        self.capacity = capacity
        self.used = 0
        self.buf = NULL

    def __dealloc__(self):
        free(self.buf)

    cdef const double *of(self, cnp.ndarray arr) except NULL:
        cdef const float *src
        cdef double *dst
        cdef Py_ssize_t i
        if not (cnp.PyArray_NDIM(arr) == 1 and cnp.PyArray_DIM(arr, 0) == self.C
                and cnp.PyArray_ISCARRAY_RO(arr)):
            raise ValueError("a per-feature parameter must be aligned and contiguous, (C,)")
        if cnp.PyArray_TYPE(arr) == cnp.NPY_FLOAT64:
            return <const double *> cnp.PyArray_DATA(arr)
        if cnp.PyArray_TYPE(arr) != cnp.NPY_FLOAT32:
            raise TypeError("a per-feature parameter must be float32 or float64")
        if self.buf == NULL:
            self.buf = <double *> malloc(max(1, self.C * self.capacity) * sizeof(double))
            if self.buf == NULL:
                raise MemoryError()
        if self.used == self.capacity:
            raise ValueError("more float32 parameters than _Params64 was sized for")
        src = <const float *> cnp.PyArray_DATA(arr)
        dst = self.buf + self.used * self.C
        self.used += 1
        for i in range(self.C):
            dst[i] = src[i]
        return dst


cdef inline bint _is_float(cnp.ndarray arr):
    return cnp.PyArray_TYPE(arr) == cnp.NPY_FLOAT32


cdef struct Features:
    # What backward is given per feature (float64, contiguous, as the dispatch layer passes
    # it), and where it writes dgamma and dbeta.
    const double *mean
    const double *mean_ulp
    const double *invstd
    const double *weight
    const double *bias  # NULL for the kernels without ReLU, which take no bias
    double *grads
    bint training


cdef Features _features(_Params64 params, cnp.ndarray mean_in, cnp.ndarray mean_ulp,
                        cnp.ndarray invstd_in, cnp.ndarray weight, cnp.ndarray bias,
                        bint training, cnp.ndarray grads) except *:
    cdef Features f
    f.mean = params.of(mean_in)
    f.mean_ulp = params.of(mean_ulp)
    f.invstd = params.of(invstd_in)
    f.weight = params.of(weight)
    f.bias = NULL if bias is None else params.of(bias)
    f.grads = _f64(grads)
    f.training = training
    return f


# --- fused shims over the C loops -------------------------------------------------------------

cdef inline void _shifted_sums(const floating *x, Py_ssize_t n, Py_ssize_t st, double shift,
                               double *out) noexcept nogil:
    if floating is float:
        shifted_sums_f(x, n, st, shift, out)
    else:
        shifted_sums_d(x, n, st, shift, out)


cdef inline void _backward_sums(const floating *dy, Py_ssize_t sdy, const floating *x,
                                Py_ssize_t sx, Py_ssize_t n, double shift,
                                double *out) noexcept nogil:
    if floating is float:
        backward_sums_f(dy, sdy, x, sx, n, shift, out)
    else:
        backward_sums_d(dy, sdy, x, sx, n, shift, out)


cdef inline void _normalize_run(const floating *x, Py_ssize_t sx, floating *y, Py_ssize_t sy,
                                Py_ssize_t n, const floating *coef, Py_ssize_t W,
                                Py_ssize_t c, bint relu, bint stream) noexcept nogil:
    if floating is float:
        normalize_run_f(x, sx, y, sy, n, coef[c], coef[W + c], coef[2 * W + c],
                        coef[3 * W + c], relu, stream)
    else:
        normalize_run_d(x, sx, y, sy, n, coef[c], coef[W + c], coef[2 * W + c],
                        coef[3 * W + c], relu, stream)


cdef inline void _dx_run(const floating *dy, Py_ssize_t sdy, const floating *x, Py_ssize_t sx,
                         floating *dx, Py_ssize_t sdx, Py_ssize_t n, const floating *coef,
                         Py_ssize_t W, Py_ssize_t c) noexcept nogil:
    if floating is float:
        dx_run_f(dy, sdy, x, sx, dx, sdx, n, coef[c], coef[W + c], coef[2 * W + c],
                 coef[3 * W + c], coef[4 * W + c])
    else:
        dx_run_d(dy, sdy, x, sx, dx, sdx, n, coef[c], coef[W + c], coef[2 * W + c],
                 coef[3 * W + c], coef[4 * W + c])


cdef inline void _scale_run(const floating *dy, Py_ssize_t sdy, floating *dx, Py_ssize_t sdx,
                            Py_ssize_t n, floating k) noexcept nogil:
    if floating is float:
        scale_run_f(dy, sdy, dx, sdx, n, k)
    else:
        scale_run_d(dy, sdy, dx, sdx, n, k)


cdef inline void _relu_sums_run(const floating *dy, Py_ssize_t sdy, const floating *x,
                                Py_ssize_t sx, Py_ssize_t n, double shift,
                                const floating *fcoef, Py_ssize_t W, Py_ssize_t c,
                                double *out) noexcept nogil:
    if floating is float:
        relu_sums_run_f(dy, sdy, x, sx, n, shift, fcoef[c], fcoef[W + c], fcoef[2 * W + c],
                        fcoef[3 * W + c], out)
    else:
        relu_sums_run_d(dy, sdy, x, sx, n, shift, fcoef[c], fcoef[W + c], fcoef[2 * W + c],
                        fcoef[3 * W + c], out)


cdef inline void _relu_dx_run(const floating *dy, Py_ssize_t sdy, const floating *x,
                              Py_ssize_t sx, floating *dx, Py_ssize_t sdx, Py_ssize_t n,
                              const floating *fc, const floating *bc,
                              bint training) noexcept nogil:
    if floating is float:
        relu_dx_run_f(dy, sdy, x, sx, dx, sdx, n, fc, bc, training)
    else:
        relu_dx_run_d(dy, sdy, x, sx, dx, sdx, n, fc, bc, training)


cdef inline void _accumulate_rows(const floating *x, Py_ssize_t rs, Py_ssize_t cs,
                                  Py_ssize_t a0, Py_ssize_t a1, Py_ssize_t L,
                                  const double *shift, double *p0, double *p1) noexcept nogil:
    if floating is float:
        accumulate_rows_f(x, rs, cs, a0, a1, L, shift, p0, p1)
    else:
        accumulate_rows_d(x, rs, cs, a0, a1, L, shift, p0, p1)


cdef inline void _accumulate_backward_rows(const floating *dy, Py_ssize_t drs, Py_ssize_t dcs,
                                           const floating *x, Py_ssize_t rs, Py_ssize_t cs,
                                           Py_ssize_t a0, Py_ssize_t a1, Py_ssize_t L,
                                           const double *shift, double *p0, double *p1,
                                           double *p2) noexcept nogil:
    if floating is float:
        accumulate_backward_rows_f(dy, drs, dcs, x, rs, cs, a0, a1, L, shift, p0, p1, p2)
    else:
        accumulate_backward_rows_d(dy, drs, dcs, x, rs, cs, a0, a1, L, shift, p0, p1, p2)


cdef inline void _normalize_rows(const floating *x, Py_ssize_t rs, Py_ssize_t cs, floating *y,
                                 Py_ssize_t yrs, Py_ssize_t ycs, Py_ssize_t a0, Py_ssize_t a1,
                                 Py_ssize_t L, const floating *coef, bint relu,
                                 bint stream) noexcept nogil:
    if floating is float:
        normalize_rows_f(x, rs, cs, y, yrs, ycs, a0, a1, L, coef, relu, stream)
    else:
        normalize_rows_d(x, rs, cs, y, yrs, ycs, a0, a1, L, coef, relu, stream)


cdef inline void _dx_rows(const floating *dy, Py_ssize_t drs, Py_ssize_t dcs, const floating *x,
                          Py_ssize_t rs, Py_ssize_t cs, floating *dx, Py_ssize_t ors,
                          Py_ssize_t ocs, Py_ssize_t a0, Py_ssize_t a1, Py_ssize_t L,
                          const floating *coef, bint training, bint stream) noexcept nogil:
    if training:
        if floating is float:
            dx_rows_f(dy, drs, dcs, x, rs, cs, dx, ors, ocs, a0, a1, L, coef, stream)
        else:
            dx_rows_d(dy, drs, dcs, x, rs, cs, dx, ors, ocs, a0, a1, L, coef, stream)
    else:  # eval: dx does not depend on x, so an Inf in x must not reach it
        if floating is float:
            scale_rows_f(dy, drs, dcs, dx, ors, ocs, a0, a1, L, coef + 2 * L)
        else:
            scale_rows_d(dy, drs, dcs, dx, ors, ocs, a0, a1, L, coef + 2 * L)


cdef inline void _relu_sums_rows(const floating *dy, Py_ssize_t drs, Py_ssize_t dcs,
                                 const floating *x, Py_ssize_t rs, Py_ssize_t cs, Py_ssize_t a0,
                                 Py_ssize_t a1, Py_ssize_t L, const double *shift,
                                 const floating *fcoef, double *p0, double *p1) noexcept nogil:
    if floating is float:
        relu_sums_rows_f(dy, drs, dcs, x, rs, cs, a0, a1, L, shift, fcoef, p0, p1)
    else:
        relu_sums_rows_d(dy, drs, dcs, x, rs, cs, a0, a1, L, shift, fcoef, p0, p1)


cdef inline void _relu_dx_rows(const floating *dy, Py_ssize_t drs, Py_ssize_t dcs,
                               const floating *x, Py_ssize_t rs, Py_ssize_t cs, floating *dx,
                               Py_ssize_t ors, Py_ssize_t ocs, Py_ssize_t a0, Py_ssize_t a1,
                               Py_ssize_t L, const floating *coef, const floating *fcoef,
                               bint training) noexcept nogil:
    if floating is float:
        relu_dx_rows_f(dy, drs, dcs, x, rs, cs, dx, ors, ocs, a0, a1, L, coef, fcoef, training)
    else:
        relu_dx_rows_d(dy, drs, dcs, x, rs, cs, dx, ors, ocs, a0, a1, L, coef, fcoef, training)


# --- per-feature finishing steps, one feature at a time (the math is in _cy_finish_t.h) ----------

cdef inline void _forward_feature(double s1, double s2, double shift, double m, double eps,
                                  double weight, double bias, double *stats, Py_ssize_t C,
                                  floating *coef, Py_ssize_t W, Py_ssize_t c) noexcept nogil:
    """Feature c's statistics (stats (3, C)) and normalizing coefficients (coef (4, W)) from
    s1 = sum(x - shift) and s2 = sum((x - shift)**2) over its m values."""
    if floating is float:
        forward_feature_f(s1, s2, shift, m, eps, weight, bias, stats, C, coef, W, c, 1)
    else:
        forward_feature_d(s1, s2, shift, m, eps, weight, bias, stats, C, coef, W, c, 1)


cdef inline void _forward_coefs(floating *coef, Py_ssize_t W, Py_ssize_t c, double mean,
                                double invstd, double weight, double bias) noexcept nogil:
    """The forward's coefficients of feature c alone (ReLU backward rebuilds its mask)."""
    cdef double s = fbn_prescale_of(mean, invstd)
    if floating is float:
        forward_coefs_f(coef, W, c, mean, invstd, weight, bias, s)
    else:
        forward_coefs_d(coef, W, c, mean, invstd, weight, bias, s)


cdef inline void _grad_coefs(double sdy, double sdyx, double shift, double m, double mean,
                             double invstd, double weight, bint training, double *grads,
                             Py_ssize_t C, floating *coef, Py_ssize_t W,
                             Py_ssize_t c) noexcept nogil:
    """Feature c's dgamma, dbeta (grads (2, C)) and dx coefficients (coef (5, W))."""
    if floating is float:
        grad_coefs_f(sdy, sdyx, shift, m, mean, invstd, weight, training, grads, C, coef, W, c,
                     1)
    else:
        grad_coefs_d(sdy, sdyx, shift, m, mean, invstd, weight, training, grads, C, coef, W, c,
                     1)


# --- feature-inner helpers: columns, shifts, folds ---------------------------------------------
# Column j of a view (A, L) holds feature (j // B) % C, L = k * C * B.

cdef inline Py_ssize_t _quot(Py_ssize_t n, Py_ssize_t d) noexcept nogil:
    """n // d, and 0 for d == 0 (zero-size axes), as Numba's error_model="numpy" gives: with
    cdivision a C division by zero would kill the process."""
    return n // d if d != 0 else 0


cdef void _column_shifts(const floating *x, Py_ssize_t cs, Py_ssize_t L, Py_ssize_t C,
                         Py_ssize_t B, double *shift) noexcept nogil:
    cdef Py_ssize_t j = 0, r, c, b
    cdef double value
    if B == 1:  # one value per column: a loop the compiler vectorizes (the general one below
        # measured 1.4 ns a column, 0.7 us of a 3.5 us call on (2, 512))
        for c in range(C):
            shift[c] = x[c * cs]
        for r in range(1, _quot(L, C)):
            memcpy(shift + r * C, shift, C * sizeof(double))
        return
    for r in range(_quot(L, C * B)):
        for c in range(C):
            value = x[c * B * cs]
            for b in range(B):
                shift[j] = value
                j += 1


cdef void _fold_columns(const double *partial, Py_ssize_t S, Py_ssize_t nchunks, Py_ssize_t L,
                        Py_ssize_t C, Py_ssize_t B, double *sums) noexcept nogil:
    """partial (S, nchunks, L) -> per-feature sums (S, C), in the Numba kernels' order."""
    cdef Py_ssize_t s, t, j, r, c, b
    cdef double acc
    if B == 1:  # the same additions, vectorized (0.0 + p is p here: sums start at +0.0)
        fbn_fold_features(partial, S, nchunks, L, C, sums)
        return
    for s in range(S * C):
        sums[s] = 0.0
    for s in range(S):
        for t in range(nchunks):
            j = 0
            for r in range(_quot(L, C * B)):
                for c in range(C):
                    acc = 0.0
                    for b in range(B):
                        acc = acc + partial[(s * nchunks + t) * L + j]
                        j += 1
                    sums[s * C + c] += acc


cdef void _tile_columns(floating *coef, Py_ssize_t R, Py_ssize_t L, Py_ssize_t C,
                        Py_ssize_t B) noexcept nogil:
    """coef[:, j] = coef[:, feature of j], in place, from the last column down."""
    cdef Py_ssize_t j = L - 1, t, c, b, r
    if B == 1:  # tiles of whole rows of C: copies that do not overlap their source
        for r in range(R):
            for t in range(1, _quot(L, C)):
                memcpy(coef + r * L + t * C, coef + r * L, C * sizeof(floating))
        return
    for t in range(_quot(L, C * B)):
        for c in range(C - 1, -1, -1):
            for b in range(B):
                for r in range(R):
                    coef[r * L + j] = coef[r * L + c]
                j -= 1


cdef inline Py_ssize_t _row0(Py_ssize_t t, Py_ssize_t A, Py_ssize_t nchunks) noexcept nogil:
    return t * A // nchunks


# --- the kernels, one file per concern ---------------------------------------------------------

include "_cy_families.pxi"
include "_cy_entries.pxi"
include "_cy_phases.pxi"
include "_cy_half.pxi"
include "_cy_call.pxi"
