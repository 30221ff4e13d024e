"""advgrad.jobs.attack: the attack job."""

from __future__ import annotations

import threading

import h5py
import numba
import numpy as np

import advgrad
from advgrad.attacks import Attack
from advgrad.bundled import MODEL, TEST_DATA, bundled_path
from advgrad.jobs import attack as attack_job
from advgrad.jobs import attack_file


def test_the_kernels_are_warmed_up_on_the_first_row_before_the_clock_starts(tmp_path, monkeypatch):
    notices: list[str] = []
    said = threading.Event()

    def notice(message: str) -> None:
        notices.append(message)
        said.set()

    # the warm-up waits for the notice, so it always outlasts COMPILE_NOTICE_AFTER_S
    warm_up = attack_job.attack_block

    def slow_attack_block(model, rows, *args, **kwargs):
        if len(rows) == 1:
            assert said.wait(10.0)
        return warm_up(model, rows, *args, **kwargs)

    monkeypatch.setattr(attack_job, "COMPILE_NOTICE_AFTER_S", 0.01)
    monkeypatch.setattr(attack_job, "attack_block", slow_attack_block)
    report = attack_job.attack_file(
        bundled_path(MODEL), bundled_path(TEST_DATA), tmp_path / "o.h5", Attack(), notice=notice
    )
    assert notices == ["compiling the kernels for this machine (first run only)"]
    assert report.n_rows == 450


def test_a_warm_start_says_nothing_about_compiling(tmp_path):
    notices: list[str] = []
    for name in ("a.h5", "b.h5"):  # the first run may compile; the second loads the kernels
        notices.clear()
        attack_job.attack_file(
            bundled_path(MODEL),
            bundled_path(TEST_DATA),
            tmp_path / name,
            Attack(),
            notice=notices.append,
        )
    assert notices == []


def test_same_seed_same_output_across_batch_sizes_and_threads(tmp_path):
    """PGD with random starts and random targets, float32, streamed in different batches."""
    outputs = []
    attack = Attack("pgd", eps=0.1, steps=5, restarts=2, target="random", seed=11)
    for index, (batch, threads) in enumerate([(256, None), (512, 1), (100_000, None)]):
        if threads is not None:
            numba.set_num_threads(threads)
        try:
            out = tmp_path / f"out{index}.h5"
            attack_file(bundled_path(MODEL), bundled_path(TEST_DATA), out, attack, batch_size=batch)
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        with h5py.File(out, "r") as f:
            outputs.append((f["X"][...], f["target"][...], f["pred_adv"][...]))
    for other in outputs[1:]:
        for a, b in zip(outputs[0], other, strict=True):
            np.testing.assert_array_equal(a, b)
    different_seed = tmp_path / "seed12.h5"
    attack_file(
        bundled_path(MODEL),
        bundled_path(TEST_DATA),
        different_seed,
        Attack("pgd", eps=0.1, steps=5, restarts=2, target="random", seed=12),
    )
    assert not np.array_equal(advgrad.load_dataset(different_seed)[0], outputs[0][0])
