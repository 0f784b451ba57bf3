"""The SAIL loop's stages: self-reward on cases with a known answer, no pair from identical images, mixup shares,
generation determinism and resume, the overlap refusal."""
import copy
import json
import shutil

import pytest
import torch
from conftest import load_stage
from helpers import coloured_image, make_pairs, make_pool

from sail import batches, common, dpo, files, models
from sail.self_reward import self_rewards

generate = load_stage("01_generate")
self_reward = load_stage("02_self_reward")
mixup = load_stage("03_mixup")
CPU = torch.device("cpu")


def run(stage, *argv):
    common.run_stage(stage.locked_main, stage.build_parser().parse_args([str(a) for a in argv]))


@pytest.fixture(scope="module")
def tiny():
    desc = models.describe_model("tiny-sd15")
    pipe = models.load_pipeline(desc, CPU, torch.float32)
    from diffusers import DDPMScheduler
    return pipe, DDPMScheduler.from_config(pipe.scheduler.config)


def latents_of(pipe, colours):
    return batches.encode_images(pipe.vae, [coloured_image(c, 32, seed=i) for i, c in enumerate(colours)], CPU)


def test_model_equal_to_reference_gives_zero_reward(tiny):
    pipe, sched = tiny
    lat = latents_of(pipe, [(200, 0, 0), (0, 200, 0), (0, 0, 200)])
    cond = batches.encode_prompts(pipe, ["a square"], CPU)
    reward, se = self_rewards(pipe.unet, pipe.unet, sched, lat, cond, 32, draws=4, beta=5000.0)
    assert torch.equal(reward, torch.zeros(3, dtype=torch.float64)) and torch.equal(se, torch.zeros(3, dtype=torch.float64))


def test_a_model_tuned_towards_one_image_ranks_it_first(tiny):
    pipe, sched = tiny
    lat = latents_of(pipe, [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0)])
    cond = batches.encode_prompts(pipe, ["a square"], CPU)
    tuned = copy.deepcopy(pipe.unet).train()
    opt = torch.optim.Adam(tuned.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):  # plain diffusion training on image 2 only
        noise = torch.randn((8, *lat.shape[1:]), generator=g)
        t = torch.randint(0, 1000, (8,), generator=g)
        x = lat[2:3].expand(8, -1, -1, -1)
        pred = dpo.unet_call(tuned, sched.add_noise(x, noise, t), t, {"embeds": cond["embeds"].expand(8, -1, -1)}, 32)
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    tuned.eval()
    reward, se = self_rewards(tuned, pipe.unet, sched, lat, cond, 32, draws=10, beta=5000.0)
    assert reward.argmax().item() == 2, reward
    assert (se > 0).all()


def test_common_draws_give_identical_images_identical_rewards(tiny):
    pipe, sched = tiny
    other = copy.deepcopy(pipe.unet)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01 * torch.randn_like(p))
    lat = latents_of(pipe, [(200, 0, 0)]).repeat(2, 1, 1, 1)
    cond = batches.encode_prompts(pipe, ["a square"], CPU)
    shared, _ = self_rewards(other, pipe.unet, sched, lat, cond, 32, draws=3, common_draws=True, batch_size=4)
    own, _ = self_rewards(other, pipe.unet, sched, lat, cond, 32, draws=3, common_draws=False)
    shared_gap, own_gap = abs(shared[0] - shared[1]).item(), abs(own[0] - own[1]).item()
    assert shared_gap < 1e-4 * abs(shared[0]).item() + 1e-9  # equal up to batching round-off
    assert own_gap > 100 * shared_gap
    again, _ = self_rewards(other, pipe.unet, sched, lat, cond, 32, draws=3, common_draws=True, batch_size=5)
    torch.testing.assert_close(again, shared, rtol=1e-4, atol=1e-6)  # batching does not change the draws


