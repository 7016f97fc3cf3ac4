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


# --- scratch: one block kept between calls -----------------------------------------------------
# malloc and free of a call's 50-80 KB of scratch cost about 1 us on small arrays (glibc
# consolidates its free lists after a free of 64 KB or more). One block is kept and lent to one
# call at a time; both functions run with the GIL held, which makes the lending atomic. A call
# that finds it lent (another thread's, between its launch and its return) allocates its own.

cdef double *_fast_kept = NULL
cdef Py_ssize_t _fast_kept_bytes = 0
cdef bint _fast_kept_lent = False


cdef double *_fast_scratch(Py_ssize_t nbytes):
    """Scratch of ``nbytes``, NULL when out of memory; give it back with _fast_scratch_done."""
    global _fast_kept, _fast_kept_bytes, _fast_kept_lent
    if _fast_kept_lent or nbytes > _FAST_SCRATCH_KEEP:
        return <double *> malloc(nbytes)
    if _fast_kept_bytes < nbytes:
        free(_fast_kept)
        _fast_kept = <double *> malloc(nbytes)
        _fast_kept_bytes = nbytes if _fast_kept != NULL else 0
        if _fast_kept == NULL:
            return NULL
    _fast_kept_lent = True
    return _fast_kept


cdef void _fast_scratch_done(double *scratch):
    global _fast_kept_lent
    if scratch == _fast_kept:
        _fast_kept_lent = False
    else:
        free(scratch)


# --- checks: True where the Python path would accept the argument as the call path takes it --

cdef inline int _fast_float_type(object a):
    """NPY_FLOAT or NPY_DOUBLE for an exact, native-order, aligned ndarray of that type, else -1."""
    cdef cnp.ndarray arr
    cdef int t
    if not cnp.PyArray_CheckExact(a):
        return -1
    arr = <cnp.ndarray> a
    t = cnp.PyArray_TYPE(arr)
    if (t != cnp.NPY_FLOAT and t != cnp.NPY_DOUBLE) or not cnp.PyArray_ISNOTSWAPPED(arr) \
            or not cnp.PyArray_ISALIGNED(arr):
        return -1
    return t


cdef inline bint _fast_vector(object v, Py_ssize_t C):
    """A per-feature vector the Python path would pass on as it is (_validate.as_param)."""
    cdef cnp.ndarray arr
    if _fast_float_type(v) < 0:
        return False
    arr = <cnp.ndarray> v
    return (cnp.PyArray_NDIM(arr) == 1 and cnp.PyArray_DIM(arr, 0) == C
            and cnp.PyArray_ISCARRAY_RO(arr))


cdef inline bint _fast_real(object v, double *value):
    """An exact, finite Python float."""
    if type(v) is not float:
        return False
    value[0] = <double> v
    return isfinite(value[0])


cdef inline int _fast_relu(object activation):
    """0 for None, 1 for "relu", -1 otherwise."""
    if activation is None:
        return 0
    if type(activation) is str and activation == "relu":
        return 1
    return -1


cdef bint _fast_cython_chosen(object backend):
    """True where the Python path would run the Cython backend (fastbn._backends.resolve_backend)
    without an error: ``backend``, else $FASTBN_BACKEND (os.environ writes through to the C
    environment), else the default; and the backends have been listed once already."""
    cdef const char *env
    available = _fast_backends_mod._available
    if available is None or len(available) == 0 or available[0] != "cython":
        return False  # not listed yet (the Python path lists them), or Cython is not first
    if backend is None:
        env = getenv("FASTBN_BACKEND")
        return env == NULL or env[0] == 0 or strcmp(env, "cython") == 0
    return type(backend) is str and backend == "cython"


