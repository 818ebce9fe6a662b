"""One user's round, free of Flower, and what the server and the clients both use.

- ``train``: ``train_round`` (one user) and ``train_cohort_rounds`` (the users of one message);
- ``evaluate``: ``evaluate_round`` (held-out accuracy; the final generation check);
- ``resident``: the run's resident model in this process (``resident_for``);
- ``users``: who user ``index`` of a run is, and the per-(user, round) seed;
- ``stores``/``user_store``: where a user's private state lives between rounds.
"""