def trained_run(tmp_path, candidates):
    """A run whose iteration 0 trained two steps (so that rewards are not all zero) and whose
    iteration 1 generated `candidates` images per prompt."""
    run_dir = make_run(tmp_path)
    train = load_stage("04_train")
    common.run_stage(train.locked_main, train.build_parser().parse_args(
        ["--run", str(run_dir), "--iter", "0", "--preset", "tiny-sd15", "--max-steps", "2", "--lr", "1e-4"]))
    run(generate, "--run", run_dir, "--iter", 1, "--num-candidates", candidates)
    return run_dir


def test_self_reward_stage_gives_no_pair_for_identical_images(tmp_path):
    run_dir = trained_run(tmp_path, candidates=2)
    folder = run_dir / "iter_01"
    gens = files.read_jsonl(folder / "generations.jsonl")
    first = [g for g in gens if g["prompt_id"] == gens[0]["prompt_id"]]
    (folder / first[1]["image"]).write_bytes((folder / first[0]["image"]).read_bytes())
    run(self_reward, "--run", run_dir, "--iter", 1, "--draws", 2, "--no-common-draws")
    rewards = {r["image"]: r["reward"] for r in files.read_jsonl(folder / "rewards.jsonl")}
    assert rewards[first[0]["image"]] != rewards[first[1]["image"]]  # own draws rank a copy by noise alone
    pairs = files.read_jsonl(folder / "pairs.jsonl")
    assert gens[0]["prompt_id"] not in {p["prompt_id"] for p in pairs} and len(pairs) == len({g["prompt_id"] for g in gens}) - 1


@pytest.mark.parametrize("share, n_human", [(0.25, 4), (0.0, 0), (0.5, 12), (0.75, 36)])
def test_mixup_shares(share, n_human):
    self_rows = [dict(source="self", i=i, p=0.5) for i in range(12)]
    human_rows = [dict(source="human", i=i) for i in range(50)]
    mixed = mixup.mix(self_rows, human_rows, share, None, seed=1)
    assert sum(r["source"] == "human" for r in mixed) == n_human and sum(r["source"] == "self" for r in mixed) == 12
    assert len({r["i"] for r in mixed if r["source"] == "human"}) == n_human  # without replacement
    assert mixed == mixup.mix(self_rows, human_rows, share, None, seed=1)


def test_mixup_keeps_the_most_confident_and_draws_with_replacement_when_short():
    self_rows = [dict(source="self", i=i, p=i / 10) for i in range(10)]
    mixed = mixup.mix(self_rows, [dict(source="human", i=0)], 0.5, 4, seed=0)
    assert sorted(r["i"] for r in mixed if r["source"] == "self") == [6, 7, 8, 9]
    assert sum(r["source"] == "human" for r in mixed) == 4


def test_mixup_stage_rewrites_paths_and_records_origin(tmp_path):
    make_pairs(tmp_path / "seed", n=6)
    make_pairs(tmp_path / "iter_01", n=3, source="self")
    run(mixup, "--run", tmp_path, "--iter", 1)
    out = tmp_path / "iter_01" / "train_pairs.jsonl"
    rows = files.read_pairs(out)
    assert sum(r["source"] == "human" for r in rows) == 1 and len(rows) == 4
    human = next(r for r in rows if r["source"] == "human")
    assert human["image_w"].startswith("../seed/images/") and human["origin"].startswith("../seed/pairs.jsonl:")
    first = out.read_bytes()
    out.unlink()
    run(mixup, "--run", tmp_path, "--iter", 1)
    assert out.read_bytes() == first


def make_run(tmp_path):
    make_pool(tmp_path / "pools" / "iter_01.jsonl", range(2))
    make_pool(tmp_path / "pools" / "iter_02.jsonl", range(2, 4))
    make_pairs(tmp_path / "seed", n=2)
    shutil.copytree(models.resolve_model_path("tiny:sd15"), tmp_path / "base")
    return tmp_path


