"""The `tspeft-rt` command line.

    tspeft-rt train configs/ts_lora_arc_easy.yaml [--set key=value ...] [--resume]
    tspeft-rt config                                    # every training option with its help and default
    tspeft-rt export runs/demo runs/demo/adapter [--prune-below 0.2] [--max-modules 0.25 --rank-by keep]
    tspeft-rt inspect runs/demo/adapter [--json]
    tspeft-rt report runs/demo [--out keep_rates.png]
    tspeft-rt generate --model smollm2-135m-instruct --adapter runs/demo/adapter "The capital of France is"
    tspeft-rt eval --model smollm2-135m-instruct --adapter runs/demo/adapter --tasks arc_easy --limit 200
    tspeft-rt eval --endpoint http://127.0.0.1:8000 --served-name demo --tasks arc_easy --limit 200
    tspeft-rt lm-eval --model tspeft --model_args adapter=runs/demo/adapter --tasks tspeft_arc_easy --limit 200
    tspeft-rt serve --model smollm2-135m-instruct runs/demo/adapter [NAME=DIR ...] [--port 8000] [-- vLLM args]
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import click

from tspeft_rt import __version__
from tspeft_rt.errors import TspeftError


class _Group(click.Group):
    """Reports tspeft-rt's own errors as one line and exit status 2, never as a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except TspeftError as e:
            # One line even when the message quotes a library's multi-line error.
            click.echo("error: " + " ".join(str(e).splitlines()), err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tspeft-rt")
def main() -> None:
    """tspeft-rt: train, export and serve token-selective (TS-PEFT) LoRA/DoRA adapters."""


@main.command()
@click.argument("config_file", required=False, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key (YAML value), e.g. --set steps=50 --set tasks=[piqa].")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in output_dir.")
def train(config_file: str | None, overrides: tuple[str, ...], resume: bool) -> None:
    """Train a token-gated adapter (or a dense baseline) from CONFIG_FILE (YAML)."""
    from tspeft_rt.config import load_config
    from tspeft_rt.trainer import train as run

    cfg = load_config(config_file, overrides)
    result = run(cfg, resume=resume)
    if os.environ.get("RANK", "0") == "0":
        click.echo(json.dumps(result, indent=1))


@main.command("config")
def show_config() -> None:
    """List every training option with its default and help."""
    from tspeft_rt.config import TrainConfig

    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        click.echo(f"{f.name} = {default!r}\n    {f.metadata['help']}")


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--prune-below", type=float, default=None, metavar="KEEP_RATE",
              help="Drop modules whose training keep rate is under KEEP_RATE.")
@click.option("--max-modules", type=float, default=None, metavar="N",
              help="Keep at most N modules (N >= 1), or this fraction of them (0 < N < 1).")
@click.option("--rank-by", type=click.Choice(["keep", "norm", "random"]), default="keep", show_default=True,
              help="How --max-modules ranks modules: token keep rate, weight norm ||sBA||_F, or at random.")
@click.option("--seed", type=int, default=0, help="Seed of --rank-by random.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists.")
def export(checkpoint: Path, out_dir: Path, prune_below, max_modules, rank_by, seed, overwrite) -> None:
    """Write the adapter of CHECKPOINT (a run folder or one checkpoint) to OUT_DIR."""
    from tspeft_rt.export import export_checkpoint

    adapter = export_checkpoint(checkpoint, out_dir, prune_below=prune_below, max_modules=max_modules,
                                rank_by=rank_by, seed=seed, overwrite=overwrite)
    click.echo(f"wrote {adapter.path}: {adapter.kind}, {len(adapter.modules)} modules, {len(adapter.pruned)} pruned")


