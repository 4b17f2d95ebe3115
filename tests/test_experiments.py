"""The experiment harness: warm-up, fit (checkpoints, resume, early stopping, the best model of
this run only, interrupts), sharded batches, data-parallel training with gloo, command lines."""

from __future__ import annotations

import json
import os

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyro_dgm.data import MinibatchLoader
from pyro_dgm.experiments import (
    Distributed,
    ExampleParser,
    TrainingInterrupted,
    check_device,
    fit,
    kl_warmup,
    load_checkpoint,
    save_checkpoint,
    save_results,
)


def test_kl_warmup_reaches_one_at_the_end_of_the_warmup_in_both_units():
    # 4 steps per epoch, 2 epochs of warm-up: the ramp rises every step, or once per epoch
    steps = [kl_warmup(epoch, step, 4, 2.0) for epoch in range(3) for step in range(4)]
    assert steps == [k / 8 for k in range(1, 9)] + [1.0] * 4
    epochs = [kl_warmup(epoch, 3, 4, 2.0, unit="epoch") for epoch in range(3)]
    assert epochs == [0.5, 1.0, 1.0]
    assert kl_warmup(0, 0, 4, 0.0) == 1.0
    with pytest.raises(ValueError, match="unit"):
        kl_warmup(0, 0, 4, 1.0, unit="batch")
    with pytest.raises(ValueError, match="warmup_epochs"):
        kl_warmup(0, 0, 4, -1.0)


