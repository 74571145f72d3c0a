"""``loraloom``: serve the engine, generate images, manage adapters.

Client commands talk to a running server (``--server`` / ``$LORALOOM_SERVER``, default
127.0.0.1:50051) and import no torch: the heavy imports live inside ``serve`` and ``train``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, TypeVar

import typer

from adapters.errors import LoraloomError

if TYPE_CHECKING:
    from server.client import Client

T = TypeVar("T")

app = typer.Typer(
    name="loraloom",
    help="A Stable Diffusion server that hot-swaps and blends LoRA adapters per request.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
adapters_app = typer.Typer(help="Manage the adapters in the server's store.", no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")

Server = Annotated[
    str,
    typer.Option("--server", "-s", envvar="LORALOOM_SERVER", help="Address of the loraloom server."),
]
Timeout = Annotated[float, typer.Option(help="Deadline of the call in seconds.")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
DEFAULT_SERVER = "127.0.0.1:50051"
# server.client.types.MERGE_METHODS, spelled out so that --help imports no client (grpc).
MergeMethod = Literal["linear", "ties", "dare_linear", "dare_ties"]
# adapters.formats.convert.TARGETS, spelled out for the same reason (that package imports torch).
ConvertTarget = Literal["kohya", "diffusers", "canonical"]


def _client(server: str, timeout: float | None):
    from server.client import Client

    return Client(server, timeout=timeout)


def _call(server: str, timeout: float | None, call: Callable[[Client], T]) -> T:
    """``call`` on a client of ``server``; a loraloom error ends the command with its message and code."""
    from server.cli import output

    try:
        with _client(server, timeout) as client:
            return call(client)
    except LoraloomError as error:
        raise output.fail(error, server) from None


from server.cli import serve as _serve  # noqa: E402  (registers `serve` on app; imports no torch)

_serve.register(app)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    adapter: Annotated[
        list[str] | None,
        typer.Option(
            "--adapter",
            "-a",
            help="Adapter of the blend, name\\[@version]\\[:weight]; repeatable. Per-part weights as "
            "A1111: name:TE:UNET or name:te=0.8:unet=0.5 (text encoder, UNet; a part not given takes "
            "the text-encoder weight).",
        ),
    ] = None,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="PNG file to write (several: out-0.png, ...).")
    ] = Path("out.png"),
    negative: Annotated[str, typer.Option("--negative", help="Negative prompt.")] = "",
    steps: Annotated[
        int, typer.Option(help="Denoising steps (0: the server's default).", show_default=False)
    ] = 0,
    seed: Annotated[int | None, typer.Option(help="Seed (default: random; printed).")] = None,
    guidance: Annotated[float | None, typer.Option(help="Guidance scale (default: the server's).")] = None,
    width: Annotated[
        int, typer.Option(help="Width in pixels (0: the model's resolution).", show_default=False)
    ] = 0,
    height: Annotated[
        int, typer.Option(help="Height in pixels (0: the model's resolution).", show_default=False)
    ] = 0,
    num_images: Annotated[int, typer.Option("--num-images", "-n", help="How many images.")] = 1,
    sampler: Annotated[
        str,
        typer.Option(
            help="Sampler: default (the model's own), dpmpp_2m, dpmpp_2m_karras, euler, euler_a, ddim, "
            "pndm, lms, heun or unipc.",
            show_default=False,
        ),
    ] = "",
    merge: Annotated[
        MergeMethod,
        typer.Option(
            help="How the blend's adapters combine: linear, the weighted sum; ties, keep each "
            "adapter's largest changes, elect a sign per weight and average the changes that agree "
            "with it; dare_linear, drop changes at random, rescale the rest and sum; dare_ties, drop "
            "as dare_linear, then merge as ties.",
        ),
    ] = "linear",
    density: Annotated[
        float | None,
        typer.Option(
            help="ties, dare_linear and dare_ties: the fraction of each adapter's changes kept, in (0, 1]. "
            "\\[default: 0.5]",
            show_default=False,
        ),
    ] = None,
    init_image: Annotated[
        Path | None,
        typer.Option(
            "--init-image",
            help="img2img: the picture to restyle (PNG or JPEG), fitted to the size by crop-and-resize.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    mask: Annotated[
        Path | None,
        typer.Option(
            "--mask",
            help="Inpainting: a mask of --init-image's size; white is repainted, black kept.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    strength: Annotated[
        float | None,
        typer.Option(
            help="img2img/inpainting: the share of the schedule re-run, in (0, 1]; low stays close to "
            "the picture. \\[default: 0.75]",
            show_default=False,
        ),
    ] = None,
    clip_skip: Annotated[
        int,
        typer.Option(
            "--clip-skip",
            help="Text-encoder layer, A1111's numbering: 1 = last (the default), 2 = penultimate.",
            show_default=False,
        ),
    ] = 0,
    schedule: Annotated[
        str,
        typer.Option(
            help="Noise schedule apart from the sampler: default, karras, exponential, beta, sgm_uniform.",
            show_default=False,
        ),
    ] = "",
    eta: Annotated[
        float | None, typer.Option(help="ddim's eta: 0 deterministic, 1 DDPM-like.", show_default=False)
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    server: Server = DEFAULT_SERVER,
    timeout: Timeout = 600.0,
) -> None:
    """Generate images with an optional blend of adapters and write them as PNG files; restyle a
    picture with --init-image (img2img), repaint part of it with --mask (inpainting)."""
    import math
    import uuid

    from server.cli.progress import GenerateProgress
    from server.client import AdapterSpec

    if density is not None and not (math.isfinite(density) and 0.0 < density <= 1.0):
        raise typer.BadParameter(f"must be in (0, 1], is {density:g}", param_hint="--density")
    request_id = uuid.uuid4().hex[:16]  # ours, so a failed request can be found in the server's log too
    try:
        specs = [AdapterSpec.parse(text) for text in adapter or ()]
        with _client(server, timeout) as client, GenerateProgress(enabled=progress) as bar:
            result = client.generate(
                prompt,
                adapters=specs,
                negative_prompt=negative,
                steps=steps,
                seed=seed,
                guidance_scale=guidance,
                width=width,
                height=height,
                num_images=num_images,
                sampler=sampler,
                merge=merge,
                density=density,
                request_id=request_id,
                on_event=bar.update,
                init_image=init_image.read_bytes() if init_image else None,
                mask_image=mask.read_bytes() if mask else None,
                strength=strength,
                clip_skip=clip_skip,
                schedule=schedule,
                eta=eta,
            )
    except LoraloomError as error:
        from server.cli.output import fail

        raise fail(error, server, request_id=request_id) from None
    paths = (
        [output]
        if len(result.images) == 1
        else [
            output.with_name(f"{output.stem}-{index}{output.suffix}") for index in range(len(result.images))
        ]
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    for path, image in zip(paths, result.images, strict=True):
        image.save(path)
        typer.echo(f"wrote {path} ({image.width}x{image.height}, seed {image.seed})")
    params = result.parameters
    blend = " ".join(f"--adapter {item.spec}" for item in params.adapters)
    if params.adapters and params.merge != "linear":
        blend += f" --merge {params.merge} --density {params.density:g}"
    took = f"{result.timing.total_ms:.0f} ms (queue {result.timing.queue_ms:.0f} ms)"
    typer.echo(f"{took}, request {result.request_id}; reproduce with:")
    extra = ""
    if init_image is not None:
        extra += f" --strength {params.strength:g}"
    if params.schedule and params.schedule != "default":
        extra += f" --schedule {params.schedule}"
    if params.clip_skip > 1:
        extra += f" --clip-skip {params.clip_skip}"
    line = f"  --seed {params.seed} --steps {params.steps} --sampler {params.sampler}{extra} {blend}"
    typer.echo(line.rstrip())


from server.cli import sweep as _sweep  # noqa: E402  (registers `sweep` on app; imports no torch)

_sweep.register(app)


@app.command()
def info(server: Server = DEFAULT_SERVER, timeout: Timeout = 10.0, json: Json = False) -> None:
    """Show the server's base model, backend, limits, cache and queue."""
    from server.cli import output

    details = _call(server, timeout, lambda client: client.server_info())
    if json:
        typer.echo(output.as_json(details))
        return
    base = details.base_model
    limits = details.limits
    cache = details.cache
    queue = details.queue
    lines = [
        f"loraloom {details.version} at {server} ({'ready' if details.ready else 'not ready'})",
        f"base model  {base.name} ({_architecture(base)}, {base.resolution} px) from {base.source}",
        f"            fingerprint {base.fingerprint[:16]}",
        f"backend     {details.backend} ({details.precision}) on {details.device}, weights {details.dtype}",
        f"limits      queue {limits.max_queue}, steps {limits.max_steps}, images {limits.max_images}, "
        f"adapters {limits.max_adapters}, size {limits.max_size} px, rank {limits.max_rank}, "
        f"prompt {output.size(limits.max_prompt_bytes)}, "
        f"message {output.size(limits.max_message_bytes)}, upload {output.size(limits.max_upload_bytes)}",
        f"cache       {cache.entries} adapters, {output.size(cache.used_bytes)} of "
        f"{output.size(cache.capacity_bytes)}, hits {cache.hits}, misses {cache.misses}, swaps {cache.swaps}",
        f"blend cache {output.size(cache.plan_bytes)} of {output.size(cache.plan_capacity_bytes)} "
        "(materialized blends)",
        f"queue       {queue.queued} waiting, {queue.running} running, {queue.completed} done, "
        f"{queue.failed} failed, {queue.cancelled} cancelled, {queue.deadline_exceeded} past deadline, "
        f"{queue.invalid} invalid, {queue.rejected} rejected (queue full)",
    ]
    typer.echo("\n".join(lines))


