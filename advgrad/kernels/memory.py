"""Huge pages for the large arrays that jitted code allocates, as numpy has for its own.

NumPy asks Linux to back every new array of 4 MiB or more with transparent huge pages
(``madvise(MADV_HUGEPAGE)``); numba's allocator does not, so a fresh output that a jitted
kernel allocates pays a page fault per 4 KiB when it is first written (12,500 faults for
16,384 MNIST rows, about 15 % of an FGSM step). ``advise_huge_pages`` gives jitted code
numpy's advice. At import, this module registers libc's ``madvise`` with LLVM under a fixed
name, so that jitted code that calls it stays cacheable; elsewhere than on Linux the advice
is skipped.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import llvmlite.binding
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

MADVISE_SYMBOL = "advgrad_madvise"
ADVISED_BYTES = 1 << 22
"""Arrays from this size up get the advice (numpy's threshold)."""
_HUGE_PAGE_ADVICE = 14  # MADV_HUGEPAGE, Linux

_ADVISE, _PAGE_BYTES = range(2)
_state = (ctypes.c_int64 * 2)()  # whether to advise, the page size; jitted code reads it by name
STATE_SYMBOL = "advgrad_memory_state"

# Where there is no madvise with huge pages, a stand-in satisfies the linker; the jitted
# code reads the state's "advise" slot first and never calls it.
_unused_madvise = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)(
    lambda address, length, advice: 0
)


def _register() -> None:
    madvise = ctypes.CDLL(None).madvise if sys.platform.startswith("linux") else _unused_madvise
    llvmlite.binding.add_symbol(MADVISE_SYMBOL, ctypes.cast(madvise, ctypes.c_void_p).value)
    llvmlite.binding.add_symbol(STATE_SYMBOL, ctypes.addressof(_state))
    _state[_ADVISE] = int(madvise is not _unused_madvise)
    _state[_PAGE_BYTES] = mmap.PAGESIZE


_register()


@intrinsic
def _state_value(typingctx, slot):
    """Slot ``slot`` of the module's state (an external global, by name)."""

    def codegen(context, builder, signature, args):
        state = builder.module.globals.get(STATE_SYMBOL)
        if state is None:
            state = ir.GlobalVariable(
                builder.module, ir.ArrayType(ir.IntType(64), len(_state)), STATE_SYMBOL
            )
        return builder.load(builder.gep(state, [ir.Constant(ir.IntType(32), 0), args[0]]))

    return types.int64(types.int64), codegen


@intrinsic
def _madvise(typingctx, address, length, advice):
    """libc's madvise(address, length, advice), through the symbol registered above."""

    def codegen(context, builder, signature, args):
        function_type = ir.FunctionType(
            ir.IntType(32), [ir.IntType(8).as_pointer(), ir.IntType(64), ir.IntType(32)]
        )
        function = cgutils.get_or_insert_function(builder.module, function_type, MADVISE_SYMBOL)
        pointer = builder.inttoptr(args[0], ir.IntType(8).as_pointer())
        return builder.call(function, [pointer, args[1], builder.trunc(args[2], ir.IntType(32))])

    return types.int32(types.int64, types.int64, types.int64), codegen


def advise_huge_pages(A):
    """Ask the OS to back a new array ``A`` of at least ``ADVISED_BYTES`` with huge pages,
    before it is first written, as numpy does for its own arrays. For jitted code; from
    Python (whose arrays numpy allocates) it does nothing."""


@overload(advise_huge_pages)
def _advise_huge_pages_jitted(A):
    def advise(A):
        if A.nbytes < ADVISED_BYTES or _state_value(_ADVISE) == 0:
            return
        page = _state_value(_PAGE_BYTES)
        start = np.int64(A.ctypes.data)
        offset = (page - start % page) % page
        _madvise(start + offset, A.nbytes - offset, _HUGE_PAGE_ADVICE)

    return advise
