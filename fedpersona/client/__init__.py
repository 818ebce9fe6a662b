"""The Flower ClientApp: what a worker (simulation) or a device (deployment) does with a message.

- ``app``: the ClientApp (``train``/``evaluate``), shared tensors in, shared tensors out;
- ``cohort``: a simulation message for a cohort of users, answered user by user;
- ``device``: the ClientApp's device mode: one real user, their state folder and privacy policy.

The round itself is Flower-free (``fedpersona.round``); the on-device state is ``fedpersona.device``.
"""