def test_generation_is_reproducible_and_resumes(tmp_path):
    run_dir = make_run(tmp_path)
    argv = ["--ckpt", "tiny-sd15", "--pool", run_dir / "pools" / "iter_01.jsonl", "--num-candidates", 3]
    run(generate, *argv, "--out", tmp_path / "a")
    gens = files.read_jsonl(tmp_path / "a" / "generations.jsonl")
    assert len(gens) == 6 and len({g["seed"] for g in gens}) == 6
    assert (tmp_path / "a" / "generate.args.json").is_file()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / "generations.jsonl").unlink()
    for g in gens[1:3]:
        (tmp_path / "b" / g["image"]).unlink()
    run(generate, *argv, "--out", tmp_path / "b")
    assert (tmp_path / "b" / "generations.jsonl").read_bytes() == (tmp_path / "a" / "generations.jsonl").read_bytes()
    for g in gens:
        assert (tmp_path / "b" / g["image"]).read_bytes() == (tmp_path / "a" / g["image"]).read_bytes()


def test_generation_refuses_overlapping_pools(tmp_path, capsys):
    run_dir = make_run(tmp_path)
    make_pool(run_dir / "pools" / "iter_02.jsonl", range(1, 3))
    with pytest.raises(SystemExit):
        run(generate, "--run", run_dir, "--iter", 1, "--ckpt", "tiny-sd15")
    err = capsys.readouterr().err
    assert "iter_01.jsonl and" in err and "share 1 prompt" in err, err
    assert not (run_dir / "iter_01" / "generations.jsonl").exists()


def test_self_reward_stage_refuses_when_every_reward_ties(tmp_path, capsys):
    run_dir = make_run(tmp_path)
    run(generate, "--run", run_dir, "--iter", 1, "--ckpt", "tiny-sd15", "--num-candidates", 2)
    with pytest.raises(SystemExit):
        run(self_reward, "--run", run_dir, "--iter", 1, "--ckpt", "tiny-sd15", "--draws", 2)
    assert "all 2 prompts tie" in capsys.readouterr().err
    assert not (run_dir / "iter_01" / "pairs.jsonl").exists()


def test_self_reward_resumes_from_a_killed_run(tmp_path):
    """A partial file with finished prompts and a torn last line: the rerun scores only the rest
    and writes the same files as an uninterrupted run."""
    run_dir = trained_run(tmp_path, candidates=3)
    folder = run_dir / "iter_01"
    run(self_reward, "--run", run_dir, "--iter", 1, "--draws", 2)
    full = {name: (folder / name).read_bytes() for name in ("rewards.jsonl", "pairs.jsonl")}
    lines = full["rewards.jsonl"].decode().splitlines(keepends=True)
    (folder / "rewards.partial.0.jsonl").write_text("".join(lines[:3]) + lines[3][:20])
    for name in full:
        (folder / name).unlink()
    run(self_reward, "--run", run_dir, "--iter", 1, "--draws", 2)
    assert "1 scored already" in (folder / "log.txt").read_text().splitlines()[-3]
    assert {name: (folder / name).read_bytes() for name in full} == full
    assert not list(folder.glob("rewards.partial.*"))


