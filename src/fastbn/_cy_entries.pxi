# Part of fastbn._cy_kernels, included by _cy_kernels.pyx after its declarations, shims and
# helpers; that file's note says how the layers stack.

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
    # every feature's statistics and coefficients, vectorized (_cy_finish_t.h)
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
