"""Everything ``advgrad.kernels.cuda`` takes from numba-cuda beyond its documented API.

The rest of the package imports numba.cuda from here, and calls these functions where it
needs more than the documented API:

- the import itself: numba-cuda 0.30 overloads ``np.row_stack``, which numpy 2.5 removed, so
  the alias goes in first (here only), and the import's deprecation warnings are silenced;
- ``launch``: a kernel launch with one driver call (``cuLaunchKernel``), its parameters
  packed by hand as numba's array data model lays them out; it reads a compiled kernel's
  ``_codelibrary`` and a device array's ``_numba_type_``;
- ``as_device``: ``numba.cuda.devicearray.is_cuda_ndarray``;
- ``address_range``: on the simulator, a device array's host copy ``_ary``;
- ``device_count``: the driver's ``get_device_count``, which says why no GPU is usable.

``missing()`` names each of these that this numba-cuda lacks; tests/test_cuda.py asserts it
is empty, so that a numba-cuda release that changes one fails there, naming it.
"""

import ctypes
import inspect
import struct
import threading
import warnings
import weakref
from typing import NamedTuple

import numpy as np

# numba-cuda 0.30 overloads np.row_stack, which numpy 2.5 removed: alias it before the import.
vars(np).setdefault("row_stack", np.vstack)

with warnings.catch_warnings():  # numba-cuda 0.30 under numpy 2.5 warns as it is imported
    warnings.filterwarnings("ignore", "The 'generic' unit for NumPy timedelta", DeprecationWarning)
    from numba import config, cuda

__all__ = ["SIMULATOR", "cuda"]

SIMULATOR = bool(config.ENABLE_CUDASIM)
# A device array as numba passes it to a kernel (its data model's fields, in order); ``launch``
# packs them as meminfo, parent, size, itemsize, data, shape..., strides....
ARRAY_FIELDS = ("meminfo", "parent", "nitems", "itemsize", "data", "shape", "strides")


def as_device(array):
    """A numba device array viewing ``array`` (anything with ``__cuda_array_interface__``)."""
    return array if cuda.devicearray.is_cuda_ndarray(array) else cuda.as_cuda_array(array)


def device_count() -> int:
    """GPUs the CUDA driver sees (raises numba's CudaSupportError without a usable driver)."""
    from numba.cuda.cudadrv.driver import driver

    return driver.get_device_count()


class _Prepared(NamedTuple):
    """A compiled kernel and a reusable block for its launch parameters."""

    launch: object  # cuda.bindings.driver.cuLaunchKernel
    handle: int  # the driver's handle of the compiled kernel
    layout: struct.Struct  # the parameters as the driver reads them (natural alignment)
    block: ctypes.Array  # memory the parameters are packed into
    pointers: int  # address of an array of pointers to each parameter in block


_array_params: dict = {}  # id(array) -> (weak reference, type name, parameter values)
_prepared: dict = {}  # (kernel, argument kinds) -> _Prepared, or None for numba's own launch
_launch_lock = threading.Lock()
_thread = threading.local()


def _array_parameters(array) -> tuple:
    """(numba type name, launch parameter values) of a device array, computed once per array.

    numba passes an array as meminfo, parent, size, itemsize, data, shape..., strides....
    """
    cached = _array_params.get(id(array))
    if cached is None or cached[0]() is not array:
        pointer = array.device_ctypes_pointer.value or 0
        values = (0, 0, array.size, array.dtype.itemsize, pointer, *array.shape, *array.strides)
        if len(_array_params) >= 4096:
            _array_params.clear()
        kind = str(array._numba_type_)  # a string: it hashes fast, unlike numba's types
        cached = _array_params[id(array)] = (weakref.ref(array), kind, values)
    return cached[1], cached[2]


def _prepare(kernel, args) -> _Prepared | None:
    """Compile ``kernel`` for ``args`` and lay out its parameter block (None if this numba-cuda
    does not expose what is needed: then numba launches it)."""
    from cuda.bindings import driver

    compiled = kernel.compile(tuple(kernel.typeof_pyval(arg) for arg in args))
    library = getattr(compiled, "_codelibrary", None)
    if library is None:
        return None
    codes = ""
    for arg in args:
        if isinstance(arg, bool):
            codes += "?"
        elif isinstance(arg, int):
            codes += "q"
        elif isinstance(arg, float):
            codes += "d"
        else:
            codes += "QQqqQ" + "qq" * arg.ndim
    layout = struct.Struct("@" + codes)
    block = ctypes.create_string_buffer(max(layout.size, 1))
    offsets, end = [], 0
    for code in codes:
        size = struct.calcsize(code)
        offsets.append(end + -end % size)  # aligned to its size
        end = offsets[-1] + size
    pointers = (ctypes.c_void_p * len(offsets))(*(ctypes.addressof(block) + o for o in offsets))
    handle = int(library.get_cufunc().handle)  # a CUkernel, which launches as a CUfunction
    return _Prepared(driver.cuLaunchKernel, handle, layout, block, pointers)


