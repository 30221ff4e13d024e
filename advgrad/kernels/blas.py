"""The thread count of the BLAS that numba's ``np.dot`` calls, set from Python and pinned
from jitted code.

Numba's ``np.dot`` calls the BLAS that scipy ships (through ``scipy.linalg.cython_blas``),
usually an OpenBLAS with a pool of threads of its own. Called from inside ``prange`` blocks,
those threads oversubscribe the cores (a batch kernel ran 2.4x slower on a quiet 2-core
machine, 19x on a busy one). So the batch kernels of ``advgrad.kernels.cpu`` call
``pin_blas`` before their parallel row blocks and ``unpin_blas`` after them; a user's own
jitted code that calls ``np.dot`` inside ``prange`` can do the same.

At import this module finds that OpenBLAS (with threadpoolctl) and registers its get and
set number-of-threads functions with LLVM under fixed names, with a small shared state
beside them; jitted code calls them by name, so that the kernels stay cacheable. Pins nest
and may overlap from several threads: under a spin lock, the first pin saves the thread
count and sets one thread, the last unpin restores the saved count. Where scipy's BLAS is
not an OpenBLAS (or is not found), pinning does nothing: ``blas_threads`` still sets any
BLAS that threadpoolctl knows.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import os
from contextlib import contextmanager

import llvmlite.binding
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

GET_THREADS_SYMBOL = "advgrad_blas_get_num_threads"
SET_THREADS_SYMBOL = "advgrad_blas_set_num_threads"
STATE_SYMBOL = "advgrad_blas_pin_state"

_LOCK, _DEPTH, _SAVED, _FOUND = range(4)
_state = (ctypes.c_int64 * 4)()  # 0 in every slot; jitted code reaches it by name only


@functools.cache
def _kernel_blas_libraries() -> tuple:
    """threadpoolctl controllers of the BLAS that numba's ``np.dot`` calls (scipy's)."""
    import scipy.linalg.cython_blas  # noqa: F401  (loads the BLAS numba binds to)
    from threadpoolctl import ThreadpoolController

    libraries = ThreadpoolController().select(user_api="blas").lib_controllers
    scipy_own = [lib for lib in libraries if f"{os.sep}scipy" in lib.filepath]
    return tuple(scipy_own or libraries)


@contextmanager
def blas_threads(n_threads: int):
    """Set the thread count of the BLAS that the CPU kernels call, restoring it on exit.

    The batch kernels pin that BLAS to one thread themselves while they run their row
    blocks in parallel (``pin_blas``); this sets it for everything else in the block, e.g.
    ``blas_threads(1)`` around code of your own that calls the BLAS from several threads.
    """
    libraries = _kernel_blas_libraries()
    previous = [lib.num_threads for lib in libraries]
    for lib in libraries:
        lib.set_num_threads(n_threads)
    try:
        yield
    finally:
        for lib, count in zip(libraries, previous, strict=True):
            lib.set_num_threads(count)


def _function_address(function) -> int:
    return ctypes.cast(function, ctypes.c_void_p).value


def _openblas_thread_functions() -> tuple[str, int, int] | None:
    """(path, address of get_num_threads, address of set_num_threads) of the OpenBLAS that
    numba's ``np.dot`` calls, or None when that BLAS is not an OpenBLAS. The symbols carry
    the affixes of the build (``scipy_openblas_set_num_threads64_`` and the like)."""
    for library in _kernel_blas_libraries():
        if library.internal_api != "openblas":
            continue
        dynlib = ctypes.CDLL(library.filepath)
        for prefix, suffix in itertools.product(("", "scipy_"), ("", "64_", "_64")):
            get = getattr(dynlib, f"{prefix}openblas_get_num_threads{suffix}", None)
            set_ = getattr(dynlib, f"{prefix}openblas_set_num_threads{suffix}", None)
            if get is not None and set_ is not None:
                return library.filepath, _function_address(get), _function_address(set_)
    return None


# Stand-ins that only satisfy the linker when no OpenBLAS is found: the jitted code checks
# the state's "found" slot first and never calls them.
_unused_get = ctypes.CFUNCTYPE(ctypes.c_int)(lambda: 1)
_unused_set = ctypes.CFUNCTYPE(None, ctypes.c_int)(lambda n_threads: None)


def _register() -> str | None:
    """Register the symbols that jitted code calls; returns the pinned library's path."""
    found = _openblas_thread_functions()
    if found is None:
        path, get, set_ = None, _function_address(_unused_get), _function_address(_unused_set)
    else:
        path, get, set_ = found
    llvmlite.binding.add_symbol(GET_THREADS_SYMBOL, get)
    llvmlite.binding.add_symbol(SET_THREADS_SYMBOL, set_)
    llvmlite.binding.add_symbol(STATE_SYMBOL, ctypes.addressof(_state))
    _state[_FOUND] = int(found is not None)
    return path


