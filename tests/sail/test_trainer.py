"""sail/trainer.py on tiny SD1.5: the job as a declared type, the metrics of a step by name with one
wait for the device, and the image loader that reads ahead of the steps."""
import math

import pytest
import torch
from conftest import load_stage
from helpers import make_pairs

from sail import batches, dpo, trainer

train = load_stage("04_train")


def start_job(folder, *flags):
    pairs = make_pairs(folder / "data", n=8)
    argv = ["--init", "tiny-sd15", "--pairs", pairs, "--out", folder / "ckpt", "--max-steps", 4, "--save-every", 0, *flags]
    return trainer.start(train.build_parser().parse_args([str(a) for a in argv]))


def test_the_job_takes_only_its_declared_fields(tmp_path):
    job = start_job(tmp_path, "--batch-size", 4)
    assert isinstance(job, trainer.Job) and job.micro == 4 and job.total_steps == 4
    with pytest.raises(AttributeError):
        job.window = []  # a field the type does not declare


def test_step_metrics_are_what_the_per_micro_batch_values_give(tmp_path, monkeypatch):
    """The metrics add up on the device and reach the host once per step; they equal, to the bit, the
    arithmetic of reading every micro batch's values (`.item()`) and summing them on the host, which they
    replace: a Python sum of value x pairs per micro batch, then float32, then / --batch-size."""
    job = start_job(tmp_path, "--batch-size", 8, "--micro-batch", 1, "--lr", 1e-3)  # eight micro batches per step
    results, norms = [], []
    real_step, real_clip = dpo.dpo_micro_batch, job.accelerator.clip_grad_norm_
    monkeypatch.setattr(dpo, "dpo_micro_batch", lambda *a, **k: results.append(real_step(*a, **k)) or results[-1])
    monkeypatch.setattr(job.accelerator, "clip_grad_norm_", lambda *a, **k: norms.append(real_clip(*a, **k)) or norms[-1])
    for step in range(3):
        results.clear(), norms.clear()
        metrics = trainer.train_step(job, step)
        assert len(results) == 8 and len(norms) == 1
        stats = [[getattr(r, name).item() * 1 for name in trainer.METRICS] for r in results]  # value x pairs
        totals = (torch.tensor([sum(column) for column in zip(*stats)]) / 8).tolist()
        assert metrics == trainer.StepMetrics(*totals, float(norms[0]))
        assert metrics.loss != pytest.approx(math.log(2), abs=1e-6) or step == 0  # the model moved: not log 2 throughout


def test_a_step_asked_out_of_order_starts_the_loader_again(tmp_path):
    """Steps in order come from one loader reading ahead; a step asked out of order (a benchmark's own
    sequence) starts it again from there, and each micro batch gets its own pairs' images."""
    job = start_job(tmp_path, "--batch-size", 4, "--micro-batch", 2, "--num-workers", 1)
    for step, m in [(0, 0), (0, 1), (2, 0), (2, 1), (1, 0)]:
        indices, pixels = trainer.loaded_images(job, step, m)
        want = batches.micro_batches(job.order, step, 4, 0, 1, 2)[m]
        assert list(indices) == want and pixels.shape == (4, 32, 32, 3) and pixels.dtype == torch.uint8
        images = [img for i in want for img in batches.load_pair_pixels(job.pairs[i], 32, 0, False, True)]
        assert torch.equal(pixels, batches.image_stack(images))


def test_the_loader_reads_only_pairs_not_in_the_latent_cache(tmp_path):
    job = start_job(tmp_path, "--batch-size", 4, "--micro-batch", 2)
    first = batches.micro_batches(job.order, 0, 4, 0, 1, 2)[0]
    job.latent_cache.store[first[0]] = torch.zeros(2, 4, 4, 4)  # as if encoded before
    indices, pixels = trainer.loaded_images(job, 0, 0)
    assert list(indices) == first[1:] and pixels.shape[0] == 2
