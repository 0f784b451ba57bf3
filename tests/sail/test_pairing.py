"""sail/pairing.py: the pairing rule of 02_self_reward.py on scored candidates with known answers."""
import math

from sail.pairing import BELOW_MIN_P, TIE, same_file_bytes, self_pair, tie_tolerance


def candidates(rewards):
    return [dict(prompt="a square", index=i, image=f"images/p_{i}.png", reward=r) for i, r in enumerate(rewards)]


def test_best_worst_pairs_the_highest_reward_with_the_lowest():
    pair, why = self_pair("p", candidates([0.5, 2.0, -1.0, 0.7]))
    assert why is None
    assert pair == dict(prompt="a square", prompt_id="p", image_w="images/p_1.png", image_l="images/p_2.png",
                        source="self", p=round(1 / (1 + math.exp(-3.0)), 6), reward_w=2.0, reward_l=-1.0)
    pair, _ = self_pair("p", candidates([1.0, 3.0, 3.0, -2.0, -2.0]))  # equal rewards: the lower index ranks higher
    assert (pair["image_w"], pair["image_l"]) == ("images/p_1.png", "images/p_4.png")


def test_random_pairs_two_candidates_per_prompt_seed_and_the_higher_reward_wins():
    group = candidates([0.5, 2.0, -1.0, 0.7])
    picks = {(pair["reward_w"], pair["reward_l"]) for i in range(30) for pair, _ in [self_pair(f"p{i}", group, "random")]}
    assert len(picks) > 2 and all(w > lose for w, lose in picks)
    assert self_pair("p3", group, "random", seed=0) == self_pair("p3", group, "random", seed=0)
    assert len({self_pair("p3", group, "random", seed=s)[0]["image_w"] for s in range(20)}) > 1


def test_ties_within_round_off_and_identical_images_give_no_pair():
    """Rewards 1e-4 apart at beta 5000 (p = 0.500025, round-off of the float32 errors) tie; so do two
    byte-identical images, whatever rewards independent draws gave them; a model equal to its
    reference gives every image reward 0."""
    assert self_pair("p", candidates([0.0, 0.0, 0.0])) == (None, TIE)
    close = candidates([1.0, 1.0 + 1e-4])
    assert tie_tolerance(5000.0) > 1e-4 > tie_tolerance(50.0)
    assert self_pair("p", close, beta=5000.0) == (None, TIE)
    assert self_pair("p", close, beta=50.0)[0] is not None
    apart = candidates([1.0, 1.1])
    assert self_pair("p", apart)[0] is not None
    for rule in ("best-worst", "random"):
        assert self_pair("p", apart, rule, same_image=lambda a, b: True) == (None, TIE)


def test_min_p_drops_pairs_the_self_reward_is_not_sure_of():
    apart = candidates([1.0, 1.1])  # p = sigmoid(0.1) = 0.525
    assert self_pair("p", apart, min_p=0.6) == (None, BELOW_MIN_P)
    assert self_pair("p", apart, min_p=0.5)[0]["p"] == round(1 / (1 + math.exp(-0.1)), 6)


def test_same_file_bytes(tmp_path):
    for name, data in (("a.png", b"one"), ("b.png", b"one"), ("c.png", b"two")):
        (tmp_path / name).write_bytes(data)
    same = same_file_bytes(tmp_path)
    assert same(dict(image="a.png"), dict(image="b.png")) and not same(dict(image="a.png"), dict(image="c.png"))
