"""SPEC §8 "No silent wrong results" and "Clear messages" decided before training: the metric direction, the
default metrics, the optimizer's parameters, names, loaders and the first loss."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
import yaml
from torch.utils.data import DataLoader, TensorDataset

from conftest import NoLen, make_data, make_loader, make_model, quiet_params, only_run
from super_trainer import Trainer
from super_trainer.checks import (check_experiment_name, check_loader, check_test_loaders, sample_target,
                                 warn_if_unbounded)
from super_trainer.losses import check_loss_value, resolve_metric_direction
from super_trainer.metrics import check_default_metrics, warn_non_finite_metrics
from super_trainer.params import TrainingParams, resolve_training_params
from super_trainer.rng import get_rng_state


def train(tmp_path, model=None, **overrides):
    return Trainer("exp", tmp_path).train(model=model or make_model(), training_params=quiet_params(**overrides),
                                          train_loader=make_loader(shuffle=True), valid_loader=make_loader(16))


# ---- greater_metric_to_watch_is_better -----------------------------------------------------------------

def test_watching_a_loss_defaults_to_lower_is_better(tmp_path):
    result = train(tmp_path, max_epochs=4, metric_to_watch="CrossEntropyLoss")
    losses = [row["valid/CrossEntropyLoss"] for row in result.history]
    assert min(losses) != max(losses)  # the direction decides which epoch is best
    assert result.best_metric == min(losses) and result.best_epoch == losses.index(min(losses))
    written = yaml.safe_load((only_run(tmp_path / "exp") / "training_params.yaml").read_text())
    assert written["greater_metric_to_watch_is_better"] is False


def test_watching_a_metric_defaults_to_greater_is_better(tmp_path):
    result = train(tmp_path, max_epochs=3)
    accuracies = [row["valid/Accuracy"] for row in result.history]
    assert result.best_metric == max(accuracies)


def test_explicit_greater_on_a_loss_warns(tmp_path):
    with pytest.warns(UserWarning, match="metric_to_watch 'CrossEntropyLoss' is a loss.*HIGHEST loss"):
        train(tmp_path, max_epochs=1, metric_to_watch="CrossEntropyLoss", greater_metric_to_watch_is_better=True)


class TwoTerms(nn.Module):
    def forward(self, preds, target):
        ce = nn.functional.cross_entropy(preds, target)
        return ce, torch.stack([ce.detach(), ce.detach() * 0])


@pytest.mark.parametrize("metric, names, greater", [
    ("CrossEntropyLoss", None, False), ("crossentropyloss", None, False), ("Accuracy", None, True),
    ("TwoTerms/loss_0", None, False), ("TwoTerms/cls", ["TwoTerms/cls", "TwoTerms/box"], False),
    ("TwoTerms/other", ["TwoTerms/cls"], True),
])
def test_resolve_metric_direction(metric, names, greater):
    criterion = TwoTerms() if metric.startswith("TwoTerms") else nn.CrossEntropyLoss()
    params = resolve_training_params({"max_epochs": 1, "initial_lr": 0.1, "metric_to_watch": metric})
    assert params.greater_metric_to_watch_is_better is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_metric_direction(params, criterion, names) is greater
    assert params.greater_metric_to_watch_is_better is greater
    params["greater_metric_to_watch_is_better"] = False  # explicit: kept, no warning either way
    assert resolve_metric_direction(params, criterion, names) is False


def test_greater_must_be_a_bool_or_unset():
    with pytest.raises(ValueError, match="greater_metric_to_watch_is_better: must be true, false, or unset"):
        resolve_training_params({"max_epochs": 1, "initial_lr": 0.1, "greater_metric_to_watch_is_better": 1})


# ---- default metrics on regression targets ----------------------------------------------------------------

def regression_loader(n=16):
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, x.sum(dim=1)), batch_size=8, shuffle=True)


def test_default_accuracy_on_float_targets_is_refused():
    params = resolve_training_params({"max_epochs": 1, "initial_lr": 0.1, "loss": "MSELoss"})
    target = sample_target(regression_loader())
    assert target.dtype == torch.float32 and target.shape == (1,)
    with pytest.raises(ValueError, match=r"valid_metrics_list: not given.*float32.*regression"):
        check_default_metrics(params, target)


@pytest.mark.parametrize("target", [
    torch.tensor([0, 2, 1]),  # class indices
    torch.eye(3),  # one-hot rows
    torch.tensor([[0.7, 0.2, 0.1], [0.0, 0.5, 0.5]]),  # probability rows (soft labels)
])
def test_default_accuracy_accepts_class_targets(target):
    params = resolve_training_params({"max_epochs": 1, "initial_lr": 0.1})
    check_default_metrics(params, target)


def test_given_metrics_are_not_second_guessed():
    given = resolve_training_params({"max_epochs": 1, "initial_lr": 0.1, "valid_metrics_list": ["Accuracy"]})
    check_default_metrics(given, torch.randn(4))
    check_default_metrics(TrainingParams(valid_metrics_list=["Accuracy"]), torch.randn(4))  # built by hand


def test_sample_target_reads_one_sample_without_touching_the_runs_numbers():
    loader = make_loader(shuffle=True)
    torch.manual_seed(3)
    before = get_rng_state()
    target = sample_target(loader)
    after = get_rng_state()
    assert torch.equal(target, make_data()[0][1].reshape(1))
    assert before["torch"] == after["torch"] and before["python"] == after["python"]
    assert sample_target(NoLen(loader)) is None and sample_target([1, 2]) is None


# ---- the optimizer's parameters ----------------------------------------------------------------------

def test_optimizer_over_another_models_parameters_is_refused(tmp_path):
    model, other = make_model(), make_model()
    optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"optimizer: 4 of the 4 parameters of the SGD instance are not the model's"):
        train(tmp_path, model=model, optimizer=optimizer, initial_lr=None)
    assert not (tmp_path / "exp").exists()


def test_optimizer_over_part_of_the_model_is_fine(tmp_path):
    model = make_model()
    optimizer = torch.optim.SGD(model[2].parameters(), lr=0.1)  # fine-tune the head only
    train(tmp_path, model=model, optimizer=optimizer, initial_lr=None, max_epochs=1)


@pytest.mark.parametrize("model, words", [
    (make_model().requires_grad_(False), r"has only frozen parameters \(requires_grad=False\)"),
    (nn.Sequential(nn.ReLU()), "has no parameters"),
])
def test_model_without_trainable_parameters_is_refused(tmp_path, model, words):
    with pytest.raises(ValueError, match=f"model: Sequential {words}: there is nothing to train"):
        train(tmp_path, model=model)


# ---- names and loaders -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["", "  ", ".", "..", "../x", "a/b", "a\\b", "x..y", "a\0b"])
def test_bad_experiment_names(name):
    with pytest.raises(ValueError, match="experiment_name .* one folder name inside ckpt_root_dir"):
        check_experiment_name(name)


def test_good_experiment_names():
    for name in ("exp", "resnet18_cifar10", "run-2.v3", "2026-12-03"):
        assert check_experiment_name(name) == name
    with pytest.raises(ValueError, match="must be a string"):
        check_experiment_name(None)


def test_dataset_given_as_a_loader_is_refused():
    with pytest.raises(ValueError, match=r"train_loader: got a TensorDataset \(a Dataset\).*DataLoader\(dataset"):
        check_loader("train_loader", make_data())
    check_loader("train_loader", make_loader())
    check_loader("train_loader", [(torch.zeros(2, 8), torch.zeros(2, dtype=torch.long))])  # any iterable of batches


def test_test_loaders_must_be_a_dict():
    loader = make_loader()
    assert check_test_loaders(None) == {} and check_test_loaders({"test": loader}) == {"test": loader}
    with pytest.raises(ValueError, match=r"test_loaders must be a dict \{name: loader\}, got a list.*'test_0': loader_0"):
        check_test_loaders([loader, loader])
    with pytest.raises(ValueError, match=r"got a DataLoader; give e.g. test_loaders=\{'test': loader\}"):
        check_test_loaders(loader)
    with pytest.raises(ValueError, match=r"test_loaders\['x'\]: got a TensorDataset"):
        check_test_loaders({"x": make_data()})


def test_endless_loader_without_a_bound_warns():
    with pytest.warns(UserWarning, match="no len\\(\\).*validation and checkpoints never happen.*max_train_batches"):
        warn_if_unbounded(None, resolve_training_params({"max_epochs": 1, "initial_lr": 0.1}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_unbounded(None, resolve_training_params({"max_epochs": 1, "initial_lr": 0.1, "max_train_batches": 5}))
        warn_if_unbounded(8, resolve_training_params({"max_epochs": 1, "initial_lr": 0.1}))


# ---- the first loss and the validation metrics -------------------------------------------------------

def test_first_loss_checks():
    preds = make_model()(torch.randn(4, 8))
    target = torch.tensor([0, 1, 2, 0])
    check_loss_value(nn.CrossEntropyLoss()(preds, target), nn.CrossEntropyLoss())
    cases = [
        (nn.CrossEntropyLoss(reduction="none"), lambda c: c(preds, target), r"returned a tensor of shape \(4,\), not a scalar"),
        (nn.CrossEntropyLoss(), lambda c: c(preds, target).item(), "returned a float .* not a tensor"),
        (nn.CrossEntropyLoss(), lambda c: c(preds.detach(), target), "returned a loss that does not depend on any trainable"),
        (nn.CrossEntropyLoss(), lambda c: target.sum(), "returned a torch.int64 tensor"),
    ]
    for criterion, compute, words in cases:
        with pytest.raises(ValueError, match=f"training_params.loss: CrossEntropyLoss {words}"):
            check_loss_value(compute(criterion), criterion)


def test_nan_validation_metric_warns_naming_it():
    with pytest.warns(UserWarning, match=r"validation metrics are not finite: F1=nan; it is metric_to_watch"):
        assert warn_non_finite_metrics({"CrossEntropyLoss": 0.3, "F1": math.nan}, "f1") == ["F1"]
    with pytest.warns(UserWarning, match=r"not finite: PerClass=\[0.5, inf\]$"):
        warn_non_finite_metrics({"PerClass": [0.5, math.inf]}, "Accuracy")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_non_finite_metrics({"Accuracy": 0.5, "CrossEntropyLoss": 1.0}, "Accuracy") == []


# ---- the same checks, reached through Trainer.train (the loop calls them) -------------------------------

from conftest import Recorder  # noqa: E402


def _train(tmp_path, recorder=None, train_loader=None, valid_loader=None, **params):
    callbacks = [recorder] if recorder is not None else []
    return Trainer("checks", tmp_path, device="cpu").train(
        model=make_model(), training_params=quiet_params(phase_callbacks=callbacks, **params),
        train_loader=train_loader if train_loader is not None else make_loader(),
        valid_loader=valid_loader)


def test_through_the_trainer_a_bad_name_or_input_fails_before_any_event(tmp_path):
    with pytest.raises(ValueError, match="experiment_name '../up' holds"):
        Trainer("../up", tmp_path)
    recorder = Recorder()
    with pytest.raises(ValueError, match="train_loader: got a TensorDataset"):
        _train(tmp_path, recorder, train_loader=make_data())
    with pytest.raises(ValueError, match="test_loaders must be a dict"):
        Trainer("checks", tmp_path, device="cpu").train(model=make_model(), training_params=quiet_params(),
                                                       train_loader=make_loader(), test_loaders=[make_loader()])
    assert recorder.events == []


def test_through_the_trainer_regression_targets_with_the_default_metrics_fail_before_any_event(tmp_path):
    regression = DataLoader(TensorDataset(torch.randn(16, 8), torch.randn(16, 3)), batch_size=4)
    params = quiet_params(loss="MSELoss")
    for key in ("valid_metrics_list", "metric_to_watch"):
        params.pop(key)
    recorder = Recorder()
    with pytest.raises(ValueError, match="training_params.valid_metrics_list"):
        Trainer("checks", tmp_path, device="cpu").train(model=make_model(), training_params=dict(
            params, phase_callbacks=[recorder]), train_loader=regression, valid_loader=regression)
    assert recorder.events == []


def test_through_the_trainer_a_loss_that_is_not_a_scalar_fails_at_the_first_batch(tmp_path):
    recorder = Recorder()
    with pytest.raises(ValueError, match="not a scalar"):
        _train(tmp_path, recorder, loss={"CrossEntropyLoss": {"reduction": "none"}}, valid_metrics_list=[],
               metric_to_watch="CrossEntropyLoss")
    assert "on_train_batch_backward_end" not in recorder.events
    assert recorder.events.count("on_training_end") == 1


def test_through_the_trainer_a_nan_validation_metric_warns(tmp_path):
    class Poison(torch.nn.Module):  # validation loss NaN: every prediction is NaN in eval mode
        def __init__(self):
            super().__init__()
            self.net = make_model()

        def forward(self, x):
            out = self.net(x)
            return out if self.training else out * float("nan")

    with pytest.warns(UserWarning, match="validation metrics are not finite: CrossEntropyLoss=nan"):
        Trainer("checks", tmp_path, device="cpu").train(
            model=Poison(), training_params=quiet_params(max_epochs=1), train_loader=make_loader(),
            valid_loader=make_loader(16))