def launch(kernel, grid, threads: int, stream, *args) -> None:
    """Queue ``kernel[grid, threads, stream](*args)`` with one driver call.

    numba's launch inspects and converts every argument on every call, tens of microseconds
    for these kernels; here an array's parameters are worked out once per array object and a
    kernel's parameter layout once per argument types. Arguments: device arrays and Python
    int, float and bool.
    """
    if SIMULATOR:
        kernel[grid, threads, stream](*args)
        return
    if not getattr(_thread, "has_context", False):
        cuda.current_context()  # the driver needs this thread to have the context current
        _thread.has_context = True
    values, kinds = [], [kernel]
    for arg in args:
        if isinstance(arg, (bool, int, float)):
            values.append(arg)
            kinds.append(type(arg))
        else:
            kind, params = _array_parameters(arg)
            values += params
            kinds.append(kind)
    key = tuple(kinds)
    if key not in _prepared:
        _prepared[key] = _prepare(kernel, args)
    prepared = _prepared[key]
    if prepared is None:
        kernel[grid, threads, stream](*args)
        return
    gx, gy, gz = grid if isinstance(grid, tuple) else (grid, 1, 1)
    stream_handle = 0 if isinstance(stream, int) else int(stream.handle)
    with _launch_lock:  # the parameter block is shared; the driver copies it at launch
        prepared.layout.pack_into(prepared.block, 0, *values)
        (status,) = prepared.launch(
            prepared.handle, gx, gy, gz, threads, 1, 1, 0, stream_handle, prepared.pointers, 0
        )
    if status != 0:
        raise RuntimeError(f"cuLaunchKernel failed with {status!r}")


def address_range(array) -> tuple[int, int]:
    """First and one-past-last byte address of a device array's elements."""
    if SIMULATOR:
        start, shape, strides = array._ary.ctypes.data, array.shape, array.strides
    else:  # the launch parameters hold the data pointer, the shape and the strides
        params = _array_parameters(array)[1]
        start, shape, strides = params[4], params[5 : 5 + array.ndim], params[5 + array.ndim :]
    low = high = start
    for length, stride in zip(shape, strides, strict=True):
        reach = (length - 1) * stride
        low, high = (low + reach, high) if reach < 0 else (low, high + reach)
    return low, high + array.dtype.itemsize


def missing() -> list[str]:
    """The numba-cuda internals this module uses that this numba-cuda lacks, each named.

    On the simulator: what ``as_device`` and ``address_range`` read. Otherwise (no GPU
    needed): the attributes and functions ``launch``, ``as_device`` and ``device_count``
    read, the kernel attribute ``_codelibrary`` as ``numba.cuda.dispatcher._Kernel`` sets
    it, and the array data model's fields (``ARRAY_FIELDS``). With a GPU, also a real
    ``launch`` of a small kernel through the driver rather than numba's fallback, once the
    rest is found. An empty list: everything is where this module looks for it.
    """
    found = []

    def need(owner, name: str, where: str) -> None:
        if not hasattr(owner, name):
            found.append(f"{where}.{name}")

    need(cuda, "devicearray", "numba.cuda")
    need(getattr(cuda, "devicearray", None), "is_cuda_ndarray", "numba.cuda.devicearray")
    if SIMULATOR:
        need(cuda.to_device(np.zeros(1)), "_ary", "a simulated device array")
        return found
    from cuda.bindings import driver as bindings
    from numba.core import types
    from numba.cuda import codegen, datamodel, dispatcher
    from numba.cuda.cudadrv import devicearray, driver

    need(bindings, "cuLaunchKernel", "cuda.bindings.driver")
    need(devicearray.DeviceNDArrayBase, "_numba_type_", "numba.cuda DeviceNDArray")
    need(devicearray.DeviceNDArrayBase, "device_ctypes_pointer", "numba.cuda DeviceNDArray")
    need(dispatcher.CUDADispatcher, "compile", "numba.cuda.dispatcher.CUDADispatcher")
    need(dispatcher.CUDADispatcher, "typeof_pyval", "numba.cuda.dispatcher.CUDADispatcher")
    need(codegen.CUDACodeLibrary, "get_cufunc", "numba.cuda.codegen.CUDACodeLibrary")
    need(driver.Driver, "get_device_count", "numba.cuda.cudadrv.driver.Driver")
    for owner, name in (
        (dispatcher._Kernel, "_codelibrary"),
        (driver.CudaPythonFunction, "handle"),
        (driver.Stream, "handle"),
    ):
        if not _sets(owner, name):
            found.append(f"{owner.__module__}.{owner.__qualname__}.{name}")
    model = datamodel.default_manager.lookup(types.Array(types.float32, 2, "C"))
    fields = tuple(getattr(model, "_fields", ()))
    if fields != ARRAY_FIELDS:
        found.append(f"the array data model's fields {ARRAY_FIELDS}, now {fields}")
    if not found and cuda.is_available():
        found += _missing_on_gpu()
    return found


def _sets(owner: type, name: str) -> bool:
    """Whether instances of ``owner`` have attribute ``name``: a class attribute (or slot),
    or one its ``__init__`` sets (read from its code, so no instance is needed)."""
    code = getattr(inspect.unwrap(owner.__init__), "__code__", None)
    return hasattr(owner, name) or (code is not None and name in code.co_names)


def _missing_on_gpu() -> list[str]:
    """What a real launch of a small kernel finds missing: ``_codelibrary`` on the compiled
    kernel (``launch`` would fall back to numba's launch), or a wrong result."""

    @cuda.jit
    def add(X, value, out):
        i = cuda.grid(1)
        if i < X.shape[0]:
            out[i] = X[i] + value

    X, out = cuda.to_device(np.arange(3.0)), cuda.device_array(3)
    args = (X, 0.5, out)
    compiled = add.compile(tuple(add.typeof_pyval(arg) for arg in args))
    if not hasattr(compiled, "_codelibrary"):
        return ["numba.cuda.dispatcher._Kernel._codelibrary"]
    launch(add, 1, 32, 0, *args)
    if not np.array_equal(out.copy_to_host(), np.arange(3.0) + 0.5):
        return ["the hand-packed launch's parameter layout (a test kernel computed garbage)"]
    return []
