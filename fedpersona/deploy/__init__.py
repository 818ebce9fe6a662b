"""Process supervisors of both sides of a real deployment.

- ``server`` (``fedpersona server``): a SuperLink with TLS and persistent state, one run submitted, followed;
- ``node`` (``fedpersona client``): this device's SuperNode, bound to the user's state folder;
- ``executor``: runs the device's ClientApp tasks in one long-lived process (the model stays loaded);
- ``superlink``, ``control``, ``supernode_main``, ``tls_probe``, ``processes``: the Flower processes, the
  Control API, a TLS probe, children that die with their parent.
"""