PINNED_LIBRARY = _register()
"""Path of the OpenBLAS that ``pin_blas`` pins, or None where pinning does nothing."""


def _state_slot(builder, slot):
    """Pointer to one int64 slot of the shared pin state (an external global, by name)."""
    state = builder.module.globals.get(STATE_SYMBOL)
    if state is None:
        state = ir.GlobalVariable(
            builder.module, ir.ArrayType(ir.IntType(64), len(_state)), STATE_SYMBOL
        )
    return builder.gep(state, [ir.Constant(ir.IntType(32), 0), slot])


def _atomic_state_operation(operation: str):
    """An intrinsic (slot, value) -> int64 applying the atomic ``operation`` ("xchg" or
    "add") to a slot of the pin state and returning what the slot held before."""

    @intrinsic
    def state_operation(typingctx, slot, value):
        def codegen(context, builder, signature, args):
            pointer = _state_slot(builder, args[0])
            return builder.atomic_rmw(operation, pointer, args[1], "seq_cst")

        return types.int64(types.int64, types.int64), codegen

    return state_operation


_state_exchange = _atomic_state_operation("xchg")
_state_add = _atomic_state_operation("add")


@intrinsic
def _blas_num_threads(typingctx):
    """The BLAS's thread count, through the function registered as GET_THREADS_SYMBOL."""

    def codegen(context, builder, signature, args):
        function_type = ir.FunctionType(ir.IntType(32), [])
        function = cgutils.get_or_insert_function(builder.module, function_type, GET_THREADS_SYMBOL)
        return builder.sext(builder.call(function, []), ir.IntType(64))

    return types.int64(), codegen


@intrinsic
def _set_blas_num_threads(typingctx, n_threads):
    """Set the BLAS's thread count, through the function registered as SET_THREADS_SYMBOL."""

    def codegen(context, builder, signature, args):
        function_type = ir.FunctionType(ir.VoidType(), [ir.IntType(32)])
        function = cgutils.get_or_insert_function(builder.module, function_type, SET_THREADS_SYMBOL)
        builder.call(function, [builder.trunc(args[0], ir.IntType(32))])
        return context.get_dummy_value()

    return types.none(types.int64), codegen


def pin_blas(n_blocks):
    """Pin the BLAS that ``np.dot`` calls to one thread when ``n_blocks`` > 1 row blocks are
    about to run in parallel; returns whether it pinned, for ``unpin_blas``.

    For jitted code (a kernel calls it right before its ``prange`` loop and ``unpin_blas``
    right after it; numba runs the code after a ``prange`` loop even when a block raised).
    Called from Python, where nothing runs in parallel, it does nothing and returns False:
    use ``blas_threads`` there.
    """
    return False


def unpin_blas(pinned):
    """Undo a ``pin_blas`` that returned ``pinned``: the last pin undone restores the
    thread count the first one saved. From Python, nothing to undo."""


@overload(pin_blas)
def _pin_blas_jitted(n_blocks):
    def pin(n_blocks):
        if n_blocks <= 1 or _state_add(_FOUND, 0) == 0:
            return False
        while _state_exchange(_LOCK, 1) != 0:
            pass
        if _state_add(_DEPTH, 1) == 0:
            n_threads = _blas_num_threads()
            _state_exchange(_SAVED, n_threads)
            if n_threads > 1:
                _set_blas_num_threads(1)
        _state_exchange(_LOCK, 0)
        return True

    return pin


@overload(unpin_blas)
def _unpin_blas_jitted(pinned):
    def unpin(pinned):
        if not pinned:
            return
        while _state_exchange(_LOCK, 1) != 0:
            pass
        if _state_add(_DEPTH, -1) == 1:
            n_threads = _state_add(_SAVED, 0)
            if n_threads > 1:
                _set_blas_num_threads(n_threads)
        _state_exchange(_LOCK, 0)

    return unpin
