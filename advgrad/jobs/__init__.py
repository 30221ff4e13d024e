"""File-to-file jobs, every one on the streaming pipeline of ``advgrad.jobs.pipeline``:
attack, evaluate, certify, and the data side of train (DESIGN.md section 2)."""

from advgrad.jobs.attack import AttackReport, attack_file, attack_files
from advgrad.jobs.inputs import NonFiniteResult
from advgrad.jobs.pipeline import Interrupted

__all__ = [
    "AttackReport",
    "Interrupted",
    "NonFiniteResult",
    "attack_file",
    "attack_files",
]
