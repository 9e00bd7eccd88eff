"""Exported adapters (the export issue's acceptance criteria), on the tiny Llama of conftest:

- round trip: train -> `export_checkpoint` -> fresh base + `attach_adapter(load_adapter(dir))` gives the
  trained in-memory model's logits (fp32, <= 1e-6) for ts-lora, ts-dora and plain lora (and once, slow,
  on the bundled model);
- stock PEFT loads the directory as a dense LoRA/DoRA: equal to tspeft-rt with every gate forced on,
  different from the gated model, with the same target modules;
- pruning (--max-modules with rank_by keep | norm | random, --prune-below): removed from both tensor files
  and target_modules, recorded with keep rate, weight norm and reason, the right modules chosen, the
  outputs change only through the pruned modules;
- `tspeft-rt inspect`, `tspeft-rt report` and `tspeft-rt generate` (through click's CliRunner).

Each method is trained once per module (lazily) and exported once; tests that change an adapter work
on copies.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from test_train import tiny_config
from tspeft_rt.adapter import AdapterError, attach_adapter, describe, load_adapter
from tspeft_rt.cli import main
from tspeft_rt.config import build_config
from tspeft_rt.checkpoint import latest_checkpoint
from tspeft_rt.export import export_checkpoint, weight_norm
from tspeft_rt.generate import generate
from tspeft_rt.inject import adapted_layers, load_base_model
from tspeft_rt.trainer import Trainer

TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Water boils at one hundred degrees Celsius at sea level, which is why cooking takes longer in the mountains.",
    "Which of these is a mammal? A whale.",
]
PREFIX = "base_model.model."
N_TINY_MODULES = 14  # 2 layers x (q, k, v, o, gate, up, down)


@dataclass
class Run:
    method: str
    run_dir: Path
    adapter_dir: Path  # the full (unpruned) export
    model: torch.nn.Module  # the trained in-memory model
    tokenizer: object


def train_run(model_dir: Path, root: Path, method: str, **over) -> Run:
    cfg = tiny_config(model_dir, root / "run", method=method, save_every=0, log_every=1, **over)
    trainer = Trainer(build_config(cfg, "test"))
    try:
        trainer.fit()
    finally:
        if trainer.tensorboard is not None:
            trainer.tensorboard.close()
    trainer.model.eval()
    adapter_dir = root / "adapter"
    export_checkpoint(root / "run", adapter_dir)
    return Run(method, root / "run", adapter_dir, trainer.model, trainer.tokenizer)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and on a busy 2-core machine torch's spinning worker
    threads made a training step ~40x slower. Restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """runs(method) -> Run: the method trained on the tiny model (6 steps) and exported, cached."""
    cache: dict[str, Run] = {}

    def get(method: str) -> Run:
        if method not in cache:
            cache[method] = train_run(tiny_model_dir, tmp_path_factory.mktemp(method), method, micro_batch_size=4)
        return cache[method]

    return get


def batch(tokenizer, texts=TEXTS) -> dict:
    return dict(tokenizer(texts, return_tensors="pt", padding=True))


@torch.no_grad()
def logits(model, b: dict) -> torch.Tensor:
    return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()


def valid_logits(model, b: dict) -> torch.Tensor:
    """Logits at the real (non-padding) positions only."""
    return logits(model, b)[b["attention_mask"].bool()]


def attached(model_dir, adapter_dir, tau: float | None = None):
    """A fresh base model with the adapter attached; `tau` overrides every gate's threshold."""
    model, tok = load_base_model(str(model_dir))
    attach_adapter(model, load_adapter(adapter_dir))
    if tau is not None:
        for layer in adapted_layers(model).values():
            layer.token_gate.tau.data.fill_(tau)
    return model.eval(), tok


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return max_diff(a, b) / b.abs().max().item()


def gate_counts(model, b: dict) -> tuple[float, float]:
    """(kept, valid) token updates summed over every gate on one forward of `b`."""
    layers = [l for l in adapted_layers(model).values() if l.token_gate is not None]
    for l in layers:
        l.token_gate.reset_stats()
    logits(model, b)
    stats = [l.token_gate.reset_stats() for l in layers]
    return sum(s.kept for s in stats), sum(s.valid for s in stats)


def checkpoint_meta(run: Run) -> tuple[dict, dict]:
    ckpt = latest_checkpoint(run.run_dir)
    return load_file(ckpt / "adapter.safetensors"), json.loads((ckpt / "meta.json").read_text())


