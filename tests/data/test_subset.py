"""A fixed workload per simulated user: at most k training / test pairs, the same sample everywhere."""

from fedpersona.round.users import population_user
from fedpersona.config import RunConfig
from fedpersona.data.sources import subset_user
from fedpersona.data.synthetic import PreferenceSimulator


def test_subset_is_a_seeded_ordered_sample_and_zero_means_all():
    user = PreferenceSimulator("conflicting", 4, 0).user_data(2)  # 53 training pairs
    assert len(user.train) > 10 and len(user.test) > 5
    small = subset_user(user, 10, 5, seed=3)
    assert len(small.train) == 10 and len(small.test) == 5
    for part, whole in ((small.train, user.train), (small.test, user.test)):
        positions = [whole.index(p) for p in part]
        assert positions == sorted(positions)  # a sample, in the user's own order
    assert subset_user(user, 10, 5, seed=3) == small  # same seed, same pairs (every process agrees)
    assert subset_user(user, 10, 5, seed=4).train != small.train
    assert subset_user(user, 0, 0, seed=3) == user


def test_run_config_caps_every_simulated_user():
    config = RunConfig(num_users=3, max_train_pairs=6, max_test_pairs=4)  # every user has more than that
    for index in range(3):
        user = population_user(config, index)
        assert len(user.train) == 6 and len(user.test) == 4
