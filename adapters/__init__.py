"""Adapters as data: the canonical LoRA form, formats, safe parsing, validation, blending, the store.

Submodules, imported on demand (this package imports nothing, so ``adapters.home``
and ``adapters.errors`` stay light for the CLI):

- ``adapters.canonical``: ``LoraModule``, ``LoraAdapter``, ``BaseModelRef``, ``ModuleShapes``
- ``adapters.safeparse``: ``read_safetensors``, ``peek_header``, ``write_safetensors``
- ``adapters.formats``: ``load_adapter``, ``detect_format``, ``save_canonical``, ``to_kohya``,
  ``to_diffusers``
- ``adapters.validation``: ``validate_against_base``
- ``adapters.blend``: ``Blend`` and ``Merge`` (linear, TIES, DARE: what a request asks for), the
  blend updates the engine and backends write (``LowRank``, ``Dense``, ``add_update``)
- ``adapters.store``: the versioned adapter store
"""
