"""A user's personal model on disk: its file formats, reading them, and applying one to a draw.

One module per training method's file, each with what both sides of a model need and no training code:

- ``engine.personal.lora``        diffusers-format LoRA safetensors (``save_lora`` writes one from trained
  adapters; the renderer loads it with diffusers' ``load_lora_weights``).
- ``engine.personal.ti``          Textual Inversion embedding files (``SDXL_KEYS``), and adding a learned
  word to the resident pipeline for one draw (``loaded_ti``).
- ``engine.personal.dreambooth``  DreamBooth weights files (``write_weights`` / ``load_weights``), and
  swapping them into the resident modules for one draw (``WeightSwapper``, ``WeightsCache``).

The trainers (``engine.train``) write their files through these modules; the renderer
(``engine.render``) reads and applies them without importing any training code.
"""

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
"""The text encoders' pipeline attribute names (and key prefixes in a weights file), in order."""
