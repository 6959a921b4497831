"""The per-batch shortcuts of the plain path (docs/performance.md) do what the calls they replace do."""
from __future__ import annotations

import math
import random
import struct

import numpy as np
import torch

from conftest import make_loader, make_model, quiet_params
from super_trainer import Callback, Trainer
from super_trainer.batches import BatchReader
from super_trainer.loop.optimizers import OptimizerHandle
from super_trainer.rng import _numpy_state, get_rng_state, set_rng_state


class CountingSGD(torch.optim.SGD):
    """An optimizer class with a zero_grad of its own: the trainer must call it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.zero_grad_calls = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.zero_grad_calls += 1
        super().zero_grad(set_to_none)


def _grads(model):
    model(torch.ones(2, 8)).sum().backward()
    return [p.grad for p in model.parameters()]


def test_clear_grads_sets_every_grad_to_none_like_zero_grad():
    model = make_model()
    optimizer = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=0.1)
    handle = OptimizerHandle("default", optimizer, restricted=False)
    assert all(g is not None for g in _grads(model))
    handle.clear_grads()
    assert all(p.grad is None for p in model.parameters())
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))]})  # a group added later (unfreezing)
    late = optimizer.param_groups[-1]["params"][0]
    late.grad = torch.ones(2)
    handle.clear_grads()
    assert late.grad is None


def test_an_optimizer_with_its_own_zero_grad_gets_it_called():
    model = make_model()
    own = CountingSGD(model.parameters(), lr=0.1)
    handle = OptimizerHandle("default", own, restricted=False)
    _grads(model)
    handle.clear_grads()
    assert own.zero_grad_calls == 1 and all(p.grad is None for p in model.parameters())

    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    plain.zero_grad = lambda set_to_none=True: calls.append(set_to_none)  # set on the instance
    OptimizerHandle("default", plain, restricted=False).clear_grads()
    assert calls == [True]


def test_the_trainer_calls_an_optimizers_own_zero_grad_once_per_step(tmp_path):
    model = make_model()
    optimizer = CountingSGD(model.parameters(), lr=0.1)
    Trainer("own_zero_grad", tmp_path).train(model=model, training_params=quiet_params(
        max_epochs=2, optimizer=optimizer, initial_lr=None), train_loader=make_loader(), valid_loader=make_loader(16))
    assert optimizer.zero_grad_calls == 2 * len(make_loader())


def test_under_a_profiler_zero_grad_keeps_its_annotation(tmp_path):
    class Profile(Callback):
        def __init__(self):
            self.names = []

        def on_train_loader_start(self, context):
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.profiler.__enter__()

        def on_train_loader_end(self, context):
            self.profiler.__exit__(None, None, None)
            self.names += [event.key for event in self.profiler.key_averages()]

    profile = Profile()
    Trainer("profiled", tmp_path).train(model=make_model(), training_params=quiet_params(
        max_epochs=1, phase_callbacks=[profile]), train_loader=make_loader(), valid_loader=make_loader(16))
    assert "Optimizer.zero_grad#SGD.zero_grad" in profile.names


def test_a_cpu_batch_is_passed_through_unchanged_and_others_are_moved():
    reader = BatchReader(torch.device("cpu"))
    inputs, target = torch.ones(2, 3), torch.zeros(2, dtype=torch.long)
    got_inputs, got_target, extras = reader((inputs, target))
    assert got_inputs is inputs and got_target is target and extras == {}
    half = reader([inputs.double(), target])  # a list batch, another dtype: still the same tensors
    assert half[0].dtype == torch.float64 and half[1] is target


def test_rng_state_round_trips_as_bytes_and_from_the_older_layouts(tmp_path):
    random.seed(7)
    np.random.seed(8)
    torch.manual_seed(9)
    state = get_rng_state()
    assert all(isinstance(v, bytes) for v in (state["python"][1], state["numpy"]["keys"], state["torch"]))
    expected = ([random.random() for _ in range(3)], np.random.rand(3).tolist(), torch.rand(3).tolist())
    torch.save(state, tmp_path / "rng.pth")
    set_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True))
    assert ([random.random() for _ in range(3)], np.random.rand(3).tolist(), torch.rand(3).tolist()) == expected
    version, words, gauss = state["python"]
    keys = list(struct.unpack("<625I", words))
    numpy_keys = torch.from_numpy(np.frombuffer(state["numpy"]["keys"], dtype="<u4").astype(np.int64))
    for python_keys in (torch.tensor(keys), tuple(keys)):  # as 0.3.1 (tensors) and earlier checkpoints hold them
        older = dict(state, python=(version, python_keys, gauss), numpy=dict(state["numpy"], keys=numpy_keys),
                     torch=torch.frombuffer(bytearray(state["torch"]), dtype=torch.uint8))
        set_rng_state(older)
        assert ([random.random() for _ in range(3)], np.random.rand(3).tolist(), torch.rand(3).tolist()) == expected


def test_numpy_state_is_read_again_whenever_the_generator_moved():
    np.random.seed(3)
    first = get_rng_state()["numpy"]
    assert _numpy_state.usable  # the raw read (reuse of an unmoved state) works on this NumPy
    assert get_rng_state()["numpy"] == first  # unchanged: the same state
    np.random.randint(10)
    moved = get_rng_state()["numpy"]
    assert (moved["keys"], moved["pos"]) != (first["keys"], first["pos"])
    np.random.standard_normal()  # leaves a second Gaussian value pending
    pending = get_rng_state()["numpy"]
    assert pending["has_gauss"] == 1
    np.random.standard_normal()  # takes the pending value: no word of the generator moves
    taken = get_rng_state()["numpy"]
    assert taken["has_gauss"] == 0 and taken["keys"] == pending["keys"] and taken["pos"] == pending["pos"]
    expected = np.random.get_state()
    assert (taken["pos"], taken["has_gauss"], taken["cached_gaussian"]) == (expected[2], expected[3], expected[4])
    assert taken["keys"] == expected[1].astype("<u4").tobytes()
    np.random.set_state(("MT19937", np.frombuffer(first["keys"], dtype="<u4"), first["pos"], 0, 0.0))
    assert get_rng_state()["numpy"] == first  # put back: read again, equal to the first read


def test_loss_averager_equals_a_plain_mean_whatever_checks_and_restores_come_between():
    """Checked items are kept as the blocks the checks stacked: the epoch's mean, the stacked record and the
    finiteness answers equal those of one list of every item (random sequences, 0-d and (K,) items)."""
    from super_trainer.metrics import LossAverager

    rng = random.Random(5)
    for case in range(300):
        width = rng.choice([None, 1, 3])
        weighted = rng.random() < 0.3
        averager, every, samples, checked = LossAverager(), [], [], 0
        for _ in range(rng.randint(1, 40)):
            action = rng.random()
            if action < 0.7:
                shape = () if width is None else (width,)
                item = torch.randn(shape, dtype=torch.float32)
                if rng.random() < 0.05:
                    item = item.clone().fill_(rng.choice([float("nan"), float("inf")]))
                count = rng.randint(1, 9)
                averager.add(item, count if weighted else None)
                every.append(item.reshape(-1).double())
                samples.append(count)
            elif action < 0.9:
                fresh = every[checked:]
                expected = all(bool(torch.isfinite(row).all()) for row in fresh)
                assert averager.all_finite_since_check() == expected, case
                checked = len(every)
            else:  # a mid-epoch checkpoint and its resume: the record restores into a fresh averager
                record = averager.stacked()
                if record is not None:
                    assert torch.allclose(record.double(), torch.stack(every), rtol=0, atol=0, equal_nan=True), case
                    restored = LossAverager()
                    restored.load(record)
                    averager, samples, weighted, checked = restored, [], False, len(every)
        rows = torch.stack(every) if every else None
        if rows is None:
            assert averager.average() == [] and averager.stacked() is None
            continue
        if weighted:
            weights = torch.tensor(samples, dtype=torch.float64)
            expected = ((rows * weights[:, None]).sum(0) / weights.sum()).tolist()
        else:
            expected = (rows.sum(0) / rows.shape[0]).tolist()
        got = averager.average()
        assert len(got) == len(expected), case
        for a, b in zip(got, expected):
            assert (math.isnan(a) and math.isnan(b)) or a == b or math.isclose(a, b, rel_tol=1e-12), (case, a, b)
    huge = LossAverager()  # the largest finite float32 losses: their sum stays finite in float64
    for _ in range(50):
        huge.add(torch.tensor(3.4e38))
    assert huge.all_finite_since_check()
    huge.add(torch.tensor(-float("inf")))
    huge.add(torch.tensor(float("inf")))
    assert not huge.all_finite_since_check()


def test_all_finite_answers_as_an_elementwise_check_for_any_mix_of_dtypes_and_bad_values():
    """One sum of 2-norms per device: any NaN, +Inf or -Inf (also +Inf in one tensor and -Inf in another, which
    must not cancel) makes it False; weights of ordinary size never do."""
    from super_trainer.loop.stops import all_finite

    rng = random.Random(3)
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
    for case in range(400):
        tensors = []
        for _ in range(rng.randint(1, 6)):
            tensor = (torch.randn(rng.choice([(1,), (3,), (4, 5)])) * 10 ** rng.randint(0, 4)).to(rng.choice(dtypes))
            if rng.random() < 0.15:
                tensor.view(-1)[rng.randrange(tensor.numel())] = rng.choice([float("nan"), float("inf"), -float("inf")])
            tensors.append(tensor)
        expected = all(bool(torch.isfinite(t).all()) for t in tensors)
        assert all_finite(tensors) == expected, case
    assert not all_finite([torch.full((2,), float("inf")), torch.full((2,), -float("inf"))])
    assert all_finite([torch.full((1000,), 1e15)])
