"""batch_accumulate equals one big batch (SPEC §1: windows never span epochs, each micro-batch scaled by 1/window)."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from conftest import NoLen, make_data, make_model, quiet_params
from super_trainer import Trainer


def train_weights(tmp_path, name, batch_size, accumulate, n=64, epochs=2, loader=None):
    model = make_model(hidden=32, seed=3)
    data = make_data(n, seed=5)
    loader = loader if loader is not None else DataLoader(data, batch_size=batch_size, shuffle=False)
    params = quiet_params(max_epochs=epochs, batch_accumulate=accumulate, optimizer="SGD",
                          optimizer_params={"momentum": 0.9}, valid_metrics_list=[], metric_to_watch="CrossEntropyLoss",
                          greater_metric_to_watch_is_better=False)
    Trainer(name, tmp_path).train(model=model, training_params=params, train_loader=loader, valid_loader=None)
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_close(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0)


def test_accumulate_4_of_8_equals_batch_32(tmp_path):
    big = train_weights(tmp_path, "big", batch_size=32, accumulate=1)
    small = train_weights(tmp_path, "small", batch_size=8, accumulate=4)
    plain = train_weights(tmp_path, "plain", batch_size=8, accumulate=1)
    assert_close(big, small)
    # and the comparison is not vacuous: without accumulation the weights differ
    assert max((big[k] - plain[k]).abs().max().item() for k in big) > 1e-3


def test_partial_last_window_is_scaled_by_its_own_size(tmp_path):
    # 40 samples, batch 8, accumulate 4: windows of 4 and 1 micro-batches == batches of 32 and 8
    big = train_weights(tmp_path, "big", batch_size=32, accumulate=1, n=40)
    small = train_weights(tmp_path, "small", batch_size=8, accumulate=4, n=40)
    assert_close(big, small)


def test_partial_last_window_without_len(tmp_path):
    big = train_weights(tmp_path, "big", batch_size=32, accumulate=1, n=40)
    data = make_data(40, seed=5)
    small = train_weights(tmp_path, "nolen", batch_size=8, accumulate=4, n=40,
                          loader=NoLen(DataLoader(data, batch_size=8, shuffle=False)))
    assert_close(big, small)
