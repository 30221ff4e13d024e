"""Numba CUDA kernels for the two-layer sigmoid network, the GPU twin of ``kernels/cpu.py``.

Same names, argument order and conventions as ``advgrad.kernels.cpu``, over device arrays:
anything with ``__cuda_array_interface__`` is used in place, without a copy. Shapes
(row-vector convention): ``X (N, d)``, ``W1 (d, H)``, ``b1 (H,)``, ``W2 (H, C)``, ``b2 (C,)``,
``Y (N, C)`` one-hot or soft, or with 0 rows to use the model's predictions as labels. All
float arrays of one call share one dtype, float32 or float64. Nothing is checked here.

A CUDA kernel runs over a grid, so the ``*_into`` functions are host-side launchers: each
queues a few kernels on ``stream`` and returns at once. A batch of at most
``SMALL_BATCH_ROWS`` rows (with W1 at most ``SMALL_WEIGHT_BYTES``) takes its whole gradient,
or L-inf step, in one launch of ``small_batch_kernel``: there launch latency, not arithmetic,
is the cost, so each block computes the hidden layer of its rows itself and no block waits
for another. Larger batches take three launches:

1. ``gemm_kernel(tile, False)``: partial sums of ``Z1 = X @ W1``, a tiled shared-memory
   product (each thread prefetches runs of consecutive elements of the next tile into
   registers; vector loads from shared memory; a register micro-tile per thread); small
   batches split the d-long sum over several blocks (split-K) so that the whole GPU works.
2. ``rows_kernel``: a few rows per block; sums the split partials, adds b1, applies the
   sigmoid (A), then logits ``A @ W2 + b2`` (C is small: threads share each dot product),
   a max-subtracted softmax, ``P - Y``, and ``D1 = (P - Y) @ W2^T * A * (1 - A)`` in place.
3. ``gemm_kernel(tile, True)``: ``G = D1 @ W1^T``, whose epilogue either stores G or, for an
   L-inf step, writes ``clip(X + eps * sign(G), x_min, x_max)`` directly. L2 and L1 steps
   need the norm of each whole row first: one more launch, ``norm_step_kernel``, reduces it
   (``ROW_THREADS`` threads per row) and rescales G into the step.

The iterative attacks (``iterate_into``: BIM, PGD, MI-FGSM) keep everything on the device:
each step is the gradient (one launch or three) into a buffer, then ``iterate_step_kernel``
(momentum, step, projection into the ball and the clip range, fused; ``ROW_THREADS`` threads
per row; the L1 projection is exact, by Michelot's algorithm in float64). ``deepfool_into``
works on the rows still moving only: per iteration ``X @ W1``, ``hidden_slopes``, the logits
and the Jacobians of all C logits as two more products, then ``deepfool_step_kernel``.

``loss_gradient_into`` takes the gradient of an attack loss (the loss switch of
``cpu.loss_gradient_into``): the cross-entropy through the kernels above on one-hot labels,
the margin losses (DLR, targeted DLR, C&W) as the hidden product, ``logit_rows_kernel``
(logits, ``margin_loss_row`` per row, D1) and the back-product; ``logits_into`` runs the
first two alone.

``parameter_gradient_into`` (training) adds the parameter gradients of a batch's loss, with
an optional FGSM pass: the hidden product and ``rows_kernel`` as above, then sums over the
rows. ``margin_bounds_into`` and ``certified_radius_into`` (certification) run the CPU's
float64 bounds, as sound, with a thread block per row.

Batches of at most ``SKINNY_ROWS`` rows use ``SKINNY_TILE``, larger ones ``WIDE_TILE``;
``THREADS_PER_BLOCK`` sizes the row kernels and ``small_batch_kernel``. Tests may lower these
package constants at any time: the ``*_kernel`` factories build (and cache) one kernel per
configuration. Launches go straight to the driver (``internals.launch``), since numba's own
launch costs tens of microseconds.

The kernels of the iterative attacks and DeepFool write ``float(v)`` where a float32 value
enters float64 arithmetic: on the GPU it changes nothing (numba promotes to float64 anyway),
but on the CUDA simulator, where a Python float does not promote a numpy float32, it keeps
the arithmetic the GPU's.

Scratch buffers come from a ``Workspace``; pass the same one to repeated calls on one stream
to avoid a device allocation per call.

The package's modules, each re-exported here by name (importing this package imports
numba.cuda, so ``advgrad`` imports it only when CUDA is asked for):

- ``internals``: the numba.cuda import and everything that leans on numba-cuda beyond its
  documented API (the hand-packed driver launch among them); ``internals.missing()`` names
  whatever a numba-cuda release changed;
- ``device``: device functions (scalar and block helpers);
- ``products``: the kernels of the forward pass and the gradient (``Tile``);
- ``steps``: the kernels of the FGM, iterative and DeepFool steps;
- ``training``: the kernels of the training gradients (``parameter_gradient_into``);
- ``bounds``: the certified-bound device functions and kernels;
- ``launchers``: host-side planning, ``Workspace`` and the launchers; the constants above;
- ``bound_launchers``: the launchers of the certified bounds (``margin_bounds_into``,
  ``certified_radius_into``) and their constants (``BOUND_THREADS``, ...).

Setting a public name on this package sets it in the module it comes from, where the code
reads it, so ``advgrad.kernels.cuda.THREADS_PER_BLOCK = 8`` (or a test's monkeypatch) takes
effect.
"""

import sys
import types

from advgrad.kernels.cuda import (
    bound_launchers,
    bounds,
    device,
    internals,
    launchers,
    products,
    steps,
    training,
)

_HOMES = {
    name: module
    for module in (internals, device, products, steps, training, bounds, launchers, bound_launchers)
    for name in module.__all__
}
__all__ = sorted(_HOMES)


def _forwarded(name: str, home: types.ModuleType) -> property:
    """A property reading and setting ``name`` in ``home``."""

    def read(package):
        return getattr(home, name)

    def write(package, value) -> None:
        setattr(home, name, value)

    return property(read, write, doc=f"``{home.__name__}.{name}``")


def _dir(package) -> list[str]:
    return sorted({*vars(package), *_HOMES})


# This package as a module object whose public names are properties that read, and set, the
# name in the module it comes from: only one value of each is ever in use, and a data
# descriptor is what monkeypatch restores through (it never deletes what it did not add).
_Package = type(
    "_Package",
    (types.ModuleType,),
    {**{name: _forwarded(name, home) for name, home in _HOMES.items()}, "__dir__": _dir},
)
sys.modules[__name__].__class__ = _Package
