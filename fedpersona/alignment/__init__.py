"""Preference alignment on one user's pairs, free of Flower and of ``RunConfig`` (the methods layer).

- ``losses``: DPO-family pairwise losses, per pair, in a registry open to plug-ins (``register_loss``);
- ``settings``: ``TrainSettings`` (what one user's local training needs);
- ``trainer``: ``train_local`` (AdamW, token-budget micro-batches, cached reference log-probs);
- ``stacked``: several users trained in one forward/backward (stacked adapters), equal to one after another;
- ``logprobs``/``microbatch``/``batching``: response log-probs in memory bounded by the scored tokens;
- ``evaluation``: held-out pairwise accuracy of the personalized, global and base models;
- ``generation``/``mixing``: personalized generation (strength knob, decoding-time logit mixing).
"""
