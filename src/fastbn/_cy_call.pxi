# --- the compiled call path: a common call checked, planned and launched in C -----------------
# Included at the end of _cy_kernels.pyx, so that it calls the kernels' C functions directly:
# no view arrays, no Python-level kernel call, no NumPy conversion of the per-feature vectors.
#
# fastbn.api.forward and fastbn.api.backward call fast_forward / fast_backward first. They
# serve the common case only: x (and dy) exact ndarrays of native float32 or float64, aligned,
# in a layout the plans fold without a copy; gamma, beta, mean and invstd None or contiguous
# float32/float64 vectors of length C; running statistics of x's dtype; exact Python bool,
# float and int options; activation None or "relu"; out None or an array of x's strides that
# does not partly overlap an input; the Cython backend chosen (argument, $FASTBN_BACKEND or
# the default). Anything else, every invalid argument included, returns None and the Python
# path (fastbn._validate, fastbn._dispatch) runs, so that every error and its message are the
# Python path's own; this code raises nothing of its own.
#
# What it computes is what the Python path computes, bit for bit: the same plan (taken from
# fastbn._plans on a cache miss: views, row blocks, output memory order), the same kernels with
# the same arguments, the same thread count (fastbn._backends: PARALLEL_MIN_BYTES, set_num_threads,
# forced_parallel), the same launch rules (one OpenMP team at a time, serial in a forked child)
# and the running statistics updated by the same operations, after the kernel and only once it
# ran.
#
# Files: this one holds the declarations, the plan cache and the two calls (fast_forward,
# fast_backward); _cy_call_checks.pxi the scratch, checks, plans, thread count and per-feature
# vectors they use; _cy_call_torch.pxi fastbn.torch's entry over tensors.

from cpython.long cimport PyLong_AsLongAndOverflow
from cpython.object cimport PyObject, PyTypeObject
from cpython.ref cimport Py_INCREF
from libc.math cimport NAN, isfinite
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport getenv
from libc.string cimport memset, strcmp

cdef extern from "numpy/arrayobject.h":
    ctypedef struct _fbn_descr "PyArray_Descr":
        pass
    # declared here with raw pointers: it steals the reference to ``descr``
    object _fbn_new_from_descr "PyArray_NewFromDescr" (
        PyTypeObject *subtype, _fbn_descr *descr, int nd, cnp.npy_intp *dims,
        cnp.npy_intp *strides, void *data, int flags, PyObject *obj)

cdef enum:
    #: A call's scratch up to this many bytes is kept for the next call (see _fast_scratch).
    _FAST_SCRATCH_KEEP = 1 << 20
    _FAST_MAX_DIMS = 8
    _FAST_CACHE_SIZE = 32
    #: Below this many bytes of x the kernel runs with the GIL held: releasing and taking it
    #: back costs more than the kernel on such arrays.
    _FAST_NOGIL_MIN_BYTES = 16384

cdef struct FastPlan:
    # the key: x's shape, strides (bytes) and itemsize, and the feature axis
    int ndim, axis
    Py_ssize_t itemsize
    Py_ssize_t shape[_FAST_MAX_DIMS]
    Py_ssize_t strides[_FAST_MAX_DIMS]
    # the plan: False where the Python path would copy x (or its views are not aligned)
    bint usable
    bint inner
    Py_ssize_t C, B, nchunks
    # the view of x (and of dy, and of an out of x's strides): shape and element strides,
    # and its first element's offset from x's data in bytes
    Strided view
    Py_ssize_t view_offset
    # a freshly allocated output: its strides (bytes, in x's logical order) and its view
    Py_ssize_t out_strides[_FAST_MAX_DIMS]
    Strided out_view
    Py_ssize_t out_view_offset
    # fastbn._plans' constants for the feature groups, read when the plan was made
    Py_ssize_t group_min_run_bytes, group_bytes, groups_per_thread


