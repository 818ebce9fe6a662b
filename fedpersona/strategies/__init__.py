"""What is shared and how it is aggregated.

- ``registry``: every Flower Message-API strategy by ``NAME(key=value)``, or a user's ``module:Class``;
- ``schemes``: personalization schemes (which tensors are shared, private, frozen), open to plug-ins;
- ``validation``: every reply screened before any strategy sees it;
- ``attacks``: simulated malicious users, for measuring what validation and robust rules prevent;
- ``pal``/``proximal``: PAL's mixture and FedProx's proximal term.
"""