@adapters_app.command("list")
def adapters_list(
    prefix: Annotated[str, typer.Option(help="Only names starting with this.")] = "",
    architecture: Annotated[str, typer.Option("--arch", help="Only this base architecture.")] = "",
    tag: Annotated[str, typer.Option(help="Only versions with this tag.")] = "",
    all_versions: Annotated[bool, typer.Option("--all", help="Every version, not just the newest.")] = False,
    server: Server = DEFAULT_SERVER,
    timeout: Timeout = 30.0,
    json: Json = False,
) -> None:
    """List the adapters in the store (newest version of each name unless --all; --json: every field)."""
    from server.cli import output

    found = _call(
        server,
        timeout,
        lambda client: list(
            client.iter_adapters(
                name_prefix=prefix, architecture=architecture, tag=tag, all_versions=all_versions
            )
        ),
    )
    if json:
        typer.echo(output.as_json(found))
    elif not found:
        typer.echo("no adapters (add one with: loraloom adapters upload FILE --name NAME)")
    else:
        output.console.print(output.adapter_table(found, output.console.width))


@adapters_app.command("show")
def adapters_show(
    ref: Annotated[str, typer.Argument(help="name, name@version or name@alias.")],
    server: Server = DEFAULT_SERVER,
    timeout: Timeout = 30.0,
    json: Json = False,
) -> None:
    """Show one adapter version in full."""
    from server.cli import output

    found = _call(server, timeout, lambda client: client.get_adapter(ref))
    typer.echo(output.as_json(found) if json else _describe(found))