class _Quadratic(nn.Module):
    """A model whose loss is ||w - batch mean + noise||^2: it draws from torch's generator, so a
    resumed run only retraces an uninterrupted one if the random state is restored."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(3))

    def loss(self, batch, kl_scale=1.0, fail_at=None):
        if fail_at is not None and fail_at():
            raise KeyboardInterrupt
        return (self.weight - batch.mean(0) + 0.1 * torch.randn(3)).square().sum()


def _batches(count=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 3, generator=generator) + 1.0,) for _ in range(count)]


def _fit(model, out, scores=None, **kwargs):
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    validate = None
    if scores is not None:
        iterator = iter(scores)
        validate = lambda: next(iterator)  # noqa: E731
    return fit(model, model.loss, optimizer, _batches(), out, validate=validate,
               progress=False, log=lambda line: None, **kwargs)


def test_fit_writes_checkpoint_and_metrics_every_epoch_and_resumes(tmp_path):
    torch.manual_seed(0)
    model = _Quadratic()
    first = _fit(model, tmp_path, epochs=2)
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["epoch"] == 1 and [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert metrics["run_id"] == first.run_id == saved["run_id"]
    assert torch.equal(saved["model"]["weight"], model.weight.detach())

    torch.manual_seed(123)  # what the checkpoint's random state replaces
    resumed_model = _Quadratic()
    resumed = _fit(resumed_model, tmp_path, epochs=4, resume=True)
    assert resumed.run_id == first.run_id and [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    # four epochs in one go take the same path as two plus two: weights, Adam's moments and
    # the random stream all continue
    torch.manual_seed(0)
    straight = _Quadratic()
    _fit(straight, tmp_path / "straight", epochs=4)
    torch.testing.assert_close(resumed_model.weight, straight.weight, rtol=0, atol=0)


def test_fit_stops_early_and_leaves_the_best_epoch(tmp_path):
    model = _Quadratic()
    weights = {}

    def remember():
        weights[len(weights) + 1] = model.weight.detach().clone()
        return {}

    result = _fit(model, tmp_path, scores=[1.0, 2.0, 3.0, 2.5, 2.0, 1.0, 0.0], epochs=10,
                  patience=2, epoch_metrics=remember)
    assert result.stopped_early and result.best_epoch == 3 and result.epochs == 5
    assert torch.equal(model.weight.detach(), weights[3])
    assert load_checkpoint(tmp_path / "best.pt")["run_id"] == result.run_id


def test_patience_counts_from_the_end_of_the_warmup(tmp_path):
    result = _fit(_Quadratic(), tmp_path, scores=[5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0],
                  epochs=8, patience=2, warmup_epochs=4)
    assert result.best_epoch == 1 and result.epochs == 6  # epochs 5 and 6 after the warm-up


def test_a_fresh_run_never_evaluates_a_stale_best_checkpoint(tmp_path):
    # an earlier run in the same folder left a best.pt with another model
    save_checkpoint(tmp_path / "best.pt", model={"weight": torch.full((3,), 100.0)}, epoch=0,
                    run_id="earlier", score=1e9)
    model = _Quadratic()
    result = _fit(model, tmp_path, scores=[1.0, 0.0], epochs=2)
    assert result.best_epoch == 1
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["run_id"] == result.run_id
    assert torch.equal(model.weight.detach(), best["model"]["weight"])
    assert model.weight.abs().max() < 10

    # a best.pt of another run put into a resumed run's folder is not loaded either
    save_checkpoint(tmp_path / "best.pt", model={"weight": torch.full((3,), 100.0)}, epoch=0,
                    run_id="another", score=1e9)
    resumed = _Quadratic()
    _fit(resumed, tmp_path, scores=[-5.0], epochs=3, resume=True)
    assert resumed.weight.abs().max() < 10


def test_interrupts_say_what_the_checkpoint_holds(tmp_path):
    calls = {"n": 0}

    def after(steps):
        def fail():
            calls["n"] += 1
            return calls["n"] > steps
        return fail

    with pytest.raises(TrainingInterrupted, match="no epoch finished"):
        _fit(_Quadratic(), tmp_path / "a", epochs=3, fail_at=after(2))
    assert not (tmp_path / "a" / "checkpoint.pt").exists()
    calls["n"] = 0
    with pytest.raises(TrainingInterrupted, match="epoch 1 is saved"):
        _fit(_Quadratic(), tmp_path / "b", epochs=3, fail_at=after(6))
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["epoch"] == 0


def test_fit_refuses_a_non_finite_loss_naming_the_epoch(tmp_path):
    model = _Quadratic()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="epoch 1 is nan"):
        fit(model, lambda batch, kl_scale: model.weight.sum() * float("nan"), optimizer,
            _batches(), tmp_path, epochs=2, progress=False, log=lambda line: None)
    with pytest.raises(ValueError, match="patience"):
        _fit(model, tmp_path, epochs=2, patience=3)


def test_zero_epochs_write_no_checkpoint(tmp_path):
    result = _fit(_Quadratic(), tmp_path, epochs=0)
    assert result.epochs == 0 and result.checkpoint is None
    assert not (tmp_path / "checkpoint.pt").exists()


def test_shards_of_a_global_batch_are_the_single_process_batches():
    images = torch.rand(40, 6, generator=torch.Generator().manual_seed(0))
    single = MinibatchLoader(images, 8, return_indices=True,
                             generator=torch.Generator().manual_seed(3))
    shards = [MinibatchLoader(images, 4, return_indices=True, rank=rank, num_replicas=2,
                              generator=torch.Generator().manual_seed(3)) for rank in (0, 1)]
    assert len(single) == len(shards[0]) == 5
    for (x, i), (x0, i0), (x1, i1) in zip(single, *shards, strict=True):
        assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(i, torch.cat([i0, i1]))
    with pytest.raises(ValueError, match="generator"):
        MinibatchLoader(images, 4, rank=0, num_replicas=2)
    with pytest.raises(ValueError, match="rank"):
        MinibatchLoader(images, 4, rank=2, num_replicas=2, generator=torch.Generator())


# --- data-parallel training: 2 processes with gloo equal 1 process on the global batch ----------

_NUM_DATA, _DIM, _GLOBAL_BATCH = 32, 6, 8


class _Decoder(nn.Module):
    """A Pyro model without latents, so that its loss is deterministic given the batch."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(_DIM, 5), nn.Tanh(), nn.Linear(5, _DIM))

    def model(self, x, indices, kl_scale=1.0):
        with pyro.plate("data", _NUM_DATA, subsample=indices):
            pyro.sample("x", dist.Bernoulli(logits=self.net(x)).to_event(1), obs=x)

    def guide(self, x, indices, kl_scale=1.0):
        pass


def _train(rank: int, world_size: int, out: str) -> dict:
    images = torch.rand(_NUM_DATA, _DIM, generator=torch.Generator().manual_seed(1))
    loader = MinibatchLoader(images, _GLOBAL_BATCH // world_size, return_indices=True,
                             rank=rank, num_replicas=world_size,
                             generator=torch.Generator().manual_seed(2))
    decoder = _Decoder()
    elbo = pyro.infer.Trace_ELBO()
    fit(decoder, lambda *batch, **kw: elbo.differentiable_loss(decoder.model, decoder.guide,
                                                                *batch, **kw),
        torch.optim.Adam(decoder.parameters(), lr=0.05), loader, out, epochs=2,
        progress=False, log=lambda line: None, distributed=Distributed(rank, world_size))
    return {name: value.detach().clone() for name, value in decoder.state_dict().items()}


