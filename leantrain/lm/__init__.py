"""Causal language modelling: fine-tuning an offline LLM (SmolLM2-135M) and pre-training small LLaMA models.

* ``data``: documents (KJV verses, .txt, .jsonl text or prompt/response) -> tokens -> packed fixed-length blocks
  with a loss mask (instruction tuning masks the prompt).
* ``models``: the SmolLM2 GGUF -> safetensors cache, local HF causal-LM folders, LLaMA presets for scratch
  pre-training (tiny ones for 2 CPU cores, the GaLore paper's 60M-7B for the memory estimator and GPUs).
* ``task``: ``CausalLMTask``, the object ``leantrain.train`` drives for ``--task causal-lm``.
* ``lowrank``: the factorised low-rank pre-training baseline of the GaLore paper (W = B A trained from scratch).

Submodules are imported on use; ``import leantrain.lm`` does not load transformers.
"""
