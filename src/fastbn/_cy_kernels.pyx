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


# --- per-feature finishing steps, one feature at a time (the math is in _cy_runs_t.h) ------------

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
    # every feature's statistics and coefficients, vectorized (_cy_runs_t.h)
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
    # every feature's gradients and dx coefficients, vectorized (_cy_runs_t.h)
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


# --- entry points: the Numba kernels' names and arguments, after ``threads`` ----------------
# Pointers are taken with the GIL held; the loops run without it.

cdef inline int _checked(int status) except -1:
    if status != 0:
        raise MemoryError("fastbn: no memory for the kernel's scratch sums")
    return 0


cdef inline void *_data(cnp.ndarray arr):
    return cnp.PyArray_DATA(arr)


def forward_train_outer(int threads, cnp.ndarray x, cnp.ndarray y, cnp.ndarray weight,
                        cnp.ndarray bias, double eps, cnp.ndarray stats, cnp.ndarray coef,
                        bint relu, Py_ssize_t ngroups):
    """Training forward on a (A, C, B) view, by ``ngroups`` groups of adjacent features (group g:
    features _row0(g, C, ngroups) to _row0(g + 1, C, ngroups); see _plans._groups)."""
    cdef Strided xv = _strided(x), yv = _strided(y)
    cdef _Params64 params = _Params64(cnp.PyArray_DIM(weight, 0), 2)
    cdef const double *w = params.of(weight)
    cdef const double *b = params.of(bias)
    cdef double *st = _f64(stats)
    cdef void *cf = _data(coef)
    cdef bint f32 = _is_float(x)
    cdef double *sums = <double *> malloc(2 * xv.n1 * sizeof(double))
    _checked(0 if sums != NULL else -1)
    with nogil:
        if f32:
            _forward_train_outer(xv, yv, w, b, eps, st, <float *> cf, relu, ngroups, threads, sums)
        else:
            _forward_train_outer(xv, yv, w, b, eps, st, <double *> cf, relu, ngroups, threads,
                                 sums)
        free(sums)


def forward_train_inner(int threads, cnp.ndarray x, cnp.ndarray y, cnp.ndarray weight,
                        cnp.ndarray bias, double eps, cnp.ndarray stats, cnp.ndarray coef,
                        Py_ssize_t nchunks, Py_ssize_t B, bint relu):
    """Training forward on a feature-inner view (A, L)."""
    cdef Strided xv = _strided(x), yv = _strided(y)
    cdef Py_ssize_t C = cnp.PyArray_DIM(weight, 0)
    cdef _Params64 params = _Params64(C, 2)
    cdef const double *w = params.of(weight)
    cdef const double *b = params.of(bias)
    cdef double *st = _f64(stats)
    cdef void *cf = _data(coef)
    cdef bint f32 = _is_float(x)
    cdef int status
    with nogil:
        if f32:
            status = _forward_train_inner(xv, yv, w, b, eps, st, <float *> cf, C, nchunks, B,
                                          relu, threads)
        else:
            status = _forward_train_inner(xv, yv, w, b, eps, st, <double *> cf, C, nchunks, B,
                                          relu, threads)
    _checked(status)


def normalize_outer(int threads, cnp.ndarray x, cnp.ndarray y, cnp.ndarray coef, bint relu):
    """y = (x * s - mean_hi) * scale + shift' on a (A, C, B) view."""
    cdef Strided xv = _strided(x), yv = _strided(y)
    cdef void *cf = _data(coef)
    cdef bint f32 = _is_float(x)
    with nogil:
        if f32:
            _normalize_outer(xv, yv, <const float *> cf, relu, threads)
        else:
            _normalize_outer(xv, yv, <const double *> cf, relu, threads)


def normalize_inner(int threads, cnp.ndarray x, cnp.ndarray y, cnp.ndarray coef,
                    Py_ssize_t nchunks, bint relu):
    """The same on a feature-inner view, with coefficients tiled to its columns."""
    cdef Strided xv = _strided(x), yv = _strided(y)
    cdef void *cf = _data(coef)
    cdef bint f32 = _is_float(x)
    with nogil:
        if f32:
            _normalize_inner(xv, yv, <const float *> cf, nchunks, relu, threads)
        else:
            _normalize_inner(xv, yv, <const double *> cf, nchunks, relu, threads)