def _architecture(base) -> str:
    """``sdxl``, or ``loraloom:tiny-sdxl (sdxl family)`` for a built-in test size."""
    if base.family and base.family != base.architecture:
        return f"{base.architecture}, {base.family} family"
    return base.architecture


def _describe(item) -> str:
    from server.cli import output

    kind = adapter_type(item.metadata)
    rows = [
        ("ref", item.ref),
        ("sha256", item.sha256),
        ("size", output.size(item.size_bytes)),
        ("base", f"{item.architecture} {item.base_fingerprint[:16]}".strip()),
        ("format", f"{kind} ({item.format} file)" if item.format else kind),
        ("rank", "full" if kind == "diff" else str(item.rank)),
        ("made by", _made_by(item.metadata)),
        ("components", ", ".join(item.components)),
        ("aliases", ", ".join(item.aliases)),
        ("tags", ", ".join(item.tags)),
        ("trigger words", ", ".join(item.trigger_words)),
        ("description", item.description),
        ("trained", _training(item.training_metadata)),
        ("created (UTC)", output.when(item.created_at)),
    ]
    return "\n".join(f"{key:<14}{value}" for key, value in rows if value)


# adapters.formats.base_ref.ADAPTER_TYPE_KEY, repeated: that package imports torch, which the
# client commands never do.
ADAPTER_TYPE_KEY = "loraloom.adapter_type"
LYCORIS_ALGOS = {
    "lora": "LoRA",
    "locon": "LoCon",
    "loha": "LoHa",
    "lokr": "LoKr",
    "full": "diff",
    "diff": "diff",
}


def adapter_type(metadata: dict) -> str:
    """LoRA, LoCon, LoHa, LoKr, diff or DoRA (...): what the server recorded when the version was
    stored, else what the file's kohya metadata (``ss_network_module``/``ss_network_args``) says."""
    recorded = metadata.get(ADAPTER_TYPE_KEY)
    if recorded:
        return str(recorded)
    args = _network_args(metadata)
    kind = "LoRA"
    if "lycoris" in str(metadata.get("ss_network_module", "")):
        kind = LYCORIS_ALGOS.get(str(args.get("algo", "lora")).lower(), str(args.get("algo")))
    if str(args.get("dora_wd", "")).lower() == "true":
        return "DoRA" if kind == "LoRA" else f"DoRA ({kind})"
    return kind