def _worker(rank: int, world_size: int, init_file: str, out: str) -> None:
    import torch.distributed

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}",
                                         rank=rank, world_size=world_size)
    try:
        torch.save(_train(rank, world_size, out), os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_two_gloo_processes_train_as_one_on_the_global_batch(tmp_path):
    single = _train(0, 1, str(tmp_path / "single"))
    out = tmp_path / "ddp"
    out.mkdir()
    torch.multiprocessing.spawn(_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2)
    for rank in (0, 1):
        parallel = torch.load(out / f"rank{rank}.pt")
        for name, value in single.items():
            torch.testing.assert_close(parallel[name], value, rtol=1e-5, atol=1e-6)
    # rank 0 alone wrote the checkpoint, 8 steps in (2 epochs of 4 global batches)
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1


# --- command lines ----------------------------------------------------------------------------

def test_devices_are_checked_with_one_line_naming_the_option():
    assert check_device("cpu") == "cpu"
    assert check_device("auto") in ("cpu", "cuda")
    with pytest.raises(ValueError, match="--device gpu: not a device"):
        check_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: this machine has no CUDA"):
            check_device("cuda")


def _parser():
    parser = ExampleParser("An example.", {"default": {"epochs": 10, "patience": None},
                                           "paper": {"epochs": 500, "patience": 50}})
    parser.add_preset_argument("--epochs", type=int, help="the largest number of epochs")
    parser.add_preset_argument("--patience", type=int, help="early stopping")
    parser.add_argument("--train-images", type=int, help="use the first N training images")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    parser.add_run_arguments(out="runs/x")
    return parser


def test_presets_fill_what_the_command_line_leaves_open(tmp_path):
    args = _parser().parse_args(["--preset", "paper", "--epochs", "7", "--data-dir",
                                 str(tmp_path)])
    assert (args.epochs, args.patience, args.data_dir_given) == (7, 50, True)
    args = _parser().parse_args([])
    assert (args.epochs, args.patience, args.data_dir_given) == (10, None, False)


def test_help_gives_each_default_once_and_says_what_presets_set(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(preset default: 10; paper: 500)" in text
    assert "(preset default: none; paper: 50)" in text
    assert "learning rate (default: 0.001)" in text
    assert "default: None" not in text and text.count("(default: 0.001)") == 1
    assert "use the first N training images --lr" in text  # no default shown for None


def test_a_missing_data_folder_named_by_the_user_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["--data-dir", str(tmp_path / "nonexistent")])
    assert f"--data-dir {tmp_path / 'nonexistent'}: no such folder" in capsys.readouterr().err


def test_require_names_the_one_argument_that_is_wrong(capsys):
    parser = _parser()
    with pytest.raises(SystemExit):
        parser.require(False, "--batch-size", "a positive integer", 0)
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.endswith("error: --batch-size must be a positive integer, got 0")


def test_metrics_are_written_before_the_pictures_and_survive_a_failing_one(tmp_path):
    lines = []

    def fails(path):
        raise ValueError("images must hold at least 32 images")

    written = save_results(tmp_path, {"test": {"elbo": -90.0}},
                           {"broken.png": fails, "fine.txt": lambda p: p.write_text("ok")},
                           log=lines.append)
    assert written == ["metrics.json", "fine.txt"]
    assert json.loads((tmp_path / "metrics.json").read_text())["test"]["elbo"] == -90.0
    assert "broken.png was not drawn" in lines[0]


def test_the_library_imports_no_harness_and_no_plotting_or_scipy():
    # (tqdm is not in the list: Pyro's own inference imports it)
    import subprocess
    import sys

    code = ("import sys, pyro_dgm.special, pyro_dgm.distributions, pyro_dgm.transforms, "
            "pyro_dgm.infer, pyro_dgm.models; "
            "print(sorted(name for name in sys.modules if name.split('.')[0] in "
            "('matplotlib', 'scipy', 'torchvision') or name.startswith("
            "('pyro_dgm.experiments', 'pyro_dgm.data'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]", result.stdout