def module_names(tensors: dict, suffix: str = ".lora_A.weight") -> set[str]:
    return {k[len(PREFIX): -len(suffix)] if k.startswith(PREFIX) else k[: -len(suffix)]
            for k in tensors if k.endswith(suffix)}


def invoke(args: list[str]):
    return CliRunner().invoke(main, [str(a) for a in args])


# ---- 1. round trip -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ts-lora", "ts-dora", "lora"])
def test_round_trip_equals_trained_model(runs, tiny_model_dir, method):
    run = runs(method)
    b = batch(run.tokenizer)
    want = valid_logits(run.model, b)
    model, _ = attached(tiny_model_dir, run.adapter_dir)
    got = valid_logits(model, b)
    assert max_diff(got, want) <= 1e-6
    base, _ = load_base_model(str(tiny_model_dir))
    assert max_diff(valid_logits(base, b), want) > 1e-3, "training left the adapter a no-op: nothing was tested"
    adapter = load_adapter(run.adapter_dir)
    assert adapter.kind == {"ts-lora": "TS-LoRA", "ts-dora": "TS-DoRA", "lora": "LoRA"}[method]
    assert len(adapter.modules) == N_TINY_MODULES
    if method.startswith("ts-"):  # tau as trained, keep rate as last logged (fp32 in the file)
        _, meta = checkpoint_meta(run)
        trained = adapted_layers(run.model)
        assert set(meta["keep_rates"]) == set(adapter.modules) == set(trained)
        for name, m in adapter.modules.items():
            assert m.tau > 0 and m.tau == trained[name].token_gate.tau.item()
            assert m.keep_rate == pytest.approx(meta["keep_rates"][name], abs=1e-7)
        assert min(meta["keep_rates"].values()) < 1, "no gate skipped a training token"


@pytest.mark.slow
def test_round_trip_on_bundled_model(bundled_dir, tmp_path):
    run = train_run(bundled_dir, tmp_path, "ts-lora", steps=3, batch_size=2, micro_batch_size=2,
                    tau_warmup_steps=1, warmup_steps=1, max_seq_len=64, lr=1e-3, max_train_examples=16)
    b = batch(run.tokenizer, [TEXTS[0], TEXTS[2]])
    want = valid_logits(run.model, b)
    model, _ = attached(bundled_dir, run.adapter_dir)
    assert max_diff(valid_logits(model, b), want) <= 1e-6
    kept, valid = gate_counts(model, b)
    assert 0 < kept < valid, f"the gates keep {kept} of {valid} token updates: the gates were not tested"
    assert len(load_adapter(run.adapter_dir).modules) == 30 * 7


# ---- 2. stock PEFT -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ts-lora", "ts-dora"])
def test_stock_peft_loads_as_dense_adapter(runs, tiny_model_dir, method):
    from peft import PeftModel

    run = runs(method)
    fresh, tok = load_base_model(str(tiny_model_dir))
    peft_model = PeftModel.from_pretrained(fresh, str(run.adapter_dir)).eval()
    ours = load_adapter(run.adapter_dir)
    targets = peft_model.peft_config["default"].target_modules
    assert set(targets) == set(ours.modules) == set(ours.config["target_modules"])
    injected = {n[len(PREFIX):].removesuffix(".lora_A") for n, _ in peft_model.named_modules()
                if n.endswith(".lora_A")}
    assert injected == set(ours.modules)

    b = batch(tok)
    dense = valid_logits(peft_model, b)
    gates_on, _ = attached(tiny_model_dir, run.adapter_dir, tau=0.0)
    assert rel_diff(valid_logits(gates_on, b), dense) <= 1e-5

    gated, _ = attached(tiny_model_dir, run.adapter_dir)
    kept, valid = gate_counts(gated, b)
    assert 0 < kept < valid, f"the gates keep {kept} of {valid} token updates: nothing is skipped to compare"
    assert rel_diff(valid_logits(gated, b), dense) > 1e-4


# ---- 3. pruning ----------------------------------------------------------------------------------------


def read_export(d: Path) -> dict:
    return {"weights": load_file(d / "adapter_model.safetensors"), "gates": load_file(d / "token_gate.safetensors"),
            "config": json.loads((d / "adapter_config.json").read_text()),
            "gate_config": json.loads((d / "token_gate_config.json").read_text())}