def _network_args(metadata: dict) -> dict:
    import json

    try:
        args = json.loads(str(metadata.get("ss_network_args") or "{}"))
    except ValueError:
        return {}
    return args if isinstance(args, dict) else {}


def _made_by(metadata: dict) -> str:
    """The tool that made the file, as kohya-style trainers record it: ``ss_network_module`` and
    ``ss_network_args`` (as ``key=value``); empty when the file does not say."""
    module = str(metadata.get("ss_network_module", "")).strip()
    args = _network_args(metadata)
    shown = ", ".join(f"{key}={value}" for key, value in args.items())
    text = f"{module} ({shown})" if module and shown else module or shown
    return text[:200]


def _training(metadata: dict) -> str:
    """A line about how `loraloom train` made it (the full record is in `show --json`).

    Uploads may carry any metadata, so only sensible values are shown.
    """
    parts = [f"{int(value)} {key}" for key in ("steps", "images") if (value := _number(metadata.get(key)))]
    if seconds := _number(metadata.get("seconds")):
        parts.append(f"{seconds:.0f} s")
    if parts and metadata.get("base_model"):
        parts.append(f"on {metadata['base_model']}")
    return ", ".join(parts)


def _number(value: object) -> float | None:
    """A positive number from metadata (strings over gRPC), else None."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


@adapters_app.command("upload")
def adapters_upload(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="A LoRA .safetensors file.")],
    name: Annotated[str, typer.Option("--name", help="Name (a new version if it exists).")],
    description: Annotated[str, typer.Option(help="Free-form description.")] = "",
    alias: Annotated[list[str] | None, typer.Option("--alias", help="Alias for the new version.")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="Attach a tag (repeatable).")] = None,
    trigger: Annotated[list[str] | None, typer.Option("--trigger", help="Trigger word (repeatable).")] = None,
    server: Server = DEFAULT_SERVER,
    timeout: Timeout = 600.0,
) -> None:
    """Upload an adapter file; it is checked against the server's base model before it becomes visible."""
    from server.cli import output

    created = _call(
        server,
        timeout,
        lambda client: client.upload_adapter(
            file,
            name,
            description=description,
            aliases=alias or (),
            tags=tag or (),
            trigger_words=trigger or (),
        ),
    )
    typer.echo(f"uploaded {created.ref} ({output.size(created.size_bytes)}, sha256 {created.sha256[:12]})")


@adapters_app.command("convert")
def adapters_convert(
    source: Annotated[
        Path, typer.Argument(exists=True, help="The adapter: a .safetensors file or a PEFT/diffusers folder.")
    ],
    output: Annotated[Path, typer.Argument(dir_okay=False, help="The .safetensors file to write.")],
    to: Annotated[
        ConvertTarget,
        typer.Option(
            "--to",
            help="kohya (A1111, ComfyUI; SGM UNet names for SDXL, as kohya's sd-scripts), diffusers "
            "(load_lora_weights) or canonical (loraloom's own).",
        ),
    ],
    base: Annotated[
        str,
        typer.Option(
            "--base",
            help="The base model it is for, as `serve --model` takes it: a built-in name (toy, "
            "tiny-sdxl...), a diffusers folder or a single-file checkpoint.",
        ),
    ],
) -> None:
    """Convert an adapter file to another format, here and offline (no server): the base model is
    loaded to map the module names, and the adapter is checked against it first."""
    from server.cli import output as out
    from server.cli.convert import convert_file

    try:
        typer.echo(convert_file(source, output, to, base))
    except LoraloomError as error:
        raise out.fail(error) from None