cdef FastPlan _fast_plans[_FAST_CACHE_SIZE]
cdef int _fast_nplans = 0, _fast_next_slot = 0, _fast_last = 0
cdef Py_ssize_t _fast_served = 0
cdef object _fast_backends_mod = None
cdef object _fast_plans_mod = None
cdef object _fast_forward_result = None
cdef object _fast_backward_result = None
cdef object _fast_tuple_new = tuple.__new__
cdef tuple _FAST_KEYS = (("cython", "inner", "forward"), ("cython", "outer", "forward"),
                         ("cython", "inner", "eval"), ("cython", "outer", "eval"),
                         ("cython", "inner", "backward"), ("cython", "outer", "backward"))


def fast_path_calls():
    """How many calls the compiled call path has served in this process (for the tests)."""
    return _fast_served


def fast_path_clear():
    """Forget the cached plans (they are rebuilt from fastbn._plans on the next call)."""
    global _fast_nplans, _fast_next_slot, _fast_last
    _fast_nplans = _fast_next_slot = _fast_last = 0


cdef bint _fast_modules():
    """Import what the call path reads from the Python layers, once."""
    global _fast_backends_mod, _fast_plans_mod, _fast_forward_result, _fast_backward_result
    if _fast_backends_mod is None:
        from fastbn import _backends, _common, _plans
        _fast_plans_mod = _plans
        _fast_forward_result = _common.ForwardResult
        _fast_backward_result = _common.BackwardResult
        _fast_backends_mod = _backends
    return True


include "_cy_call_checks.pxi"


# --- forward ------------------------------------------------------------------------------------

cdef void _fast_update_running(floating *rm, floating *rv, const double *stats, Py_ssize_t C,
                               double momentum, double var_factor) noexcept nogil:
    """update_running_f/d of _cy_finish_t.h: the operations of the Cython kernels'
    _update_running (the twin of fastbn._common.update_running_stats) on contiguous, disjoint
    vectors, the batch variance times ``var_factor``: m / (m - 1) for the unbiased variance,
    1.0 for the biased one."""
    if floating is float:
        update_running_f(rm, rv, stats, C, momentum, var_factor)
    else:
        update_running_d(rm, rv, stats, C, momentum, var_factor)


def fast_forward(x, gamma, beta, axis, training, running_mean, running_var, momentum, eps,
                 activation, out, backend, unbiased_running_var=True):
    """fastbn.forward's ForwardResult for a common call, or None: then the Python path runs
    (see the header of this section). Arguments as fastbn.forward's, all given but
    ``unbiased_running_var`` (True: the running variance takes the batch variance times
    m / (m - 1); False: the batch variance itself)."""
    return _fast_forward(x, gamma, beta, axis, training, running_mean, running_var, momentum,
                         eps, activation, out, backend, unbiased_running_var)