cdef inline void _fast_extent(cnp.ndarray arr, char **lo, char **hi):
    """The bytes an array's elements span, [lo, hi), as np.may_share_memory bounds them."""
    cdef char *low = cnp.PyArray_BYTES(arr)
    cdef char *high = low
    cdef int i
    cdef Py_ssize_t step
    for i in range(cnp.PyArray_NDIM(arr)):
        step = (cnp.PyArray_DIM(arr, i) - 1) * cnp.PyArray_STRIDE(arr, i)
        if step < 0:
            low += step
        else:
            high += step
    lo[0] = low
    hi[0] = high + cnp.PyArray_ITEMSIZE(arr)


cdef bint _fast_disjoint(cnp.ndarray a, cnp.ndarray b):
    cdef char *alo
    cdef char *ahi
    cdef char *blo
    cdef char *bhi
    _fast_extent(a, &alo, &ahi)
    _fast_extent(b, &blo, &bhi)
    return ahi <= blo or bhi <= alo


cdef bint _fast_same_strides(cnp.ndarray a, cnp.ndarray b):
    cdef int i
    for i in range(cnp.PyArray_NDIM(a)):
        if cnp.PyArray_STRIDE(a, i) != cnp.PyArray_STRIDE(b, i):
            return False
    return True


cdef bint _fast_out_ok(cnp.ndarray o, cnp.ndarray x, cnp.ndarray alias):
    """``out`` as _validate._out accepts it without the exact overlap test, with x's strides
    (so that x's view serves it): x itself, a view of x's very elements, or disjoint from x
    (and from ``alias``, dy in backward)."""
    cdef int i
    if cnp.PyArray_NDIM(o) != cnp.PyArray_NDIM(x) or cnp.PyArray_TYPE(o) != cnp.PyArray_TYPE(x):
        return False
    for i in range(cnp.PyArray_NDIM(x)):
        if cnp.PyArray_DIM(o, i) != cnp.PyArray_DIM(x, i):
            return False
    if not (cnp.PyArray_ISWRITEABLE(o) and _fast_same_strides(o, x)):
        return False
    for arr in (x, alias):
        if arr is None or o is arr or cnp.PyArray_BYTES(o) == cnp.PyArray_BYTES(<cnp.ndarray> arr):
            continue  # same shape and strides: the same view
        if not _fast_disjoint(o, <cnp.ndarray> arr):
            return False
    return True


# --- plans ------------------------------------------------------------------------------------

cdef bint _fast_key_matches(FastPlan *p, cnp.ndarray x, int axis):
    cdef int i
    if p.ndim != cnp.PyArray_NDIM(x) or p.axis != axis \
            or p.itemsize != cnp.PyArray_ITEMSIZE(x):
        return False
    for i in range(p.ndim):
        if p.shape[i] != cnp.PyArray_DIM(x, i) or p.strides[i] != cnp.PyArray_STRIDE(x, i):
            return False
    return True


cdef void _fast_set_view(Strided *v, Py_ssize_t *offset, cnp.ndarray view, cnp.ndarray base,
                         Py_ssize_t item):
    cdef Strided s = _strided(view)
    s.data = NULL
    v[0] = s
    offset[0] = cnp.PyArray_BYTES(view) - cnp.PyArray_BYTES(base)