def backward_outer(int threads, cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx,
                   cnp.ndarray mean_in, cnp.ndarray mean_ulp, cnp.ndarray invstd_in,
                   cnp.ndarray weight, bint training, cnp.ndarray grads, cnp.ndarray coef,
                   Py_ssize_t ngroups):
    """Backward on (A, C, B) views, by ``ngroups`` groups of adjacent features (as
    forward_train_outer)."""
    cdef Strided gv = _strided(dy), xv = _strided(x), ov = _strided(dx)
    # params owns any float32 vector's float64 copy: it must outlive the kernel
    cdef _Params64 params = _Params64(cnp.PyArray_DIM(weight, 0), 4)
    cdef Features f = _features(params, mean_in, mean_ulp, invstd_in, weight, None, training,
                                grads)
    cdef void *cf = _data(coef)
    cdef bint f32 = _is_float(x)
    cdef double *sums = <double *> malloc(3 * xv.n1 * sizeof(double))
    _checked(0 if sums != NULL else -1)
    with nogil:
        if f32:
            _backward_outer(gv, xv, ov, f, <float *> cf, ngroups, threads, sums)
        else:
            _backward_outer(gv, xv, ov, f, <double *> cf, ngroups, threads, sums)
        free(sums)


def backward_inner(int threads, cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx,
                   cnp.ndarray mean_in, cnp.ndarray mean_ulp, cnp.ndarray invstd_in,
                   cnp.ndarray weight, bint training, cnp.ndarray grads, cnp.ndarray coef,
                   Py_ssize_t nchunks, Py_ssize_t B):
    """Backward on feature-inner views (A, L)."""
    cdef Strided gv = _strided(dy), xv = _strided(x), ov = _strided(dx)
    cdef Py_ssize_t C = cnp.PyArray_DIM(weight, 0)
    # params owns any float32 vector's float64 copy: it must outlive the kernel
    cdef _Params64 params = _Params64(cnp.PyArray_DIM(weight, 0), 4)
    cdef Features f = _features(params, mean_in, mean_ulp, invstd_in, weight, None, training,
                                grads)
    cdef void *cf = _data(coef)
    cdef bint f32 = _is_float(x)
    cdef int status
    with nogil:
        if f32:
            status = _backward_inner(gv, xv, ov, f, <float *> cf, C, nchunks, B, threads)
        else:
            status = _backward_inner(gv, xv, ov, f, <double *> cf, C, nchunks, B, threads)
    _checked(status)


def backward_relu_outer(int threads, cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx,
                        cnp.ndarray mean_in, cnp.ndarray mean_ulp, cnp.ndarray invstd_in,
                        cnp.ndarray weight, cnp.ndarray bias, bint training,
                        cnp.ndarray grads, cnp.ndarray coef, cnp.ndarray fcoef):
    """Backward of relu(batch_norm(x)) on (A, C, B) views, per feature."""
    cdef Strided gv = _strided(dy), xv = _strided(x), ov = _strided(dx)
    # params owns any float32 vector's float64 copy: it must outlive the kernel
    cdef _Params64 params = _Params64(cnp.PyArray_DIM(weight, 0), 5)
    cdef Features f = _features(params, mean_in, mean_ulp, invstd_in, weight, bias, training,
                                grads)
    cdef void *cf = _data(coef)
    cdef void *fc = _data(fcoef)
    cdef bint f32 = _is_float(x)
    with nogil:
        if f32:
            _backward_relu_outer(gv, xv, ov, f, <float *> cf, <float *> fc, threads)
        else:
            _backward_relu_outer(gv, xv, ov, f, <double *> cf, <double *> fc, threads)