cdef object _fast_forward(x, gamma, beta, axis, training, running_mean, running_var, momentum,
                          eps, activation, out, backend, unbiased_running_var):
    cdef int xt = _fast_float_type(x)
    cdef cnp.ndarray xa, ya, rm, rv
    cdef int ax = 0, relu, threads, run_threads, op
    cdef bint train, fresh
    cdef double eps_ = 0.0, momentum_ = 0.0, var_factor = 1.0
    cdef Py_ssize_t C, m, size, nbytes, W, ngroups, item
    cdef FastPlan *p
    cdef FastPlan plan_copy
    cdef Strided xv, yv
    cdef double *scratch
    cdef double *stats
    cdef double *sums
    cdef double *slots
    cdef void *coef
    cdef const double *w
    cdef const double *b
    cdef const double *rmp
    cdef const double *rvp
    cdef int status = 0
    if xt < 0:
        return None
    xa = <cnp.ndarray> x
    if cnp.PyArray_NDIM(xa) < 2 or cnp.PyArray_NDIM(xa) > _FAST_MAX_DIMS \
            or not _fast_prologue(axis, cnp.PyArray_NDIM(xa), &ax):
        return None
    if training is True:
        train = True
    elif training is False:
        train = False
    else:
        return None
    if not (_fast_real(eps, &eps_) and eps_ > 0.0 and _fast_real(momentum, &momentum_)
            and 0.0 <= momentum_ <= 1.0):
        return None
    relu = _fast_relu(activation)
    size = cnp.PyArray_SIZE(xa)
    if relu < 0 or size == 0:
        return None
    C = cnp.PyArray_DIM(xa, ax)
    m = size // C
    if (gamma is not None and not _fast_vector(gamma, C)) \
            or (beta is not None and not _fast_vector(beta, C)):
        return None
    if running_mean is None and running_var is None:
        if not train:
            return None
        rm = rv = None
    else:
        if _fast_float_type(running_mean) != xt or _fast_float_type(running_var) != xt \
                or not _fast_vector(running_mean, C) or not _fast_vector(running_var, C):
            return None
        rm, rv = <cnp.ndarray> running_mean, <cnp.ndarray> running_var
        if train and not (cnp.PyArray_ISWRITEABLE(rm) and cnp.PyArray_ISWRITEABLE(rv)
                          and _fast_disjoint(rm, rv)):
            return None
    if train and m < 2:
        return None
    if unbiased_running_var is True:
        var_factor = m / (m - 1.0)
    elif unbiased_running_var is False:
        var_factor = 1.0
    else:
        return None
    if out is not None and (_fast_float_type(out) != xt
                            or not _fast_out_ok(<cnp.ndarray> out, xa, None)):
        return None
    _fast_modules()
    if not _fast_cython_chosen(backend):
        return None
    p = _fast_plan(xa, ax)
    if p == NULL:
        return None
    # a copy: the Python calls below may let another thread replace the cache entry
    plan_copy = p[0]
    p = &plan_copy
    # checks done: from here on the call is served
    fresh = out is None
    ya = _fast_output(xa, p) if fresh else <cnp.ndarray> out
    nbytes = cnp.PyArray_NBYTES(xa)
    item = p.itemsize
    xv = _fast_view_of(p, xa, False, nbytes)
    yv = _fast_view_of(p, ya, fresh, nbytes)
    W = p.view.n1 if p.inner else C
    op = (0 if train else 2) + (0 if p.inner else 1)
    threads = _fast_threads(op, nbytes)
    ngroups = 0 if p.inner or not train else _fast_groups(p, threads, p.group_bytes)
    # stats 3C, sums 2C, four per-feature slots 4C, coef 4 x W (at most 8 bytes each)
    scratch = _fast_scratch((9 * C + 4 * W) * sizeof(double))
    if scratch == NULL:
        return None
    stats, sums, slots = scratch, scratch + 3 * C, scratch + 5 * C
    coef = <void *> (scratch + 9 * C)
    w = _fast_param(gamma, slots, C, 1.0)
    b = _fast_param(beta, slots + C, C, 0.0)
    if not train:
        rmp = _fast_param(rm, slots + 2 * C, C, 0.0)
        rvp = _fast_param(rv, slots + 3 * C, C, 0.0)
        if xt == cnp.NPY_FLOAT:
            _eval_coefficients(rmp, rvp, w, b, eps_, stats, <float *> coef, C, W)
            if p.inner:
                _tile_columns(<float *> coef, 4, W, C, p.B)
        else:
            _eval_coefficients(rmp, rvp, w, b, eps_, stats, <double *> coef, C, W)
            if p.inner:
                _tile_columns(<double *> coef, 4, W, C, p.B)
    lock = _fast_team(threads) if threads > 1 else None
    run_threads = threads if lock is not None else 1
    try:
        if nbytes >= _FAST_NOGIL_MIN_BYTES:
            with nogil:
                status = _fast_forward_launch(xt, train, p, xv, yv, w, b, eps_, stats, coef,
                                              sums, relu, ngroups, run_threads)
        else:
            status = _fast_forward_launch(xt, train, p, xv, yv, w, b, eps_, stats, coef, sums,
                                          relu, ngroups, run_threads)
    finally:
        if lock is not None:
            lock.release()
    if status != 0:  # no memory for the kernel's scratch: the Python path says so
        _fast_scratch_done(scratch)
        return None
    if train and rm is not None:
        if xt == cnp.NPY_FLOAT:
            _fast_update_running(<float *> cnp.PyArray_DATA(rm), <float *> cnp.PyArray_DATA(rv),
                                 stats, C, momentum_, var_factor)
        else:
            _fast_update_running(<double *> cnp.PyArray_DATA(rm),
                                 <double *> cnp.PyArray_DATA(rv), stats, C, momentum_,
                                 var_factor)
    try:
        mean = _fast_vector_out(stats, C, xt)
        invstd = _fast_vector_out(stats + 2 * C, C, xt)
    finally:
        _fast_scratch_done(scratch)
    global _fast_served
    _fast_served += 1
    return _fast_tuple_new(_fast_forward_result, (ya, mean, invstd))


