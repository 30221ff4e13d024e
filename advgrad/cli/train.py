"""``advgrad train``: train (or adversarially train) a network and write the model file."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from advgrad.cli.options import (
    Device,
    DeviceOption,
    MaxWeightsOption,
    OverwriteOption,
    Precision,
    weights_limit,
)
from advgrad.cli.reports import console, percent, progress_bar, reported_errors, summary_table


class Optimizer(StrEnum):
    adam = "adam"
    sgd = "sgd"


class AdversarialMethod(StrEnum):
    fgsm = "fgsm"
    pgd = "pgd"


def train(
    data: Annotated[
        Path | None,
        typer.Option(
            help="Labelled training set (.h5 with /X and /y). Default: the bundled digits "
            "training set.",
            show_default=False,
        ),
    ] = None,
    test: Annotated[
        Path | None,
        typer.Option(
            help="Labelled test set, scored after training. Default: the bundled digits test "
            "set when --data is not given, else none.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="Output model file.")] = Path("model.h5"),
    hidden: Annotated[int, typer.Option(min=1, help="Hidden units H.")] = 64,
    epochs: Annotated[int, typer.Option(min=1, help="Most passes over the data.")] = 300,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per mini-batch.")] = 32,
    lr: Annotated[
        float | None,
        typer.Option(
            min=0.0, help="Learning rate. Default: 0.01 for adam, 0.1 for sgd.", show_default=False
        ),
    ] = None,
    optimizer: Annotated[Optimizer, typer.Option(help="adam, or sgd with momentum.")] = (
        Optimizer.adam
    ),
    momentum: Annotated[float, typer.Option(min=0.0, max=0.999, help="sgd: momentum.")] = 0.9,
    weight_decay: Annotated[
        float,
        typer.Option(min=0.0, help="L2 penalty on W1 and W2: `weight_decay/2 ||W||^2`."),
    ] = 1e-4,
    seed: Annotated[
        int, typer.Option(help="Seeds the weights, the validation split, the batch order.")
    ] = 0,
    validation: Annotated[
        float,
        typer.Option(
            min=0.0, max=0.99, help="Share of rows held out for early stopping (0: none)."
        ),
    ] = 0.1,
    patience: Annotated[
        int,
        typer.Option(min=1, help="Stop after this many epochs without a lower validation loss."),
    ] = 30,
    adv_eps: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Adversarial training: L-inf radius of the adversarial rows (0: plain training).",
        ),
    ] = 0.0,
    adv_alpha: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Weight alpha of the clean loss: `alpha J(x, y) + (1 - alpha) J(x_adv, y)`.",
        ),
    ] = 0.5,
    adv_method: Annotated[
        AdversarialMethod,
        typer.Option(help="fgsm (Goodfellow et al.) or pgd (Madry et al.) adversarial rows."),
    ] = AdversarialMethod.fgsm,
    adv_steps: Annotated[int, typer.Option(min=1, help="pgd: steps per batch.")] = 10,
    dtype: Annotated[Precision, typer.Option(help="Compute dtype.")] = Precision.float32,
    overwrite: OverwriteOption = False,
    device: DeviceOption = Device.cpu,
    max_weights: MaxWeightsOption = None,
) -> None:
    """Train a two-layer sigmoid network and write the model file.

    Mini-batches with Adam (or SGD with momentum), early stopping on a validation split,
    optional adversarial training (--adv-eps). With no --data it trains on the bundled digits
    training set and scores the bundled test set. The model file records the data's hash, the
    hyper-parameters and the final metrics.
    """
    with reported_errors():
        from advgrad.bundled import TEST_DATA, TRAIN_DATA, bundled_path
        from advgrad.jobs.train import train_file
        from advgrad.train import TrainConfig

        config = TrainConfig(
            hidden=hidden,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            optimizer=optimizer.value,
            momentum=momentum,
            weight_decay=weight_decay,
            seed=seed,
            validation_fraction=validation,
            patience=patience,
            adv_eps=adv_eps,
            adv_alpha=adv_alpha,
            adv_method=adv_method.value,
            adv_steps=adv_steps,
            dtype=dtype.value,
        )
        if data is None:  # the bundled training set, scored on the bundled test set
            data, test = bundled_path(TRAIN_DATA), test or bundled_path(TEST_DATA)
        columns = "loss {task.fields[loss]}, accuracy {task.fields[accuracy]}"
        with progress_bar(f"training epochs: {columns}") as bar:
            task = bar.add_task("", total=epochs, loss="-", accuracy="-")

            def progress(stats) -> None:
                loss, accuracy = stats.train_loss, stats.train_accuracy
                if stats.validation_loss is not None:
                    loss, accuracy = stats.validation_loss, stats.validation_accuracy
                bar.update(
                    task, completed=stats.epoch, loss=f"{loss:.4f}", accuracy=percent(accuracy)
                )

            report = train_file(
                data,
                out,
                config,
                test_path=test,
                overwrite=overwrite,
                max_weights=weights_limit(max_weights),
                device=device.value,
                progress=progress,
            )
    result = report.result
    final = result.history[result.best_epoch - 1]
    split = result.model.metadata
    rows = [
        (
            "rows",
            f"{report.n_rows} ({split['training_rows']} training, "
            f"{split['validation_rows']} validation)",
        ),
        ("epochs", f"{len(result.history)} (best {result.best_epoch})"),
        ("training loss, accuracy", f"{final.train_loss:.4f}, {percent(final.train_accuracy)}"),
    ]
    if final.validation_loss is not None:
        rows.append(
            (
                "validation loss, accuracy",
                f"{final.validation_loss:.4f}, {percent(final.validation_accuracy)}",
            )
        )
    if report.test_accuracy is not None:
        rows.append((f"test accuracy ({report.test_rows} rows)", percent(report.test_accuracy)))
    if config.adversarial:
        rows.append(
            ("adversarial training", f"{adv_method.value}, eps {adv_eps:g}, alpha {adv_alpha:g}")
        )
    rows += [("seconds", f"{result.seconds:.1f}"), ("output", str(report.output))]
    console().print(summary_table(f"Training, {config.optimizer}, H = {hidden}", rows))