@main.command()
@click.argument("adapter_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect(adapter_dir: Path, as_json: bool) -> None:
    """Tell what ADAPTER_DIR is: kind, base model, modules with tau and keep rate, pruning, size."""
    from tspeft_rt.adapter import describe, load_adapter

    info = describe(load_adapter(adapter_dir))
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    base = info["base_model"]
    click.echo(f"{info['path']}: {info['kind']} adapter ({info['format']})")
    click.echo(f"base model: {base.get('name')} ({base.get('model_type', '?')}, config hash "
               f"{base.get('config_hash', '?')}); base_model_name_or_path {info['base_model_name_or_path']}")
    click.echo(f"modules: {len(info['modules'])} adapted, {len(info['pruned'])} pruned; rank {info['rank']}, "
               f"alpha {info['alpha']}, rsLoRA {'on' if info['use_rslora'] else 'off'}; "
               f"size on disk {info['size_bytes'] / 1e6:.2f} MB")
    if info["training"]:
        t = info["training"]
        click.echo(f"training: {t.get('method')}, {t.get('steps')} steps, skip rate {t.get('skip_rate', 0):.3f}")
    if info["kind"].startswith("TS-"):
        click.echo(f"{'module':<40} {'rank':>4} {'tau':>10} {'keep':>6}")
        for name, m in info["modules"].items():
            click.echo(f"{name:<40} {m['rank']:>4} {m['tau']:>10.5f} {m['keep_rate']:>6.3f}")
    for name, p in info["pruned"].items():
        click.echo(f"pruned {name}: {p['reason']}")
    if info["warning"]:
        click.echo(f"WARNING: {info['warning']}.")


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Heatmap PNG (default: SOURCE/keep_rates.png).")
def report(source: Path, out: Path | None) -> None:
    """Module importance of a TS run folder or adapter: keep rate vs weight norm, and a heatmap."""
    from tspeft_rt.report import heatmap, module_scores, table

    scores = module_scores(source)
    click.echo(table(scores))
    png = heatmap(scores, out or source / "keep_rates.png", f"token keep rate: {source}")
    click.echo(f"heatmap: {png}")


@main.command()
@click.option("--model", default="smollm2-135m-instruct", show_default=True, help="Base model folder or name.")
@click.option("--adapter", "adapter_dir", default=None, help="Adapter directory (gates applied).")
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--chat", is_flag=True, help="Wrap each prompt in the tokenizer's chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of completions.")
@click.argument("prompts", nargs=-1, required=True)
def generate(model, adapter_dir, max_new_tokens, temperature, top_p, seed, chat, as_json, prompts) -> None:
    """Generate completions of PROMPTS with the adapter's gates applied (the serving reference)."""
    from tspeft_rt.generate import generate as run, load_model_with_adapter

    hf_model, tok, _ = load_model_with_adapter(model, adapter_dir)
    outs = run(hf_model, tok, list(prompts), max_new_tokens=max_new_tokens, temperature=temperature,
               top_p=top_p, chat=chat, seed=seed)
    if as_json:
        click.echo(json.dumps(outs))
    else:
        for prompt, out in zip(prompts, outs):
            click.echo(f"{prompt!r} -> {out!r}")


@main.command("eval")
@click.option("--model", default="smollm2-135m-instruct", show_default=True,
              help="Base model folder or name (with --endpoint: only its tokenizer is used).")
@click.option("--adapter", "adapter_dir", default=None, help="Adapter directory (gates applied).")
@click.option("--endpoint", default=None, metavar="URL",
              help="Score through this OpenAI-compatible server (e.g. http://127.0.0.1:8000) instead of locally.")
@click.option("--served-name", default=None, help="With --endpoint: the model or adapter name to query.")
@click.option("--tasks", default="arc_easy", show_default=True, help="Comma-separated bundled tasks.")
@click.option("--limit", type=int, default=None, help="First N validation examples per task.")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Also write the JSON here.")
def evaluate(model, adapter_dir, endpoint, served_name, tasks, limit, batch_size, out) -> None:
    """Multiple-choice validation accuracy (log-likelihood; acc and acc_norm), printed as JSON."""
    from tspeft_rt.evaluate import evaluate_endpoint, evaluate_tasks

    if out and not out.parent.is_dir():  # checked before the evaluation, whose results would be lost
        raise TspeftError(f"--out {out}: the folder {out.parent} does not exist")

    if endpoint:
        if adapter_dir or not served_name:
            raise click.UsageError("--endpoint takes --served-name (the served adapter or model), not --adapter")
        from transformers import AutoTokenizer

        from tspeft_rt.assets import resolve_model_path

        tok = AutoTokenizer.from_pretrained(resolve_model_path(model))
        result = evaluate_endpoint(endpoint, served_name, tok, tasks.split(","), limit, progress=True)
    else:
        from tspeft_rt.generate import load_model_with_adapter

        hf_model, tok, _ = load_model_with_adapter(model, adapter_dir)
        result = evaluate_tasks(hf_model, tok, tasks.split(","), limit, batch_size, progress=True)
    text = json.dumps(result, indent=1)
    click.echo(text)
    if out:
        try:
            out.write_text(text)
        except OSError as e:
            raise TspeftError(f"--out {out}: cannot write it ({e.strerror}); the results are printed above") from None


@main.command("lm-eval", context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def lm_eval(args) -> None:
    """lm-evaluation-harness's command line (`pip install 'tspeft-rt[lm-eval]'`) with the model `tspeft`
    (a Hugging Face model with an adapter, gates applied: --model_args pretrained=DIR,adapter=DIR) and the
    bundled tasks `tspeft_<task>` (tspeft_arc_easy, ...; all: tspeft_commonsense) read from local files.
    Against a server: --model local-completions. Every other option is lm-eval's (--help lists them)."""
    try:
        from tspeft_rt import harness
    except ImportError as e:
        raise TspeftError(f"lm-eval: lm-evaluation-harness is not installed ({e}); "
                          "pip install 'tspeft-rt[lm-eval]'") from None
    harness.cli(list(args))


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--model", default="smollm2-135m-instruct", show_default=True, help="Base model folder or name.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--served-model-name", default=None, help="Name of the base model in the API (default: --model).")
@click.option("--dtype", default="float32", show_default=True, help="vLLM --dtype (float32 matches `generate`).")
@click.option("--max-loras", type=int, default=None, help="Adapters in one batch (default: the number given).")
@click.option("--allow-adapter-loading", is_flag=True,
              help="Enable /v1/load_lora_adapter and /v1/unload_lora_adapter (for trusted networks only).")
@click.option("--log-file", type=click.Path(path_type=Path), default=None, help="Write vLLM's log here.")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def serve(model, host, port, served_model_name, dtype, max_loras, allow_adapter_loading, log_file, args) -> None:
    """Serve the base model and ADAPTERS (DIR or NAME=DIR) on vLLM's OpenAI-compatible API.

    Arguments after `--` that start with a dash go to vLLM unchanged. Stops the whole server on
    Ctrl-C, SIGTERM or SIGHUP (a closed terminal); a second one skips the grace periods and kills it.
    """
    import signal
    import time

    from tspeft_rt.serve.launcher import STOP_SIGNALS, Server

    first_flag = next((i for i, a in enumerate(args) if a.startswith("-")), len(args))
    server = Server(model=model, adapters=list(args[:first_flag]), host=host, port=port,
                    served_model_name=served_model_name, dtype=dtype, max_loras=max_loras,
                    allow_adapter_loading=allow_adapter_loading, extra_args=list(args[first_flag:]), log_file=log_file)

    def interrupt(*_):
        # Only the first signal interrupts; later ones must not break into the clean-up (Server.stop
        # catches those arriving while it runs, to hurry it).
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt

    for sig in STOP_SIGNALS:
        signal.signal(sig, interrupt)
    try:
        server.start()
        click.echo(f"serving at {server.url}/v1 (OpenAI-compatible); models: "
                   + ", ".join(m["id"] for m in server.served_models()))
        while server.process.poll() is None:
            time.sleep(1)
        raise TspeftError(f"vLLM server exited with code {server.process.returncode}")
    except KeyboardInterrupt:
        click.echo("stopping the server", err=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
