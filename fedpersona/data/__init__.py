"""Preference data: the pair schema and files, synthetic users, dataset formats, the users of a run.

- ``schema``: ``PreferencePair``/``UserData``, the JSONL pair file (one clear line per bad row);
- ``synthetic``: synthetic heterogeneous users with hidden utilities (a pure function of seed and user);
- ``formats``: loaders of published formats (HH-RLHF, PRISM, P-SOUPS, PersonalLLM), a registry open to
  plug-ins (``register_data_format``);
- ``sources``: a run's users from one spec (``synthetic:<scenario>``, a pair file, ``FORMAT:PATH``);
- ``style_prompts``: the small data of the generated scenarios.
"""
