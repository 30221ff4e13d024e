"""advgrad.jobs.attack: the attack job."""

from __future__ import annotations

import threading

from advgrad.attacks import Attack
from advgrad.bundled import MODEL, TEST_DATA, bundled_path
from advgrad.jobs import attack as batch


def test_the_kernels_are_warmed_up_on_the_first_row_before_the_clock_starts(tmp_path, monkeypatch):
    notices: list[str] = []
    said = threading.Event()

    def notice(message: str) -> None:
        notices.append(message)
        said.set()

    # the warm-up waits for the notice, so it always outlasts COMPILE_NOTICE_AFTER_S
    warm_up = batch.attack_block

    def slow_attack_block(model, rows, *args, **kwargs):
        if len(rows) == 1:
            assert said.wait(10.0)
        return warm_up(model, rows, *args, **kwargs)

    monkeypatch.setattr(batch, "COMPILE_NOTICE_AFTER_S", 0.01)
    monkeypatch.setattr(batch, "attack_block", slow_attack_block)
    report = batch.attack_file(
        bundled_path(MODEL), bundled_path(TEST_DATA), tmp_path / "o.h5", Attack(), notice=notice
    )
    assert notices == ["compiling the kernels for this machine (first run only)"]
    assert report.n_rows == 450


def test_a_warm_start_says_nothing_about_compiling(tmp_path):
    notices: list[str] = []
    for name in ("a.h5", "b.h5"):  # the first run may compile; the second loads the kernels
        notices.clear()
        batch.attack_file(
            bundled_path(MODEL),
            bundled_path(TEST_DATA),
            tmp_path / name,
            Attack(),
            notice=notices.append,
        )
    assert notices == []
