"""OpenVINO GenAI as a benchmark peer: an exporter of loraloom's models to the folder layout
``openvino_genai.Text2ImagePipeline`` loads, and helpers to drive that pipeline.

Imported lazily: ``openvino``, ``openvino_tokenizers`` and ``openvino_genai`` are the
``bench`` extra, not core dependencies.
"""
