"""advgrad.kernels.memory: arrays that the kernels allocate fault in like numpy's own."""

from __future__ import annotations

import resource

import numpy as np
from conftest import one_hot, random_network

from advgrad.kernels import cpu, memory


def minor_faults(call) -> int:
    """Minor page faults of this process during ``call()``."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    call()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_a_fresh_output_faults_in_no_more_than_a_numpy_array():
    """``fgsm_step``'s new X_adv (38.5 MB: past glibc's largest mmap threshold, so each call
    maps fresh memory) takes about as many page faults as a new numpy array of its size
    written once (huge pages where the OS gives them to numpy), not one per 4 KiB page as
    numba's allocator alone gives (9,400 here)."""
    rng = np.random.default_rng(13)
    network = random_network(rng, 784, 16, 10, dtype=np.float32)
    X = rng.random((12288, 784), dtype=np.float32)
    Y = one_hot(rng.integers(0, 10, 12288), 10, np.float32)
    assert X.nbytes >= memory.ADVISED_BYTES

    def numpy_array():
        np.empty_like(X).fill(1.0)

    cpu.fgsm_step(X, *network, Y, 0.1, 0.0, 1.0)  # compiled, workspaces warm
    numpy_faults = min(minor_faults(numpy_array) for _ in range(3))
    kernel_faults = min(
        minor_faults(lambda: cpu.fgsm_step(X, *network, Y, 0.1, 0.0, 1.0)) for _ in range(3)
    )
    assert kernel_faults <= numpy_faults + 100
