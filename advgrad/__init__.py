"""advgrad: exact, fast adversarial examples for two-layer sigmoid networks.

The model type, file loaders and savers, and array-level attacks::

    import advgrad
    model = advgrad.load_model("model.h5")
    X, y = advgrad.load_dataset("data.h5")
    X_adv = advgrad.fgsm(model, X, eps=0.1)
    X_adv = advgrad.pgd(model, X, eps=0.1, steps=20, restarts=5)
    X_adv = advgrad.run(model, X, attack=advgrad.Attack("mifgsm", eps=0.1))
    result = advgrad.auto_attack(model, X, y, eps=0.1)  # X_adv, broken_by

The jitted kernels themselves live in ``advgrad.kernels.cpu``. Names load on first use,
so that ``import advgrad`` (and the command line's ``--help``) stays fast.
"""

from importlib import import_module

__version__ = "0.1.0"

_PUBLIC = {
    "Model": "advgrad.model",
    "AdvgradError": "advgrad.errors",
    "InputFileError": "advgrad.errors",
    "load_model": "advgrad.io",
    "save_model": "advgrad.io",
    "load_dataset": "advgrad.io",
    "save_dataset": "advgrad.io",
    "input_gradient": "advgrad.attacks",
    "fgsm": "advgrad.attacks",
    "bim": "advgrad.attacks",
    "pgd": "advgrad.attacks",
    "mi_fgsm": "advgrad.attacks",
    "deepfool": "advgrad.attacks",
    "Attack": "advgrad.attacks",
    "run": "advgrad.attacks",
    "auto_attack": "advgrad.autoattack",
    "predict": "advgrad.attacks",
    "predict_proba": "advgrad.attacks",
    "loss": "advgrad.attacks",
    "gradcheck": "advgrad.gradient_check",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'advgrad' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
