# Part of the compiled call path, included by _cy_call.pxi (whose note says what it serves
# and why): the scratch, the checks, the plans, the thread count and the per-feature vectors
# that a call needs before its launch.

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
