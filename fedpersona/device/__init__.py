"""Everything a user owns on their device, and what they do with it there.

- ``state``: ``DeviceState``, the state folder (``--state DIR``): adapters, ledger, reply cache, atomic files;
- ``memory``: ``PreferenceMemory``, the user's feedback and chats (SQLite in WAL mode);
- ``policy``: ``DevicePolicy``, what this device accepts whatever a server asks (the device decides);
- ``privacy_record``: what forgotten pairs had cost (a budget never restarts by accident);
- ``ref_cache``: reference log-probs kept across restarts;
- ``assistant``: the personal assistant loop behind ``fedpersona chat``.
"""
