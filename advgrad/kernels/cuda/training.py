"""CUDA kernels of the training gradients (the twin of ``cpu.parameter_gradient_into``).

``parameter_gradient_into`` (in ``advgrad.kernels.cuda.launchers``) runs the gradient's
forward pass and ``D1`` with the products' kernels, then these: ``hidden_activations`` for
the activations A the row kernel overwrote, and ``add_weighted_products`` for each
parameter's sum over the rows.
"""

from advgrad.kernels.cuda.device import sigmoid
from advgrad.kernels.cuda.internals import cuda

__all__ = ["add_weighted_products", "hidden_activations"]


@cuda.jit
def hidden_activations(Z1, b1, A):
    """``A (N, H) = sigmoid(Z1 + b1)``, Z1 ``(splits * N, H)`` holding the split partial sums
    of ``X @ W1``, added in ``rows_kernel``'s order (so A is bitwise the activations it
    used). Grid-stride over the elements of A."""
    N, H = A.shape
    splits = Z1.shape[0] // N
    for e in range(cuda.grid(1), N * H, cuda.gridsize(1)):
        n = e // H
        j = e - n * H
        z = Z1[n, j]
        for split in range(1, splits):
            z += Z1[split * N + n, j]
        A[n, j] = sigmoid(z + b1[j])


@cuda.jit
def add_weighted_products(left, right, weight, use_left, out):
    """``out[i, j] += weight * sum_n left[n, i] right[n, j]``, summed over the rows in order.

    Without ``use_left`` the left factor is 1 and out has one row: ``out[0, j] += weight *
    sum_n right[n, j]`` (a bias's gradient). A thread per element of out (grid-stride); the
    sum is in the arrays' dtype, the weighted addition in float64, as on the CPU.
    """
    I, J = out.shape
    N = right.shape[0]
    zero = right.dtype.type(0)
    for e in range(cuda.grid(1), I * J, cuda.gridsize(1)):
        i = e // J
        j = e - i * J
        total = zero
        for n in range(N):
            total += left[n, i] * right[n, j] if use_left else right[n, j]
        out[i, j] += weight * total
