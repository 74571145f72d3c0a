"""Adapters as data: the canonical LoRA form, formats, safe parsing, validation, blending, the store.

Submodules, imported on demand (this package imports nothing, so ``adapters.home``
and ``adapters.errors`` stay light for the CLI):

- ``adapters.canonical``: the module kinds (``LoraModule``, ``LohaModule``, ``LokrModule``,
  ``DiffModule``, ``DoraScale``), ``LoraAdapter``, ``BaseModelRef``, ``ModuleShapes``
- ``adapters.weights``: ``PartWeights`` (text encoder / UNet weights) and their text forms (no torch)
- ``adapters.safeparse``: ``read_safetensors``, ``peek_header``, ``write_safetensors``
- ``adapters.formats``: ``load_adapter``, ``detect_format``, ``save_canonical``, ``to_kohya``,
  ``to_diffusers``
- ``adapters.validation``: ``validate_against_base``
- ``adapters.blend``: ``Blend`` and ``Merge`` (linear, TIES, DARE: what a request asks for), each
  kind's layout and how a blend combines them (``prepare_module``, ``combine``), the blend updates
  the engine and backends write (``LowRank``, ``Dense``, ``Rescaled``, ``add_update``)
- ``adapters.store``: the versioned adapter store
"""
