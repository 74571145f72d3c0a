"""``loraloom serve``: flags override ``LORALOOM_*`` variables, which override the defaults."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from adapters.envsettings import env_name
from server.settings import FIELDS


def _opt(name: str, *flags: str):
    """A typer option whose help is the setting's help plus its variable."""
    field = FIELDS[name]
    default = field.default
    shown = f"default {default}" if default not in (None, "") else "no default"
    text = f"{field.metadata['help']} (env {env_name(name)}; {shown})"
    return typer.Option(*flags, help=text, show_default=False)


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        host: Annotated[str | None, _opt("host", "--host")] = None,
        port: Annotated[int | None, _opt("port", "--port", "-p")] = None,
        model: Annotated[str | None, _opt("model", "--model", "-m")] = None,
        device: Annotated[str | None, _opt("device", "--device")] = None,
        dtype: Annotated[str | None, _opt("dtype", "--dtype")] = None,
        prediction_type: Annotated[str | None, _opt("prediction_type", "--prediction-type")] = None,
        backend: Annotated[str | None, _opt("backend", "--backend")] = None,
        precision: Annotated[str | None, _opt("precision", "--precision")] = None,
        compile: Annotated[bool | None, _opt("compile", "--compile/--no-compile")] = None,
        compile_cache: Annotated[
            bool | None, _opt("compile_cache", "--compile-cache/--no-compile-cache")
        ] = None,
        w0_on_host: Annotated[bool | None, _opt("w0_on_host", "--w0-on-host/--w0-on-device")] = None,
        home: Annotated[Path | None, _opt("home", "--home")] = None,
        store_db_url: Annotated[str | None, _opt("store_db_url", "--store-db-url")] = None,
        max_queue: Annotated[int | None, _opt("max_queue", "--max-queue")] = None,
        max_group_skips: Annotated[int | None, _opt("max_group_skips", "--max-group-skips")] = None,
        max_batch: Annotated[int | None, _opt("max_batch", "--max-batch")] = None,
        cache_mb: Annotated[int | None, _opt("cache_mb", "--cache-mb")] = None,
        plan_cache_mb: Annotated[int | None, _opt("plan_cache_mb", "--plan-cache-mb")] = None,
        max_message_mb: Annotated[int | None, _opt("max_message_mb", "--max-message-mb")] = None,
        max_upload_mb: Annotated[int | None, _opt("max_upload_mb", "--max-upload-mb")] = None,
        image_chunk_bytes: Annotated[int | None, _opt("image_chunk_bytes", "--image-chunk-bytes")] = None,
        default_steps: Annotated[int | None, _opt("default_steps", "--default-steps")] = None,
        max_steps: Annotated[int | None, _opt("max_steps", "--max-steps")] = None,
        max_images: Annotated[int | None, _opt("max_images", "--max-images")] = None,
        max_adapters: Annotated[int | None, _opt("max_adapters", "--max-adapters")] = None,
        max_size: Annotated[int | None, _opt("max_size", "--max-size")] = None,
        max_abs_weight: Annotated[float | None, _opt("max_abs_weight", "--max-abs-weight")] = None,
        max_prompt_bytes: Annotated[int | None, _opt("max_prompt_bytes", "--max-prompt-bytes")] = None,
        max_rank: Annotated[int | None, _opt("max_rank", "--max-rank")] = None,
        max_input_pixels: Annotated[int | None, _opt("max_input_pixels", "--max-input-pixels")] = None,
        oom_unready_after: Annotated[int | None, _opt("oom_unready_after", "--oom-unready-after")] = None,
        resolve_ttl_s: Annotated[float | None, _opt("resolve_ttl_s", "--resolve-ttl-s")] = None,
        grace_s: Annotated[float | None, _opt("grace_s", "--grace-s")] = None,
        warmup: Annotated[bool | None, _opt("warmup", "--warmup/--no-warmup")] = None,
        log_level: Annotated[str | None, _opt("log_level", "--log-level")] = None,
        s3_bucket: Annotated[str | None, _opt("s3_bucket", "--s3-bucket")] = None,
        s3_prefix: Annotated[str | None, _opt("s3_prefix", "--s3-prefix")] = None,
        s3_endpoint: Annotated[str | None, _opt("s3_endpoint", "--s3-endpoint")] = None,
        s3_region: Annotated[str | None, _opt("s3_region", "--s3-region")] = None,
        blob_cache_mb: Annotated[int | None, _opt("blob_cache_mb", "--blob-cache-mb")] = None,
        tls_cert: Annotated[Path | None, _opt("tls_cert", "--tls-cert")] = None,
        tls_key: Annotated[Path | None, _opt("tls_key", "--tls-key")] = None,
        tls_client_ca: Annotated[Path | None, _opt("tls_client_ca", "--tls-client-ca")] = None,
        tokens_file: Annotated[Path | None, _opt("tokens_file", "--tokens-file")] = None,
        health_port: Annotated[int | None, _opt("health_port", "--health-port")] = None,
        metrics_port: Annotated[int | None, _opt("metrics_port", "--metrics-port")] = None,
        log_format: Annotated[str | None, _opt("log_format", "--log-format")] = None,
        log_prompts: Annotated[bool | None, _opt("log_prompts", "--log-prompts/--no-log-prompts")] = None,
    ) -> None:
        """Serve the gRPC API (no flags: built-in model "toy", local store, 127.0.0.1:50051)."""
        from server.settings import Settings

        overrides = {key: value for key, value in locals().items() if key != "Settings"}
        settings = Settings.load(**overrides)
        # The server never forks a child that uses gRPC, but model conversion runs subprocesses;
        # with fork support on, gRPC logs a warning for each (dozens on a first start).
        os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
        from server.api.app import run

        raise typer.Exit(run(settings))