def test_generation_rerun_with_other_settings_stops_instead_of_mixing(tmp_path, capsys):
    """A killed generation (images there, no generations.jsonl) continues only with the settings that
    made its images; another --steps or --cfg stops and names both values."""
    run_dir = make_run(tmp_path)
    argv = ["--ckpt", "tiny-sd15", "--pool", run_dir / "pools" / "iter_01.jsonl", "--num-candidates", 2, "--out", tmp_path / "g"]
    run(generate, *argv, "--steps", 2)
    gens = files.read_jsonl(tmp_path / "g" / "generations.jsonl")
    (tmp_path / "g" / "generations.jsonl").unlink()
    (tmp_path / "g" / gens[1]["image"]).unlink()  # killed before the last images and the list
    kept = (tmp_path / "g" / gens[0]["image"]).read_bytes()
    for flag in (["--steps", 3], ["--cfg", 1.5]):
        with pytest.raises(SystemExit):
            run(generate, *argv, "--steps", 2, *flag)  # the last --steps counts
        err = capsys.readouterr().err
        name = flag[0][2:]
        assert f"holds work made with {name} = " in err and f"this run has {name} = {flag[1]!r}" in err, err
        assert "generate.settings.json to generate anew" in err
        assert not (tmp_path / "g" / "generations.jsonl").exists() and (tmp_path / "g" / gens[0]["image"]).read_bytes() == kept
    run(generate, *argv, "--steps", 2)
    assert len(files.read_jsonl(tmp_path / "g" / "generations.jsonl")) == len(gens)


def test_self_reward_rerun_with_other_settings_stops_instead_of_mixing(tmp_path, capsys):
    run_dir = make_run(tmp_path)
    run(generate, "--run", run_dir, "--iter", 1, "--ckpt", "tiny-sd15", "--num-candidates", 2)
    folder = run_dir / "iter_01"
    partial = folder / "rewards.partial.0.jsonl"
    partial.write_text('{"prompt_id": "prompt0", "prompt": "prompt number 0", "index": 0, "image": "x", "reward": 1.0,'
                       ' "reward_se": 0.1, "draws": 2}\n')
    files.write_json_atomic(folder / "self_reward.settings.json", dict(
        model="tiny-sd15", reference="base", draws=2, common_draws=True, beta=5000.0, seed=0, mixed_precision="no"))
    for flag, name, value in ((["--draws", 3], "draws", 3), (["--beta", 2500], "beta", 2500.0),
                              (["--no-common-draws"], "common_draws", False), (["--ref", "tiny-sdxl"], "reference", "tiny-sdxl")):
        with pytest.raises(SystemExit):
            run(self_reward, "--run", run_dir, "--iter", 1, "--ckpt", "tiny-sd15", "--draws", 2, *flag)
        err = capsys.readouterr().err
        assert f"holds work made with {name} = " in err and f"this run has {name} = {value!r}" in err, err
        assert partial.read_text().count("\n") == 1 and not (folder / "rewards.jsonl").exists()


def test_self_reward_draw_scheme_is_a_setting(tmp_path, capsys):
    """--draw-scheme changes the rewards and is recorded: a killed run continues only with the same scheme.
    The default (iid) leaves the settings file as it was before the option, so older folders continue."""
    run_dir = trained_run(tmp_path, candidates=2)
    folder = run_dir / "iter_01"
    run(self_reward, "--run", run_dir, "--iter", 1, "--draws", 2)
    iid = {r["image"]: r["reward"] for r in files.read_jsonl(folder / "rewards.jsonl")}
    assert "draw_scheme" not in json.loads((folder / "self_reward.settings.json").read_text())
    for name in ("rewards.jsonl", "pairs.jsonl", "self_reward.settings.json"):
        (folder / name).unlink()
    run(self_reward, "--run", run_dir, "--iter", 1, "--draws", 2, "--draw-scheme", "stratified-antithetic")
    other = {r["image"]: r["reward"] for r in files.read_jsonl(folder / "rewards.jsonl")}
    assert other.keys() == iid.keys() and all(other[k] != iid[k] for k in iid)
    (folder / "rewards.partial.0.jsonl").write_text((folder / "rewards.jsonl").read_text().splitlines()[0] + "\n")
    for name in ("rewards.jsonl", "pairs.jsonl"):  # killed before the end
        (folder / name).unlink()
    with pytest.raises(SystemExit):
        run(self_reward, "--run", run_dir, "--iter", 1, "--draws", 2)
    err = capsys.readouterr().err
    assert "draw_scheme = 'stratified-antithetic'" in err and "draw_scheme = None" in err, err