def assert_pruned_consistently(full: Path, pruned_dir: Path, pruned: set[str], keep_rates: dict,
                               pruning: dict) -> None:
    f, p = read_export(full), read_export(pruned_dir)
    everything = set(f["config"]["target_modules"])
    kept = everything - pruned
    assert pruned and kept
    assert module_names(p["weights"]) == kept
    assert module_names(p["weights"], ".lora_B.weight") == kept
    assert module_names(p["gates"], ".token_gate.tau") == kept
    assert module_names(p["gates"], ".token_gate.keep_rate") == kept
    assert set(p["config"]["target_modules"]) == kept
    for k, t in p["weights"].items():  # kept modules are written unchanged
        assert torch.equal(t, f["weights"][k]), k
    assert set(p["gate_config"]["pruned"]) == pruned
    for name, rec in p["gate_config"]["pruned"].items():
        assert rec["keep_rate"] == pytest.approx(keep_rates[name], abs=1e-12)
        assert rec["weight_norm"] > 0
        assert isinstance(rec["reason"], str) and rec["reason"]
    for key, value in pruning.items():
        assert p["gate_config"]["pruning"][key] == value, key
    assert (pruned_dir / "adapter_model.safetensors").stat().st_size < \
        (full / "adapter_model.safetensors").stat().st_size
    assert (pruned_dir / "token_gate.safetensors").stat().st_size < (full / "token_gate.safetensors").stat().st_size
    assert load_adapter(pruned_dir).pruned.keys() == pruned


@pytest.mark.parametrize("rank_by", ["keep", "norm", "random"])
def test_max_modules_prunes_by_rank(runs, tmp_path, rank_by):
    run = runs("ts-lora")
    tensors, meta = checkpoint_meta(run)
    keep_rates = meta["keep_rates"]
    n = 5
    out = tmp_path / "pruned"
    export_checkpoint(run.run_dir, out, max_modules=n, rank_by=rank_by, seed=3)
    gate_config = json.loads((out / "token_gate_config.json").read_text())
    pruned = set(gate_config["pruned"])
    kept = set(keep_rates) - pruned
    assert len(kept) == n and len(pruned) == N_TINY_MODULES - n
    assert_pruned_consistently(run.adapter_dir, out, pruned, keep_rates,
                               {"max_modules": n, "rank_by": rank_by, "prune_below": None, "seed": 3})
    # ||s B A||_F computed independently of tspeft_rt.export.weight_norm (s = alpha / r = 16 / 8)
    norms = {m: torch.linalg.norm(2.0 * tensors[f"{m}.lora_B.weight"].double() @ tensors[f"{m}.lora_A.weight"].double()).item()
             for m in keep_rates}
    for name, rec in gate_config["pruned"].items():
        assert rec["weight_norm"] == pytest.approx(norms[name], rel=1e-9)
        assert rank_by in rec["reason"]
    if rank_by == "keep":
        assert min(keep_rates[m] for m in kept) >= max(keep_rates[m] for m in pruned)
        top = sorted(keep_rates, key=lambda m: -keep_rates[m])
        if keep_rates[top[n - 1]] != keep_rates[top[n]]:  # no tie at the boundary: the set is unique
            assert kept == set(top[:n])
    elif rank_by == "norm":
        assert kept == set(sorted(norms, key=lambda m: -norms[m])[:n])
    else:
        again = tmp_path / "again"
        export_checkpoint(run.run_dir, again, max_modules=n, rank_by="random", seed=3)
        assert set(json.loads((again / "token_gate_config.json").read_text())["pruned"]) == pruned
        others = []
        for seed in (4, 5):
            d = tmp_path / f"seed{seed}"
            export_checkpoint(run.run_dir, d, max_modules=n, rank_by="random", seed=seed)
            others.append(set(json.loads((d / "token_gate_config.json").read_text())["pruned"]))
        assert any(o != pruned for o in others), "the seed does not change the random choice"


def test_weight_norm_matches_frobenius_norm(runs):
    run = runs("ts-dora")
    tensors, _ = checkpoint_meta(run)
    for m in module_names(tensors):
        A, B = tensors[f"{m}.lora_A.weight"], tensors[f"{m}.lora_B.weight"]
        want = torch.linalg.norm(0.7 * B.double() @ A.double()).item()
        assert weight_norm({"lora_A.weight": A, "lora_B.weight": B}, 0.7) == pytest.approx(want, rel=1e-9)