cdef int _fast_forward_launch(int xt, bint train, const FastPlan *p, Strided xv, Strided yv,
                              const double *w, const double *b, double eps, double *stats,
                              void *coef, double *sums, bint relu, Py_ssize_t ngroups,
                              int threads) noexcept nogil:
    if xt == cnp.NPY_FLOAT:
        if train and p.inner:
            return _forward_train_inner(xv, yv, w, b, eps, stats, <float *> coef, p.C,
                                        p.nchunks, p.B, relu, threads)
        if train:
            _forward_train_outer(xv, yv, w, b, eps, stats, <float *> coef, relu, ngroups,
                                 threads, sums)
        elif p.inner:
            _normalize_inner(xv, yv, <const float *> coef, p.nchunks, relu, threads)
        else:
            _normalize_outer(xv, yv, <const float *> coef, relu, threads)
    else:
        if train and p.inner:
            return _forward_train_inner(xv, yv, w, b, eps, stats, <double *> coef, p.C,
                                        p.nchunks, p.B, relu, threads)
        if train:
            _forward_train_outer(xv, yv, w, b, eps, stats, <double *> coef, relu, ngroups,
                                 threads, sums)
        elif p.inner:
            _normalize_inner(xv, yv, <const double *> coef, p.nchunks, relu, threads)
        else:
            _normalize_outer(xv, yv, <const double *> coef, relu, threads)
    return 0


# --- backward -----------------------------------------------------------------------------------

def fast_backward(dy, x, mean, invstd, gamma, beta, axis, training, activation, out, backend):
    """fastbn.backward's BackwardResult for a common call, or None: then the Python path runs.
    Arguments as fastbn.backward's, all given."""
    return _fast_backward(dy, x, mean, invstd, gamma, beta, axis, training, activation, out,
                          backend)