cdef FastPlan *_fast_plan(cnp.ndarray x, int axis) except? NULL:
    """The cached plan of x's layout, made from fastbn._plans.plan on a miss; NULL where x's
    layout is not one the call path serves."""
    global _fast_nplans, _fast_next_slot, _fast_last
    cdef int i
    cdef FastPlan *p = &_fast_plans[_fast_last]
    if _fast_last < _fast_nplans and _fast_key_matches(p, x, axis):
        return p if p.usable else NULL
    for i in range(_fast_nplans):
        p = &_fast_plans[i]
        if _fast_key_matches(p, x, axis):
            _fast_last = i
            return p if p.usable else NULL
    # a miss: the Python plan, and the views it gives for x and for a fresh output
    cdef FastPlan new
    cdef Py_ssize_t item = cnp.PyArray_ITEMSIZE(x)
    plans = _fast_plans_mod
    plan = plans.plan(x, axis)
    new.ndim = cnp.PyArray_NDIM(x)
    new.axis = axis
    new.itemsize = item
    for i in range(new.ndim):
        new.shape[i] = cnp.PyArray_DIM(x, i)
        new.strides[i] = cnp.PyArray_STRIDE(x, i)
    x_view = plan.view_of(x)
    new.usable = x_view is not None and x_view.flags.aligned
    if new.usable:
        y, y_view, _ = plan.output_view(None, x)
        new.usable = y_view.flags.aligned and y.ndim == new.ndim
    if new.usable:
        new.inner = bool(plan.inner)
        new.B = plan.B
        new.C = x.shape[axis]
        new.nchunks = plans._chunks(plan.shape[0], x.nbytes)
        _fast_set_view(&new.view, &new.view_offset, x_view, x, item)
        _fast_set_view(&new.out_view, &new.out_view_offset, y_view, y, item)
        for i in range(new.ndim):
            new.out_strides[i] = cnp.PyArray_STRIDE(<cnp.ndarray> y, i)
        new.group_min_run_bytes = plans.GROUP_MIN_RUN_BYTES
        new.group_bytes = plans.GROUP_BYTES
        new.groups_per_thread = plans.GROUPS_PER_THREAD
    i = _fast_next_slot
    _fast_plans[i] = new
    _fast_next_slot = (i + 1) % _FAST_CACHE_SIZE
    if _fast_nplans < _FAST_CACHE_SIZE:
        _fast_nplans += 1
    _fast_last = i
    return &_fast_plans[i] if new.usable else NULL