@adapters_app.command("delete")
def adapters_delete(
    ref: Annotated[str, typer.Argument(help="name@version deletes one version; name deletes them all.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    server: Server = DEFAULT_SERVER,
    timeout: Timeout = 30.0,
) -> None:
    """Delete one version, or every version of a name."""
    if not yes and "@" not in ref:
        import sys

        if not sys.stdin.isatty():
            message = f"refusing to delete every version of {ref!r} without a terminal to ask: add --yes"
            typer.echo(message, err=True)
            raise typer.Exit(1)
        typer.confirm(f"delete every version of {ref!r}? (--yes skips this question)", abort=True)
    deleted = _call(server, timeout, lambda client: client.delete_adapter(ref))
    typer.echo("deleted " + ", ".join(item.ref for item in deleted))


@adapters_app.command("alias")
def adapters_alias(
    name: Annotated[str, typer.Argument(help="Adapter name.")],
    alias: Annotated[str, typer.Argument(help="Alias to set, e.g. stable.")],
    version: Annotated[int, typer.Argument(help="Version the alias points at.")],
    server: Server = DEFAULT_SERVER,
    timeout: Timeout = 30.0,
) -> None:
    """Point NAME@ALIAS at a version (creating or moving the alias)."""

    target = _call(server, timeout, lambda client: client.set_alias(name, alias, version))
    typer.echo(f"{name}@{alias} -> {target.ref}")


VERIFY_DAMAGED_EXIT = 3
_REASONS = {
    "missing": "blob missing",
    "sha256_mismatch": "bytes changed (sha256 mismatch)",
    "undecodable": "not a readable adapter file",
}


@adapters_app.command("verify")
def adapters_verify(
    repair: Annotated[
        bool,
        typer.Option(help="Also remove orphan blobs and temp files older than an hour (never versions)."),
    ] = False,
    server: Server = DEFAULT_SERVER,
    timeout: Timeout = 3600.0,
    json: Json = False,
) -> None:
    """Check every stored version's bytes on the server (sha256, size, decoding); list the damaged ones.

    Exits with 3 when any version is damaged (upload its file again, or delete it), 1 when the
    check itself failed. Needs a token with the manage scope.
    """
    from server.cli import output

    report = _call(server, timeout, lambda client: client.verify_store(repair=repair))
    if json:
        typer.echo(output.as_json(report))
    else:
        for item in report.damaged:
            typer.echo(f"damaged  {item.ref}  {_REASONS.get(item.reason, item.reason)}  sha256 {item.sha256}")
        leftovers = f"{len(report.orphans)} orphan blob(s), {report.partials} temp file(s)"
        removed = f", {report.removed} removed" if repair else ""
        state = f"{len(report.damaged)} damaged version(s)" if report.damaged else "every version intact"
        typer.echo(f"checked {report.checked} blob(s): {state}; {leftovers}{removed}")
        if report.damaged:
            typer.echo(
                "upload each damaged version's file again (in a local blob folder the same bytes "
                "repair its blob) or delete the version",
                err=True,
            )
    if report.damaged:
        raise typer.Exit(VERIFY_DAMAGED_EXIT)


@adapters_app.command("load")
def adapters_load(
    ref: Annotated[str, typer.Argument(help="name, name@version or name@alias.")],
    pin: Annotated[bool, typer.Option(help="Keep it resident (never evicted).")] = False,
    server: Server = DEFAULT_SERVER,
    timeout: Timeout = 120.0,
) -> None:
    """Warm (or pin) an adapter in the engine's cache."""
    from server.cli import output

    loaded = _call(server, timeout, lambda client: client.load_adapter(ref, pin=pin))
    state = "pinned" if loaded.pinned else "loaded"
    typer.echo(f"{state} {loaded.name}@{loaded.version} ({output.size(loaded.size_bytes)})")


@adapters_app.command("unload")
def adapters_unload(
    ref: Annotated[str, typer.Argument(help="name, name@version or name@alias.")],
    server: Server = DEFAULT_SERVER,
    timeout: Timeout = 30.0,
) -> None:
    """Drop an adapter from the engine's cache (and unpin it)."""
    dropped = _call(server, timeout, lambda client: client.unload_adapter(ref))
    typer.echo(f"unloaded {ref}" if dropped else f"{ref} was not resident")


@adapters_app.command("resident")
def adapters_resident(server: Server = DEFAULT_SERVER, timeout: Timeout = 30.0, json: Json = False) -> None:
    """List the adapters held in the engine's cache."""
    from server.cli import output

    listing = _call(server, timeout, lambda client: client.list_resident())
    if json:
        typer.echo(output.as_json(listing))
        return
    for item in listing.adapters:
        pin = " (pinned)" if item.pinned else ""
        typer.echo(f"{item.name}@{item.version}  {output.size(item.size_bytes)}{pin}")
    cache = listing.cache
    used, capacity = output.size(cache.used_bytes), output.size(cache.capacity_bytes)
    typer.echo(f"{cache.entries} resident, {used} of {capacity}")


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def train(ctx: typer.Context) -> None:
    """Train a LoRA adapter (hands over to the trainer; `loraloom train --help` for its options)."""
    try:
        from trainer import cli as trainer_cli
    except ImportError:
        typer.echo("the trainer is not installed in this build (trainer.cli is missing)", err=True)
        raise typer.Exit(2) from None
    trainer_app = getattr(trainer_cli, "app", None)
    if trainer_app is None:
        typer.echo("trainer.cli has no `app` to run", err=True)
        raise typer.Exit(2)
    trainer_app(args=list(ctx.args), prog_name="loraloom train")


def main() -> None:  # pragma: no cover - `python -m server.cli.main`
    app()


if __name__ == "__main__":
    main()