cdef object _fast_backward(dy, x, mean, invstd, gamma, beta, axis, training, activation, out,
                           backend):
    cdef int xt = _fast_float_type(x)
    cdef cnp.ndarray xa, ga, oa
    cdef int ax = 0, relu, threads, run_threads, i
    cdef bint train, fresh
    cdef Py_ssize_t C, m, size, nbytes, W, ngroups
    cdef FastPlan *p
    cdef FastPlan plan_copy
    cdef Strided xv, gv, ov
    cdef Features f
    cdef double *scratch
    cdef double *grads
    cdef double *sums
    cdef double *slots
    cdef void *coef
    cdef void *fcoef
    cdef int status = 0
    if xt < 0 or _fast_float_type(dy) != xt:
        return None
    xa, ga = <cnp.ndarray> x, <cnp.ndarray> dy
    if cnp.PyArray_NDIM(xa) < 2 or cnp.PyArray_NDIM(xa) > _FAST_MAX_DIMS \
            or cnp.PyArray_NDIM(ga) != cnp.PyArray_NDIM(xa) \
            or not _fast_prologue(axis, cnp.PyArray_NDIM(xa), &ax):
        return None
    for i in range(cnp.PyArray_NDIM(xa)):
        if cnp.PyArray_DIM(ga, i) != cnp.PyArray_DIM(xa, i):
            return None
    if not _fast_same_strides(ga, xa):
        return None
    if training is True:
        train = True
    elif training is False:
        train = False
    else:
        return None
    relu = _fast_relu(activation)
    size = cnp.PyArray_SIZE(xa)
    if relu < 0 or size == 0:
        return None
    C = cnp.PyArray_DIM(xa, ax)
    m = size // C
    if not (_fast_vector(mean, C) and _fast_vector(invstd, C)) \
            or (gamma is not None and not _fast_vector(gamma, C)) \
            or (beta is not None and not _fast_vector(beta, C)):
        return None
    if train and m < 2:
        return None
    if out is not None and (_fast_float_type(out) != xt
                            or not _fast_out_ok(<cnp.ndarray> out, xa, dy)):
        return None
    _fast_modules()
    if not _fast_cython_chosen(backend):
        return None
    p = _fast_plan(xa, ax)
    if p == NULL:
        return None
    plan_copy = p[0]  # as in fast_forward
    p = &plan_copy
    fresh = out is None
    oa = _fast_output(xa, p) if fresh else <cnp.ndarray> out
    nbytes = cnp.PyArray_NBYTES(xa)
    xv = _fast_view_of(p, xa, False, nbytes)
    gv = _fast_view_of(p, ga, False, nbytes)
    ov = _fast_view_of(p, oa, fresh, nbytes)
    W = p.view.n1 if p.inner else C
    threads = _fast_threads(4 if p.inner else 5, nbytes)
    # backward reads two arrays where forward reads one: half the budget (as _drivers)
    ngroups = 0 if p.inner or relu else _fast_groups(p, threads, p.group_bytes // 2)
    # grads 2C, sums 3C, five per-feature slots 5C, coef 5 x W, fcoef 4 x W
    scratch = _fast_scratch((10 * C + 9 * W) * sizeof(double))
    if scratch == NULL:
        return None
    grads, sums, slots = scratch, scratch + 2 * C, scratch + 5 * C
    coef, fcoef = <void *> (scratch + 10 * C), <void *> (scratch + 10 * C + 5 * W)
    memset(grads, 0, 2 * C * sizeof(double))
    f.mean = _fast_param(mean, slots, C, 0.0)
    _fast_ulps(mean, slots + C, C)
    f.mean_ulp = slots + C
    f.invstd = _fast_param(invstd, slots + 2 * C, C, 0.0)
    f.weight = _fast_param(gamma, slots + 3 * C, C, 1.0)
    f.bias = _fast_param(beta, slots + 4 * C, C, 0.0) if relu else NULL
    f.grads = grads
    f.training = train
    lock = _fast_team(threads) if threads > 1 else None
    run_threads = threads if lock is not None else 1
    try:
        if nbytes >= _FAST_NOGIL_MIN_BYTES:
            with nogil:
                status = _fast_backward_launch(xt, p, gv, xv, ov, f, coef, fcoef, sums, relu,
                                               ngroups, run_threads)
        else:
            status = _fast_backward_launch(xt, p, gv, xv, ov, f, coef, fcoef, sums, relu,
                                           ngroups, run_threads)
    finally:
        if lock is not None:
            lock.release()
    if status != 0:
        _fast_scratch_done(scratch)
        return None
    try:
        dgamma = _fast_vector_out(grads, C, xt)
        dbeta = _fast_vector_out(grads + C, C, xt)
    finally:
        _fast_scratch_done(scratch)
    global _fast_served
    _fast_served += 1
    return _fast_tuple_new(_fast_backward_result, (oa, dgamma, dbeta))


cdef int _fast_backward_launch(int xt, const FastPlan *p, Strided gv, Strided xv, Strided ov,
                               Features f, void *coef, void *fcoef, double *sums, bint relu,
                               Py_ssize_t ngroups, int threads) noexcept nogil:
    if xt == cnp.NPY_FLOAT:
        if relu and p.inner:
            return _backward_relu_inner(gv, xv, ov, f, <float *> coef, <float *> fcoef, p.C,
                                        p.nchunks, p.B, threads)
        if relu:
            _backward_relu_outer(gv, xv, ov, f, <float *> coef, <float *> fcoef, threads)
        elif p.inner:
            return _backward_inner(gv, xv, ov, f, <float *> coef, p.C, p.nchunks, p.B, threads)
        else:
            _backward_outer(gv, xv, ov, f, <float *> coef, ngroups, threads, sums)
    else:
        if relu and p.inner:
            return _backward_relu_inner(gv, xv, ov, f, <double *> coef, <double *> fcoef, p.C,
                                        p.nchunks, p.B, threads)
        if relu:
            _backward_relu_outer(gv, xv, ov, f, <double *> coef, <double *> fcoef, threads)
        elif p.inner:
            return _backward_inner(gv, xv, ov, f, <double *> coef, p.C, p.nchunks, p.B,
                                   threads)
        else:
            _backward_outer(gv, xv, ov, f, <double *> coef, ngroups, threads, sums)
    return 0


include "_cy_call_torch.pxi"