def test_prune_below_drops_low_keep_rates(runs, tmp_path):
    run = runs("ts-lora")
    _, meta = checkpoint_meta(run)
    keep_rates = meta["keep_rates"]
    values = sorted(set(keep_rates.values()))
    assert len(values) >= 2, f"every module keeps the same fraction {values}: nothing to threshold"
    threshold = values[len(values) // 2]  # between two observed keep rates
    out = tmp_path / "pruned"
    adapter = export_checkpoint(run.run_dir, out, prune_below=threshold)
    pruned = {m for m, k in keep_rates.items() if k < threshold}
    assert set(adapter.pruned) == pruned
    assert_pruned_consistently(run.adapter_dir, out, pruned, keep_rates,
                               {"prune_below": threshold, "max_modules": None})
    for rec in adapter.pruned.values():
        assert str(threshold) in rec["reason"]


def test_pruning_changes_outputs_only_through_pruned_modules(runs, tiny_model_dir, tmp_path):
    run = runs("ts-lora")
    out = tmp_path / "pruned"
    pruned = set(export_checkpoint(run.run_dir, out, max_modules=6, rank_by="norm").pruned)
    b = batch(run.tokenizer)
    pruned_model, _ = attached(tiny_model_dir, out)
    full_model, _ = attached(tiny_model_dir, run.adapter_dir)
    full = valid_logits(full_model, b)
    got = valid_logits(pruned_model, b)
    assert max_diff(got, full) > 1e-4, "pruning 8 of 14 modules changed nothing: nothing was tested"
    layers = adapted_layers(full_model)
    assert pruned <= set(layers)
    for name in pruned:
        layers[name].lora_B.weight.data.zero_()
    assert max_diff(got, valid_logits(full_model, b)) <= 1e-6


def test_pruning_a_dense_run_is_refused(runs, tmp_path):
    """A dense run exports as plain PEFT LoRA, which cannot record pruning: refused, nothing written."""
    with pytest.raises(AdapterError, match="record pruning"):
        export_checkpoint(runs("lora").run_dir, tmp_path / "pruned", max_modules=4, rank_by="norm")
    assert not (tmp_path / "pruned").exists()


def test_cli_export_matches_api(runs, tmp_path):
    run = runs("ts-lora")
    api = tmp_path / "api"
    export_checkpoint(run.run_dir, api, max_modules=5, rank_by="norm")
    cli = tmp_path / "cli"
    r = invoke(["export", run.run_dir, cli, "--max-modules", "5", "--rank-by", "norm"])
    assert r.exit_code == 0, r.output
    assert "TS-LoRA, 5 modules, 9 pruned" in r.stdout
    a, c = read_export(api), read_export(cli)
    assert a["config"] == c["config"]
    assert a["gate_config"] == c["gate_config"]
    for kind in ("weights", "gates"):
        assert a[kind].keys() == c[kind].keys()
        assert all(torch.equal(a[kind][k], c[kind][k]) for k in a[kind])
    again = invoke(["export", run.run_dir, cli])
    assert again.exit_code != 0 and "--overwrite" in again.output
    assert invoke(["export", run.run_dir, cli, "--overwrite"]).exit_code == 0
    assert len(load_adapter(cli).modules) == N_TINY_MODULES


# ---- 4. inspect ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ts-lora", "ts-dora", "lora", "pruned"])
def test_inspect_reports_the_files(runs, tmp_path, method):
    if method == "pruned":
        d = tmp_path / "pruned"
        export_checkpoint(runs("ts-lora").run_dir, d, max_modules=5)
    else:
        d = runs(method).adapter_dir
    files = {p.name for p in d.iterdir()}
    gated = method != "lora"
    assert ({"token_gate.safetensors", "token_gate_config.json"} <= files) == gated
    size = sum((d / f).stat().st_size for f in files)
    kind = {"ts-lora": "TS-LoRA", "ts-dora": "TS-DoRA", "lora": "LoRA", "pruned": "TS-LoRA"}[method]
    targets = json.loads((d / "adapter_config.json").read_text())["target_modules"]

    r = invoke(["inspect", d, "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info == json.loads(json.dumps(describe(load_adapter(d))))
    assert info["kind"] == kind
    assert len(info["modules"]) == (5 if method == "pruned" else N_TINY_MODULES)
    assert set(info["modules"]) == set(targets)
    assert info["size_bytes"] == size
    if gated:
        gates = load_file(d / "token_gate.safetensors")
        for name, m in info["modules"].items():
            assert m["tau"] == gates[f"{PREFIX}{name}.token_gate.tau"].item()
            assert m["keep_rate"] == gates[f"{PREFIX}{name}.token_gate.keep_rate"].item()
            assert m["tau"] > 0
        assert info["pruned"] == json.loads((d / "token_gate_config.json").read_text())["pruned"]
        assert info["warning"] and "dense" in info["warning"] and "gate" in info["warning"]
    else:
        assert all(m["tau"] is None and m["keep_rate"] is None for m in info["modules"].values())
        assert info["pruned"] == {} and info["warning"] is None
    assert (len(info["pruned"]) == N_TINY_MODULES - 5) == (method == "pruned")

    text = invoke(["inspect", d])
    assert text.exit_code == 0, text.output
    warnings = [l for l in text.stdout.splitlines() if l.startswith("WARNING:")]
    assert len(warnings) == int(gated)
    assert kind in text.stdout
    for name in info["pruned"]:
        assert f"pruned {name}:" in text.stdout


# ---- 5. report -----------------------------------------------------------------------------------------


def assert_png(path: Path) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 0 and im.height > 0


def assert_table(output: str, modules: set[str]) -> list[str]:
    lines = output.splitlines()
    rows = [l for l in lines if l.split() and l.split()[0] in modules]
    assert {l.split()[0] for l in rows} == modules
    assert any(l.startswith("Spearman") for l in lines), output
    return rows


def test_report_on_run_folder(runs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(runs("ts-lora").run_dir, run_dir)
    r = invoke(["report", run_dir])
    assert r.exit_code == 0, r.output
    _, meta = checkpoint_meta(runs("ts-lora"))
    assert_table(r.stdout, set(meta["keep_rates"]))
    assert_png(run_dir / "keep_rates.png")


def test_report_on_pruned_adapter(runs, tmp_path):
    run = runs("ts-lora")
    d = tmp_path / "pruned"
    pruned = set(export_checkpoint(run.run_dir, d, max_modules=5).pruned)
    png = tmp_path / "x.png"
    r = invoke(["report", d, "--out", png])
    assert r.exit_code == 0, r.output
    rows = assert_table(r.stdout, set(json.loads((run.adapter_dir / "adapter_config.json").read_text())["target_modules"]))
    assert {l.split()[0] for l in rows if "(pruned)" in l} == pruned
    assert_png(png)
    assert not (d / "keep_rates.png").exists()


def test_report_on_plain_lora_fails_clearly(runs, tmp_path):
    png = tmp_path / "x.png"
    r = invoke(["report", runs("lora").adapter_dir, "--out", png])
    assert r.exit_code != 0
    assert "no keep rates" in r.output and "LoRA" in r.output
    assert "Traceback" not in r.output
    assert not png.exists()


# ---- 6. generate ---------------------------------------------------------------------------------------


def with_tau(src: Path, dst: Path, tau: float) -> Path:
    """A copy of the adapter directory with every tau in token_gate.safetensors set to `tau`."""
    shutil.copytree(src, dst)
    gates = load_file(dst / "token_gate.safetensors")
    gates = {k: torch.full_like(t, tau) if k.endswith(".tau") else t for k, t in gates.items()}
    save_file(gates, dst / "token_gate.safetensors", metadata={"format": "pt"})
    return dst


def cli_generate(model_dir: Path, adapter: Path | None, n: int, prompt: str = "hello") -> list[str]:
    args = ["generate", "--model", model_dir, "--json", "--max-new-tokens", n]
    if adapter is not None:
        args += ["--adapter", adapter]
    r = invoke([*args, prompt])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], str)
    return out


def test_generate_json_is_deterministic(runs, tiny_model_dir):
    d = runs("ts-lora").adapter_dir
    first = cli_generate(tiny_model_dir, d, 5)
    assert first[0]
    assert cli_generate(tiny_model_dir, d, 5) == first


@pytest.mark.parametrize("method", ["ts-lora", "ts-dora"])
def test_generate_with_gates_off_and_on(runs, tiny_model_dir, tmp_path, method):
    d = runs(method).adapter_dir
    n, prompt = 12, "The capital of France is"
    base = cli_generate(tiny_model_dir, None, n, prompt)
    off = cli_generate(tiny_model_dir, with_tau(d, tmp_path / "off", 1e30), n, prompt)
    on = cli_generate(tiny_model_dir, with_tau(d, tmp_path / "on", 0.0), n, prompt)
    assert off == base
    model, tok = attached(tiny_model_dir, d, tau=0.0)
    assert on == generate(model, tok, [prompt], max_new_tokens=n)
    assert on != base, "the dense adapter generates what the base model does: nothing was tested"
