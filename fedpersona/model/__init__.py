"""The frozen base model and its adapters.

- ``loading``/``embedded``/``gguf``: the base (the shipped embedded model, any HF id or folder, GGUF files);
- ``adapters``: shared and private LoRA adapters and the split policy (``Role``: shared, private, frozen);
- ``resident``: one resident model per process (base loaded once; users swap tensors in);
- ``prompting``/``targets``: chat templates and LoRA targets per architecture;
- ``signal``/``inspect``: pairs that carry no signal once encoded; a data set as a model sees it;
- ``export``/``merge``: adapters in PEFT's format; ``allocator``: memory returned to the system.
"""