def backward_relu_inner(int threads, cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx,
                        cnp.ndarray mean_in, cnp.ndarray mean_ulp, cnp.ndarray invstd_in,
                        cnp.ndarray weight, cnp.ndarray bias, bint training,
                        cnp.ndarray grads, cnp.ndarray coef, cnp.ndarray fcoef,
                        Py_ssize_t nchunks, Py_ssize_t B):
    """Backward of relu(batch_norm(x)) on feature-inner views (A, L)."""
    cdef Strided gv = _strided(dy), xv = _strided(x), ov = _strided(dx)
    cdef Py_ssize_t C = cnp.PyArray_DIM(weight, 0)
    # params owns any float32 vector's float64 copy: it must outlive the kernel
    cdef _Params64 params = _Params64(cnp.PyArray_DIM(weight, 0), 5)
    cdef Features f = _features(params, mean_in, mean_ulp, invstd_in, weight, bias, training,
                                grads)
    cdef void *cf = _data(coef)
    cdef void *fc = _data(fcoef)
    cdef bint f32 = _is_float(x)
    cdef int status
    with nogil:
        if f32:
            status = _backward_relu_inner(gv, xv, ov, f, <float *> cf, <float *> fc, C, nchunks,
                                          B, threads)
        else:
            status = _backward_relu_inner(gv, xv, ov, f, <double *> cf, <double *> fc, C,
                                          nchunks, B, threads)
    _checked(status)


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


def tile_columns(cnp.ndarray coef, Py_ssize_t C, Py_ssize_t B):
    """coef[:, j] = coef[:, feature of column j] for every column j, in place."""
    cdef Py_ssize_t R = cnp.PyArray_DIM(coef, 0), L = cnp.PyArray_DIM(coef, 1)
    if _is_float(coef):
        _tile_columns(<float *> _data(coef), R, L, C, B)
    else:
        _tile_columns(<double *> _data(coef), R, L, C, B)


cdef void _eval_coefficients(const double *running_mean, const double *running_var,
                             const double *weight, const double *bias, double eps,
                             double *stats, floating *coef, Py_ssize_t C,
                             Py_ssize_t W) noexcept nogil:
    # every feature's statistics and coefficients, vectorized (_cy_runs_t.h)
    if floating is float:
        finish_eval_f(running_mean, running_var, C, eps, weight, bias, stats, coef, W)
    else:
        finish_eval_d(running_mean, running_var, C, eps, weight, bias, stats, coef, W)


def eval_coefficients(cnp.ndarray running_mean, cnp.ndarray running_var, cnp.ndarray weight,
                      cnp.ndarray bias, double eps, cnp.ndarray stats, cnp.ndarray coef):
    """Eval-mode statistics and coefficients from the running statistics ((C,), float32 or
    float64, contiguous); coef (4, W) gets them in its first C columns."""
    cdef Py_ssize_t C = cnp.PyArray_DIM(weight, 0), W = cnp.PyArray_DIM(coef, 1)
    cdef _Params64 params = _Params64(C, 4)
    cdef const double *rm = params.of(running_mean)
    cdef const double *rv = params.of(running_var)
    cdef const double *w = params.of(weight)
    cdef const double *b = params.of(bias)
    if _is_float(coef):
        _eval_coefficients(rm, rv, w, b, eps, _f64(stats), <float *> _data(coef), C, W)
    else:
        _eval_coefficients(rm, rv, w, b, eps, _f64(stats), <double *> _data(coef), C, W)


cdef void _update_running(floating *rm, Py_ssize_t sm, floating *rv, Py_ssize_t sv,
                          const double *stats, Py_ssize_t C, double momentum,
                          double var_factor) noexcept nogil:
    cdef double new_mean, new_var
    cdef Py_ssize_t c
    for c in range(C):
        new_mean = (1.0 - momentum) * rm[c * sm] + momentum * stats[c]
        new_var = (1.0 - momentum) * rv[c * sv] + momentum * (stats[C + c] * var_factor)
        rm[c * sm] = <floating> new_mean
        rv[c * sv] = <floating> new_var


def update_running_stats(cnp.ndarray running_mean, cnp.ndarray running_var, cnp.ndarray stats,
                         double momentum, double var_factor):
    """The twin of fastbn._common.update_running_stats (same operations, same bits), for
    running statistics of one dtype, float32 or float64, with aligned element strides.
    ``var_factor`` multiplies the batch variance (m / (m - 1): unbiased; 1.0: biased)."""
    cdef Strided mv = _strided(running_mean), vv = _strided(running_var)
    if _is_float(running_mean):
        _update_running(<float *> mv.data, mv.s0, <float *> vv.data, vv.s0, _f64(stats),
                        mv.n0, momentum, var_factor)
    else:
        _update_running(<double *> mv.data, mv.s0, <double *> vv.data, vv.s0, _f64(stats),
                        mv.n0, momentum, var_factor)


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


# --- the compiled call path (fast_forward, fast_backward): see _cy_call.pxi ----------------

include "_cy_call.pxi"