cdef Py_ssize_t _fast_groups(const FastPlan *p, int threads, Py_ssize_t budget) noexcept nogil:
    """fastbn._plans._groups of the plan's (A, C, B) view."""
    cdef Py_ssize_t A = p.view.n0, C = p.view.n1, B = p.view.n2
    cdef Py_ssize_t by_cache, per_thread, want
    if B * p.itemsize < p.group_min_run_bytes:
        return max(1, C)
    by_cache = max(1, budget // max(1, A * B * p.itemsize))
    per_thread = (C + threads - 1) // threads
    want = max(p.groups_per_thread, (per_thread + by_cache - 1) // by_cache)
    return max(1, min(C, threads * want))


# --- threads: fastbn._backends.launch_threads and _cython_launch ------------------------------

cdef int _fast_threads(int key, Py_ssize_t nbytes) except -1:
    """Threads for the launch: fastbn._backends.launch_threads("cython", ...)."""
    b = _fast_backends_mod
    forced = b._forced
    if forced is None:
        parallel = nbytes >= b.PARALLEL_MIN_BYTES[_FAST_KEYS[key]]
    else:
        parallel = forced
    if not parallel:
        return 1
    n = b._num_threads
    if n is None:
        n = b.get_num_threads()
    return n


cdef object _fast_team(int threads):
    """The team lock taken for a launch on ``threads`` threads, None when the kernel runs on
    the calling thread instead (one OpenMP team at a time; serial in a forked child)."""
    b = _fast_backends_mod
    if b._forked_child:
        return None
    lock = b._team_lock
    return lock if lock.acquire(False) else None


# --- per-feature vectors as float64 pointers --------------------------------------------------

cdef inline const double *_fast_param(object v, double *slot, Py_ssize_t C, double fill):
    """A float64 vector's data; a float32 one converted into ``slot``; None as ``fill``."""
    cdef Py_ssize_t i
    cdef const float *src
    if v is None:
        for i in range(C):
            slot[i] = fill
        return slot
    if cnp.PyArray_TYPE(<cnp.ndarray> v) == cnp.NPY_DOUBLE:
        return <const double *> cnp.PyArray_DATA(<cnp.ndarray> v)
    src = <const float *> cnp.PyArray_DATA(<cnp.ndarray> v)
    for i in range(C):
        slot[i] = src[i]
    return slot


cdef void _fast_ulps(object mean, double *slot, Py_ssize_t C):
    """abs(np.spacing(mean)) in mean's own dtype (as _validate.backward_args), as float64:
    the magnitude's bit pattern plus one is the next float away from zero (the largest finite
    one goes to Inf, as nextafter; NaN stays NaN), without a libm call per feature; Inf gives
    NaN, as np.spacing."""
    cdef Py_ssize_t i
    cdef const uint32_t *mf
    cdef const uint64_t *md
    cdef uint32_t fb, fb1
    cdef uint64_t db, db1
    cdef float fa, fn
    cdef double da, dn
    if cnp.PyArray_TYPE(<cnp.ndarray> mean) == cnp.NPY_FLOAT:
        mf = <const uint32_t *> cnp.PyArray_DATA(<cnp.ndarray> mean)
        for i in range(C):
            fb = mf[i] & 0x7fffffffu
            if fb == 0x7f800000u:
                slot[i] = NAN
                continue
            fb1 = fb + 1
            memcpy(&fa, &fb, 4)
            memcpy(&fn, &fb1, 4)
            slot[i] = <double> (fn - fa)
    else:
        md = <const uint64_t *> cnp.PyArray_DATA(<cnp.ndarray> mean)
        for i in range(C):
            db = md[i] & 0x7fffffffffffffffu
            if db == 0x7ff0000000000000u:
                slot[i] = NAN
                continue
            db1 = db + 1
            memcpy(&da, &db, 8)
            memcpy(&dn, &db1, 8)
            slot[i] = dn - da


cdef object _fast_vector_out(const double *src, Py_ssize_t C, int x_type):
    """A (C,) result in the statistics' dtype: float64 for float64 x, else float32."""
    cdef cnp.npy_intp n = C
    cdef Py_ssize_t i
    cdef float *f
    out = cnp.PyArray_EMPTY(1, &n, cnp.NPY_DOUBLE if x_type == cnp.NPY_DOUBLE else cnp.NPY_FLOAT,
                            0)
    if x_type == cnp.NPY_DOUBLE:
        memcpy(cnp.PyArray_DATA(<cnp.ndarray> out), src, C * sizeof(double))
    else:
        f = <float *> cnp.PyArray_DATA(<cnp.ndarray> out)
        for i in range(C):
            f[i] = <float> src[i]
    return out


cdef object _fast_output(cnp.ndarray x, FastPlan *p):
    """A fresh output in the Python path's memory order (_plans.Plan.output_view)."""
    descr = <object> cnp.PyArray_DESCR(x)
    Py_INCREF(descr)
    return _fbn_new_from_descr(<PyTypeObject *> cnp.ndarray, <_fbn_descr *> descr, p.ndim,
                               cnp.PyArray_DIMS(x), <cnp.npy_intp *> p.out_strides, NULL, 0, NULL)


cdef inline Strided _fast_view_of(const FastPlan *p, cnp.ndarray arr, bint fresh,
                                  Py_ssize_t nbytes):
    cdef Strided v = p.out_view if fresh else p.view
    v.data = cnp.PyArray_BYTES(arr) + (p.out_view_offset if fresh else p.view_offset)
    v.stream = nbytes >= _stream_min_bytes
    return v


cdef inline bint _fast_prologue(object axis, int ndim, int *ax):
    """axis as an exact int in range, normalized."""
    cdef int overflow = 0
    cdef long a
    if type(axis) is not int:
        return False
    a = PyLong_AsLongAndOverflow(axis, &overflow)
    if overflow or a < -ndim or a >= ndim:
        return False
    ax[0] = <int> (a + ndim if a < 0 else a)
    return True


# --- forward ------------------------------------------------------------------------------------

cdef void _fast_update_running(floating *rm, floating *rv, const double *stats, Py_ssize_t C,
                               double momentum, double var_factor) noexcept nogil:
    """update_running_f/d of _cy_runs_t.h: the operations of the Cython kernels'
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


# --- PyTorch tensors: the call path over a tensor's own memory ----------------------------------
# fastbn.torch's eager calls come here first: each tensor becomes an ndarray header over its
# memory (its data pointer, shape and strides; cheaper than Tensor.numpy(), which costs about
# 0.8 us a tensor with its detach), and the call goes on as fast_forward / fast_backward above,
# so that what it serves and computes is theirs. PyTorch's dtype and layout objects are handed
# over by fastbn._torch_ops (this module does not import torch).

cdef object _torch_float32 = None
cdef object _torch_float64 = None
cdef object _torch_strided = None


def fast_torch_register(float32, float64, strided):
    """PyTorch's torch.float32, torch.float64 and torch.strided, which the calls below compare
    tensors' dtype and layout with."""
    global _torch_float32, _torch_float64, _torch_strided
    _torch_float32, _torch_float64, _torch_strided = float32, float64, strided


cdef object _fast_tensor(object t):
    """An ndarray over a CPU, strided float32/float64 tensor's memory (no copy, no reference
    to the tensor: the caller keeps it alive for the call), else None."""
    cdef cnp.npy_intp dims[_FAST_MAX_DIMS]
    cdef cnp.npy_intp strides[_FAST_MAX_DIMS]
    cdef int typenum, nd, i
    cdef Py_ssize_t item
    dtype = t.dtype
    if dtype is _torch_float32:
        typenum, item = cnp.NPY_FLOAT, 4
    elif dtype is _torch_float64:
        typenum, item = cnp.NPY_DOUBLE, 8
    else:
        return None
    if t.is_cpu is not True or t.layout is not _torch_strided:
        return None
    shape = t.shape
    stride = t.stride()
    nd = len(shape)
    if nd > _FAST_MAX_DIMS:
        return None
    for i in range(nd):
        dims[i] = shape[i]
        strides[i] = stride[i] * item
    # NumPy sets the aligned and contiguity flags from the pointer and strides
    return cnp.PyArray_New(cnp.ndarray, nd, dims, typenum, strides,
                           <void *> <size_t> t.data_ptr(), 0, cnp.NPY_ARRAY_WRITEABLE, None)


def fast_torch_forward(x, y, weight, bias, running_mean, running_var, training, momentum, eps,
                       relu, unbiased_running_var=True):
    """fast_forward on tensors: writes y (a tensor of x's shape and strides) and, in training,
    updates the running statistics in place; returns the ForwardResult (its ``y`` an ndarray
    over y's memory, its mean and invstd ndarrays of their own), or None when the call is not
    served (then nothing was written). Running statistics that require grad are not served."""
    if (running_mean is not None and running_mean.requires_grad) \
            or (running_var is not None and running_var.requires_grad):
        return None
    xa = _fast_tensor(x)
    ya = _fast_tensor(y)
    wa = None if weight is None else _fast_tensor(weight)
    ba = None if bias is None else _fast_tensor(bias)
    rma = None if running_mean is None else _fast_tensor(running_mean)
    rva = None if running_var is None else _fast_tensor(running_var)
    if xa is None or ya is None or (wa is None and weight is not None) \
            or (ba is None and bias is not None) or (rma is None and running_mean is not None) \
            or (rva is None and running_var is not None):
        return None
    return _fast_forward(xa, wa, ba, 1, training, rma, rva, momentum, eps,
                         "relu" if relu is True else None, ya, None, unbiased_running_var)


def fast_torch_backward(dy, x, mean, invstd, weight, bias, training, relu, dx):
    """fast_backward on tensors dy, x, weight, bias and dx (x's shape and strides, written),
    with ``mean`` and ``invstd`` the ndarrays fast_torch_forward returned; the BackwardResult
    (dgamma and dbeta ndarrays of their own), or None when the call is not served."""
    ga = _fast_tensor(dy)
    xa = _fast_tensor(x)
    oa = _fast_tensor(dx)
    wa = None if weight is None else _fast_tensor(weight)
    ba = None if bias is None else _fast_tensor(bias)
    if ga is None or xa is None or oa is None or (wa is None and weight is not None) \
            or (ba is None and bias is not None):
        return None
    return _fast_backward(ga, xa, mean, invstd, wa, ba, 1, training,
                          "relu" if relu is True else None, oa, None)
